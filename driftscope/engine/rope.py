"""Rotary position embeddings of every rope type transformers implements for the Llama family, computed as its
`modeling_rope_utils` does: inverse frequencies (default, linear, dynamic, yarn, longrope, llama3) over the first
`rotary_dim` dims of a head, the attention factor that scales cos/sin (yarn, longrope), and the in-place rotation.

Dynamic NTK and longrope depend on the sequence length: transformers recomputes them from max(position_ids) + 1 of
the forward. `inv_freq_per_token` gives every token the frequencies of the sequence length it is computed under
(`seq_lens [T]`), so each sequence of a packed batch equals that sequence run alone; a decode step passes its
position + 1, as transformers' cached generate does (earlier keys keep the rotation they were cached with).
"""
from __future__ import annotations

import math

import torch

from driftscope.engine.config import ModelConfig


def _rope_dim(c: ModelConfig) -> int:  # the `dim` of transformers' formulas: int(head_dim · partial_rotary_factor)
    return int(c.head_dim * c.partial_rotary_factor)


def _powers(c: ModelConfig) -> torch.Tensor:  # [rotary_dim/2] fp32: 2i / dim
    dim = _rope_dim(c)
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _factor(c: ModelConfig) -> float:  # yarn/longrope: factor, or the context ratio when the config gives none
    s = c.rope_scaling
    if s.get("factor") is not None:
        return s["factor"]
    return c.max_position_embeddings / s["original_max_position_embeddings"]


def _longrope(c: ModelConfig, which: str) -> torch.Tensor:
    ext = torch.tensor(c.rope_scaling[which], dtype=torch.float32)
    return 1.0 / (ext * c.rope_theta ** _powers(c))


def _yarn(c: ModelConfig) -> torch.Tensor:
    s, dim, base = c.rope_scaling, _rope_dim(c), c.rope_theta
    factor, old_len = _factor(c), s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim index that turns `rotations` times over old_len
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** _powers(c)
    extrapolation = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate by factor (slow dims)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3(c: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    s = c.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    """[rotary_dim/2] float32 inverse frequencies of a sequence within the length limit (dynamic: the plain ones,
    longrope: the short factors)."""
    t = c.rope_type
    if t == "yarn":
        return _yarn(c)
    if t == "longrope":
        return _longrope(c, "short_factor")
    inv_freq = 1.0 / (c.rope_theta ** _powers(c))
    if t == "linear":
        return inv_freq / c.rope_scaling["factor"]
    if t == "llama3":
        return _llama3(c, inv_freq)
    assert t in ("default", "dynamic"), t
    return inv_freq


def rope_attention_factor(c: ModelConfig) -> float:
    """The factor transformers multiplies cos and sin by (so q·k by its square): yarn's mscale, longrope's
    sqrt(1 + log(factor) / log(original context)), or the config's attention_factor; 1 for the other types."""
    s = c.rope_scaling
    if c.rope_type not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    factor = _factor(c)
    if c.rope_type == "longrope":
        old_len = s["original_max_position_embeddings"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
    return mscale(factor)


def length_limit(c: ModelConfig) -> int | None:
    """The sequence length past which the frequencies change (dynamic: max_position_embeddings, longrope:
    original_max_position_embeddings); None for the types that do not depend on it."""
    if c.rope_type == "dynamic":
        return c.max_position_embeddings
    if c.rope_type == "longrope":
        return int(c.rope_scaling["original_max_position_embeddings"])
    return None


def inv_freq_per_token(c: ModelConfig, inv_freq: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor | None:
    """[T, rotary_dim/2] fp32 frequencies for tokens computed under sequence lengths `seq_lens [T]` int64, or None
    when no token is past `length_limit` (then every token uses `inv_freq`)."""
    limit = length_limit(c)
    if limit is None or not bool((seq_lens > limit).any()):
        return None
    long = (seq_lens > limit)[:, None]  # [T, 1]
    if c.rope_type == "longrope":
        return torch.where(long, _longrope(c, "long_factor").to(inv_freq.device), inv_freq)
    # dynamic NTK, transformers' float32 arithmetic on the tensor max(position_ids) + 1
    dim, factor = _rope_dim(c), c.rope_scaling["factor"]
    s = torch.maximum(seq_lens, torch.tensor(limit, dtype=seq_lens.dtype, device=seq_lens.device))
    base = c.rope_theta * ((factor * s / limit) - (factor - 1)) ** (dim / (dim - 2))  # [T]
    scaled = 1.0 / (base[:, None] ** _powers(c).to(base.device)[None, :])  # [T, rotary_dim/2]
    return torch.where(long, scaled, inv_freq)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first 2·R dims of x [T, H, D] in place (rotate-half within them, the rest passes through):
    (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin) with x1 = x[..., :R], x2 = x[..., R:2R].

    cos/sin: [T, 1, R]. One temporary of x1's size instead of transformers' four full-size ones.
    """
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]  # views, [T, H, R]
    x1_sin = x1 * sin
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)
    x2.mul_(cos).add_(x1_sin)
