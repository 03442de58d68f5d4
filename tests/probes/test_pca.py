"""PCA shift: paper mode vs a literal sklearn reimplementation of analyse_PCA_Shift.py; streaming vs sklearn PCA."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from driftscope.probes import pca as P
from driftscope.probes.base import load_state, save_state
from driftscope.drift_run.paper_pca import paper_select_texts
from probe_helpers import assert_close, paper_pad_batch, paper_query_vectors, paper_query_vectors_from_real

sklearn_decomposition = pytest.importorskip("sklearn.decomposition", reason="scikit-learn (test extra) not installed")
PCA = sklearn_decomposition.PCA


def query_vectors(n_layers, q, d, seed=0):
    """[L][q, d] float32 base/tuned vectors with two dominant directions per layer (like real hidden states)."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = [], []
    for _ in range(n_layers):
        offset = 5 * torch.randn(d, generator=g)
        u = torch.linalg.qr(torch.randn(d, 2, generator=g))[0]
        coef = torch.randn(q, 2, generator=g) * torch.tensor([20.0, 8.0])
        b = offset + coef @ u.T + 0.3 * torch.randn(q, d, generator=g)
        t = b + 2.0 * u[:, 0] - 1.0 * u[:, 1] + 0.1 * torch.randn(q, d, generator=g)
        base.append(b.float())
        tuned.append(t.float())
    return base, tuned


def paper_reference(base, tuned):
    """analyse_PCA_Shift.py, phases 1-2 and compute_centroid_distance, on float32 numpy features."""
    np.random.seed(42)
    records = []
    for layer, (fo, fu) in enumerate(zip(base, tuned)):
        feats_o, feats_u = fo.numpy(), fu.numpy()
        pca = PCA(n_components=2).fit(feats_o)
        comp1, comp2 = pca.components_[0], pca.components_[1]
        pc1_o, pc2_o = float(feats_o.dot(comp1).mean()), float(feats_o.dot(comp2).mean())
        pc1_u, pc2_u = float(feats_u.dot(comp1).mean()), float(feats_u.dot(comp2).mean())
        records.append({"layer": layer, "state": "Original", "shift": 0.0, "principle": pc2_o})
        records.append({"layer": layer, "state": "Updated", "shift": pc1_u - pc1_o, "principle": pc2_u})
    orig = np.array([[r["shift"], r["principle"]] for r in records if r["state"] == "Original"]).mean(0)
    upd = np.array([[r["shift"], r["principle"]] for r in records if r["state"] == "Updated"]).mean(0)
    return records, float(np.linalg.norm(upd - orig)), pca


# d=48: sklearn picks the full SVD; d=640 > 500: randomized SVD, the solver the paper's 30 x 5120 inputs got
PAPER_CASES = [(3, 30, 48), (2, 30, 640), (4, 7, 9)]


