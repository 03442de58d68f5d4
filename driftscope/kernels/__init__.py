"""Kernels: one file per op (Triton kernel + launcher + fp32 torch reference); `_dispatch` picks a backend."""
from driftscope.kernels._dispatch import backend_status, use_backend
from driftscope.kernels.cov_update import cov_update, cov_update_torch
from driftscope.kernels.vocab_probe import VocabProbeResult, vocab_probe, vocab_probe_torch

__all__ = [
    "backend_status",
    "use_backend",
    "cov_update",
    "cov_update_torch",
    "vocab_probe",
    "vocab_probe_torch",
    "VocabProbeResult",
]
