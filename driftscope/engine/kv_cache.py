"""Paged KV cache: fixed-size blocks of token slots, one free list, per-model key/value tensors.

A sequence owns a block table (block ids); token position p lives in slot `table[p // block_size] · block_size +
p % block_size`. Models that generate in lockstep (a base following a tuned model) share one `BlockAllocator`, so a
sequence has the same block table in every model's cache, and each model has its own `KVCache` tensors.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

import torch

from driftscope.engine.model import Transformer


class BlockAllocator:
    """Free list of `num_blocks` block ids; `allocate(n)` hands out n ids or raises, `free(ids)` takes them back."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a KV cache needs at least one block of at least one token, "
                             f"got {num_blocks} × {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), f"allocate({n}) with {len(self._free)} free blocks"
        return [self._free.popleft() for _ in range(n)]

    def free(self, ids: Sequence[int]) -> None:
        self._free.extend(ids)
        assert len(self._free) <= self.num_blocks, "a block was freed twice"


def bytes_per_block(model: Transformer, block_size: int) -> int:
    """Key + value bytes of one block across all layers of `model`."""
    c = model.config
    elt = torch.empty((), dtype=model.dtype).element_size()
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * elt


def default_cache_bytes(device: torch.device) -> int:
    """The cache budget when none is given: 90% of the free CUDA memory (weights are already loaded), or a quarter
    of the host's physical memory on the CPU. The cache is further capped at what the workload can use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class KVCache:
    """Key and value tensors [L, num_blocks · block_size, Hkv, D] of one model, in its dtype and on its device.

    Allocated uninitialised (no pass over gigabytes); `debug_fill` (tests set NaN) fills them, so reading a slot
    that no token wrote shows up in the outputs."""

    debug_fill: float | None = None

    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        c = model.config
        shape = (c.num_layers, num_blocks * block_size, c.num_kv_heads, c.head_dim)
        self.k = torch.empty(shape, dtype=model.dtype, device=model.device)
        self.v = torch.empty(shape, dtype=model.dtype, device=model.device)
        if self.debug_fill is not None:
            self.k.fill_(self.debug_fill)
            self.v.fill_(self.debug_fill)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
