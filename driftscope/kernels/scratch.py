"""Reused CPU scratch memory for a forward's large transient tensors (the fused q|k|v and gate|up GEMM outputs).

glibc serves an allocation above its mmap threshold (32 MiB at most) with fresh pages and unmaps them when it is
freed, so every layer's [T, 2I] gate|up output paid its page faults and the kernel's zeroing again: 30 ms of a
170 ms GEMM at T = 7,042 on SmolLM2 (MKL at 147 instead of 179 GFLOP/s; bench/RESULTS.md). `scratch(tag, shape,
dtype, device)` returns a tensor of that shape in a buffer kept per (thread, tag, device, dtype) and grown when a
larger one is asked for: the same tag in the same thread gets the same memory again, so a caller must be done with
its tensor before it asks for the tag again (a layer's intermediates are). Other devices get a plain `torch.empty`
(CUDA's caching allocator already reuses memory). `release_scratch()` frees every buffer: drift(), generate() and
evaluate() do at their end, so only a caller running a Transformer's forward itself keeps them (at most
T·(2I + q|k|v width) floats per thread: 132 MB for SmolLM2 at 8,192 tokens) until it calls it.
"""
from __future__ import annotations

import math
import threading

import torch

_buffers: dict[tuple, torch.Tensor] = {}
_lock = threading.Lock()


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialized contiguous tensor of `shape`; on the CPU, a view of this thread's buffer for `tag`."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    key = (threading.get_ident(), tag, device, dtype)
    with _lock:
        buf = _buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = _buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def release_scratch() -> None:
    """Free every scratch buffer (a tensor still held elsewhere stays valid: it keeps its own memory alive)."""
    with _lock:
        _buffers.clear()
