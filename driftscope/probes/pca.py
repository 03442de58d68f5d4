"""PCA shift (DESIGN.md §3): `PaperPCAShift` reproduces the paper's analyse_PCA_Shift.py from per-query vectors;
`StreamingPCA` gives the same PCA from float64 Σx, Σxxᵀ per layer over any number of queries or tokens.

Both fit PCA(n_components=2) on the BASE vectors of each layer and project raw (uncentred) vectors; records
follow the paper's pca_shift.json: {"layer", "state": "Original"|"Updated", "shift", "principle"}.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from driftscope.probes.base import Accumulator, json_float

__all__ = [
    "PaperPCAShift", "StreamingPCA", "pca_components", "pca_components_from_moments", "svd_flip_v",
    "paper_pad_batch", "paper_query_vectors", "paper_query_vectors_from_real", "paper_select_texts",
    "pca_shift_records", "pca_shift_entry", "centroid_distance", "cov_update",
]


# ---- covariance update: one swappable call -----------------------------------------------------------------
def _cov_update_f64(sum_x: torch.Tensor, sum_xxT: torch.Tensor, x: torch.Tensor) -> None:
    """In place: sum_x [d] += Σ_rows x, sum_xxT [d, d] += xᵀx, in float64 (x: [n, d], any float dtype)."""
    x64 = x.detach().to(sum_x.device, torch.float64)
    sum_x += x64.sum(0)
    sum_xxT += x64.T @ x64


def _resolve_cov_update():
    try:  # the fast kernel (same signature, in place) when it exists
        from driftscope.kernels.cov_update import cov_update as kernel
    except ImportError:
        return _cov_update_f64
    return kernel


cov_update = _resolve_cov_update()


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
    """Exact PCA of rows of x [n, d] in float64, sklearn semantics: (mean [d], components [k, d], explained_variance [k])."""
    x = x.to(torch.float64)
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    comps = svd_flip_v(vt[:n_components])
    return mean, comps, s[:n_components] ** 2 / max(x.shape[0] - 1, 1)


def pca_components_from_moments(n: int, sum_x: torch.Tensor, sum_xxT: torch.Tensor, n_components: int = 2):
    """PCA from n, Σx [d], Σxxᵀ [d, d] (float64) via eigh of the covariance; same return and signs as `pca_components`."""
    if n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {n}")
    mean = sum_x / n
    cov = (sum_xxT - n * torch.outer(mean, mean)) / (n - 1)
    cov = (cov + cov.T) / 2
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -n_components:].flip(1)  # [d, k], largest eigenvalue first
    return mean, svd_flip_v(top.T.contiguous()), evals[-n_components:].flip(0)


# ---- the paper's query vectors ---------------------------------------------------------------------------------
def paper_select_texts(texts: Sequence[str], k: int = 30, seed: int = 42, method: str = "shuffle") -> list[str]:
    """The paper's query choice: `random.seed(42)` then `random.shuffle(texts)[:k]` ("shuffle", HF datasets) or
    `random.sample(data, k)` ("sample", its OlympiadBench path). The caller builds `texts` like the paper (columns
    joined by two spaces)."""
    rng = random.Random(seed)
    if method == "shuffle":
        out = list(texts)
        rng.shuffle(out)
        return out[:k]
    if method == "sample":
        return rng.sample(list(texts), k)
    raise ValueError(f"method must be 'shuffle' or 'sample', got {method!r}")


def paper_pad_batch(token_ids: Sequence[Sequence[int]], pad_id: int, max_length: int = 128,
                    pad_to: str = "longest") -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's `tokenizer(texts, padding=True, truncation=True, max_length=128)` with padding_side="left":
    keep each text's first `max_length` tokens, left-pad with `pad_id` to the batch width W.

    pad_to="longest" (the paper's code, padding=True): W = longest truncated text, so W = 128 only when some
    text reaches 128 tokens. pad_to="max_length" (DESIGN.md's wording "all 128 positions"): W = max_length.
    Returns (input_ids [B, W] int64, attention_mask [B, W] int64).
    """
    if pad_to not in ("longest", "max_length"):
        raise ValueError(f"pad_to must be 'longest' or 'max_length', got {pad_to!r}")
    seqs = [list(t)[:max_length] for t in token_ids]
    width = max_length if pad_to == "max_length" else max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.int64)
            mask[i, width - len(s):] = 1
    return ids, mask


