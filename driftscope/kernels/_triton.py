"""The one Triton import: `triton` and `tl`, or None where Triton is not installed (CPU builds: the triton backend
then reports itself unavailable, with MISSING). Kernel files define their @triton.jit functions under
`if triton is not None:`."""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError as exc:
    triton = tl = None
    MISSING = f"import triton failed: {type(exc).__name__}: {exc}"


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's interpreter on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"
