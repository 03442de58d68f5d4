"""PCA shift (DESIGN.md §3): `PaperPCAShift` reproduces the paper's analyse_PCA_Shift.py from per-query vectors;
`StreamingPCA` gives the same PCA from float64 Σx, Σxxᵀ per layer over any number of queries or tokens, for one
base against any number of tuned models (base moments kept once, Σx per tuned model).

Both fit PCA(n_components=2) on the BASE vectors of each layer and project raw (uncentred) vectors; records
follow the paper's pca_shift.json: {"layer", "state": "Original"|"Updated", "shift", "principle"}.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from driftscope.kernels.cov_update import batch_gram
from driftscope.probes.base import Accumulator, LayerSums, json_float

__all__ = ["PaperPCAShift", "StreamingPCA", "pca_components", "pca_components_from_moments", "svd_flip_v",
           "pca_shift_records", "centroid_distance"]


# ---- PCA with sklearn's conventions ---------------------------------------------------------------------------
def svd_flip_v(components: torch.Tensor) -> torch.Tensor:
    """sklearn `svd_flip(u_based_decision=False)`: flip each row so its largest-|.| entry (first on ties) is > 0.

    This is what sklearn >= 1.5 PCA does for every solver, and what older sklearn's randomized solver (which
    PCA(n_components=2) picks for the paper's 30 x 5120 inputs) did when n_samples < n_features.
    """
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return components * signs


def pca_components(x: torch.Tensor, n_components: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact PCA of rows of x [n, d] in float64, sklearn semantics: (mean [d], components [k, d],
    explained_variance [k])."""
    x = x.to(torch.float64)
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    comps = svd_flip_v(vt[:n_components])
    return mean, comps, s[:n_components] ** 2 / max(x.shape[0] - 1, 1)


def pca_components_from_moments(n: int, sum_x: torch.Tensor, sum_xxT: torch.Tensor, n_components: int = 2):
    """PCA from n, Σx [d], Σxxᵀ [d, d] (float64) via eigh of the covariance; same return and signs as
    `pca_components`."""
    if n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {n}")
    mean = sum_x / n
    cov = (sum_xxT - n * torch.outer(mean, mean)) / (n - 1)
    cov = (cov + cov.T) / 2
    evals, evecs = _eigh(cov)  # ascending
    top = evecs[:, -n_components:].flip(1)  # [d, k], largest eigenvalue first
    return mean, svd_flip_v(top.T.contiguous()), evals[-n_components:].flip(0)


ONE_THREAD_EIGH = 2048  # CPU: eigh of at most this size runs on one thread (see _eigh)


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh; on the CPU, for d <= ONE_THREAD_EIGH on one thread: LAPACK's tridiagonal reduction at
    these sizes is a chain of short parallel regions that gains little from a second thread and, while other
    processes share the cores, waits at every barrier for a descheduled one (d = 576, float64, 2 threads on a
    loaded 2-core machine: 5-15 s instead of 0.07 s on one thread; bench/RESULTS.md)."""
    if a.device.type != "cpu" or a.shape[-1] > ONE_THREAD_EIGH or (threads := torch.get_num_threads()) == 1:
        return torch.linalg.eigh(a)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


def _each_layer(fn: Callable[[int], Any], n: int, device: torch.device) -> list:
    """[fn(layer) for each of n layers]; on the CPU with T > 1 threads, T layers at once, each on one thread: an eigh
    gains little from threads (see _eigh) while the layers are independent. Every call runs on one thread, as the
    sequential loop's eigh does, so the bits are the loop's (31 eighs at d = 576: 1.0 -> 0.5 s on 2 cores)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or n < 2:
        return [fn(i) for i in range(n)]

    def one(i: int):
        torch.set_num_threads(1)  # this worker's OpenMP; MKL's is process-wide, set below and kept until the end
        return fn(i)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, n)) as pool:
            return list(pool.map(one, range(n)))
    finally:
        torch.set_num_threads(threads)


# ---- records ----------------------------------------------------------------------------------------------------
def pca_shift_records(m1_base, m2_base, m1_tuned, m2_tuned) -> list[dict]:
    """The paper's per-layer records: Original (shift 0.0, principle m2_base),
    Updated (m1_tuned − m1_base, m2_tuned)."""
    return [rec for layer, (a, b, c, d) in enumerate(zip(m1_base, m2_base, m1_tuned, m2_tuned, strict=True))
            for rec in ({"layer": layer, "state": "Original", "shift": 0.0, "principle": float(b)},
                        {"layer": layer, "state": "Updated", "shift": float(c) - float(a), "principle": float(d)})]


