"""Kernels: one file (or folder) per op, each declaring its backends as a table (`_dispatch.Op`) that
`backend_status()` reports; importing the package imports every op, so that all have registered."""
from driftscope.kernels import attention, linear, paged_attention  # noqa: F401  (their tables register)
from driftscope.kernels._dispatch import backend_status, use_backend
from driftscope.kernels.cov_update import cov_update, cov_update_torch
from driftscope.kernels.vocab_probe import VocabProbeResult, vocab_probe, vocab_probe_torch

__all__ = ["backend_status", "use_backend", "cov_update", "cov_update_torch", "vocab_probe", "vocab_probe_torch",
           "VocabProbeResult"]
