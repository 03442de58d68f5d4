"""The tokenizer of a GGUF file, rebuilt from its tokenizer.ggml.* metadata with the `tokenizers` library: byte-level
BPE (tokenizer.ggml.model "gpt2") from the tokens and merges, split first by llama.cpp's pre-tokenizer regexes for
tokenizer.ggml.pre (src/llama-vocab.cpp), or SentencePiece BPE ("llama") from the tokens and scores; control and
user-defined tokens as added tokens; tokenizer.chat_template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken

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
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _merge_pairs(path: Path, merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for i, m in enumerate(merges):
        pair = tuple(m.split(" ", 1))
        if len(pair) != 2:
            raise InputError(f"{path}: tokenizer.ggml.merges[{i}]={m!r} is not two tokens separated by a space")
        pairs.append(pair)
    return pairs


def _bpe(path: Path, tokens: list[str], merges: list[str], pre: str):
    """Byte-level BPE ("gpt2"): llama.cpp's regexes for `pre`, then bytes -> the GPT-2 unicode alphabet."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{', '.join(PRE_TOKENIZERS)}")
    regexes, ignore_merges, nfc = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(path, merges), ignore_merges=ignore_merges,
                                 fuse_unk=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a token into two tokens, the best-scored result first (the pair
    llama.cpp's SPM tokenizer merges first); ties as transformers orders them (longer left piece first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = [((-score, -i, i - len(t), vocab[t], vocab[t[:i]]), t[:i], t[i:])  # the key is unique per pair
             for t, score in zip(tokens, scores) for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
    return [(left, right) for _, left, right in sorted(found)]


def _spm(path: Path, tokens: list[str], scores: list[float], unk: int | None, prefix: bool):
    """SentencePiece ("llama"): spaces as "▁", a leading "▁" per text piece when add_space_prefix (as llama.cpp and
    Llama-2's tokenizer.json do), BPE by score, byte tokens <0xXX> for anything else."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    if len(scores) != len(tokens):
        raise InputError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores), byte_fallback=True,
                                 fuse_unk=True, unk_token=None if unk is None else tokens[unk]))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def gguf_tokenizer(path: Path, cls: type) -> Any:
    """`cls(...)` (engine.tokenizer.Tokenizer) built from the GGUF file's tokenizer metadata."""
    r = reader(path)

    def get(key: str, default: Any = None) -> Any:
        return field(r, path, key, default)

    model = get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise InputError(f"{path}: tokenizer.ggml.model={model!r} is not supported; supported: 'gpt2' (byte-level "
                         "BPE), 'llama' (SentencePiece BPE); use the HF checkpoint folder's tokenizer")
    tokens = get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise InputError(f"{path}: metadata key 'tokenizer.ggml.tokens' is missing or empty")
    types = get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise InputError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    def special(key: str) -> int | None:
        tid = get(f"tokenizer.ggml.{key}")
        if tid is not None and not 0 <= tid < len(tokens):
            raise InputError(f"{path}: tokenizer.ggml.{key}={tid} is outside the vocabulary (0..{len(tokens) - 1})")
        return tid

    ids = {k: special(f"{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")}
    if model == "gpt2":
        tok = _bpe(path, tokens, get("tokenizer.ggml.merges") or [], get("tokenizer.ggml.pre", "default"))
    else:
        tok = _spm(path, tokens, get("tokenizer.ggml.scores") or [], ids["unknown"],
                   get("tokenizer.ggml.add_space_prefix", True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                    if k == USER_DEFINED])
    if get("tokenizer.ggml.add_bos_token", model == "llama") and ids["bos"] is not None:  # llama.cpp's defaults
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
