"""The drift analysis: `drift(base, tuned, data, out=None, **options) -> DriftReport` (see run.py)."""
from driftscope.drift_run.options import DriftOptions
from driftscope.drift_run.run import DriftReport, drift

__all__ = ["drift", "DriftReport", "DriftOptions"]