@pytest.mark.parametrize("n_layers,q,d", PAPER_CASES, ids=[f"L{layers}-Q{q}-d{d}" for layers, q, d in PAPER_CASES])
def test_paper_mode_matches_sklearn_reimplementation(n_layers, q, d):
    base, tuned = query_vectors(n_layers, q, d)
    acc = P.PaperPCAShift(n_layers, d)
    for layer in range(n_layers):  # arrive in two chunks, in reverse query order
        acc.update(layer, base[layer][q // 2:], tuned[layer][q // 2:], range(q // 2, q))
        acc.update(layer, base[layer][:q // 2], tuned[layer][:q // 2], range(q // 2))
    out = acc.finalize()
    json.dumps(out, allow_nan=False)
    ref, ref_d, _ = paper_reference(base, tuned)
    scale = max(abs(float(b.mean(0) @ b.mean(0)) ** 0.5) for b in base)  # |projection| is at most ‖mean‖
    assert [(r["layer"], r["state"]) for r in out["records"]] == [(r["layer"], r["state"]) for r in ref]
    for key in ("shift", "principle"):
        assert_close([r[key] for r in out["records"]], [r[key] for r in ref], rtol=0, atol=1e-4 * scale,
                     what=f"{key} (scale {scale:.3g})")
    assert_close(out["centroid_distance"], ref_d, rtol=0, atol=1e-4 * scale, what="centroid distance")


STREAM_CASES = [(5, 3), (30, 48), (300, 17), (2000, 64)]


@pytest.mark.parametrize("n,d", STREAM_CASES, ids=[f"n{n}-d{d}" for n, d in STREAM_CASES])
def test_streaming_matches_sklearn_pca(n, d):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, d, dtype=torch.float64)
         + torch.randn(d, generator=g, dtype=torch.float64) * 10)
    acc = P.StreamingPCA(1, d)
    for chunk in torch.split(x, max(7, n // 8)):  # any number of rows per update
        acc.update(0, chunk, chunk.float() if n == 2000 else chunk)
    ref = PCA(n_components=2, svd_solver="full").fit(x.numpy())
    mean, comps, ev = acc.components(0)
    assert_close(mean, ref.mean_, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(comps, ref.components_, rtol=0, atol=1e-8, what="components (signs included)")
    assert_close(ev, ref.explained_variance_, rtol=1e-9, what="explained variance")
    # the exact batch PCA (paper mode's fit) gives the same components
    assert_close(P.pca_components(x)[1], ref.components_, rtol=0, atol=1e-10, what="batch pca_components")


def test_streaming_equals_paper_mode_on_query_vectors():
    base, tuned = query_vectors(3, 30, 20, seed=5)
    paper, stream = P.PaperPCAShift(3, 20), P.StreamingPCA(3, 20)
    for layer in range(3):
        paper.update(layer, base[layer], tuned[layer], range(30))
        stream.update(layer, base[layer], tuned[layer])
    a, b = paper.finalize(), stream.finalize()
    for key in ("shift", "principle"):
        assert_close([r[key] for r in b["records"]], [r[key] for r in a["records"]], rtol=1e-9, atol=1e-9, what=key)
    assert_close(b["centroid_distance"], a["centroid_distance"], rtol=1e-9, what="centroid distance")


def test_merge_and_state_round_trip(tmp_path):
    base, tuned = query_vectors(2, 12, 6, seed=1)
    whole_p, whole_s = P.PaperPCAShift(2, 6), P.StreamingPCA(2, 6)
    parts = [(P.PaperPCAShift(2, 6), P.StreamingPCA(2, 6)) for _ in range(2)]
    for layer in range(2):
        whole_p.update(layer, base[layer], tuned[layer], range(12))
        whole_s.update(layer, base[layer], tuned[layer])
        for j, (p, s) in enumerate(parts):
            sl = slice(0, 5) if j == 0 else slice(5, 12)
            p.update(layer, base[layer][sl], tuned[layer][sl], range(12)[sl])
            s.update(layer, base[layer][sl], tuned[layer][sl])
    p, s = parts[1][0].merge(parts[0][0]), parts[1][1].merge(parts[0][1])
    save_state(p, tmp_path / "p.safetensors")
    save_state(s, tmp_path / "s.safetensors")
    assert load_state(P.PaperPCAShift(1, 1), tmp_path / "p.safetensors").finalize() == whole_p.finalize()
    back = load_state(P.StreamingPCA(1, 1), tmp_path / "s.safetensors").finalize()
    ref = whole_s.finalize()
    for key in ("shift", "principle"):
        assert_close([r[key] for r in back["records"]], [r[key] for r in ref["records"]], rtol=1e-12, atol=1e-12,
                     what=key)
    with pytest.raises(ValueError, match="cannot load"):
        load_state(P.StreamingPCA(1, 1), tmp_path / "p.safetensors")


def test_pad_batch_and_query_vectors():
    ids, mask = paper_pad_batch([[1, 2, 3], list(range(10, 200)), []], pad_id=0, max_length=128)
    assert ids.shape == (3, 128) and mask.sum(1).tolist() == [3, 128, 0]
    assert ids[0, -3:].tolist() == [1, 2, 3] and ids[0, :-3].eq(0).all()  # left padding
    assert ids[1].tolist() == list(range(10, 138))                         # keeps the first 128 tokens
    short, _ = paper_pad_batch([[1, 2, 3], [4]], pad_id=9)
    assert short.tolist() == [[1, 2, 3], [9, 9, 4]]                        # padding=True: pad to the longest
    assert paper_pad_batch([[1]], pad_id=9, max_length=4, pad_to="max_length")[0].tolist() == [[9, 9, 9, 1]]
    # mean over all W positions including the pad states == (Σ real + n_pad·pad)/W
    g = torch.Generator().manual_seed(0)
    n_layers, w, d, t = 3, 11, 5, 4
    pad = torch.randn(n_layers, d, generator=g)
    real = torch.randn(n_layers, t, d, generator=g).bfloat16()
    padded = torch.cat([pad[:, None, :].expand(n_layers, w - t, d).bfloat16(), real], dim=1)  # left padding
    v1 = paper_query_vectors([padded[i][None] for i in range(n_layers)])  # [L+1, B=1, d]
    v2 = paper_query_vectors_from_real(list(real), list(pad.bfloat16()), width=w)
    assert v1.shape == (n_layers, 1, d) and v1.dtype == torch.float32
    assert_close(v2, v1[:, 0], rtol=1e-6, atol=1e-6, what="from_real vs padded mean")


def test_select_texts_like_the_paper():
    texts = [f"t{i}" for i in range(100)]
    random.seed(42)
    expected = list(texts)
    random.shuffle(expected)
    assert paper_select_texts(texts, k=30) == expected[:30]
    random.seed(42)
    assert paper_select_texts(texts, k=30, method="sample") == random.sample(texts, 30)


def test_svd_flip_matches_sklearn():
    from sklearn.utils.extmath import svd_flip
    v = torch.randn(4, 9, dtype=torch.float64)
    _, ref = svd_flip(np.zeros((2, 4)), v.numpy().copy(), u_based_decision=False)
    assert_close(P.svd_flip_v(v), ref, rtol=0, atol=0, what="svd_flip")


def test_streaming_pca_uses_the_float64_covariance_update():
    x = torch.randn(13, 6)
    acc = P.StreamingPCA(1, 6)
    acc.update(0, x, x)
    acc.update(0, x, x)
    x64 = x.double()
    assert_close(acc.sums["base_x"][0], 2 * x64.sum(0), rtol=1e-12, atol=1e-12, what="sum_x")
    assert_close(acc.sums["base_xxT"][0], 2 * x64.T @ x64, rtol=1e-12, atol=1e-12, what="sum_xxT")
    assert_close(acc.sums["tuned0_x"][0], 2 * x64.sum(0), rtol=1e-14, what="tuned sum_x")


def test_one_base_against_several_tuned_equals_separate_pairs(tmp_path):
    base, t1 = query_vectors(3, 25, 10, seed=2)
    _, t2 = query_vectors(3, 25, 10, seed=3)
    multi = P.StreamingPCA(3, 10, n_tuned=2)
    pairs = [P.StreamingPCA(3, 10), P.StreamingPCA(3, 10)]
    for layer in range(3):
        multi.update(layer, base[layer], [t1[layer], t2[layer]])
        pairs[0].update(layer, base[layer], t1[layer])
        pairs[1].update(layer, base[layer], t2[layer])
    save_state(multi, tmp_path / "m.safetensors")
    back = load_state(P.StreamingPCA(1, 1), tmp_path / "m.safetensors")
    for j in range(2):
        assert multi.finalize(j) == pairs[j].finalize() == back.finalize(j)
    assert multi.finalize(0) != multi.finalize(1)
    with pytest.raises(ValueError, match="2 tuned"):
        multi.update(0, base[0], t1[0])
    with pytest.raises(ValueError, match="out of range"):
        multi.finalize(2)
    few = P.StreamingPCA(1, 10)
    few.update(0, base[0][:1], t1[0][:1])
    assert few.finalize()["undefined"].startswith("PCA needs at least 2 rows")


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        P.pca_components_from_moments(1, torch.zeros(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        P.StreamingPCA(1, 4).update(0, torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no data"):
        P.StreamingPCA(1, 2).components(0)
    with pytest.raises(ValueError, match="pad_to"):
        paper_pad_batch([[1]], 0, pad_to="left")


@pytest.mark.gpu
def test_streaming_cuda_matches_cpu():
    base, tuned = query_vectors(2, 40, 24, seed=6)
    out = {}
    for dev in ("cpu", "cuda"):
        acc = P.StreamingPCA(2, 24)
        for layer in range(2):
            acc.update(layer, base[layer].to(dev), tuned[layer].to(dev))
        out[dev] = acc.finalize()
    for key in ("shift", "principle"):
        assert_close([r[key] for r in out["cuda"]["records"]], [r[key] for r in out["cpu"]["records"]],
                     rtol=1e-9, atol=1e-9, what=key)


@pytest.mark.parametrize("limit", [P.ONE_THREAD_EIGH, 0], ids=["one-thread", "all-threads"])
@pytest.mark.parametrize("d", [1, 37, 576], ids=lambda d: f"d{d}")
def test_moments_pca_on_either_thread_path_matches_svd(monkeypatch, limit, d):
    """pca_components_from_moments takes eigh on one thread for small d (ONE_THREAD_EIGH) and on every thread above
    it: both give the float64 SVD's PCA (values, and components up to float64 rounding), with an odd size, a 1-wide
    edge case and a large-mean (cancellation-prone) input; the caller's thread count is restored."""
    monkeypatch.setattr(P, "ONE_THREAD_EIGH", limit)
    g = torch.Generator().manual_seed(d)
    n = max(3 * d, 8)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, d, dtype=torch.float64)
         + 1e3 * torch.randn(d, generator=g, dtype=torch.float64))  # a mean ~1000x the spread in every feature
    k = min(2, d)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mean, comps, ev = P.pca_components_from_moments(n, x.sum(0), x.T @ x, k)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    ref_mean, ref_comps, ref_ev = P.pca_components(x, k)
    assert_close(mean, ref_mean, rtol=1e-12, atol=0, what="mean")
    assert_close(ev, ref_ev, rtol=1e-6, atol=0, what="explained variance")  # 1e3 mean: moments lose ~1e-6 x 1e6
    assert_close(comps, ref_comps, rtol=0, atol=1e-4, what="components")


def test_eigh_restores_the_thread_count_when_it_fails(monkeypatch):
    def failing(a):
        raise RuntimeError("linalg.eigh: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="converge"):
            P.pca_components_from_moments(3, torch.ones(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_streaming_finalize_runs_layers_in_parallel_with_the_sequential_bits(monkeypatch):
    """StreamingPCA.finalize on 2 threads fits the layers 2 at a time, each eigh on one thread: every number equals
    the one-thread run's bit for bit, the eighs do run on worker threads, and the thread count is restored."""
    import threading

    g = torch.Generator().manual_seed(5)
    acc = P.StreamingPCA(6, 40, n_tuned=2)
    for layer in range(6):
        xb = torch.randn(90, 40, generator=g) * torch.linspace(2, 0.2, 40) + 3
        acc.update(layer, xb, [xb + 0.1 * torch.randn(90, 40, generator=g) for _ in range(2)])
    threads, callers = torch.get_num_threads(), set()
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: callers.add(threading.get_ident()) or real(a))
    out = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            acc._fit = None
            callers.clear()
            out[t] = [acc.finalize(j) for j in range(2)]
            assert torch.get_num_threads() == t
            assert (threading.get_ident() in callers) == (t == 1), callers  # 2 threads: workers only
    finally:
        torch.set_num_threads(threads)
    assert out[1] == out[2]
