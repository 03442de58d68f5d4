"""The drift analysis: `drift(base, tuned, data, out=None, **options) -> DriftReport` (see run.py)."""
from driftscope.analysis.options import DriftOptions
from driftscope.analysis.run import DriftReport, drift

__all__ = ["drift", "DriftReport", "DriftOptions"]
