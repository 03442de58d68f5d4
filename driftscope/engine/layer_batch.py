"""What every layer of a forward reads besides its input: the packed batch's boundaries and rope tables
(`LayerBatch`), a generation step's paged KV cache (`KVStep`), a shared-prefix batch's whole-sequence layout
(`SharedPrefix`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KVStep", "LayerBatch", "SharedPrefix"]


@dataclass
class KVStep:
    """One generation step's view of a model's paged KV cache (shared metadata from the scheduler, this model's cache).

    The step's T tokens are `n_decode` decode tokens (one per running sequence, attending to its cached context)
    followed by whole prefill sequences (`LayerBatch.cu_seqlens` covers those, causal among themselves).
    """

    k: torch.Tensor  # [L, S, Hkv, D] this model's key cache, S = num_blocks · block_size slots
    v: torch.Tensor  # [L, S, Hkv, D]
    slot_mapping: torch.Tensor  # [T] int64 slot where each new token's k/v is written
    n_decode: int
    gather: torch.Tensor  # [n_decode, Lmax] int64 slots of each decode sequence's context
    key_mask: torch.Tensor  # [n_decode, Lmax] bool
    block_tables: torch.Tensor  # [n_decode, M] int32
    context_lens: torch.Tensor  # [n_decode] int32, including the new token
    block_size: int


@dataclass
class SharedPrefix:
    """A shared-prefix batch's attention layout: the rows as whole sequences (each sample's own copy of the prefix,
    then its rows), where the varlen kernels attend causally as for an unshared batch."""

    gather: torch.Tensor  # [T_full] int64: the batch row at each row of the whole-sequence layout
    back: torch.Tensor  # [T] int64: the whole-sequence row each batch row's output is read from
    cu_seqlens: torch.Tensor  # [B+1] int32 over the whole sequences
    max_seqlen: int

    @staticmethod
    def of(bounds: list[int], prefix: int, device) -> tuple["SharedPrefix", torch.Tensor]:
        """(the layout, the batch rows' positions [T]) of cu_seqlens `bounds` whose sequence 0 is a `prefix` every
        later sequence continues: its rows at positions 0.., theirs at prefix..; sample b laid out whole as the
        prefix's rows, then its own."""
        own = torch.arange(prefix, dtype=torch.int64)
        gather, back, positions, start = [], [own], [own], 0
        for s, e in zip(bounds[1:-1], bounds[2:]):
            gather += [own, torch.arange(s, e, dtype=torch.int64)]
            back.append(torch.arange(start + prefix, start + prefix + e - s, dtype=torch.int64))
            positions.append(torch.arange(prefix, prefix + e - s, dtype=torch.int64))
            start += prefix + e - s
        lens = torch.tensor([prefix + e - s for s, e in zip(bounds[1:-1], bounds[2:])], dtype=torch.int64)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        layout = SharedPrefix(torch.cat(gather).to(device), torch.cat(back).to(device), cu.to(device),
                              int(lens.max()))
        return layout, torch.cat(positions).to(device)


@dataclass
class LayerBatch:
    """Per-batch data shared by all layers (and by both models of a lockstep pair when their configs agree)."""

    cu_seqlens: torch.Tensor  # [B+1] int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T (prefill part when kv is set)
    max_seqlen: int
    cos: torch.Tensor  # [T, 1, R] model dtype, R = rotary_dim / 2
    sin: torch.Tensor  # [T, 1, R] model dtype
    kv: KVStep | None = None
    masks: tuple | None = None  # per sequence: bool [L, L] attention mask or None (causal); see tree_attention
    window_masks: tuple | None = None  # `masks` restricted to the sliding window (by position), for windowed layers
    shared: SharedPrefix | None = None  # sequence 0 a prefix the others continue (Transformer.prepare(prefix=))
