"""Per-layer hidden-state drift between base and tuned states over scored tokens: mean cosine, relative L2,
and linear CKA from streaming float64 sums (Σx, Σy, XᵀX, YᵀY, YᵀX), so merge is an exact add.

Memory: full CKA keeps (1 + 2J)·d²·8 bytes per layer for J tuned models (XᵀX once; d=5120, J=1: 629 MB per
layer, 25.8 GB for 41 layers); `cka="projected"` keeps (1 + 2J)·k²·8 (k=256, J=1: 1.6 MB) after a fixed Gaussian
projection; `cka="none"` keeps O(1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from driftscope.kernels.cov_update import batch_gram, cov_update
from driftscope.probes.base import Accumulator, LayerSums, json_float

__all__ = ["HiddenSimilarity", "linear_cka_from_sums", "projection_matrix"]

_CKA_MODES = ("full", "projected", "none")
_BASE_SCALARS = ("tokens", "sum_base_norm", "sum_base_sq")  # [n_layers]: once for every tuned model
_PAIR_SCALARS = ("sum_cos", "sum_rel_l2", "sum_diff_norm", "sum_diff_sq")  # [n_tuned, n_layers]
_SCALARS = _BASE_SCALARS + _PAIR_SCALARS


def _cka_names(n_tuned: int) -> list[str]:
    """The base CKA sums once (Σx, XᵀX), then Σy, YᵀY, YᵀX of each tuned model."""
    return ["sum_x", "xtx", *(f"{name}{j}" for j in range(n_tuned) for name in ("sum_y", "yty", "ytx"))]
_EPS = 1e-8  # norm floor for cosine / relative L2, as torch.nn.functional.cosine_similarity
_CHUNK = 4096  # rows converted to float64 at a time (bounds the transient copy)


def _gram(sum_x: torch.Tensor, xtx: torch.Tensor, x: torch.Tensor) -> None:
    """sum_x += Σ rows of x, xtx += xᵀx (float64 sums; x [n, k] in its own dtype). On the CPU through
    kernels.cov_update (the symmetric half of the products, x read in place: 4x torch's upcast + float64 GEMM at
    d = 576), elsewhere as float64 torch (GPU float64 GEMMs; no tensor-core partials for the CKA's sums)."""
    if x.device.type == "cpu":
        cov_update(sum_x, xtx, x)
        return
    x = x.to(torch.float64)
    sum_x += x.sum(0)
    xtx += x.T @ x


def projection_matrix(d: int, k: int, seed: int) -> torch.Tensor:
    """[d, k] float64 Gaussian N(0, 1/k) from a CPU generator seeded with `seed` (same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, k, generator=g, dtype=torch.float64) / k ** 0.5


def linear_cka_from_sums(n, sum_x, sum_y, xtx, yty, ytx) -> float:
    """Linear CKA (Kornblith et al. 2019) of centred X, Y from n, Σx, Σy, XᵀX, YᵀY, YᵀX (float64):
    ‖YcᵀXc‖_F² / (‖XcᵀXc‖_F ‖YcᵀYc‖_F) with XcᵀXc = XᵀX − n·x̄x̄ᵀ etc. NaN if a side has no variance."""
    n = float(n)
    mx, my = sum_x / n, sum_y / n
    cxx = xtx - n * torch.outer(mx, mx)
    cyy = yty - n * torch.outer(my, my)
    cyx = ytx - n * torch.outer(my, mx)
    den = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
    return float(torch.linalg.matrix_norm(cyx) ** 2 / den) if den > 0 else float("nan")


class HiddenSimilarity(Accumulator):
    """Per layer: n tokens, Σ‖h_b‖, Σ‖h_b‖² and the base CKA sums (Σx, XᵀX) once, and per tuned model j: Σcos,
    Σ‖Δ‖/‖h_b‖, Σ‖Δ‖, Σ‖Δ‖² (Δ = h_t − h_b) and its CKA sums (Σy, YᵀY, YᵀX).

    `n_tuned` tuned models against one base on the same tokens (lockstep): `update(layer, h_base, [h_t...])` does
    the base work (float64 copy, norms, projection, XᵀX) once per batch and keeps the base sums once, not once per
    tuned model. Sums live on the device of the first `update` (float64; H100 float64 GEMM is fine) and move to the
    CPU in `state_dict`. Cancellation in XᵀX − n·x̄x̄ᵀ is the float64 limit of the CKA: fine unless the per-feature
    mean is ~1e6× the spread.
    """

    def __init__(self, n_layers: int, hidden_size: int, cka: str = "full", proj_dim: int = 256,
                 seed: int = 0, n_tuned: int = 1) -> None:
        if cka not in _CKA_MODES:
            raise ValueError(f"cka must be one of {_CKA_MODES}, got {cka!r}")
        if min(n_layers, hidden_size, proj_dim, n_tuned) <= 0:
            raise ValueError(f"n_layers, hidden_size, proj_dim, n_tuned must be positive: {n_layers}, {hidden_size}, "
                             f"{proj_dim}, {n_tuned}")
        self.n_layers, self.hidden_size, self.cka, self.seed = int(n_layers), int(hidden_size), cka, int(seed)
        self.n_tuned = int(n_tuned)
        self.proj_dim = int(proj_dim) if cka == "projected" else 0
        self.k = {"full": self.hidden_size, "projected": self.proj_dim, "none": 0}[cka]
        self._proj: torch.Tensor | None = None
        self.s: dict[str, torch.Tensor] = {
            name: torch.zeros(self.n_layers if name in _BASE_SCALARS else (self.n_tuned, self.n_layers),
                              dtype=torch.float64) for name in _SCALARS}
        k = self.k
        self.m = LayerSums(self.n_layers, {name: (k,) if name.startswith("sum") else (k, k) for name in _cka_names(
            self.n_tuned)})

    def update(self, layer: int, h_base: torch.Tensor, h_tuned: torch.Tensor | Sequence[torch.Tensor],
               base_gram: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """h_base [N, d] and h_tuned, [N, d] or a sequence of n_tuned of them: the states of the N scored tokens at
        `layer` (any float dtype, same device). `base_gram`: `batch_gram(h_base)` when the caller has it (StreamingPCA
        keeps the same base sums); full CKA adds it, computed here when None (the same call either way)."""
        hts = list(h_tuned) if isinstance(h_tuned, (list, tuple)) else [h_tuned]
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layers})")
        if len(hts) != self.n_tuned:
            raise ValueError(f"expected the states of {self.n_tuned} tuned model(s), got {len(hts)}")
        if h_base.ndim != 2 or h_base.shape[1] != self.hidden_size or any(h.shape != h_base.shape for h in hts):
            raise ValueError(f"expected h_base, h_tuned [N, {self.hidden_size}], got {tuple(h_base.shape)}, "
                             f"{[tuple(h.shape) for h in hts]}")
        dev = h_base.device
        acc_b = torch.zeros(len(_BASE_SCALARS), dtype=torch.float64, device=dev)
        acc_t = torch.zeros(self.n_tuned, len(_PAIR_SCALARS), dtype=torch.float64, device=dev)
        sums = {name: self.m.get(name, layer, dev) for name in self.m.shapes} if self.k else None
        if self.cka == "projected" and (self._proj is None or self._proj.device != dev):
            self._proj = projection_matrix(self.hidden_size, self.proj_dim, self.seed).to(dev)
        if self.cka == "full":  # the base sums of the whole batch at once (x read in place), shareable
            sx, sxx = base_gram if base_gram is not None else batch_gram(h_base.detach())
            sums["sum_x"] += sx
            sums["xtx"] += sxx
        for i in range(0, h_base.shape[0], _CHUNK):
            xs = h_base[i:i + _CHUNK].detach()
            x = xs.to(torch.float64)  # [n, d], once for every tuned model
            nx = x.norm(dim=1)
            acc_b += torch.stack([torch.tensor(float(x.shape[0]), dtype=torch.float64, device=dev), nx.sum(),
                                  (nx * nx).sum()])
            xp = x @ self._proj if self._proj is not None else x  # [n, k]
            if self._proj is not None:
                _gram(sums["sum_x"], sums["xtx"], xp)
            for j, ht in enumerate(hts):
                ys = ht[i:i + _CHUNK].detach()
                y = ys.to(torch.float64)  # [n, d]
                ny, dn = y.norm(dim=1), (y - x).norm(dim=1)
                cos = (x * y).sum(1) / (nx.clamp_min(_EPS) * ny.clamp_min(_EPS))
                acc_t[j] += torch.stack([cos.sum(), (dn / nx.clamp_min(_EPS)).sum(), dn.sum(), (dn * dn).sum()])
                if sums is not None:
                    yp = y @ self._proj if self._proj is not None else y
                    _gram(sums[f"sum_y{j}"], sums[f"yty{j}"], yp if self._proj is not None else ys)
                    sums[f"ytx{j}"] += yp.T @ xp
        acc_b, acc_t = acc_b.cpu(), acc_t.cpu()
        for c, name in enumerate(_BASE_SCALARS):
            self.s[name][layer] += acc_b[c]
        for c, name in enumerate(_PAIR_SCALARS):
            self.s[name][:, layer] += acc_t[:, c]

    def _config(self) -> tuple:
        return (self.n_layers, self.hidden_size, self.cka, self.proj_dim, self.seed, self.n_tuned)

    def merge(self, other: "HiddenSimilarity") -> "HiddenSimilarity":
        self._check_mergeable(other)
        if other._config() != self._config():
            raise ValueError(f"cannot merge config {other._config()} into {self._config()} "
                             "(n_layers, hidden_size, cka, proj_dim, seed, n_tuned)")
        for name in _SCALARS:
            self.s[name] += other.s[name]
        self.m.merge(other.m)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"config": torch.tensor([self.n_layers, self.hidden_size, _CKA_MODES.index(self.cka),
                                      self.proj_dim, self.seed, self.n_tuned], dtype=torch.int64)}
        sd.update({f"s.{name}": v.clone() for name, v in self.s.items()})
        sd.update(self.m.state("m."))
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        n_layers, d, mode, proj_dim, seed, n_tuned = state["config"].tolist()
        self.__init__(n_layers, d, _CKA_MODES[mode], proj_dim or 256, seed, n_tuned)
        for name in _SCALARS:
            self.s[name] = state[f"s.{name}"].to(torch.float64).clone()
        self.m.load(state, "m.")

    def finalize(self, j: int = 0) -> dict:
        """Tuned model j's {"cka_mode", "proj_dim", "layers": [{layer, tokens, cos_mean, rel_l2_mean,
        rel_l2_ratio_of_sums, rel_l2_fro, cka}]}; rel_l2_ratio_of_sums = Σ‖Δ‖/Σ‖h_b‖, rel_l2_fro =
        sqrt(Σ‖Δ‖²/Σ‖h_b‖²)."""
        s = {name: v if name in _BASE_SCALARS else v[j] for name, v in self.s.items()}
        layers = []
        for i in range(self.n_layers):
            n = float(s["tokens"][i])
            nan = float("nan")
            row = {
                "layer": i, "tokens": int(n),
                "cos_mean": json_float(s["sum_cos"][i] / n if n else nan),
                "rel_l2_mean": json_float(s["sum_rel_l2"][i] / n if n else nan),
                "rel_l2_ratio_of_sums": json_float(s["sum_diff_norm"][i] / s["sum_base_norm"][i] if n else nan),
                "rel_l2_fro": json_float((s["sum_diff_sq"][i] / s["sum_base_sq"][i]).sqrt() if n else nan),
                "cka": None,
            }
            if self.k and n and self.m["sum_x"][i] is not None:
                names = ("sum_x", f"sum_y{j}", "xtx", f"yty{j}", f"ytx{j}")
                row["cka"] = json_float(linear_cka_from_sums(n, *(self.m[name][i].cpu() for name in names)))
            layers.append(row)
        return {"cka_mode": self.cka, "proj_dim": self.proj_dim or None, "layers": layers}
