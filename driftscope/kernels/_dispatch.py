"""The one dispatch seam: each kernel op declares its implementations as a table, `Op(name, {backend: fn})`;
`Op.select(device)` picks one per call and `backend_status()` reports every op (`driftscope backends`).

Backends: triton, cpp (driftscope._C, CPU tensors), torch (every op's fallback), flash_attn (attention's, CUDA).
Automatic choice: the first backend of PREFERENCE that the op implements, that is available on the tensors' device
and that the call admits (the op's own rule on dtype or size, e.g. linear sends only <= 128 float32 rows to cpp).
DRIFTSCOPE_BACKEND or `use_backend(...)` force triton, cpp or torch: a strict op (vocab_probe, cov_update) runs the
forced backend or raises with the reason, never falling back in silence; a lenient op (the model's attention and
linear) only leaves out the other forceable backends (torch takes the calls the forced one does not; flash-attn,
which cannot be forced, still runs). A new backend: its status function in STATUS and place in PREFERENCE here, and
per op an implementation and its entry in the op's table.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from driftscope.kernels import _triton

BACKENDS = ("triton", "cpp", "torch")  # the ones DRIFTSCOPE_BACKEND and use_backend can force
PREFERENCE = {"cuda": ("flash_attn", "triton", "torch"), "cpu": ("cpp", "torch")}  # other devices: the CPU's
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
    if (name := _forced.get()) is not None:
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


@functools.cache
def _import_status(module: str) -> Availability:
    try:
        importlib.import_module(module)
    except Exception as exc:  # report any import failure (missing, ABI mismatch) as the reason
        return Availability(False, f"import {module} failed: {type(exc).__name__}: {exc}")
    return Availability(True, f"{module} imported")


def triton_status(device: torch.device | str | None = None) -> Availability:
    if _triton.triton is None:
        return Availability(False, _triton.MISSING)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return Availability(True, "CUDA tensors")
    if _triton.triton_interpreter():
        return Availability(True, "TRITON_INTERPRET=1: interpreter on CPU tensors (slow; tests only)")
    if dev is None and torch.cuda.is_available():
        return Availability(True, "CUDA available")
    return Availability(False, "no CUDA device and TRITON_INTERPRET is not 1")


def cpp_status(device: torch.device | str | None = None) -> Availability:
    if not (imp := _import_status("driftscope._C")):
        return Availability(False, imp.reason + " (build with `make build` / `pip install -e .`)")
    if device is not None and (device if isinstance(device, torch.device) else torch.device(device)).type != "cpu":
        return Availability(False, f"cpp runs on CPU tensors only, got {torch.device(device)}")
    from driftscope import _C

    return _cpp_ready(_C.has_openmp(), _C.omp_max_threads())


@functools.cache  # linear asks at every call
def _cpp_ready(openmp: bool, threads: int) -> Availability:
    return Availability(True, f"driftscope._C ({f'OpenMP, {threads} threads' if openmp else 'no OpenMP'})")


def flash_attn_status(device: torch.device | str | None = None) -> Availability:
    if device is not None and torch.device(device).type != "cuda":
        return Availability(False, f"flash-attn runs on CUDA tensors only, got {torch.device(device)}")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA device")
    return _import_status("flash_attn")


STATUS: dict[str, Callable[..., Availability]] = {
    "triton": triton_status, "cpp": cpp_status, "flash_attn": flash_attn_status,
    "torch": lambda device=None: Availability(True, "the fallback every op implements"),
}
OPS: dict[str, Op] = {}  # every op, registered by its declaration, for backend_status


@dataclass(frozen=True)
class Op:
    """A kernel op: its implementations {backend: fn}, all with the op's signature, torch (the fallback) among them.
    `takes`: what a backend takes when it takes only some calls (the op turns the others away with
    `select(device, backend=False)`); `strict`: see the module docstring; `details`: more the op says of itself in
    backend_status."""
    name: str
    impls: dict[str, Callable]
    takes: dict[str, str] = field(default_factory=dict)
    strict: bool = True
    details: Callable[[], dict[str, object]] | None = None

    def __post_init__(self) -> None:
        assert "torch" in self.impls and set(self.impls) <= set(STATUS), f"{self.name}: {tuple(self.impls)}"
        OPS[self.name] = self

    def select(self, device: torch.device | str, **admits: bool) -> str:
        """The backend of a call whose tensors live on `device`; `admits`: backend=False where the op's own rule
        turns the call away from that backend."""
        device = device if isinstance(device, torch.device) else torch.device(device)
        forced = forced_backend()
        if forced is not None and self.strict:
            if forced not in self.impls:
                raise RuntimeError(f"backend {forced!r} is forced but {self.name} implements only {tuple(self.impls)}")
            if not (st := STATUS[forced](device)):
                raise RuntimeError(f"backend {forced!r} is forced but unavailable on {device}: {st.reason}")
            return forced
        for name in PREFERENCE.get(device.type, PREFERENCE["cpu"]):
            if (name in self.impls and admits.get(name, True) and (forced in (None, name) or name not in BACKENDS)
                    and STATUS[name](device)):
                return name
        return "torch"

    def status(self) -> dict[str, object]:
        """For CPU and for CUDA tensors: the backend a call runs (`takes` aside) and why each of the op's backends is
        or is not available there."""
        out: dict[str, object] = {"cpu": {}, "cuda": {"runs": None, "reason": "no CUDA device"}}
        for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            try:
                runs = self.select(dev)
            except RuntimeError as exc:  # a forced backend that cannot run there: said here, raised by a call
                runs = f"none: {exc}"
            out[dev] = {"runs": runs}
            for name in self.impls:
                st = STATUS[name](dev)
                out[dev][name] = (f"{'available' if st else 'unavailable'}: {st.reason}"
                                  + (f"; only for {self.takes[name]}" if name in self.takes else ""))
        return {**out, **(self.details() if self.details else {})}


def backend_status() -> dict[str, object]:
    """Why each backend is (un)available here, the forced one, and per op what runs on CPU and on CUDA tensors."""
    out: dict[str, object] = {name: {"available": (st := status()).available, "reason": st.reason}
                              for name, status in STATUS.items()}
    out["forced"] = {"backend": forced_backend()}
    out["ops"] = {name: op.status() for name, op in OPS.items()}
    return out
