"""Kernel-test set-up: Triton runs under TRITON_INTERPRET=1 on CPU-only machines.

Triton decides interpreter-or-compiler when a @triton.jit function is *defined* — its own
triton.language helpers (tl.sum, tl.zeros, ...) included, at `import triton`. If an earlier test file
already imported triton without the interpreter (e.g. through driftscope.kernels), the pure-Python
triton modules are dropped from sys.modules (its compiled extension stays loaded) and our kernel
modules are reloaded, so that both are redefined as interpreted functions.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# the modules that define the kernels first, each after the ones it imports them from (the tile helper, the
# recount kernel, then the scan and its launcher), then the package that re-exports the launcher
_KERNEL_MODULES = ("driftscope.kernels.vocab_probe.triton_tile", "driftscope.kernels.vocab_probe.triton_recount",
                   "driftscope.kernels.vocab_probe.triton_fused", "driftscope.kernels.vocab_probe.triton_fold",
                   "driftscope.kernels.vocab_probe",
                   "driftscope.kernels.cov_update")


def _triton_defined_for_interpreter() -> bool:
    if "triton" not in sys.modules:
        return True  # not imported yet: the first import will see TRITON_INTERPRET
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if not _triton_defined_for_interpreter():
        for _name in [m for m in sys.modules
                      if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")]:
            del sys.modules[_name]
        for _name in _KERNEL_MODULES:
            if _name in sys.modules:
                importlib.reload(sys.modules[_name])


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where triton tests put their tensors: CUDA when present, else CPU under the interpreter."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
