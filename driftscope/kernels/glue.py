"""The row-wise work between a layer's GEMMs on float32 CPU tensors, one `driftscope._C` call each.

Between its GEMMs a layer runs chains of element-wise torch ops: RMSNorm is 6, rope 5, the residual add 1, silu·up 2
plus a copy of the strided gate for the down GEMM. In a decode step (a few rows) each costs ~10 us of dispatch for
~1 us of work; in a prefill (thousands of rows) each is a pass over memory (bench/RESULTS.md, the profiles). These
fold each chain into one pass (many rows in 64-row chunks over OpenMP's threads, those of the GEMMs around them):

- `rms_norm(x, w, eps)`: x [T, d] (rows may be strided) -> x · 1/sqrt(mean(x²) + eps) · w, new [T, d];
- `add_rms_norm(h, a, w, eps)`: (h + a, rms_norm(h + a, w, eps)), the residual add and the next norm in one pass;
- `silu_mul(gu)`: gu [T, 2I] (gate | up) -> silu(gate) · up, new contiguous [T, I];
- `rope_cache_write_(qkv, cos, sin, k_cache, v_cache, slots, hq, hkv)`: rotate-half rope on the q and k heads of
  qkv [T, Hq + 2·Hkv, D] in place (cos/sin [T, 1, R] or [T, R], the first 2·R dims), then token t's k and v heads
  into cache slot slots[t] ([S, Hkv, D] caches); k_cache None: rope only.

Each has its float32 torch reference, `<name>_torch`, same signature (the model's ops before these: RMSNorm,
apply_rope_, index_copy_), and a dispatch table (NORM, ADD_NORM, SILU_MUL, ROPE: cpp for float32 CPU tensors, else
torch). The C++ sums squares in 16 lanes and uses a polynomial exp: results agree with the references to float32
rounding, not bit for bit; each row's result is the same whatever the batch or the thread count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import Op


def _f32_cpu(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        assert t.dtype == torch.float32 and t.device.type == "cpu", (
            f"{name}: float32 CPU tensors, got {t.dtype} {t.device}")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    from driftscope import _C

    _f32_cpu("rms_norm", x, w)
    T, d = x.shape
    assert x.stride(1) == 1 and w.shape == (d,) and w.is_contiguous(), f"rms_norm: x {x.stride()}, w {tuple(w.shape)}"
    out = torch.empty(T, d)
    _C.rms_norm(out.data_ptr(), x.data_ptr(), w.data_ptr(), T, d, x.stride(0) if T > 1 else d, eps)
    return out


def add_rms_norm(h: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from driftscope import _C

    _f32_cpu("add_rms_norm", h, a, w)
    T, d = h.shape
    assert a.shape == h.shape and w.shape == (d,), f"add_rms_norm: h {tuple(h.shape)}, a {tuple(a.shape)}"
    h, a, w = h.contiguous(), a.contiguous(), w.contiguous()
    res, out = torch.empty(T, d), torch.empty(T, d)
    _C.add_rms_norm(res.data_ptr(), out.data_ptr(), h.data_ptr(), a.data_ptr(), w.data_ptr(), T, d, eps)
    return res, out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    from driftscope import _C

    _f32_cpu("silu_mul", gu)
    T, two_i = gu.shape
    assert two_i % 2 == 0, f"silu_mul: gu {tuple(gu.shape)} must be [T, 2I]"
    gu = gu.contiguous()
    out = torch.empty(T, two_i // 2)
    _C.silu_mul(out.data_ptr(), gu.data_ptr(), T, two_i // 2)
    return out


def rope_cache_write_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None,
                      v_cache: torch.Tensor | None, slots: torch.Tensor | None, hq: int, hkv: int) -> None:
    from driftscope import _C

    _f32_cpu("rope_cache_write_", qkv, cos, sin)
    T, H, D = qkv.shape
    R = cos.shape[-1]
    assert qkv.is_contiguous() and H == hq + 2 * hkv and 2 * R <= D, f"rope_cache_write_: qkv {tuple(qkv.shape)}"
    cos, sin = cos.reshape(T, R).contiguous(), sin.reshape(T, R).contiguous()
    ptrs = (0, 0, 0, 0)
    if k_cache is not None:
        _f32_cpu("rope_cache_write_", k_cache, v_cache)
        assert k_cache.shape[1:] == (hkv, D) and k_cache.shape == v_cache.shape and k_cache.is_contiguous() \
            and v_cache.is_contiguous(), f"rope_cache_write_: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        assert slots.shape == (T,) and slots.dtype == torch.int64, f"rope_cache_write_: slots {slots.dtype}"
        slots = slots.contiguous()
        ptrs = (k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), k_cache.shape[0])
    _C.rope_cache_write(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), *ptrs[:3], T, hq, hkv, D, R, ptrs[3])


def rms_norm_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: float32, engine/model.py's RMSNorm."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def add_rms_norm_torch(h: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    res = h + a
    return res, rms_norm_torch(res, w, eps)


def silu_mul_torch(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def rope_cache_write_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None,
                           v_cache: torch.Tensor | None, slots: torch.Tensor | None, hq: int, hkv: int) -> None:
    """Reference: rotate-half on the q and k heads' first 2·R dims, then index_copy_ into the caches."""
    T = qkv.shape[0]
    R = cos.shape[-1]
    c, s = cos.reshape(T, 1, R), sin.reshape(T, 1, R)
    x = qkv[:, : hq + hkv]
    x1, x2 = x[..., :R].clone(), x[..., R : 2 * R].clone()
    x[..., :R] = x1 * c - x2 * s
    x[..., R : 2 * R] = x2 * c + x1 * s
    if k_cache is not None:
        k_cache.index_copy_(0, slots, qkv[:, hq : hq + hkv])
        v_cache.index_copy_(0, slots, qkv[:, hq + hkv :])


NORM = Op("rms_norm", {"cpp": rms_norm, "torch": rms_norm_torch}, takes={"cpp": "float32 [T, d]"}, strict=False)
ADD_NORM = Op("add_rms_norm", {"cpp": add_rms_norm, "torch": add_rms_norm_torch}, takes={"cpp": "float32"},
              strict=False)
SILU_MUL = Op("silu_mul", {"cpp": silu_mul, "torch": silu_mul_torch}, takes={"cpp": "float32"}, strict=False)
ROPE = Op("rope", {"cpp": rope_cache_write_, "torch": rope_cache_write_torch}, takes={"cpp": "float32"},
          strict=False)


def use_cpp(x: torch.Tensor) -> bool:
    """Whether the glue of a layer over x runs the cpp kernels: float32 CPU tensors, cpp not forced away."""
    return x.dtype == torch.float32 and NORM.select(x.device, cpp=x.device.type == "cpu") == "cpp"
