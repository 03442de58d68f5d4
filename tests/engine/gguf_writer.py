"""Test-side HF folder -> GGUF writer, mirroring llama.cpp's convert_hf_to_gguf.py for llama / qwen2 / qwen3.

What it mirrors: the metadata keys (TextModel.set_gguf_parameters + LlamaModel's vocab_size / rope.dimension_count),
tensor names from gguf's own TensorNameMap, llama's q/k row permutation (LlamaModel.permute), 1-D tensors kept F32
and 2-D ones stored as the requested type (gguf.quants.quantize), and the gpt2 tokenizer metadata as llama.cpp writes
it (tokens by id padded with [PADn], token types CONTROL / USER_DEFINED for added tokens, merges, pre, special ids,
add_bos_token, chat_template). It is written from the gguf library and the HF files only, never from driftscope.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
Q = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: each head's rows (2, d/2) -> (d/2, 2)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg: dict) -> tuple[float, dict]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta), params


def _tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int, pre: str, model: str) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if tj["model"].get("byte_fallback"):
        return _spm_tokenizer(w, tj, tcfg)
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id |= {i: a["content"] for i, a in added.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok is not None:
            add(ids[tok])
    if "add_bos_token" in tcfg:
        w.add_add_bos_token(bool(tcfg["add_bos_token"]))
    if tcfg.get("chat_template") is not None:
        w.add_chat_template(tcfg["chat_template"])


def _spm_tokenizer(w: gguf.GGUFWriter, tj: dict, tcfg: dict) -> None:
    """A SentencePiece-style BPE (byte_fallback, <0xXX> byte tokens) as convert_hf_to_gguf.py's
    _set_vocab_sentencepiece writes one: model "llama", scores as in a SentencePiece BPE model (-merge rank; 0 for
    pieces no merge makes), token types NORMAL / UNKNOWN / CONTROL / BYTE, add_space_prefix."""
    vocab, added = tj["model"]["vocab"], {a["content"]: a for a in tj.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    rank = {m.replace(" ", ""): -1.0 - j for j, m in enumerate(merges)}
    tokens = sorted(vocab, key=vocab.get)
    unk = tj["model"].get("unk_token")

    def kind(t: str) -> gguf.TokenType:
        if t == unk:
            return gguf.TokenType.UNKNOWN
        if t in added:
            return gguf.TokenType.CONTROL
        return gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else gguf.TokenType.NORMAL

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([rank.get(t, 0.0) for t in tokens])
    w.add_token_types([kind(t) for t in tokens])
    w.add_add_space_prefix(True)
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("unk_token", w.add_unk_token_id)):
        if tcfg.get(key) is not None:
            add(vocab[tcfg[key]])
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", True)))
    if tcfg.get("chat_template") is not None:
        w.add_chat_template(tcfg["chat_template"])


def write_gguf(folder: Path, out: Path, qtype: Q = Q.F32, *, pre: str = "gpt-2", arch: str | None = None,
               tokenizer_model: str = "gpt2", tensors: dict[str, np.ndarray | None] | None = None) -> Path:
    """Convert the HF checkpoint `folder` (config.json, model.safetensors, tokenizer files) to the GGUF `out`.
    For refusal tests: `arch` overrides general.architecture, `tokenizer_model` tokenizer.ggml.model, and `tensors`
    (GGUF name -> array, its numpy dtype giving the GGML type, or None) replaces, adds or drops tensors."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = cfg["model_type"]
    name = arch or model_type
    w = gguf.GGUFWriter(str(out), name)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    theta, scaling = _rope(cfg)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_file_type({Q.F32: 0, Q.F16: 1}.get(qtype, 7))
    if model_type == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    _tokenizer(w, folder, cfg["vocab_size"], pre, tokenizer_model)

    names = gguf.get_tensor_name_map(ARCHS[model_type], cfg["num_hidden_layers"])
    for hf, data in load_file(str(folder / "model.safetensors")).items():
        data = data.astype(np.float32)
        if model_type == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, heads, heads)
        if model_type == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, heads, kv)
        gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert gname is not None, hf
        t = qtype if data.ndim == 2 else Q.F32
        if gname not in (tensors or {}):
            w.add_tensor(gname, gguf.quants.quantize(data, t), raw_dtype=t)  # a uint8 array: byte shape -> shape
    for gname, raw in (tensors or {}).items():
        if raw is not None:
            w.add_tensor(gname, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
