"""`driftscope sweep`: one base against a training run's checkpoints, as one resumable job (see run.py).

`driftscope.sweep(manifest, out)` is `driftscope.sweep_run.sweep` (the package is not named `sweep`, so that importing
it never replaces the function, as drift_run does for `driftscope.drift`).
"""
from __future__ import annotations

from driftscope.sweep_run.manifest import Manifest, read_manifest
from driftscope.sweep_run.run import SweepReport, sweep

__all__ = ["sweep", "SweepReport", "Manifest", "read_manifest"]
