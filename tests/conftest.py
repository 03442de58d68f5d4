"""Shared test configuration: deterministic seeds, GPU-marker skipping, path to ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Triton picks interpreter-or-compiler when kernels are defined: set it before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CLI subprocesses run on this process's thread count (fp32 sums then round as in-process runs do), and the CLI's
# busy-machine rule (one thread, driftscope.cli._threads) never fires in tests: the tests of that rule unset it.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

SHARED_DATA = Path(os.environ.get("DRIFTSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any keyword: a test id "gpu" once was
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _children_write_temp_files_under_pytests_base(tmp_path_factory):
    """Subprocesses' temporary files go under pytest's base temp folder (pruned by pytest), not /tmp: every
    torchrun launch leaves a torchelastic_* folder there otherwise (~300 per suite run)."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.getbasetemp())
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
