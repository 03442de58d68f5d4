"""Small helpers used across the package: atomic file writes, strict JSON (NaN -> null), JSON files read with an
error that names the file and the position."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "read_json", "strict_json", "write_json"]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a sibling temporary file and os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def strict_json(obj: Any) -> Any:
    """A copy with every non-finite float replaced by None, so `json.dumps(..., allow_nan=False)` holds."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict, indented UTF-8 JSON, written atomically; values JSON cannot hold are written as their str()."""
    text = json.dumps(strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | Path, what: str = "JSON file", kind: type | None = None) -> Any:
    """Parse a JSON file; FileNotFoundError / ValueError with one line naming the file (and line:column)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    if kind is not None and not isinstance(data, kind):
        raise ValueError(f"{path}: {what} must hold a JSON {'object' if kind is dict else kind.__name__}, "
                         f"got {type(data).__name__}")
    return data
