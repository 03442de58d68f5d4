"""`driftscope sweep`: one base against a training run's checkpoints, as one resumable job (see run.py).

`driftscope.sweep(manifest, out)` runs it: this package is callable as its own `sweep` function, because importing a
subpackage named like the function would otherwise replace `driftscope.sweep` with the package.
"""
from __future__ import annotations

import sys
import types

from driftscope.sweep.manifest import Manifest, read_manifest
from driftscope.sweep.run import SweepReport, sweep

__all__ = ["sweep", "SweepReport", "Manifest", "read_manifest"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> SweepReport:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
