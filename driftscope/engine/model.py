"""One decoder-only transformer for the Llama/Mistral/Qwen2/Qwen3 family, over packed variable-length batches.

Input: `input_ids [T]` int64 + `cu_seqlens [B+1]` int32 (causal within each sequence, no padding); q/k/v and
gate/up are fused into one GEMM each. Everything runs under torch.inference_mode(). Weights come from `loader.py`.
A `LayerBatch` with `kv` set runs a generation step against a paged KV cache (see `engine/kv_cache.py`).
Layers with a sliding window (`ModelConfig.layer_windows`) attend to keys q - window < k <= q, in prefill, trees and
decode alike; rope tables follow `engine/rope.py` (every transformers rope type, partial rotary dims).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from driftscope.engine import decode_layer
from driftscope.engine.config import ModelConfig
from driftscope.engine.layer_batch import KVStep, LayerBatch, SharedPrefix
from driftscope.engine.rope import apply_rope_, inv_freq_per_token, length_limit, rope_attention_factor, rope_inv_freq
from driftscope.errors import InputError
from driftscope.kernels import glue
from driftscope.kernels.attention import tree_attention, varlen_attention
from driftscope.kernels.linear import linear, row_block
from driftscope.kernels.paged_attention import paged_decode_attention
from driftscope.kernels.scratch import scratch


class LowRank(nn.Module):
    """A low-rank side path on one linear site: h = x · aᵀ, then y[rows of part p] += h[:, cols of p] · b_pᵀ. A fused
    site (q|k|v, gate|up) stacks its parts' a; each part's b_p [out_p, r_p] (LoRA scaling folded in) writes its own
    rows, so no block-diagonal b is stored. Non-persistent buffers: they follow .to() and stay out of state_dict.
    Built by engine/lora.attach."""

    def __init__(self, a: torch.Tensor, b: Sequence[torch.Tensor], rows: Sequence[int]):
        super().__init__()
        assert len(b) == len(rows) and a.shape[0] == sum(t.shape[1] for t in b), (a.shape, [t.shape for t in b])
        self.register_buffer("a", a, persistent=False)  # [R, in], R = Σ r_p
        for p, t in enumerate(b):
            self.register_buffer(f"b{p}", t, persistent=False)  # [out_p, r_p]
        self.rows = tuple(rows)  # per part: the first output row it writes

    @property
    def b(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"b{p}") for p in range(len(self.rows)))

    def add_(self, y: torch.Tensor, x: torch.Tensor) -> None:  # y [T, out] += side path of x [T, in], in place
        h = linear(x, self.a)  # [T, R]
        if len(self.rows) == 1 and self.b0.shape[0] == y.shape[1]:
            y.add_(linear(h, self.b0))
            return
        col = 0
        for b, row in zip(self.b, self.rows):
            y[:, row : row + b.shape[0]].add_(linear(h[:, col : col + b.shape[1]], b))
            col += b.shape[1]


def _side_(y: torch.Tensor, lora: nn.ModuleDict | None, site: str, x: torch.Tensor) -> torch.Tensor:
    """y [T, out] += the side path of `site` applied to x [T, in], in place; y itself when there is none."""
    if lora is not None and site in lora:
        lora[site].add_(y, x)
    return y


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [T, d] after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None  # L+1 × [T, d] (transformers' convention) or None


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:  # [..., d] fp32 -> [..., 1] = 1/sqrt(mean(x²) + eps)
    # vector_norm reduces without materializing x² (torch's rms_norm on CPU is composite: pow, mean, mul): 2x faster
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.rsqrt(r.square_().div_(x.shape[-1]).add_(eps))


def rms_norm_(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In-place RMSNorm over the last dim, transformers' rounding: normalize in fp32, cast, then scale."""
    if x.dtype == torch.float32:
        x.mul_(_rstd(x, eps)).mul_(weight)
    else:
        xf = x.float()
        x.copy_(xf.mul_(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))))
        x.mul_(weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim], new tensor
        if x.dtype == torch.float32:
            if x.dim() == 2 and glue.use_cpp(x):
                return glue.rms_norm(x, self.weight, self.eps)
            return torch.mul(x, _rstd(x, self.eps)).mul_(self.weight)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = c.layer_windows[layer_idx]  # None: full causal attention
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        self.eps = c.rms_norm_eps
        kw = {"device": device, "dtype": dtype}
        self.wqkv = nn.Linear(c.hidden_size, c.q_size + 2 * c.kv_size, bias=c.qkv_bias, **kw)  # rows: q | k | v
        self.wo = nn.Linear(c.q_size, c.hidden_size, bias=c.o_bias, **kw)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **kw) if c.qk_norm else None
        self.lora: nn.ModuleDict | None = None  # LowRank side paths on "wqkv" / "wo" (engine/lora.attach)

    def forward(self, x: torch.Tensor, batch: LayerBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, d] -> [T, d]; `rows` (int64 [R]): only those positions' outputs, [R, d] (every position's keys and
        values are still computed and attended to)."""
        T = x.shape[0]
        hq, hkv = self.n_heads, self.n_kv_heads
        w = self.wqkv.weight
        qkv = _side_(linear(x, w, self.wqkv.bias, out=scratch("attn.qkv", (T, w.shape[0]), x.dtype, x.device)),
                     self.lora, "wqkv", x)  # [T, (Hq + 2·Hkv)·D]
        qkv = qkv.view(T, hq + 2 * hkv, self.head_dim)  # [T, Hq + 2·Hkv, D]
        if self.q_norm is not None:
            rms_norm_(qkv[:, :hq], self.q_norm.weight, self.eps)
            rms_norm_(qkv[:, hq : hq + hkv], self.k_norm.weight, self.eps)
        if glue.use_cpp(qkv) and qkv.is_contiguous():  # q and k in one pass
            glue.rope_cache_write_(qkv, batch.cos, batch.sin, None, None, None, hq, hkv)
        else:
            apply_rope_(qkv[:, : hq + hkv], batch.cos, batch.sin)
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
        kv = batch.kv
        if batch.shared is not None:  # each sample as a whole sequence (its prefix keys copied in), read back
            sh = batch.shared
            full = torch.index_select(qkv, 0, sh.gather, out=scratch(
                "attn.qkv_full", (sh.gather.shape[0], *qkv.shape[1:]), x.dtype, x.device))
            o = varlen_attention(full[:, :hq], full[:, hq : hq + hkv], full[:, hq + hkv :], sh.cu_seqlens,
                                 sh.max_seqlen, self.scale, self.window)
            o = o.reshape(o.shape[0], hq * self.head_dim).index_select(0, sh.back if rows is None else sh.back[rows])
            return _side_(linear(o, self.wo.weight, self.wo.bias), self.lora, "wo", o)
        if batch.masks is not None:
            masks = batch.masks if self.window is None else batch.window_masks
            assert masks is not None, "a windowed layer needs LayerBatch.window_masks (Transformer.prepare_tree)"
            o = tree_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, self.scale, masks)
        elif kv is None:
            o = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, self.scale, self.window)  # [T, Hq, D]
        else:
            o = self._cached_attention(q, k, v, batch, kv)
        o = o.reshape(T, hq * self.head_dim)
        if rows is not None:
            o = o.index_select(0, rows)
        return _side_(linear(o, self.wo.weight, self.wo.bias), self.lora, "wo", o)

    def _cached_attention(self, q, k, v, batch: LayerBatch, kv: KVStep) -> torch.Tensor:  # -> [T, Hq, D]
        """Write the step's keys/values into the cache; decode tokens attend to their cached context, prefill
        sequences (all their tokens new) to themselves through the varlen kernel."""
        kc, vc = kv.k[self.layer_idx], kv.v[self.layer_idx]  # [S, Hkv, D]
        kc.index_copy_(0, kv.slot_mapping, k)
        vc.index_copy_(0, kv.slot_mapping, v)
        nd, T = kv.n_decode, q.shape[0]
        if nd == 0:
            return varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, self.scale, self.window)
        dec = paged_decode_attention(q[:nd], kc, vc, kv.gather, kv.key_mask, kv.block_tables, kv.context_lens,
                                     kv.block_size, self.scale, self.window)  # [nd, Hq, D]
        if nd == T:
            return dec
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out[:nd] = dec
        out[nd:] = varlen_attention(q[nd:], k[nd:], v[nd:], batch.cu_seqlens, batch.max_seqlen, self.scale,
                                    self.window)
        return out


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.inter = c.intermediate_size
        kw = {"device": device, "dtype": dtype}
        self.w_gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias, **kw)  # rows: gate | up
        self.w_down = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, **kw)
        self.lora: nn.ModuleDict | None = None  # LowRank side paths on "w_gate_up" / "w_down" (engine/lora.attach)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, d]
        rows = row_block(x, 2 * self.inter)  # blocks whose gate|up output oneDNN's GEMM can take (kernels/linear.py)
        if rows is None:
            return self._rows(x)
        return torch.cat([self._rows(x[r0 : r0 + rows]) for r0 in range(0, x.shape[0], rows)])

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        gu = linear(x, self.w_gate_up.weight, self.w_gate_up.bias,
                    out=scratch("mlp.gate_up", (x.shape[0], 2 * self.inter), x.dtype, x.device))
        gu = _side_(gu, self.lora, "w_gate_up", x)  # [T, 2I], reused memory (kernels/scratch.py)
        if glue.use_cpp(gu):
            g = glue.silu_mul(gu)  # [T, I], contiguous (oneDNN copies a strided one)
        else:
            g = gu[:, : self.inter]  # [T, I] view with row stride 2I: MKL takes it without a copy
            F.silu(g, inplace=True).mul_(gu[:, self.inter :])
        return _side_(linear(g, self.w_down.weight, self.w_down.bias), self.lora, "w_down", g)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device=device, dtype=dtype)
        self.attn = Attention(c, layer_idx, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(c, device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, batch: LayerBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, d] -> new [T, d] (h is not modified); with `rows` (int64 [R]) only those positions' outputs, [R, d]:
        attention still reads every position's keys and values, the output projection and the MLP run on R rows."""
        if rows is None and batch.kv is not None and decode_layer.takes(self, h, batch):
            return decode_layer.decode_block(self, h, batch)  # the same arithmetic in ~10 calls (a decode step)
        a = self.attn(self.attn_norm(h), batch, rows)
        h = h if rows is None else h.index_select(0, rows)
        if glue.use_cpp(a):  # the residual add and the next norm in one pass
            r, x = glue.add_rms_norm(h, a, self.mlp_norm.weight, self.mlp_norm.eps)
        else:
            r = h + a
            x = self.mlp_norm(r)
        return r.add_(self.mlp(x))


