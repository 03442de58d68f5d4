"""A drift whose records share an instruction prefix (run once per batch, `share_prefix`): against the float64
transformers reference of each sample run alone, and against the same drift with every sample whole."""
from __future__ import annotations

import json
import math

import pytest
import torch
from analysis_helpers import TEXTS, reference_tokens
from json_helpers import leaves

from driftscope import drift, load_tokenizer
from driftscope.engine.runner import LockstepRunner
from driftscope.records import load_samples

OPTS = {"progress": False, "max_batch_tokens": 400, "report": False}
INSTRUCTION = "Read the text below, then continue it in the same style. Text: "


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "instructed.jsonl"
    rows = [{"prompt": INSTRUCTION + t[:10 + i % 7], "response": t[10 + i % 7:]} for i, t in enumerate(TEXTS[:10])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(models, records):
    prefixes: list[int] = []
    original = LockstepRunner.forward

    def spy(self, input_ids, cu_seqlens, on_layer=None, rows=None, prefix=0):
        prefixes.append(prefix)
        return original(self, input_ids, cu_seqlens, on_layer, rows, prefix)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LockstepRunner, "forward", spy)
        shared = drift(models["base"], models["tuned"], records, **OPTS).summary
        seen, prefixes[:] = list(prefixes), []
        whole = drift(models["base"], models["tuned"], records, **OPTS, share_prefix=False).summary
    return {"shared": shared, "whole": whole, "prefixes": seen, "whole_prefixes": list(prefixes)}


def test_the_prefix_is_shared_unless_turned_off(runs):
    assert len(runs["prefixes"]) > 1 and all(p > 0 for p in runs["prefixes"]), runs["prefixes"]
    assert set(runs["whole_prefixes"]) == {0}
    assert runs["shared"]["config"]["share_prefix"] is True and runs["whole"]["config"]["share_prefix"] is False


def test_shared_prefix_drift_matches_float64_transformers(runs, models, records):
    samples, _ = load_samples(records, load_tokenizer(models["base"]))
    r = reference_tokens(models["base"], models["tuned"], samples)
    task = runs["shared"]["models"]["tuned"]["tasks"]["instructed"]
    assert task["tokens"] == r["kl_tb"].numel()
    for key in ("kl_tb", "kl_bt", "logp_base", "logp_tuned"):
        ref = float(r[key].mean())
        assert abs(task[key]["token_mean"] - ref) <= 1e-6 * max(1.0, abs(ref)), (key, task[key]["token_mean"], ref)
    for key in ("rank_base", "rank_tuned", "rank_shift_top"):
        assert task[key]["token_mean"] == pytest.approx(float(r[key].double().mean()), abs=1e-9), key


def test_every_number_equals_the_whole_samples_run_within_float32_rounding(runs):
    a = {k: v for k, v in leaves(runs["shared"]["models"]) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    b = {k: v for k, v in leaves(runs["whole"]["models"]) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert a.keys() == b.keys()
    bad = [(k, a[k], b[k]) for k in a if isinstance(b[k], int) and a[k] != b[k]
           or not math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6)]
    assert not bad, bad[:5]
    assert any(isinstance(v, float) for v in a.values()) and torch.isfinite(torch.tensor(list(a.values()))).all()
