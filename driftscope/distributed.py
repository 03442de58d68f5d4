"""Data-parallel runs under torchrun (drift, generate, eval): `World` is this process's place among the ranks. In a
drift run every rank plans the same batches, takes a share balanced by tokens (`shard`), runs it with its own
resumable state, and at the end every rank's accumulators are summed into rank 0's (`merge`), which writes the
outputs. One process never touches torch.distributed.

A rank waits at most `dist_timeout` seconds in a collective (the merge waits for the slowest rank's shard); a rank
that dies ends the others sooner: torchrun stops the whole group when one of its processes fails.
"""
from __future__ import annotations

import dataclasses
import datetime
import heapq
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from driftscope.errors import InputError


class Stateful(Protocol):
    """What a merge and a checkpoint need of an accumulator."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


def processes(n: int) -> str:
    """A world size in words, for messages."""
    return "one process" if n == 1 else f"{n} processes (torchrun WORLD_SIZE {n})"


@dataclass
class World:
    """rank / size / local_rank of this process (0 / 1 / 0 for a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # where the merge sums, once started: this rank's models' device
    owns_group: bool = False  # whether start() made the process group (then close() ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        """The world torch.distributed.run (torchrun) describes in WORLD_SIZE, RANK and LOCAL_RANK; one process when
        WORLD_SIZE is unset or 1."""
        if env.get("WORLD_SIZE", "1") == "1":
            return cls()
        try:
            size, rank, local = (int(env.get(k, "")) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
        except ValueError:
            raise InputError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r}, LOCAL_RANK="
                             f"{env.get('LOCAL_RANK')!r}: expected the integers torchrun sets; launch with torchrun "
                             "--nproc-per-node=N -m driftscope drift ...") from None
        if not 0 <= rank < size:
            raise InputError(f"RANK={rank} lies outside WORLD_SIZE={size}")
        return cls(rank, size, local)

    # ---- the process group --------------------------------------------------------------------------------------
    def start(self, opts):
        """Join the process group for a drift run (see `join`); returns the options with this rank's device, or its
        group of devices (`rank_devices`), and progress bars on rank 0 only. A no-op for one process."""
        if self.size == 1:
            return opts
        if opts.base_device is not None or opts.tuned_device:  # a group of devices per process
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            base, tuned = self.rank_devices(opts.base_device or opts.device, list(opts.tuned_device) or [opts.device],
                                            count)
            opts = dataclasses.replace(opts, base_device=base, tuned_device=tuned, device=base)
            self.join(base, opts.dist_timeout, "--base-device", exact=True)
        else:
            opts = dataclasses.replace(opts, device=self.join(opts.device, opts.dist_timeout, "--device"))
        return opts if self.main else dataclasses.replace(opts, progress=False)  # one progress bar: rank 0's

    def rank_devices(self, base: str, tuned: list[str], count: int) -> tuple[str, list[str]]:
        """--base-device/--tuned-device under torchrun name the devices of one process's group: `cuda:i` is the
        i-th of G = (largest index + 1) GPUs per process, and the process with LOCAL_RANK l takes cuda:(l·G + i)
        (`cuda` alone: cuda:0 of the group; the CPU stays the CPU). With 8 GPUs, --nproc-per-node=4 --base-device
        cuda:0 --tuned-device cuda:1 puts rank l's base on GPU 2l and its tuned model on GPU 2l + 1. `count`: the
        CUDA devices of this node."""
        names = [base, *tuned]
        index = [torch.device("cuda:0" if d == "cuda" else d).index for d in names]
        cuda = [i for d, i in zip(names, index) if torch.device(d).type == "cuda"]
        if not cuda:
            return base, list(tuned)
        group = max(cuda) + 1
        first = self.local_rank * group
        if first + group > count:
            raise InputError(f"LOCAL_RANK={self.local_rank} with {group} GPU{'s' * (group > 1)} per process "
                             f"(--base-device/--tuned-device up to cuda:{group - 1}) needs cuda:{first}..cuda:"
                             f"{first + group - 1}, but this node has {count} CUDA device(s): --nproc-per-node × "
                             f"{group} must not exceed its GPUs")
        mapped = [f"cuda:{first + i}" if torch.device(d).type == "cuda" else d for d, i in zip(names, index)]
        return mapped[0], mapped[1:]

    def join(self, device: str, timeout: float = 1800.0, flag: str = "device", exact: bool = False) -> str:
        """Join the process group (gloo for the CPU, nccl for CUDA: each rank on cuda:LOCAL_RANK, or on `device` as
        given when `exact`) and return this rank's device; `flag` names the option in errors. An existing group (an
        embedding harness made it) is used. A no-op returning `device` for one process."""
        if self.size == 1:
            return device
        import torch.distributed as dist

        if not dist.is_available():
            raise InputError(f"WORLD_SIZE={self.size} but this torch ({torch.__version__}) has no torch.distributed")
        dev = torch.device(device)
        if dev.type == "cuda" and exact:
            torch.cuda.set_device(dev)
        elif dev.type == "cuda":
            if dev.index is not None:
                raise InputError(f"{flag} {device} under torchrun (WORLD_SIZE={self.size}): pass {flag} cuda; each "
                                 "process takes cuda:LOCAL_RANK")
            if self.local_rank >= torch.cuda.device_count():
                raise InputError(f"LOCAL_RANK={self.local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                                 "here: --nproc-per-node must not exceed the GPUs of a node")
            torch.cuda.set_device(self.local_rank)
            dev = torch.device("cuda", self.local_rank)
        self.device = dev
        if not dist.is_initialized():
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout), **kw)
            self.owns_group = True
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.size):
            raise InputError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the "
                             f"environment RANK={self.rank} of WORLD_SIZE={self.size}")
        return str(dev)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's picklable `obj` on every rank; `obj` itself for one process."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj, dst: int = 0) -> list | None:
        """Every rank's picklable `obj` in rank order on rank `dst`, None on the others; [obj] for one process."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        every: list | None = [None] * self.size if self.rank == dst else None
        dist.gather_object(obj, every, dst=dst)
        return every

    # ---- the work -----------------------------------------------------------------------------------------------
    def shard(self, sizes: Sequence[Sequence[int]]) -> list[list[int]]:
        """This rank's batches: `sizes[k][i]` is the token count of task k's batch i; returns the batch indices of
        each task this rank runs, ascending. Greedy over every task's batches at once: the largest batch goes to the
        rank with the fewest tokens so far (the lowest rank on ties). Deterministic: every rank deals the same
        shards, and so does a resumed run."""
        if self.size == 1:
            return [list(range(len(s))) for s in sizes]
        mine: list[list[int]] = [[] for _ in sizes]
        loads = [(0, r) for r in range(self.size)]  # a heap of (tokens, rank)
        units = sorted((-n, k, i) for k, s in enumerate(sizes) for i, n in enumerate(s))  # largest first
        for neg, k, i in units:
            load, r = heapq.heappop(loads)
            heapq.heappush(loads, (load - neg, r))
            if r == self.rank:
                mine[k].append(i)
        return [sorted(m) for m in mine]

    def merge(self, states: Mapping[str, Stateful], counts: dict, merge_kind: Callable[[str], str]) -> dict:
        """Every rank's accumulators summed into rank 0's `states` (the other ranks' stay as they are), each tensor
        combined as `merge_kind(key)` says ("sum", "cat" in rank order, or "first"); `counts` ({"tokens": int,
        "nonfinite": {key: int}}) added up the same way. Returns the summed counts (rank 0; `counts` elsewhere). A
        no-op for one process."""
        if self.size == 1:
            return counts
        import torch.distributed as dist

        for acc in states.values():
            sd = acc.state_dict()
            metas: list = [None] * self.size
            dist.all_gather_object(metas, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
            shapes = {k: m for meta in metas for k, m in meta.items()}  # a rank without batches lacks layer sums
            merged = {}
            for key in sorted(shapes):
                kind, t = merge_kind(key), sd.get(key)
                if kind == "sum":
                    t = (t if t is not None else torch.zeros(shapes[key][0], dtype=shapes[key][1])).to(self.device)
                    dist.reduce(t, dst=0)
                    merged[key] = t.cpu()
                elif kind == "cat":  # TokenMetrics' per-sample rows: every rank's, in rank order
                    parts = self.gather(t)
                    merged[key] = torch.cat(parts) if self.main else t
                else:
                    merged[key] = t
            if self.main:
                acc.load_state_dict(merged)
        every = self.gather(counts)
        if not self.main:
            return counts
        nonfinite: dict[str, int] = {}
        for c in every:
            for key, n in c["nonfinite"].items():
                nonfinite[key] = nonfinite.get(key, 0) + n
        return {"tokens": sum(c["tokens"] for c in every), "nonfinite": nonfinite}
