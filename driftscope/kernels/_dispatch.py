"""The one dispatch seam for kernel ops: picks `triton`, `cpp` or `torch` per call.

Default: CUDA tensors -> triton, CPU tensors -> cpp, torch as the last fallback. Override with the
environment variable DRIFTSCOPE_BACKEND or the `use_backend(...)` context manager; a forced backend
that cannot run raises with the reason instead of silently falling back.
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


def backend_status() -> dict[str, dict[str, object]]:
    """Why each backend is (un)available here, and which attention implementation the engine uses."""
    out: dict[str, dict[str, object]] = {}
    for name in BACKENDS:
        st = status_of(name)
        out[name] = {"available": st.available, "reason": st.reason}
    fa = flash_attn_status()
    out["attention"] = {
        "backend": "flash_attn" if fa else "sdpa",
        "reason": "flash-attn varlen on CUDA" if fa else f"torch SDPA ({fa.reason})",
    }
    out["forced"] = {"backend": forced_backend()}
    return out