def _shown(x) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _int_vector(name: str, x, device, expected: str, dtypes=(torch.int32, torch.int64)) -> torch.Tensor:
    """x as a 1-D tensor of one of `dtypes`: a tensor as it is, a list or tuple of ints as a new int64 tensor on
    `device`; InputError naming `name`, what was given and `expected` otherwise."""
    if isinstance(x, (list, tuple)) and all(isinstance(v, Integral) and not isinstance(v, bool) for v in x):
        x = torch.tensor([int(v) for v in x], dtype=torch.int64, device=device)
    if not (isinstance(x, torch.Tensor) and x.dim() == 1 and x.dtype in dtypes):
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
            f"{type(x).__name__} {_shown(x)}"
        raise InputError(f"{name} must be {expected}; got {got}")
    return x


def _window_mask(mask: torch.Tensor | None, pos: torch.Tensor, window: int) -> torch.Tensor | None:
    """A tree sequence's mask (None = causal) restricted to keys within `window` positions of the query."""
    n = pos.shape[0]
    if n == 0 or int(pos.max() - pos.min()) < window:
        return mask  # every pair is within the window
    base = torch.ones(n, n, dtype=torch.bool, device=pos.device).tril() if mask is None else mask.to(pos.device)
    return base & (pos[:, None] - pos[None, :] < window)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        c = self.config = config
        kw = {"device": device, "dtype": dtype}
        # on the meta device (the loaders' way: every weight is loaded after) `_weight` skips nn.Embedding's normal_
        # init, which there imports torch._dynamo: 1.0-1.4 s of every command's start (measured)
        meta = torch.empty(c.vocab_size, c.hidden_size, **kw) if torch.device(device or "cpu").type == "meta" else None
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, _weight=meta, **kw)
        self.layers = nn.ModuleList(Block(c, i, **kw) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.output = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw)
        self.inv_freq = rope_inv_freq(c)  # [R] float32 on CPU; not a parameter (never in a checkpoint)
        self.rope_scale = rope_attention_factor(c)  # multiplies cos and sin (yarn, longrope)
        self._head: torch.Tensor | None = None  # a tied head's copy on another device (place_head)
        self.requires_grad_(False)

    @property
    def lm_head_weight(self) -> torch.Tensor:  # [V, d]
        if self.output is not None:
            return self.output.weight
        return self.tok_embeddings.weight if self._head is None else self._head

    def place_head(self, device: torch.device | str) -> None:
        """Keep the LM head on `device`, where another model's states meet this one's for the vocab probe (a model
        per device): moved when untied, a copy when tied (the embedding stays). `logits` then needs one device."""
        if self.output is not None:
            self.output.to(device)
        else:
            self._head = self.tok_embeddings.weight.to(device)  # the weight itself when already there

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def rope_key(self) -> tuple:
        """Equal for models whose `rope_tables` agree for any input: they can share one LayerBatch per batch."""
        c = self.config
        return (self.dtype, self.inv_freq.numpy().tobytes(), self.rope_scale, length_limit(c),
                repr(sorted(c.rope_scaling.items())) if length_limit(c) is not None else None)

    @property
    def length_dependent_rope(self) -> bool:  # dynamic / longrope: frequencies depend on the sequence length
        return length_limit(self.config) is not None

    @torch.inference_mode()
    def rope_tables(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, R] in the model dtype for int64 positions [T], computed in fp32 as transformers does.
        `seq_lens [T]`: the sequence length each token is computed under (max position + 1 of its forward), which
        dynamic and longrope rope depend on; None: every token within the length limit."""
        inv = self.inv_freq.to(positions.device)
        per = None if seq_lens is None else inv_freq_per_token(self.config, inv, seq_lens.to(positions.device))
        freqs = positions.float()[:, None] * (inv[None, :] if per is None else per)  # [T, R] fp32
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos.to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    def _ids(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """input_ids as an int64 tensor [T] (a list of ints goes to the model's device), T > 0, every id in the
        vocabulary; InputError naming input_ids otherwise."""
        ids = _int_vector("input_ids", input_ids, self.device, "a 1-D int64 tensor or a list of token ids [T]",
                          (torch.int64,))
        if ids.shape[0] == 0:
            raise InputError("input_ids is empty")
        lo, hi = (int(x) for x in torch.aminmax(ids))
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"input_ids holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, "
                             f"{self.config.vocab_size}) of {self.config.source}")
        return ids

    def _packing(self, input_ids, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(input_ids, cu_seqlens int32 on the ids' device, sequence lengths) after checking the packing (lists of
        ints are taken too); InputError naming the argument, what was given and what is expected otherwise."""
        ids = self._ids(input_ids)
        T, dev = ids.shape[0], ids.device
        expected = f"a 1-D int32/int64 tensor or a list of ints [B+1] that start at 0, are non-decreasing and end " \
                   f"at T={T} = len(input_ids)"
        cu = torch.tensor([0, T], device=dev) if cu_seqlens is None else _int_vector("cu_seqlens", cu_seqlens, dev,
                                                                                     expected)
        bounds = cu.tolist()
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise InputError(f"cu_seqlens must be {expected}; got {_shown(bounds)}")
        return ids, cu.to(dev, torch.int32), [e - s for s, e in zip(bounds[:-1], bounds[1:])]

    @torch.inference_mode()
    def prepare(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, prefix: int = 0,
                ) -> LayerBatch:
        """Check the packing and compute positions and rope tables once per batch. `prefix` > 0: sequence 0 (that
        many tokens) is a prefix every later sequence continues (engine.data.share_prefix): their positions start
        at `prefix` and they attend to its keys, as if each had its own copy."""
        input_ids, cu_seqlens, lengths = self._packing(input_ids, cu_seqlens)
        T, dev = input_ids.shape[0], input_ids.device
        if prefix:
            return self._prepare_shared(input_ids, cu_seqlens, lengths, prefix)
        lens = torch.tensor(lengths, device=dev)
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens, output_size=T)
        seq_lens = torch.repeat_interleave(lens, lens, output_size=T) if self.length_dependent_rope else None
        cos, sin = self.rope_tables(torch.arange(T, device=dev) - starts, seq_lens)  # positions restart per sequence
        return LayerBatch(cu_seqlens=cu_seqlens, max_seqlen=max(lengths), cos=cos, sin=sin)

    def _prepare_shared(self, input_ids, cu_seqlens, lengths: list[int], prefix: int) -> LayerBatch:
        if len(lengths) < 2 or lengths[0] != prefix or min(lengths[1:]) < 1:
            raise ValueError(f"prefix={prefix}: sequence 0 must be the prefix ({lengths[0]} tokens) and every later "
                             f"sequence nonempty, got lengths {_shown(lengths)}")
        if self.length_dependent_rope:  # each sample's rope would depend on its own length, the prefix's too
            raise ValueError(f"{self.config.source}: rope_type={self.config.rope_type!r} depends on the sequence "
                             "length, so its samples cannot share a prefix's states; run without prefix sharing")
        shared, positions = SharedPrefix.of(cu_seqlens.tolist(), prefix, input_ids.device)
        cos, sin = self.rope_tables(positions)
        return LayerBatch(cu_seqlens=cu_seqlens, max_seqlen=max(lengths), cos=cos, sin=sin, shared=shared)

    @torch.inference_mode()
    def prepare_tree(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor,
                     masks: tuple) -> LayerBatch:
        """A batch of sequences with explicit positions [T] and per-sequence attention masks (None = causal):
        shared-prefix trees, where each branch continues the prefix's positions (eval.loglik)."""
        input_ids, cu_seqlens, lengths = self._packing(input_ids, cu_seqlens)
        if positions.shape != input_ids.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}")
        positions, c = positions.to(input_ids.device), self.config
        bounds = list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
        seq_lens = None
        if self.length_dependent_rope:  # each sequence under its own max position + 1, as it runs alone
            ends = [int(positions[s:e].max()) + 1 if e > s else 0 for s, e in bounds]
            over = [n for (n, m) in zip(ends, masks) if m is not None and n > length_limit(c)]
            if over:
                raise ValueError(f"{c.source}: rope_type={c.rope_type!r} changes its frequencies past length "
                                 f"{length_limit(c)}, so a shared-prefix tree of length {over[0]} has no exact "
                                 "equivalent; score these sequences without prefix sharing")
            seq_lens = torch.repeat_interleave(torch.tensor(ends, device=positions.device),
                                               torch.tensor(lengths, device=positions.device))
        cos, sin = self.rope_tables(positions, seq_lens)
        window_masks = None
        if c.sliding_window is not None and any(w is not None for w in c.layer_windows):
            window_masks = tuple(_window_mask(m, positions[s:e], c.sliding_window) for (s, e), m in zip(bounds, masks))
        return LayerBatch(cu_seqlens=cu_seqlens, max_seqlen=max(lengths), cos=cos, sin=sin, masks=tuple(masks),
                          window_masks=window_masks)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, d]
        return F.embedding(input_ids, self.tok_embeddings.weight)

    @torch.inference_mode()
    def final_norm(self, h: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, d]
        return self.norm(h)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, output_hidden_states: bool = False,
        batch: LayerBatch | None = None, rows: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """`rows` (int64 [R]): `hidden` of those positions only, [R, d] (the last layer computes just them)."""
        if rows is not None and output_hidden_states:
            raise ValueError("rows and output_hidden_states exclude each other: the states are of every position")
        input_ids = self._ids(input_ids)  # a list of ids is taken too
        batch = self.prepare(input_ids, cu_seqlens) if batch is None else batch
        h = self.embed(input_ids)  # [T, d]
        states = [h] if output_hidden_states else None
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            h = layer(h, batch, rows if i == n - 1 else None)
            if states is not None and i < n - 1:  # transformers replaces the last layer's output by the normed one
                states.append(h)
        h = self.final_norm(h)
        if states is not None:
            states.append(h)
            assert len(states) == n + 1
        return ForwardOutput(hidden=h, hidden_states=None if states is None else tuple(states))

    def head(self, hidden: torch.Tensor, gemm: Callable = F.linear) -> torch.Tensor:  # [..., d] -> [..., V] fp32
        """float32 logits of final-normed hidden states: the one place the LM head (`output`, or the tied
        embedding) is applied. `gemm(x, w)`: F.linear, or kernels.linear for a decode step's few rows."""
        return gemm(hidden, self.lm_head_weight).float()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 logits for [T] ids -> [T, V], or [B, T] ids (independent rows) -> [B, T, V]. Small inputs only."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() == 1:
            return self.head(self.forward(input_ids).hidden)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [T] or [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=input_ids.device)  # [B+1]
        hidden = self.forward(input_ids.reshape(B * T), cu).hidden  # [B·T, d]
        return self.head(hidden).view(B, T, -1)
