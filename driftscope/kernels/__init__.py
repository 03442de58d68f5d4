"""Kernels: one file per op (Triton kernel + launcher + fp32 torch reference); `_dispatch` picks a backend."""
from driftscope.kernels._dispatch import backend_status, use_backend

__all__ = ["backend_status", "use_backend"]
