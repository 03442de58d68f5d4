"""Small helpers used across the package: atomic file writes, strict JSON (NaN -> null), JSON files read with an
error that names the file and the position, the dtype names models load and run in, and the digests that identify
input files and checkpoints in resume fingerprints."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "atomic_write", "atomic_write_text", "dtype_name", "json_float", "read_json",
           "read_jsonl", "strict_json", "torch_dtype", "write_json", "write_jsonl", "file_digest", "sampled_digest",
           "checkpoint_identity"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the floating dtypes a model is loaded and run in


def dtype_name(dtype: Any) -> str:
    """"bfloat16" for "bfloat16", "torch.bfloat16" or torch.bfloat16; ValueError naming the value otherwise."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {', '.join(DTYPE_NAMES)}")
    return name


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch.dtype of a name or dtype accepted by `dtype_name`."""
    import torch

    return getattr(torch, dtype_name(dtype))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a new hidden file beside `path`, then os.replace it onto `path`: readers never see
    half a file, and a failed write leaves nothing behind. The file gets the mode of a normally created one
    (0666 less the umask), whatever `write` does. Parent folders are created. An OSError (a full disk, a
    read-only folder) names `path`, not the temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that made its own file (e.g. 0600): give it the usual mode
            tmp.chmod(mode)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename in (None, str(tmp), tmp):
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_float(x: float) -> float | None:
    """Python float for JSON; NaN/inf become None (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


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


def write_jsonl(path: str | Path, rows: Iterable[Any], *, ensure_ascii: bool = False) -> Path:
    """One strict JSON value per line (NaN -> null, others as their str()), written atomically."""
    text = "".join(json.dumps(strict_json(r), ensure_ascii=ensure_ascii, allow_nan=False, default=str) + "\n"
                   for r in rows)
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


def read_jsonl(path: str | Path, what: str = "JSONL file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file of objects (gzipped when named *.gz);
    FileNotFoundError, or a ValueError naming path:line of the first line that is not UTF-8 or not a JSON object."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    out = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:  # line by line, so that an error names its line
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: {what} is not UTF-8 text (byte {e.start + 1} of the line is "
                                 f"0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict):
                out.append((line_no, obj))
            else:
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def sampled_digest(path: Path, window: int = 1 << 20) -> str:
    """sha256 of the size and three 1 MiB windows (start, middle, end): a weights file re-saved after more
    training differs in all of them; copying or re-staging the file (new mtime) does not change it."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        for off in sorted({0, max(size // 2 - window // 2, 0), max(size - window, 0)}):
            f.seek(off)
            h.update(f.read(window))
    return h.hexdigest()


def checkpoint_identity(folder: Path) -> dict:
    """What identifies a checkpoint's contents without reading all its weights: sha256 of its small JSON files
    (config, tokenizer, index) and a sampled digest of each weight file. A checkpoint re-saved in place changes it."""
    out = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".json" or f.name == "chat_template.jinja":
            out[f.name] = file_digest(f)
        elif f.suffix in _WEIGHT_SUFFIXES:
            out[f.name] = sampled_digest(f)
    return out
