"""Per-token-id table of shifted tokens (actual next token whose rank differs between base and tuned):
count, count shifted, sum of rank shift; dense int64/float64 tables indexed by token id, so merge is an exact add.

The paper's word clouds / Table 8 are `finalize(decode=tokenizer.decode_one, top_k=...)` sorted by count_shifted.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from driftscope.probes.base import Accumulator, json_float

__all__ = ["ShiftedTokens"]

_SORT_KEYS = ("count_shifted", "count", "sum_abs_shift")
_TABLES = dict(count=torch.int64, count_shifted=torch.int64, sum_shift=torch.float64, sum_abs_shift=torch.float64)


class ShiftedTokens(Accumulator):
    """Token id -> (count, count_shifted, sum_shift, sum_abs_shift), with shift = rank_base - rank_tuned.

    Memory: vocab_size * 4 * 8 bytes (4.9 MB for a 152k vocabulary). All entries are integers (rank shifts are
    integers; float64 sums are exact below 2^53), so merge and update order never change the result.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        for k, dtype in _TABLES.items():  # count, count_shifted, sum_shift, sum_abs_shift: [vocab_size] each
            setattr(self, k, torch.zeros(vocab_size, dtype=dtype))

    def update(self, token_ids: torch.Tensor, rank_base: torch.Tensor, rank_tuned: torch.Tensor) -> None:
        """token_ids [N]: the actual next token at each scored position (the batch's targets[score_mask]);
        rank_base, rank_tuned [N]: its rank under each model (vocab probe outputs; rows with a rank < 1 are skipped)."""
        ids = token_ids.detach().to("cpu", torch.int64)
        n = ids.shape[0]
        for k, v in (("token_ids", token_ids), ("rank_base", rank_base), ("rank_tuned", rank_tuned)):
            if v.shape != (n,):
                raise ValueError(f"{k} has shape {tuple(v.shape)}, expected ({n},)")
        if n == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got min {int(ids.min())}, "
                             f"max {int(ids.max())}")
        rank_base, rank_tuned = rank_base.detach().to("cpu", torch.int64), rank_tuned.detach().to("cpu", torch.int64)
        ok = (rank_base >= 1) & (rank_tuned >= 1)  # a flagged vocab_probe row (rank -1) is left out
        ids, shift = ids[ok], (rank_base - rank_tuned)[ok]
        self.count += torch.bincount(ids, minlength=self.vocab_size)
        self.count_shifted += torch.bincount(ids[shift != 0], minlength=self.vocab_size)
        self.sum_shift.index_add_(0, ids, shift.to(torch.float64))
        self.sum_abs_shift.index_add_(0, ids, shift.abs().to(torch.float64))

    def merge(self, other: "ShiftedTokens") -> "ShiftedTokens":
        self._check_mergeable(other)
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge vocab_size {other.vocab_size} into {self.vocab_size}")
        for k in _TABLES:
            getattr(self, k).add_(getattr(other, k))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in _TABLES}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.__init__(int(state["count"].shape[0]))
        for k, dtype in _TABLES.items():
            setattr(self, k, state[k].to(dtype).clone())

    def finalize(self, decode: Callable[[int], str] | None = None, top_k: int | None = 100,
                 sort_by: str = "count_shifted") -> dict:
        """{"tokens", "shifted", "distinct_shifted", "sort_by", "top": [{id, text, count, count_shifted,
        frac_shifted, mean_shift, mean_abs_shift}]}, rows with count_shifted > 0 only, sorted by `sort_by`
        descending then token id ascending; `decode(id) -> str` fills "text" (None without it)."""
        if sort_by not in _SORT_KEYS:
            raise ValueError(f"sort_by must be one of {_SORT_KEYS}, got {sort_by!r}")
        key = {"count_shifted": self.count_shifted.to(torch.float64), "count": self.count.to(torch.float64),
               "sum_abs_shift": self.sum_abs_shift}[sort_by]
        ids = torch.nonzero(self.count_shifted > 0).flatten()
        # stable sort by id (already ascending), then by key descending: ties keep ascending id; top_k None: all
        ids = ids[torch.argsort(-key[ids], stable=True)][:top_k]
        rows = []
        for i in ids.tolist():
            c = int(self.count[i])
            rows.append({
                "id": i, "text": decode(i) if decode is not None else None, "count": c,
                "count_shifted": int(self.count_shifted[i]), "frac_shifted": int(self.count_shifted[i]) / c,
                "mean_shift": json_float(self.sum_shift[i] / c),
                "mean_abs_shift": json_float(self.sum_abs_shift[i] / c),
            })
        return {"tokens": int(self.count.sum()), "shifted": int(self.count_shifted.sum()),
                "distinct_shifted": int((self.count_shifted > 0).sum()), "sort_by": sort_by, "top": rows}
