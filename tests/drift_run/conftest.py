"""Analysis fixtures: one base and tuned variants per session, written by transformers (an independent writer)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
from analysis_helpers import write_base, write_records, write_tuned  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift-models")
    base = write_base(root / "base")
    return {
        "base": base,
        "tuned": write_tuned(base, root / "tuned", from_layer=1),   # layers 1, 2 and the head change
        "late": write_tuned(base, root / "late", from_layer=2, head=False, seed=5),  # only layer 2
    }


@pytest.fixture(scope="session")
def records(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("records") / "mixed.jsonl")