def centroid_distance(records: Sequence[Mapping]) -> float:
    """‖mean_layers(shift, principle | Updated) − mean_layers(shift, principle | Original)‖₂ (Original shift is 0)."""
    def centroid(state):
        rows = [r for r in records if r["state"] == state]
        return (sum(r["shift"] for r in rows) / len(rows), sum(r["principle"] for r in rows) / len(rows))
    (s_u, p_u), (s_o, p_o) = centroid("Updated"), centroid("Original")
    return ((s_u - s_o) ** 2 + (p_u - p_o) ** 2) ** 0.5


def _project(means_base, means_tuned, comps) -> list[dict]:
    """m_j = mean(X·c_j) = mean(X)·c_j for raw vectors, per layer; comps [L][2, d]."""
    m = [(mb @ c[0], mb @ c[1], mt @ c[0], mt @ c[1]) for mb, mt, c in zip(means_base, means_tuned, comps)]
    return pca_shift_records(*zip(*m))


# ---- accumulators -----------------------------------------------------------------------------------------------
class PaperPCAShift(Accumulator):
    """Keeps the per-query vectors ([L+1] x [Q, d], Q ~ 30) of both models and runs the paper's PCA at finalize.

    update(layer, base_vectors [B, d], tuned_vectors [B, d], query_ids [B]); a query id may appear once per layer.
    Vectors are sorted by query id before the fit, so update/merge order does not matter.
    """

    def __init__(self, n_layers: int, hidden_size: int) -> None:
        self.n_layers, self.hidden_size = int(n_layers), int(hidden_size)
        self._rows: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(self.n_layers)]

    def update(self, layer: int, base_vectors: torch.Tensor, tuned_vectors: torch.Tensor,
               query_ids: torch.Tensor | Sequence[int]) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layers})")
        qids = [int(q) for q in (query_ids.tolist() if torch.is_tensor(query_ids) else query_ids)]
        b, t = base_vectors.detach().cpu(), tuned_vectors.detach().cpu()
        if b.shape != t.shape or b.shape != (len(qids), self.hidden_size):
            raise ValueError(f"expected base/tuned vectors [{len(qids)}, {self.hidden_size}], got "
                             f"{tuple(b.shape)}, {tuple(t.shape)}")
        for i, q in enumerate(qids):
            assert q not in self._rows[layer], f"query {q} already added at layer {layer}"
            self._rows[layer][q] = (b[i].clone(), t[i].clone())

    def merge(self, other: "PaperPCAShift") -> "PaperPCAShift":
        self._check_mergeable(other)
        if (other.n_layers, other.hidden_size) != (self.n_layers, self.hidden_size):
            raise ValueError("cannot merge PaperPCAShift of different n_layers/hidden_size")
        for layer, rows in enumerate(other._rows):
            for q, (b, t) in rows.items():
                assert q not in self._rows[layer], f"query {q} present in both accumulators at layer {layer}"
                self._rows[layer][q] = (b, t)
        return self

    def vectors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query_ids [Q], base [Q, d], tuned [Q, d]) sorted by query id, in the stored dtype."""
        qs = sorted(self._rows[layer])
        if not qs:
            return (torch.zeros(0, dtype=torch.int64),) + (torch.zeros(0, self.hidden_size),) * 2
        return (torch.tensor(qs, dtype=torch.int64), torch.stack([self._rows[layer][q][0] for q in qs]),
                torch.stack([self._rows[layer][q][1] for q in qs]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"config": torch.tensor([self.n_layers, self.hidden_size], dtype=torch.int64)}
        for layer in range(self.n_layers):
            q, b, t = self.vectors(layer)
            sd[f"ids.{layer}"], sd[f"base.{layer}"], sd[f"tuned.{layer}"] = q, b.contiguous(), t.contiguous()
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.__init__(*state["config"].tolist())
        for layer in range(self.n_layers):
            if state[f"ids.{layer}"].numel():
                self.update(layer, state[f"base.{layer}"], state[f"tuned.{layer}"], state[f"ids.{layer}"])

    def finalize(self) -> dict:
        """{"mode": "paper", "queries", "records", "centroid_distance"}; PCA per layer on float64 copies."""
        means_b, means_t, comps, n_q = [], [], [], None
        for layer in range(self.n_layers):
            q, b, t = self.vectors(layer)
            if n_q is not None and q.shape[0] != n_q:
                raise ValueError(f"layer {layer} has {q.shape[0]} queries, layer 0 has {n_q}")
            n_q = q.shape[0]
            b64, t64 = b.to(torch.float64), t.to(torch.float64)
            comps.append(pca_components(b64, 2)[1])
            means_b.append(b64.mean(0))
            means_t.append(t64.mean(0))
        records = _project(means_b, means_t, comps)
        return {"mode": "paper", "queries": n_q, "records": records,
                "centroid_distance": json_float(centroid_distance(records))}


class StreamingPCA(Accumulator):
    """Per layer: n, Σx, Σxxᵀ of the base rows and Σx of each of `n_tuned` tuned models' rows for the same inputs
    (float64, on the first update's device). Memory d²·8 bytes per layer once, whatever n_tuned (d=5120: 210 MB
    per layer). Rows may be per-query vectors (same PCA as the paper) or per-token states."""

    def __init__(self, n_layers: int, hidden_size: int, n_tuned: int = 1) -> None:
        if n_tuned < 1:
            raise ValueError(f"n_tuned must be >= 1, got {n_tuned}")
        self.n_layers, self.hidden_size, self.n_tuned = int(n_layers), int(hidden_size), int(n_tuned)
        self.n = torch.zeros(self.n_layers, dtype=torch.int64)
        d = self.hidden_size
        self.sums = LayerSums(self.n_layers, {"base_x": (d,), "base_xxT": (d, d),
                                              **{f"tuned{j}_x": (d,) for j in range(self.n_tuned)}})
        self._fit: list | None = None  # per layer (mean, components, explained variance), cached by finalize

    def update(self, layer: int, x_base: torch.Tensor, x_tuned: torch.Tensor | Sequence[torch.Tensor],
               base_gram: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """x_base [n, d] and one [n, d] per tuned model (a tensor when n_tuned is 1): rows of the same inputs.
        `base_gram`: `batch_gram(x_base)` when the caller has it (shared with HiddenSimilarity), else computed here."""
        xs = [x_tuned] if torch.is_tensor(x_tuned) else list(x_tuned)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layers})")
        if len(xs) != self.n_tuned:
            raise ValueError(f"expected states of {self.n_tuned} tuned model(s), got {len(xs)}")
        for x in (x_base, *xs):
            if x.shape != x_base.shape or x.ndim != 2 or x.shape[1] != self.hidden_size:
                raise ValueError(f"expected x_base and every x_tuned [n, {self.hidden_size}], got "
                                 f"{[tuple(t.shape) for t in (x_base, *xs)]}")
        dev = x_base.device
        sx, sxx = base_gram if base_gram is not None else batch_gram(x_base.detach())
        self.sums.get("base_x", layer, dev).add_(sx)
        self.sums.get("base_xxT", layer, dev).add_(sxx)
        for j, x in enumerate(xs):
            self.sums.get(f"tuned{j}_x", layer, dev).add_(x.detach().to(torch.float64).sum(0))
        self.n[layer] += x_base.shape[0]
        self._fit = None

    def _config(self) -> tuple[int, int, int]:
        return (self.n_layers, self.hidden_size, self.n_tuned)

    def merge(self, other: "StreamingPCA") -> "StreamingPCA":
        self._check_mergeable(other)
        if other._config() != self._config():
            raise ValueError(f"cannot merge StreamingPCA {other._config()} into {self._config()} "
                             "(n_layers, hidden_size, n_tuned)")
        self.n += other.n
        self.sums.merge(other.sums)
        self._fit = None
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"config": torch.tensor(self._config(), dtype=torch.int64), "n": self.n.clone(), **self.sums.state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.__init__(*state["config"].tolist())
        self.n = state["n"].to(torch.int64).clone()
        self.sums.load(state)

    def components(self, layer: int, n_components: int = 2):
        """(mean, components [k, d], explained_variance [k]) of the base rows of `layer`."""
        sx, sxx = self.sums["base_x"][layer], self.sums["base_xxT"][layer]
        if sx is None:
            raise ValueError(f"layer {layer} has no data")
        # on the sums' device: a float64 eigh of 5120 x 5120 takes seconds on a GPU, minutes on 2 CPU cores
        return pca_components_from_moments(int(self.n[layer]), sx, sxx, n_components)

    def finalize(self, j: int = 0) -> dict:
        """Tuned model j against the base: {"mode": "streaming", "rows", "records", "centroid_distance",
        "explained_variance": [[ev1, ev2] per layer]}, or "undefined" with the reason when a layer has < 2 rows.
        One eigh per layer, shared by every j."""
        if not 0 <= j < self.n_tuned:
            raise ValueError(f"tuned model {j} out of range [0, {self.n_tuned})")
        if int(self.n.min()) < 2:
            why = f"PCA needs at least 2 rows (scored tokens) per layer, got {int(self.n.min())}"
            return {"mode": "streaming", "rows": self.n.tolist(), "records": [], "centroid_distance": None,
                    "explained_variance": None, "undefined": why}
        if self._fit is None:
            self._fit = _each_layer(self.components, self.n_layers, self.sums["base_xxT"][0].device)
        means_b = [mean for mean, _, _ in self._fit]
        means_t = [self.sums[f"tuned{j}_x"][layer].to(mean.device) / int(self.n[layer])
                   for layer, mean in enumerate(means_b)]
        records = _project(means_b, means_t, [c for _, c, _ in self._fit])
        return {"mode": "streaming", "rows": self.n.tolist(), "records": records,
                "centroid_distance": json_float(centroid_distance(records)),
                "explained_variance": [[json_float(e) for e in ev] for _, _, ev in self._fit]}
