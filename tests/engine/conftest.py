"""Engine test fixtures: a session cache of tiny random checkpoints (see engine_helpers.py)."""
from __future__ import annotations

import pytest
from engine_helpers import Checkpoints


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("ckpt"))
