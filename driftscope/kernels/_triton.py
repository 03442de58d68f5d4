"""The one Triton import: `triton` and `tl`, or None (with MISSING, the reason the triton backend reports) where
Triton is not installed or cannot run: without a CUDA device and without TRITON_INTERPRET=1 it is not imported at
all (0.18 s of every command on a CPU-only machine). Kernel files define their @triton.jit functions under
`if triton is not None:`; Triton itself decides interpreter-or-compiler when they are defined, at this import."""
from __future__ import annotations

import os

import torch


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's interpreter on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


if not triton_interpreter() and not torch.cuda.is_available():
    triton = tl = None
    MISSING = "not imported: no CUDA device and TRITON_INTERPRET is not 1"
else:
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        triton = tl = None
        MISSING = f"import triton failed: {type(exc).__name__}: {exc}"