def paper_query_vectors(hidden_states_per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L+1] x [B, W, d] padded states -> [L+1, B, d] float32: `hs.to(float32).mean(dim=1)`, padding included.

    The states are transformers' `output_hidden_states` for the left-padded batch of `paper_pad_batch`: layer 0
    is the embedding output, the last one is after the final norm. Pad positions carry real (nonzero) states:
    in the paper's run (flash_attention_2) attention at a pad position outputs zero, so a pad state is the pad
    token's embedding pushed through the residual + MLP path only; position_ids are arange(W), so real tokens
    sit at positions n_pad.. (RoPE is relative, so only rounding differs from an unpadded run).
    """
    return torch.stack([hs.to(torch.float32).mean(dim=1) for hs in hidden_states_per_layer])


def paper_query_vectors_from_real(real_states_per_layer: Sequence[torch.Tensor],
                                  pad_state_per_layer: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Same vector for one query from its T real-token states [L+1] x [T, d] and the per-layer pad state [L+1] x [d]
    (what a packed runner has): (Σ_t h_t + (W − T)·h_pad) / W per layer, in float64, returned float32 [L+1, d]."""
    out = []
    for h, pad in zip(real_states_per_layer, pad_state_per_layer, strict=True):
        t = h.shape[0]
        if t > width:
            raise ValueError(f"query has {t} tokens, more than the padded width {width}")
        v = h.to(torch.float64).sum(0) + (width - t) * pad.to(torch.float64)
        out.append((v / width).to(torch.float32))
    return torch.stack(out)


# ---- records ----------------------------------------------------------------------------------------------------
def pca_shift_records(m1_base, m2_base, m1_tuned, m2_tuned) -> list[dict]:
    """The paper's per-layer records: Original (shift 0.0, principle m2_base), Updated (m1_tuned − m1_base, m2_tuned)."""
    recs = []
    for layer, (a, b, c, d) in enumerate(zip(m1_base, m2_base, m1_tuned, m2_tuned, strict=True)):
        recs.append({"layer": layer, "state": "Original", "shift": 0.0, "principle": float(b)})
        recs.append({"layer": layer, "state": "Updated", "shift": float(c) - float(a), "principle": float(d)})
    return recs


def centroid_distance(records: Sequence[Mapping]) -> float:
    """‖mean_layers(shift, principle | Updated) − mean_layers(shift, principle | Original)‖₂ (Original shift is 0)."""
    def centroid(state):
        rows = [r for r in records if r["state"] == state]
        return (sum(r["shift"] for r in rows) / len(rows), sum(r["principle"] for r in rows) / len(rows))
    (s_u, p_u), (s_o, p_o) = centroid("Updated"), centroid("Original")
    return ((s_u - s_o) ** 2 + (p_u - p_o) ** 2) ** 0.5


