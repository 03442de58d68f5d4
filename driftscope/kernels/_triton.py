"""The one Triton import: `triton` and `tl`, or None where Triton cannot run or is not installed (the triton backend
then reports itself unavailable, with MISSING). Kernel files define their @triton.jit functions under
`if triton is not None:`. Without a CUDA device and without TRITON_INTERPRET=1 nothing could run a Triton kernel, so
triton is not imported at all (0.16 s of every CPU process's start, measured), unless the process imported it first
(ahead-of-time compiles for a GPU: bench/aot_resources.py)."""
from __future__ import annotations

import os
import sys

import torch


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's interpreter on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


if not (triton_interpreter() or torch.cuda.is_available() or "triton" in sys.modules):
    triton = tl = None
    MISSING = "no CUDA device and TRITON_INTERPRET is not 1"
else:
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        triton = tl = None
        MISSING = f"import triton failed: {type(exc).__name__}: {exc}"
