"""JSON helpers shared by test directories (tests/ is on sys.path through its conftest.py)."""
from __future__ import annotations


def leaves(x, path: str = ""):
    """(path, value) of every leaf of a JSON value (a summary's numbers, compared one by one)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x