def pca_shift_entry(benchmark: str, records: list[dict]) -> dict:
    """One entry of the paper's `<model>_pca_shift.json` list."""
    return {"benchmark": f"{benchmark}_PCA_Shift", "data": records}


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
    """Per layer: n, Σx, Σxxᵀ of the base vectors and n, Σx of the tuned ones (float64, on the first update's
    device); `tuned_cov=True` also keeps Σxxᵀ of the tuned vectors. Memory d²·8 bytes per layer and covariance
    (d=5120: 210 MB per layer). Rows may be per-query vectors (same PCA as the paper) or per-token states."""

    def __init__(self, n_layers: int, hidden_size: int, tuned_cov: bool = False) -> None:
        self.n_layers, self.hidden_size, self.tuned_cov = int(n_layers), int(hidden_size), bool(tuned_cov)
        self.n = torch.zeros(self.n_layers, dtype=torch.int64)
        self.sums: dict[str, list[torch.Tensor | None]] = {
            k: [None] * self.n_layers for k in ("base_x", "base_xxT", "tuned_x", "tuned_xxT")}

    def _get(self, key: str, layer: int, device) -> torch.Tensor:
        if self.sums[key][layer] is None:
            shape = (self.hidden_size,) * (2 if key.endswith("xxT") else 1)
            self.sums[key][layer] = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sums[key][layer] = self.sums[key][layer].to(device)
        return self.sums[key][layer]

    def update(self, layer: int, x_base: torch.Tensor, x_tuned: torch.Tensor) -> None:
        """x_base, x_tuned: [n, d] rows (query vectors or token states) of the same inputs under each model."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layers})")
        if x_base.shape != x_tuned.shape or x_base.ndim != 2 or x_base.shape[1] != self.hidden_size:
            raise ValueError(f"expected x_base, x_tuned [n, {self.hidden_size}], got {tuple(x_base.shape)}, "
                             f"{tuple(x_tuned.shape)}")
        dev = x_base.device
        cov_update(self._get("base_x", layer, dev), self._get("base_xxT", layer, dev), x_base)
        if self.tuned_cov:
            cov_update(self._get("tuned_x", layer, dev), self._get("tuned_xxT", layer, dev), x_tuned)
        else:
            self._get("tuned_x", layer, dev).add_(x_tuned.detach().to(torch.float64).sum(0))
        self.n[layer] += x_base.shape[0]

    def merge(self, other: "StreamingPCA") -> "StreamingPCA":
        self._check_mergeable(other)
        if (other.n_layers, other.hidden_size, other.tuned_cov) != (self.n_layers, self.hidden_size, self.tuned_cov):
            raise ValueError("cannot merge StreamingPCA of different n_layers/hidden_size/tuned_cov")
        self.n += other.n
        for key, per_layer in other.sums.items():
            for layer, v in enumerate(per_layer):
                if v is not None:
                    self._get(key, layer, v.device).add_(v)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"config": torch.tensor([self.n_layers, self.hidden_size, int(self.tuned_cov)], dtype=torch.int64),
              "n": self.n.clone()}
        for key, per_layer in self.sums.items():
            for layer, v in enumerate(per_layer):
                if v is not None:
                    sd[f"{key}.{layer}"] = v.detach().cpu().clone()
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        n_layers, d, tc = state["config"].tolist()
        self.__init__(n_layers, d, bool(tc))
        self.n = state["n"].to(torch.int64).clone()
        for name, v in state.items():
            if "." in name:
                key, layer = name.rsplit(".", 1)
                self.sums[key][int(layer)] = v.to(torch.float64).clone()

    def components(self, layer: int, n_components: int = 2, model: str = "base"):
        """(mean, components [k, d], explained_variance [k]) of `model` ("base", or "tuned" with tuned_cov)."""
        if model == "tuned" and not self.tuned_cov:
            raise ValueError("tuned PCA needs StreamingPCA(tuned_cov=True)")
        sx, sxx = self.sums[f"{model}_x"][layer], self.sums[f"{model}_xxT"][layer]
        if sx is None:
            raise ValueError(f"layer {layer} has no data")
        # on the sums' device: a float64 eigh of 5120 x 5120 takes seconds on a GPU, minutes on 2 CPU cores
        return pca_components_from_moments(int(self.n[layer]), sx, sxx, n_components)

    def finalize(self) -> dict:
        """{"mode": "streaming", "rows", "records", "centroid_distance", "explained_variance": [[ev1, ev2] per layer]}."""
        means_b, means_t, comps, evs = [], [], [], []
        for layer in range(self.n_layers):
            mean, c, ev = self.components(layer)
            n = int(self.n[layer])
            means_b.append(mean)
            means_t.append(self.sums["tuned_x"][layer].to(mean.device) / n)
            comps.append(c)
            evs.append([json_float(e) for e in ev])
        records = _project(means_b, means_t, comps)
        return {"mode": "streaming", "rows": self.n.tolist(), "records": records,
                "centroid_distance": json_float(centroid_distance(records)), "explained_variance": evs}
