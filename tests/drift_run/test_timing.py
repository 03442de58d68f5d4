"""summary.json's "timing": forwarded and scored tokens per second, stages that add up to drift()'s wall time (the
outputs' too), the process's age; telemetry's StageTimes and process_seconds on their own."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from driftscope import drift, load_tokenizer
from driftscope.records import load_samples
from driftscope.telemetry import StageTimes, process_seconds

OPTS = {"progress": False, "max_batch_tokens": 96}
LOOP = {"forward", "layer_probes", "vocab_probe", "token_probes"}


def _expected_tokens(models, records) -> tuple[int, int]:
    """(forwarded, scored) from the records alone: every token of every sample; positions first_scored .. L-2."""
    samples, _ = load_samples(records, load_tokenizer(models["base"]))
    return (sum(len(s.input_ids) for s in samples),
            sum(len(s.input_ids) - 1 - s.first_scored for s in samples))


@pytest.mark.parametrize("with_out", [True, False], ids=["out", "no-out"])
def test_stages_add_up_to_the_wall_time_and_tokens_are_counted(models, records, tmp_path, with_out):
    t0 = time.perf_counter()
    rep = drift(models["base"], models["tuned"], records, out=tmp_path / "run" if with_out else None, **OPTS)
    outer = time.perf_counter() - t0
    t = rep.summary["timing"]
    forwarded, scored = _expected_tokens(models, records)
    assert (t["tokens"], t["scored_tokens"]) == (forwarded, scored) and scored < forwarded
    assert t["tokens_per_s"] == pytest.approx(forwarded / t["seconds"])
    assert t["scored_tokens_per_s"] == pytest.approx(scored / t["seconds"])
    stages = t["stages"]
    want = {"plan", "load", "summarize", "other", *LOOP} | ({"outputs"} if with_out else set())
    assert want <= set(stages) and all(v >= 0 for v in stages.values()), stages
    assert ("outputs" in stages) == with_out
    # exclusive stages + "other" = drift()'s wall time (each rounded to 0.1 ms), within what the caller measured
    assert sum(stages.values()) == pytest.approx(t["wall_seconds"], abs=1e-3 * len(stages)), stages
    assert sum(stages[s] for s in LOOP) <= t["seconds"] + 1e-3 <= t["wall_seconds"] + 2e-3
    assert t["wall_seconds"] <= outer + 1e-3
    assert t["process_seconds"] >= t["wall_seconds"] - 0.02  # /proc's clock ticks are 10 ms
    if with_out:  # the file holds the final timing (rewritten after the outputs), the same as the returned one
        on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert on_disk["timing"] == t and on_disk["models"] == rep.summary["models"]


def test_stage_times_are_exclusive_and_other_is_the_rest():
    times = StageTimes(start=time.perf_counter())
    a = time.perf_counter()
    with times("outer"):
        time.sleep(0.03)
        with times("inner"):
            time.sleep(0.05)
    b = time.perf_counter()
    time.sleep(0.02)
    end = time.perf_counter()
    s = times.summary(end)
    assert s["inner"] >= 0.05 and s["outer"] >= 0.03
    assert s["outer"] + s["inner"] == pytest.approx(b - a, abs=1e-3)  # the outer stage excludes the inner one
    assert s["other"] >= 0.02 and sum(s.values()) == pytest.approx(times.wall(end), abs=5e-4)
    assert "other" not in times.summary()  # without an end time: the stages alone


def test_process_seconds_counts_from_the_process_start():
    """A child that sleeps 0.6 s before asking: its age is at least that, and at most what the parent waited."""
    code = "import time; time.sleep(0.6); from driftscope.telemetry import process_seconds; print(process_seconds())"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    waited = time.perf_counter() - t0
    age = float(out)
    assert 0.6 - 0.02 <= age <= waited + 0.02, (age, waited)
    assert process_seconds() > 0


def test_the_lens_is_its_own_stage(models, records):
    """--lens: its head GEMMs are timed as "lens" (exclusive, inside the batch loop), not under token_probes; the
    stages still add up to the wall time."""
    t = drift(models["base"], models["tuned"], records, lens="all", **OPTS).summary["timing"]
    stages = t["stages"]
    assert stages["lens"] > 0, stages
    assert sum(stages.values()) == pytest.approx(t["wall_seconds"], abs=1e-3 * len(stages)), stages
    assert sum(stages[s] for s in LOOP | {"lens"}) <= t["seconds"] + 1e-3
    plain = drift(models["base"], models["tuned"], records, **OPTS).summary["timing"]["stages"]
    assert "lens" not in plain
