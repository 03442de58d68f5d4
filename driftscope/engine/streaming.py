"""Layer streaming: a model's decoder layers stay in host memory (the memory-mapped safetensors files) and each one is
copied to the device just before it runs, the copy of layer i+1 overlapped with the compute of layer i.

`StreamedLayers` stands in for `Transformer.layers` (loader.load_model(stream_layers=True)): two Block slots on the
device; `layers[i]` waits for layer i's copy, starts layer i+1's (after the last layer: layer 0's, for the next batch)
into the other slot on a worker thread, and returns layer i's slot, valid until the access after next. A copy opens
its files with safe_open (tensors are views of a private mapping, read on first touch) and closes them when done, so
only the layers in flight are resident. On the CPU the worker materializes the mapped tensors into the slot; on CUDA
it copies them into pinned staging buffers that a side stream uploads, with events ordering the slot's last use, the
upload and the next use. The embedding, the final norm and the LM head are not streamed: they stay resident.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Block


@dataclass(frozen=True)
class LayerTensor:
    file: Path
    name: str  # HF tensor name in the file
    param: str  # parameter inside a Block, e.g. "attn.wqkv.weight"
    rows: tuple[int, int] | None  # row range inside a fused parameter


class _CudaPipe:
    """Per slot: pinned staging buffers, an event after the slot's last use (compute stream) and one after its
    upload (side stream)."""

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.staging: list[dict[tuple, torch.Tensor]] = [{}, {}]  # per slot: (param, rows) -> host buffer
        self.freed = [torch.cuda.Event(), torch.cuda.Event()]
        self.uploaded = [torch.cuda.Event(), torch.cuda.Event()]


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """A pinned host buffer shaped like `like` (its upload is asynchronous), pageable where pinning fails."""
    try:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
    except RuntimeError:
        return torch.empty(like.shape, dtype=like.dtype)


class StreamedLayers(nn.Module):
    """`len`, `[i]` and iteration of a ModuleList of Blocks, over two resident slots (see the module docstring)."""

    def __init__(self, config: ModelConfig, tensors: list[list[LayerTensor]], dtype: torch.dtype):
        super().__init__()
        assert len(tensors) == config.num_layers and config.num_layers > 0
        self.config, self.tensors = config, tensors
        self.slots = nn.ModuleList(Block(config, 0, device="meta", dtype=dtype) for _ in range(2))
        self.requires_grad_(False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftscope-stream")
        self._current: int | None = None  # the slot in use
        self._next: tuple[int, int, Future] | None = None  # (layer, slot, its copy in flight)
        self._pipe: _CudaPipe | None = None

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def device(self) -> torch.device:
        return self.slots[0].attn_norm.weight.device

    def __getitem__(self, i: int) -> Block:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"layer {i} of {n}")
        i %= n
        if self._next is not None and self._next[0] == i:
            _, slot, copy = self._next
        else:  # not prefetched (first access, out-of-order access): copy now into the slot not in use
            slot = 0 if self._current is None else 1 - self._current
            copy = self._submit(i, slot)
        copy.result()  # re-raises a failed copy
        if self._pipe is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pipe.uploaded[slot])
        self._current = slot
        self._next = (i + 1) % n, 1 - slot, self._submit((i + 1) % n, 1 - slot)
        block = self.slots[slot]
        block.attn.layer_idx, block.attn.window = i, self.config.layer_windows[i]
        return block

    def _submit(self, i: int, slot: int) -> Future:
        """Start copying layer i into `slot`, after the compute that uses the slot now (everything enqueued)."""
        if self.device.type == "cuda":
            if self._pipe is None:
                self._pipe = _CudaPipe(self.device)
            self._pipe.freed[slot].record(torch.cuda.current_stream(self.device))
        return self._pool.submit(self._fill, i, slot)

    @torch.inference_mode()
    def _fill(self, i: int, slot: int, check=None) -> None:
        """Layer i's tensors from their files into `slot` (run by the worker thread; by `check` synchronously)."""
        params = dict(self.slots[slot].named_parameters())
        pipe = self._pipe if check is None else None
        if pipe is not None:
            pipe.uploaded[slot].synchronize()  # the staging buffers' previous upload is done: they can be reused
        staged = []
        by_file: dict[Path, list[LayerTensor]] = {}
        for t in self.tensors[i]:
            by_file.setdefault(t.file, []).append(t)
        for file, ts in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:  # unmapped again when it closes
                for t in ts:
                    src = f.get_tensor(t.name)
                    dst = params[t.param].data
                    dst = dst if t.rows is None else dst[t.rows[0] : t.rows[1]]
                    if pipe is None:
                        dst.copy_(src)  # the cast to the model's dtype, as the in-memory load does
                        if check is not None:
                            check(t.name, t.file, dst, src)
                        continue
                    key = (t.param, t.rows)  # the tensor's role in a Block: the same buffers serve every layer
                    buf = pipe.staging[slot].get(key)
                    if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                        buf = pipe.staging[slot][key] = _host_buffer(src)
                    staged.append((dst, buf.copy_(src)))
        if pipe is not None:
            with torch.cuda.device(self.device), torch.cuda.stream(pipe.stream):
                pipe.stream.wait_event(pipe.freed[slot])
                for dst, buf in staged:
                    dst.copy_(buf, non_blocking=True)
                pipe.uploaded[slot].record(pipe.stream)

    def verify(self, check) -> None:
        """Read every layer once, as the in-memory load does: `check(name, file, loaded, stored)` per tensor (the
        loader's finiteness check). Layer by layer, each file closed after its layer: one layer resident at a time."""
        assert self._next is None, "check the layers before streaming them"
        for i in range(len(self)):
            self._fill(i, 0, check)
