"""driftscope: base-vs-tuned LLM drift in lockstep, exact full-vocabulary metrics without materializing logits.

The public API is imported lazily so that `import driftscope` stays cheap (no torch import until used).
help(driftscope.drift) lists every drift option with its default; README.md shows the commands and the API.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "driftscope.engine.checkpoint",
    "load_tokenizer": "driftscope.engine.tokenizer",
    "ModelConfig": "driftscope.engine.config",
    "vocab_probe": "driftscope.kernels.vocab_probe",
    "vocab_probe_pairs": "driftscope.kernels.vocab_probe",
    "VocabProbeResult": "driftscope.kernels.vocab_probe",
    "generate": "driftscope.engine.generate",
    "Generation": "driftscope.engine.decoding",
    "SamplingParams": "driftscope.engine.sampling",
    "GenerationEngine": "driftscope.engine.decoding",
    "drift": "driftscope.drift_run.run",
    "DriftReport": "driftscope.drift_run.run",
    "DriftOptions": "driftscope.drift_run.options",
    "sweep": "driftscope.sweep_run",
    "SweepReport": "driftscope.sweep_run",
    "transferability_index": "driftscope.eval.ti",
    "transferability_indices": "driftscope.eval.ti",
    "TIResult": "driftscope.eval.ti",
    "backend_status": "driftscope.kernels._dispatch",
    "use_backend": "driftscope.kernels._dispatch",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'driftscope' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
