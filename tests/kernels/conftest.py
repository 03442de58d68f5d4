"""Kernel-test set-up: Triton runs under TRITON_INTERPRET=1 on CPU-only machines.

Triton decides interpreter-or-compiler when a @triton.jit function is *defined* — its own
triton.language helpers (tl.sum, tl.zeros, ...) included, at `import triton`. If an earlier test file
already imported triton without the interpreter (e.g. through driftscope.kernels), the pure-Python
triton modules are dropped from sys.modules (its compiled extension stays loaded), the one Triton import
(driftscope.kernels._triton) is redone and every kernels module that holds a @triton.jit function is
reloaded, each after the modules whose kernels it calls, so that all are redefined as interpreted functions.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch


def _jit_modules() -> list[str]:
    """The loaded driftscope.kernels modules that hold a @triton.jit function, each after the modules it imports one
    from (a kernel calls the function object bound when its module ran: the callee's module is reloaded first)."""
    from triton.runtime.jit import JITFunction

    deps = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("driftscope.kernels.") and module is not None:
            found = {v.fn.__module__ for v in vars(module).values() if isinstance(v, JITFunction)}
            if found:
                deps[name] = found - {name}
    order: list[str] = []
    while deps:
        ready = sorted(n for n, d in deps.items() if not d & deps.keys())
        assert ready, f"kernel modules import each other's kernels in a circle: {deps}"
        order += ready
        deps = {n: d for n, d in deps.items() if n not in ready}
    return order


def _triton_defined_for_interpreter() -> bool:
    if "triton" not in sys.modules:
        return True  # not imported yet: the first import will see TRITON_INTERPRET
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if not _triton_defined_for_interpreter():
        _stale = _jit_modules()  # found while triton's JITFunction is still the compiler's
        for _name in [m for m in sys.modules
                      if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")]:
            del sys.modules[_name]
        for _name in ("driftscope.kernels._triton", *_stale):
            if _name in sys.modules:
                importlib.reload(sys.modules[_name])


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where triton tests put their tensors: CUDA when present, else CPU under the interpreter."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
