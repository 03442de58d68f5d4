"""Contract: the probes' finalize() dicts, shaped by analysis.summary like a real run, render into a report with
every figure drawn and the token table rows written; NaN-free random inputs, tiny sizes."""
from __future__ import annotations

import re

import pytest
import torch

from driftscope.drift_run.summary import model_summary, task_summary
from driftscope.probes.hidden_similarity import HiddenSimilarity
from driftscope.probes.pca import StreamingPCA
from driftscope.probes.shifted_tokens import ShiftedTokens
from driftscope.probes.token_metrics import TokenMetrics
from driftscope.report import read_token_table, write_report, write_token_table

N, V, D, LAYERS = 64, 50, 8, 3


def probe_outputs(g: torch.Generator) -> dict[str, torch.Tensor]:
    zb, zt = torch.randn(N, V, generator=g), torch.randn(N, V, generator=g)
    lq, lp = zb.log_softmax(-1), zt.log_softmax(-1)
    y = torch.randint(0, V, (N,), generator=g)
    rank = lambda z: 1 + (z > z.gather(1, y[:, None])).sum(1)  # noqa: E731
    top_t = zt.argmax(1)
    return {"kl_tb": (lp.exp() * (lp - lq)).sum(1), "kl_bt": (lq.exp() * (lq - lp)).sum(1),
            "logp_base": lq.gather(1, y[:, None])[:, 0], "logp_tuned": lp.gather(1, y[:, None])[:, 0],
            "rank_base": rank(zb), "rank_tuned": rank(zt), "top_base": zb.argmax(1), "top_tuned": top_t,
            "rank_shift_top": 1 + (zb > zb.gather(1, top_t[:, None])).sum(1),
            "entropy_base": -(lq.exp() * lq).sum(1), "entropy_tuned": -(lp.exp() * lp).sum(1), "targets": y}


def one_task(seed: int, pca: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = probe_outputs(g)
    sample_ids = torch.arange(N) // 8
    tm = TokenMetrics()
    tm.update(p, sample_ids, torch.arange(N) % 8 == 0)
    hs = HiddenSimilarity(LAYERS, D, cka="full" if pca else "none")
    sp = StreamingPCA(LAYERS, D)
    for layer in range(LAYERS):
        hb = torch.randn(N, D, generator=g)
        ht = hb + 0.1 * (layer + 1) * torch.randn(N, D, generator=g)
        hs.update(layer, hb, ht)
        sp.update(layer, hb, ht)
    st = ShiftedTokens(V)
    st.update(p["targets"], p["rank_base"], p["rank_tuned"])
    return task_summary(tokens=tm.finalize(), hidden=hs.finalize(),
                        shifted=st.finalize(decode=lambda i: f"<t{i}>\n$", top_k=30),
                        pca=sp.finalize() if pca else None, problems=[])


def test_real_shapes_render(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    tasks = {"coqa": one_task(0, pca=True), "ifeval": one_task(1, pca=False)}
    summary = {"driftscope_version": "0.1.0", "created": "now", "config": {"base": "b"},
               "models": {"rl": model_summary("/m/rl", tasks)}}
    text = write_report(tmp_path, summary).read_text(encoding="utf-8")
    assert 'class="error"' not in text
    assert len(re.findall(r"data:image/png;base64,", text)) == 5 + 4  # ifeval: no PCA
    assert re.search(r"&lt;t\d+&gt;↵\$", text) and not re.search(r"<t\d+>", text)  # decoded texts escaped
    rows = [{"model": "rl", "task": t, **r} for t, task in tasks.items() for r in task["shifted_tokens"]["top"]]
    back = read_token_table(write_token_table(tmp_path / "tokens", rows))
    assert [(r["task"], r["id"], r["text"]) for r in back] == [(r["task"], r["id"], r["text"]) for r in rows]
