"""Paper-mode PCA shift against a literal reimplementation of the paper's procedure with transformers + sklearn."""
from __future__ import annotations

import random

import pytest
import torch
from analysis_helpers import TEXTS

from driftscope import drift, load_tokenizer

sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
transformers = pytest.importorskip("transformers")


def _query_file(path, tok, *, long: bool, k: int = 12):
    rng = random.Random(0)
    lines = []
    for i in range(k):
        texts = TEXTS[:]
        rng.shuffle(texts)
        if long:  # >= 128 tokens each: no padding, W = 128
            line = " ".join(texts)
            assert len(tok.encode(line)) >= 128
        else:  # 5..60 tokens: left padding to the longest
            line = " ".join(texts[: 1 + i % 3])[: 20 + 13 * i]
        lines.append(line.replace("\n", " "))
    path.write_text("\n".join(lines) + "\n")
    return lines


@torch.no_grad()
def _paper_reference(base_dir, tuned_dir, texts, pad_id, k):
    """analyse_PCA_Shift.py: random.seed(42); shuffle; [:k]; tokenize (trunc 128, left pad to longest); mean over
    all positions incl. padding (pad rows: attention output 0, i.e. flash-attention's behaviour); PCA-2 on base."""
    tok = load_tokenizer(base_dir)
    texts = list(texts)
    random.Random(42).shuffle(texts)
    texts = texts[:k]
    ids = [tok.encode(t)[:128] for t in texts]
    width = max(map(len, ids))
    out = []
    for d in (base_dir, tuned_dir):
        m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        # the pad state: embedding, then residual + MLP only per layer, final norm at the last state
        h = m.model.embed_tokens(torch.tensor([[pad_id]]))
        pad = [h[0, 0]]
        for i, layer in enumerate(m.model.layers):
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            pad.append(m.model.norm(h)[0, 0] if i == len(m.model.layers) - 1 else h[0, 0])
        vecs = []
        for q in ids:
            hs = m(torch.tensor([q]), output_hidden_states=True).hidden_states  # L+1 x [1, T, d]
            vecs.append(torch.stack([(s[0].sum(0) + (width - len(q)) * p) / width for s, p in zip(hs, pad)]))
        out.append(torch.stack(vecs, 1).numpy())  # [L+1, Q, d]
    xb, xt = out
    recs = []
    for layer in range(xb.shape[0]):
        pca = sklearn_decomposition.PCA(n_components=2).fit(xb[layer])
        c1, c2 = pca.components_
        m1b, m2b = (xb[layer] @ c1).mean(), (xb[layer] @ c2).mean()
        m1t, m2t = (xt[layer] @ c1).mean(), (xt[layer] @ c2).mean()
        recs.append((layer, m1t - m1b, m2b, m2t))
    return recs


@pytest.mark.parametrize("long", [True, False], ids=["W128-no-padding", "left-padded"])
def test_paper_pca_matches_sklearn_reimplementation(models, records, tmp_path, long):
    tok = load_tokenizer(models["base"])
    texts = _query_file(tmp_path / "queries.txt", tok, long=long)
    k = 8
    s = drift(models["base"], models["tuned"], records, pca="paper", pca_texts=str(tmp_path / "queries.txt"),
              pca_queries=k, progress=False).summary["models"]["tuned"]["tasks"]["mixed"]
    ref = _paper_reference(models["base"], models["tuned"], texts, tok.pad_token_id, k)
    scale = max(abs(v) for r in ref for v in r[1:])
    assert s["pca"]["mode"] == "paper" and s["pca"]["queries"] == k
    for row, (layer, shift, m2b, m2t) in zip(s["layers"], ref):
        assert row["layer"] == layer
        for name, got, want in (("shift", row["pca_shift"], shift), ("principle base", row["pca_principle_base"], m2b),
                                ("principle tuned", row["pca_principle_tuned"], m2t)):
            assert abs(got - want) <= 1e-4 * scale, f"layer {layer} {name}: {got} vs sklearn {want} (scale {scale})"
