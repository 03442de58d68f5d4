"""The tokenizer of a GGUF file, rebuilt from its tokenizer.ggml.* metadata with the `tokenizers` library: byte-level
BPE (tokenizer.ggml.model "gpt2") from the tokens and merges, split first by llama.cpp's pre-tokenizer regexes for
tokenizer.ggml.pre (src/llama-vocab.cpp); control and user-defined tokens as added tokens; tokenizer.chat_template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from driftscope.engine.gguf import field, reader
from driftscope.errors import InputError

# llama.cpp's regexes, applied in order (each splits the pieces of the one before; unmatched text stays a piece)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
           r"|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
          r"|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
# tokenizer.ggml.pre -> (regexes, ignore_merges: a piece that is a whole token is taken as is, as llama.cpp does for
# llama3, normalize NFC: as the checkpoint's tokenizer.json does for Qwen2)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    "gpt-2": ((_GPT2,), False, False),
    "smollm": ((r"\p{N}", _GPT2), False, False),
    "starcoder": ((r"\p{N}", _GPT2), False, False),
    "refact": ((r"\p{N}", _GPT2), False, False),
    "llama-bpe": ((_LLAMA3,), True, False),
    "llama3": ((_LLAMA3,), True, False),
    "llama-v3": ((_LLAMA3,), True, False),
    "qwen2": ((_QWEN2,), False, True),
    "deepseek-r1-qwen": ((_QWEN2,), False, True),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _build(path: Path, tokens: list[str], merges: list[str], pre: str, types: list[int]):
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{', '.join(PRE_TOKENIZERS)}")
    regexes, ignore_merges, nfc = PRE_TOKENIZERS[pre]
    pairs = []
    for i, m in enumerate(merges):
        pair = tuple(m.split(" ", 1))
        if len(pair) != 2:
            raise InputError(f"{path}: tokenizer.ggml.merges[{i}]={m!r} is not two tokens separated by a space")
        pairs.append(pair)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def gguf_tokenizer(path: Path, cls: type) -> Any:
    """`cls(...)` (engine.tokenizer.Tokenizer) built from the GGUF file's tokenizer metadata."""
    r = reader(path)

    def get(key: str, default: Any = None) -> Any:
        return field(r, path, key, default)

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise InputError(f"{path}: tokenizer.ggml.model={model!r} is not supported; supported: 'gpt2' (byte-level "
                         "BPE); use the HF checkpoint folder's tokenizer")
    tokens = get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise InputError(f"{path}: metadata key 'tokenizer.ggml.tokens' is missing or empty")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise InputError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tok = _build(path, tokens, get("tokenizer.ggml.merges") or [], get("tokenizer.ggml.pre", "default"), types)

    def special(key: str) -> int | None:
        tid = get(f"tokenizer.ggml.{key}")
        if tid is not None and not 0 <= tid < len(tokens):
            raise InputError(f"{path}: tokenizer.ggml.{key}={tid} is outside the vocabulary (0..{len(tokens) - 1})")
        return tid

    ids = {k: special(f"{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")}
    if get("tokenizer.ggml.add_bos_token", False) and ids["bos"] is not None:
        from tokenizers import processors

        bos = tokens[ids["bos"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, ids["bos"])])
    templates = {"default": t} if (t := get("tokenizer.chat_template")) is not None else {}
    for name in get("tokenizer.chat_templates") or []:
        if (t := get(f"tokenizer.chat_template.{name}")) is not None:
            templates[name] = t
    ends = [ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None]

    def text(k: str) -> str | None:
        return None if ids[k] is None else tokens[ids[k]]

    return cls(tok, path, bos_token=text("bos"), eos_token=text("eos"), pad_token=text("padding"),
               unk_token=text("unknown"), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
               pad_token_id=ids["padding"], eos_token_ids=tuple(dict.fromkeys(ends)), chat_template=templates,
               chat_template_source=f"{path} (tokenizer.chat_template)" if templates else None)
