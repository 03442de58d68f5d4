"""The GGUF container (llama.cpp's docs/gguf.md, versions 2 and 3, little-endian): metadata key -> value, tensor
infos, and memory-mapped byte views of the tensors in the layout `gguf.quants.dequantize` takes.

Only the header is parsed: a 151k-token vocabulary reads in well under a second, where gguf.GGUFReader builds a numpy
view per string (seconds). A short or damaged file is one InputError naming the file and what is cut or wrong.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driftscope.errors import InputError

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # value types
STRING, ARRAY = 8, 9
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


class _Short(Exception):
    """The header runs past the end of the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): the file's ne list reversed
    type_id: int  # a gguf.GGMLQuantizationType value
    offset: int  # of its first byte in the file
    nbytes: int  # 0 when the type is unknown to the gguf library


class GGUFFile:
    """`metadata` (key -> int / float / bool / str / list), `tensors` (name -> TensorInfo) and `data(name)`."""

    def __init__(self, path: Path, quant_sizes: dict[int, tuple[int, int]]):
        """`quant_sizes`: type id -> (elements per block, bytes per block), gguf.GGML_QUANT_SIZES."""
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size, self._pos = len(self._map), 4  # the magic was checked by is_gguf
        try:
            self._parse(quant_sizes)
        except InputError:
            raise
        except _Short:
            raise InputError(f"{self.path}: the file is truncated: its header ends past its {self.size} bytes")
        except (UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise InputError(f"{self.path}: damaged GGUF header near byte {self._pos} ({exc})") from None

    def _parse(self, quant_sizes: dict[int, tuple[int, int]]) -> None:
        version = self._scalar("I")
        if version not in VERSIONS:
            why = "a big-endian file; " if version & 0xFFFF == 0 else ""
            raise InputError(f"{self.path}: GGUF version {version} is not supported ({why}supported: little-endian "
                             f"versions {', '.join(map(str, VERSIONS))})")
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        if max(n_tensors, n_kv) > self.size:  # each entry takes bytes: a count this large is garbage
            raise ValueError(f"{n_tensors} tensors and {n_kv} metadata entries in a {self.size}-byte file")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name, nd = self._string(), self._scalar("I")
            dims = [self._scalar("Q") for _ in range(nd)]
            infos.append((name, tuple(reversed(dims)), self._scalar("I"), self._scalar("Q")))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment={align!r} is not a power of two")
        start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in infos:
            block, type_size = quant_sizes.get(type_id, (0, 0))
            n = int(np.prod(shape, dtype=np.int64))
            nbytes = n // block * type_size if block else 0
            info = TensorInfo(name, shape, type_id, start + offset, nbytes)
            if info.offset + nbytes > self.size:
                raise InputError(f"{self.path}: the file is truncated: tensor {name!r} ends at byte "
                                 f"{info.offset + nbytes}, the file has {self.size}")
            self.tensors[name] = info

    def _scalar(self, code: str) -> Any:
        if self._pos + struct.calcsize(code) > self.size:
            raise _Short
        (v,) = struct.unpack_from("<" + code, self._map, self._pos)
        self._pos += struct.calcsize(code)
        return v

    def _string(self) -> str:
        n = self._scalar("Q")
        if self._pos + n > self.size:
            raise _Short
        s = self._map[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self._scalar(SCALARS[vtype])
        if vtype == STRING:
            return self._string()
        if vtype != ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        sub, n = self._scalar("I"), self._scalar("Q")
        if sub in SCALARS:  # numeric arrays in one read
            dtype = np.dtype("<" + SCALARS[sub])
            if self._pos + n * dtype.itemsize > self.size:
                raise _Short
            out = np.frombuffer(self._map, dtype=dtype, count=n, offset=self._pos).tolist()
            self._pos += n * dtype.itemsize
            return out
        return [self._value(sub) for _ in range(n)]

    def data(self, name: str, byte_shape: tuple[int, ...]) -> np.ndarray:
        """The tensor's bytes (uint8, `byte_shape`: gguf.quants.quant_shape_to_byte_shape), a view of the map."""
        t = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(byte_shape)
