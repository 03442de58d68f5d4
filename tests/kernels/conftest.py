"""Kernel-test set-up: Triton runs under TRITON_INTERPRET=1 on CPU-only machines.

triton.jit decides interpreter-or-compiler when a kernel is *defined*, so the variable must be set
before driftscope.kernels' kernel modules are imported; if another test imported them first, they
are reloaded here (module reload re-runs the @triton.jit definitions in the same module dict).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("driftscope.kernels.vocab_probe", "driftscope.kernels.cov_update"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where triton tests put their tensors: CUDA when present, else CPU under the interpreter."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
