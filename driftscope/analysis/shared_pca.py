"""Streaming PCA shift for one base against several tuned models, with the base moments kept once per task.

The PCA is fit on the base states only, so its Σx, Σxxᵀ (d² float64 per layer: 210 MB at d=5120) are the same for
every tuned model. The task's first tuned model keeps a full `StreamingPCA` (base moments + its tuned Σx); every
other tuned model keeps only n and Σx of its own states (`TunedMeans`). At finalize the base PCA of each layer is
computed once and every tuned model is projected on it, with the same arithmetic as `StreamingPCA.finalize`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from driftscope.probes.base import Accumulator, json_float
from driftscope.probes.pca import StreamingPCA, centroid_distance, pca_shift_records


class TunedMeans(Accumulator):
    """Per layer: n rows and their float64 Σx (on the device of the first update). merge = add."""

    def __init__(self, n_layers: int, hidden_size: int) -> None:
        self.n_layers, self.hidden_size = int(n_layers), int(hidden_size)
        self.n = torch.zeros(self.n_layers, dtype=torch.int64)
        self.sum_x: list[torch.Tensor | None] = [None] * self.n_layers

    def update(self, layer: int, x: torch.Tensor) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layers})")
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"expected x [n, {self.hidden_size}], got {tuple(x.shape)}")
        if self.sum_x[layer] is None:
            self.sum_x[layer] = torch.zeros(self.hidden_size, dtype=torch.float64, device=x.device)
        self.sum_x[layer] = self.sum_x[layer].to(x.device)
        self.sum_x[layer].add_(x.detach().to(torch.float64).sum(0))
        self.n[layer] += x.shape[0]

    def merge(self, other: "TunedMeans") -> "TunedMeans":
        self._check_mergeable(other)
        if (other.n_layers, other.hidden_size) != (self.n_layers, self.hidden_size):
            raise ValueError("cannot merge TunedMeans of different n_layers/hidden_size")
        self.n += other.n
        for layer, v in enumerate(other.sum_x):
            if v is not None:
                mine = self.sum_x[layer]
                self.sum_x[layer] = v.clone() if mine is None else mine.add_(v.to(mine.device))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"config": torch.tensor([self.n_layers, self.hidden_size], dtype=torch.int64), "n": self.n.clone()}
        for layer, v in enumerate(self.sum_x):
            if v is not None:
                sd[f"sum_x.{layer}"] = v.detach().cpu().clone()
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.__init__(*state["config"].tolist())
        self.n = state["n"].to(torch.int64).clone()
        for name, v in state.items():
            if name.startswith("sum_x."):
                self.sum_x[int(name.split(".")[1])] = v.to(torch.float64).clone()

    def finalize(self) -> dict:
        raise TypeError("TunedMeans has no PCA of its own: use shared_streaming_finalize with the task's StreamingPCA")


def shared_streaming_finalize(base: StreamingPCA, others: Sequence[TunedMeans]) -> list[dict]:
    """[base.finalize(), then the same dict for each of `others` projected on base's PCA]; one eigh per layer.

    Fewer than 2 rows (scored tokens) make the PCA undefined: then each dict says so (no records, distance None)."""
    if int(base.n.min()) < 2:
        why = f"PCA needs at least 2 rows (scored tokens) per layer, got {int(base.n.min())}"
        return [{"mode": "streaming", "rows": base.n.tolist(), "records": [], "centroid_distance": None,
                 "explained_variance": None, "undefined": why} for _ in range(1 + len(others))]
    comps, evs, means_b = [], [], []
    for layer in range(base.n_layers):
        mean, c, ev = base.components(layer)
        comps.append(c)
        means_b.append(mean)
        evs.append([json_float(e) for e in ev])
    out = []
    for n, sums in [(base.n, base.sums["tuned_x"]), *((o.n, o.sum_x) for o in others)]:
        if not torch.equal(n, base.n):
            raise ValueError(f"a tuned model saw {n.tolist()} rows per layer, the base {base.n.tolist()}")
        m = []
        for layer, (mb, c) in enumerate(zip(means_b, comps)):
            mt = sums[layer].to(mb.device) / int(n[layer])
            m.append((mb @ c[0], mb @ c[1], mt @ c[0], mt @ c[1]))
        records = pca_shift_records(*zip(*m))
        out.append({"mode": "streaming", "rows": base.n.tolist(), "records": records,
                    "centroid_distance": json_float(centroid_distance(records)), "explained_variance": evs})
    return out
