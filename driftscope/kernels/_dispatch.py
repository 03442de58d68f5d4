"""The one dispatch seam for kernel ops: picks `triton`, `cpp` or `torch` per call.

Default: CUDA tensors -> triton, CPU tensors -> cpp, torch as the last fallback. Override with the
environment variable DRIFTSCOPE_BACKEND or the `use_backend(...)` context manager; a forced backend
that cannot run raises with the reason instead of silently falling back.
`vocab_path` is the triton backend's rule for vocab_probe: the panel path or the fused kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cpp", "torch")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("driftscope_backend", default=None)


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by `use_backend` (innermost wins) or DRIFTSCOPE_BACKEND, else None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("DRIFTSCOPE_BACKEND", "").strip()
    return _check_name(env, "DRIFTSCOPE_BACKEND") if env else None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a `with` block (None restores automatic choice)."""
    token = _forced.set(None if name is None else _check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _import_status(module: str) -> Availability:
    try:
        importlib.import_module(module)
    except Exception as exc:  # report any import failure (missing, ABI mismatch) as the reason
        return Availability(False, f"import {module} failed: {type(exc).__name__}: {exc}")
    return Availability(True, f"{module} imported")


def triton_status(device: torch.device | str | None = None) -> Availability:
    imp = _import_status("triton")
    if not imp:
        return imp
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return Availability(True, "CUDA tensors")
    if triton_interpreter():
        return Availability(True, "TRITON_INTERPRET=1: interpreter on CPU tensors (slow; tests only)")
    if dev is None and torch.cuda.is_available():
        return Availability(True, "CUDA available")
    return Availability(False, "no CUDA device and TRITON_INTERPRET is not 1")


def cpp_status(device: torch.device | str | None = None) -> Availability:
    imp = _import_status("driftscope._C")
    if not imp:
        return Availability(False, imp.reason + " (build with `make build` / `pip install -e .`)")
    if device is not None and torch.device(device).type != "cpu":
        return Availability(False, f"cpp runs on CPU tensors only, got {torch.device(device)}")
    from driftscope import _C

    return Availability(True, "driftscope._C ("
                        f"{'OpenMP, ' + str(_C.omp_max_threads()) + ' threads' if _C.has_openmp() else 'no OpenMP'})")


def flash_attn_status() -> Availability:
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device")
    return _import_status("flash_attn")


def status_of(backend: str, device: torch.device | str | None = None) -> Availability:
    if backend == "triton":
        return triton_status(device)
    if backend == "cpp":
        return cpp_status(device)
    return Availability(True, "fp32 reference, always available")


def select(device: torch.device | str, supported: tuple[str, ...] = BACKENDS) -> str:
    """Backend for an op whose tensors live on `device`; `supported` lists what the op implements."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        if forced not in supported:
            raise RuntimeError(f"backend {forced!r} is forced but this op implements only {supported}")
        st = status_of(forced, device)
        if not st:
            raise RuntimeError(f"backend {forced!r} is forced but unavailable on {device}: {st.reason}")
        return forced
    preferred = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in preferred:
        if name in supported and status_of(name, device):
            return name
    return "torch"


# vocab_probe on the triton backend: "panel" (cuBLAS GEMM into fp32 [rows, V] panels + Triton fold, triton_panel)
# or "fused" (one fused Triton kernel, least memory, triton_fused). Constants to be confirmed on a GPU (none lent yet).
VOCAB_PATHS = ("panel", "fused")
PANEL_MAX_BYTES = 2 << 30  # both fp32 panels (base + one tuned) together
PANEL_FREE_FRACTION = 0.25  # ... and at most this share of the device's free memory
PANEL_MIN_ROWS = 64  # below this the GEMMs are too thin to pay: fused instead
PANEL_ROW_MULTIPLE = 128  # panels rounded to whole cuBLAS row tiles where the budget allows


@dataclass(frozen=True)
class VocabPath:
    path: str  # "panel" | "fused"
    rows: int  # token rows per panel (0 for fused)
    reason: str


def panel_bytes(rows: int, vocab: int) -> int:
    """Memory of the panel path's buffers: two fp32 [rows, V] panels (the base one and one reused tuned one)."""
    return 2 * rows * vocab * 4


@functools.cache
def mm_out_dtype_status() -> Availability:
    """Whether torch.mm takes out_dtype=float32 (bf16/fp16 GEMMs with fp32 output, torch >= 2.8): the panel path
    needs it on CUDA. Probed on the meta device, so it answers on CPU-only machines too."""
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        return Availability(False, f"torch {torch.__version__} has no torch.mm(out_dtype=float32) ({exc})"[:200])
    return Availability(True, "torch.mm(out_dtype=float32)")


def vocab_path(device: torch.device | str, n: int, vocab: int) -> VocabPath:
    """The triton backend's vocab_probe path for N tokens over a V-word vocabulary, in this one place.

    Rule: panel when two fp32 [rows, V] panels with rows >= min(N, PANEL_MIN_ROWS) fit the budget
    min(PANEL_MAX_BYTES, PANEL_FREE_FRACTION · free CUDA memory) (PANEL_MAX_BYTES off CUDA) and, on CUDA,
    torch.mm has out_dtype; else fused. DRIFTSCOPE_VOCAB_PATH=panel|fused forces one (a forced panel takes
    at least PANEL_MIN_ROWS rows; without out_dtype on CUDA it raises).
    Rows: the most that fit, spread evenly over the panels and rounded up to PANEL_ROW_MULTIPLE when that
    still fits (paper shape, 2 GiB: 1766 fit, 10 panels of 1664 rows, 1.9 GiB).

    Predicted, to be confirmed by measurement on a GPU (none has been lent yet), at N = 16384, d = 5120,
    V = 151,936, bf16, H200: the two GEMMs are 4·N·V·d = 5.10e13 FLOP, ≈ 73 ms at ~700 TFLOP/s; their fp32
    outputs (2·N·V·4 = 19.9 GB, written by cuBLAS: part of that floor) are read once by the fold (19.9 GB)
    and the base one again by its rank pass (10.0 GB): 29.9 GB ≈ 7.5 ms at ~4 TB/s, which the fold's ALU
    work (≈ 40 instructions per (base, tuned) logit pair: 1e11 ≈ 3 ms on 132 SMs, 2·N·V = 5e9 exps ≈ 1.2 ms
    on the SFUs) should mostly hide: panel ≈ 80–84 ms ≈ 1.10–1.15× the two cuBLAS bf16 GEMMs with fp32 out,
    within 1.25× (each panel's GEMM re-reads the heads, 10 × 2 × 1.56 GB, under its 7 ms of compute). The
    fused kernel is estimated at 3–5×. Fused wins only where memory is short (V = 151,936: 64 rows = 78 MB).
    With J tuned models: J + 1 GEMMs, and J folds each reading the base panel twice."""
    forced = os.environ.get("DRIFTSCOPE_VOCAB_PATH", "").strip()
    if forced and forced not in VOCAB_PATHS:
        raise ValueError(f"DRIFTSCOPE_VOCAB_PATH={forced!r} is not a vocab path; expected one of "
                         f"{', '.join(VOCAB_PATHS)}")
    device = torch.device(device)
    mm = mm_out_dtype_status()
    if device.type == "cuda" and not mm and forced != "fused":
        if forced:
            raise RuntimeError(f"DRIFTSCOPE_VOCAB_PATH=panel is forced but unavailable: {mm.reason}")
        return VocabPath("fused", 0, f"fused kernel: the panel path needs {mm.reason}")
    budget, where = PANEL_MAX_BYTES, f"{PANEL_MAX_BYTES / 2**30:.1f} GiB"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)  # free on the device + cached by torch's allocator
        budget = min(budget, int(PANEL_FREE_FRACTION * free))
        where = f"{budget / 2**30:.2f} GiB (min of {PANEL_MAX_BYTES / 2**30:.1f} GiB, {PANEL_FREE_FRACTION:g} of " \
                f"{free / 2**30:.1f} GiB free)"
    fit, need = budget // panel_bytes(1, vocab), min(n, PANEL_MIN_ROWS)
    if forced == "fused" or (not forced and fit < need):
        why = "DRIFTSCOPE_VOCAB_PATH=fused" if forced else f"{need} rows of V={vocab} do not fit the budget {where}"
        return VocabPath("fused", 0, f"fused kernel: {why}")
    fit = max(fit, need)
    per = -(-n // max(1, -(-n // fit)))  # even panels
    rounded = -(-per // PANEL_ROW_MULTIPLE) * PANEL_ROW_MULTIPLE
    rows = min(n, rounded if rounded <= fit else per)
    why = "DRIFTSCOPE_VOCAB_PATH=panel" if forced else f"two fp32 [rows, V] panels fit the budget {where}"
    return VocabPath("panel", rows, f"panel: {why}; {rows} rows x V={vocab} = "
                                    f"{panel_bytes(rows, vocab) / 2**20:.1f} MiB")


def backend_status() -> dict[str, dict[str, object]]:
    """Why each backend is (un)available here, and which attention implementation the engine uses."""
    out: dict[str, dict[str, object]] = {}
    for name in BACKENDS:
        st = status_of(name)
        out[name] = {"available": st.available, "reason": st.reason}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vp = vocab_path(dev, 16384, 151_936)
    out["triton"]["vocab_path"] = {"path": vp.path, "rows": vp.rows,
                                   "reason": f"vocab_probe at N=16384, V=151,936 on {dev}: {vp.reason}"}
    fa = flash_attn_status()
    out["attention"] = {
        "backend": "flash_attn" if fa else "sdpa",
        "reason": "flash-attn varlen on CUDA" if fa else f"torch SDPA ({fa.reason})",
    }
    out["forced"] = {"backend": forced_backend()}
    return out
