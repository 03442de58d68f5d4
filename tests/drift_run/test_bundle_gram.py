"""TaskProbes computes the base states' Σx, XᵀX once per layer and batch for full CKA and the streaming PCA (the
same sums in both), and every probe's sums equal those it computes alone."""
from __future__ import annotations

import pytest
import torch

import driftscope.drift_run.bundle as bundle
import driftscope.probes.hidden_similarity as hs
import driftscope.probes.pca as pca
from driftscope.drift_run.bundle import TaskProbes
from driftscope.probes import HiddenSimilarity, StreamingPCA

NS, D = 3, 16


def batches(n_tuned: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for n in (7, 33):  # two batches: the running sums add
        hb = torch.randn(NS, n, D, generator=g) * 3 + 1
        yield hb, [hb + 0.1 * torch.randn(NS, n, D, generator=g) for _ in range(n_tuned)]


@pytest.mark.parametrize("shared_base", [True, False])
def test_base_gram_once_and_equal_to_each_probe_alone(monkeypatch, shared_base):
    n_tuned = 2
    calls = []

    def counted(x):
        calls.append(x.shape)
        return real(x)

    real = bundle.batch_gram
    monkeypatch.setattr(bundle, "batch_gram", counted)
    refuse = lambda x: pytest.fail("a probe recomputed the shared base gram")  # noqa: E731
    probes = TaskProbes(n_tuned, NS, D, vocab_rows=10, pca="streaming", cka="full", cka_proj_dim=4,
                        shared_base=shared_base)
    with monkeypatch.context() as m:
        m.setattr(hs, "batch_gram", refuse)
        m.setattr(pca, "batch_gram", refuse)
        for hb, hts in batches(n_tuned):
            for layer in range(NS):
                probes.on_layer(layer, hb[layer], [h[layer] for h in hts])
    assert len(calls) == 2 * NS  # once per layer and batch, whatever the number of tuned models

    # alone: each probe computes its own sums; equal bit for bit (the same batch_gram call, the same adds)
    alone_h = [HiddenSimilarity(NS, D, cka="full", n_tuned=n_tuned if shared_base else 1)
               for _ in range(1 if shared_base else n_tuned)]
    alone_p = [StreamingPCA(NS, D, n_tuned if shared_base else 1) for _ in range(1 if shared_base else n_tuned)]
    for hb, hts in batches(n_tuned):
        for layer in range(NS):
            for k, (h, p) in enumerate(zip(alone_h, alone_p)):
                ts = [t[layer] for t in hts] if shared_base else [hts[k][layer]]
                h.update(layer, hb[layer], ts)
                p.update(layer, hb[layer], ts)
    for got, want in zip(probes.hidden + probes.pcas, alone_h + alone_p):
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # and the shared sums are the base rows' Σx, XᵀX (float64 reference)
    hb_all = torch.cat([hb for hb, _ in batches(n_tuned)], dim=1).double()
    for layer in range(NS):
        torch.testing.assert_close(probes.pcas[0].sums["base_xxT"][layer], hb_all[layer].T @ hb_all[layer],
                                   rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(probes.hidden[0].m.get("xtx", layer, "cpu"), hb_all[layer].T @ hb_all[layer],
                                   rtol=1e-12, atol=1e-9)


def test_a_lone_probe_computes_its_own():
    """Projected CKA keeps other sums: the PCA computes its base gram alone (no shared call)."""
    probes = TaskProbes(1, NS, D, vocab_rows=10, pca="streaming", cka="projected", cka_proj_dim=4)
    assert probes._base_gram(torch.randn(5, D)) is None
