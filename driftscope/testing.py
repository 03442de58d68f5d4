"""`driftscope.testing`: synthetic checkpoints and tokenizers, fully offline, no transformers needed; for the tests,
`driftscope demo`, and anyone who tests code on top of driftscope.

`random_checkpoint` writes a deterministic random HF-layout checkpoint (HF tensor names, config.json in either
style); `write_checkpoint` writes any state dict (single file or sharded with an index); `write_tokenizer` trains a BPE.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from driftscope.engine.config import ARCHITECTURES, ModelConfig
from driftscope.util import torch_dtype

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_checkpoint(
    path: str | Path, config: dict, state_dict: dict[str, torch.Tensor], *, shards: int = 1, dtype: str = "float32"
) -> Path:
    """Write config.json and the tensors (cast to `dtype`) as model.safetensors, or `shards` files plus an index."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if shards < 1 or shards > max(1, len(state_dict)):
        raise ValueError(f"shards={shards} must be between 1 and the number of tensors ({len(state_dict)})")
    tdtype = torch_dtype(dtype)
    config = dict(config)
    config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype  # in its style
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().to("cpu", tdtype).contiguous() for k, v in state_dict.items()}
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = list(tensors)
    per = -(-len(names) // shards)  # ceil: contiguous runs of names, as save_pretrained does
    weight_map: dict[str, str] = {}
    for s in range(shards):
        chunk = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(root / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return root


def hf_config(
    arch: str = "qwen3",
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None = None,
    intermediate_size: int,
    tie: bool = False,
    dtype: str = "float32",
    config_style: str = "rope_parameters",
    rope_theta: float = 10000.0,
) -> dict:
    """An HF config.json dict for `arch` in either style (transformers 5 `rope_parameters`+`dtype`, or older)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not supported; expected one of {', '.join(ARCHITECTURES)}")
    if config_style not in ("rope_parameters", "rope_theta"):
        raise ValueError(f"config_style={config_style!r}; expected 'rope_parameters' or 'rope_theta'")
    cfg: dict = {
        "architectures": [ARCHITECTURES[arch]["class"]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if head_dim is not None or arch == "qwen3":
        cfg["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    if arch in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    if arch == "mistral":
        cfg["sliding_window"] = None
    if config_style == "rope_parameters":
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, dtype=dtype)
    else:
        cfg.update(rope_theta=rope_theta, rope_scaling=None, torch_dtype=dtype)
    return cfg


def random_state_dict(config: ModelConfig, *, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights under HF names: matrices ~ N(0, std), norms ~ 1 + N(0, 0.1),
    biases ~ N(0, std)."""
    from driftscope.engine.loader import expected_weights  # the weight-name table is the one source of names/shapes

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, target in expected_weights(config).items():
        t = torch.randn(target.shape, generator=gen)
        out[name] = 1.0 + 0.1 * t if name.endswith("norm.weight") else std * t
    return out


def random_checkpoint(path: str | Path, arch: str = "qwen3", *, seed: int = 0, shards: int = 1, **config: Any) -> dict:
    """Write a deterministic random checkpoint that both driftscope and transformers can load; returns config.json's
    dict. `config`: `hf_config`'s keywords (vocab_size, hidden_size, ..., dtype, config_style)."""
    cfg = hf_config(arch, **config)
    sd = random_state_dict(ModelConfig.from_dict(cfg, source=f"random_checkpoint({arch})"), seed=seed)
    write_checkpoint(path, cfg, sd, shards=shards, dtype=config.get("dtype", "float32"))
    return cfg


def write_tokenizer(path: str | Path, corpus: list[str], vocab_size: int = 300) -> Path:
    """Train a byte-level BPE on `corpus`; save tokenizer.json + tokenizer_config.json (Qwen-style chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not corpus:
        raise ValueError("corpus is empty; write_tokenizer needs some text to train on")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(root / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")
    return root
