"""driftscope sweep: curves along a synthetic series, every number equal to separate drift runs, grouping into passes
(memory plan), eval scores and TI, sweep.json's shape, a mixed series of HF, LoRA and GGUF checkpoints."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from sweep_helpers import differences, drift_tasks, fast_reports, manifest, write_run

import driftscope
from driftscope.cli import main
from driftscope.drift_run.options import DriftOptions
from driftscope.engine.checkpoint import Checkpoint
from driftscope.eval.ti import BENCHMARKS, GROUP_OF, transferability_indices
from driftscope.sweep_run import plan as P
from driftscope.sweep_run import run as R

SWEEP_KEYS = {"driftscope_version", "created", "manifest", "ordinal", "base", "data", "options", "checkpoints", "eval",
              "passes", "timing"}
ENTRY_KEYS = {"label", "path", "kind", "ordinal", "pass", "tasks", "rank_shift_mean_of_task_means", "scores"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return write_run(tmp_path_factory.mktemp("sweep-run"))


@pytest.fixture(scope="module")
def one_pass(run, tmp_path_factory) -> driftscope.SweepReport:
    """The series as one pass (max_group 8 >= 5 checkpoints)."""
    with pytest.MonkeyPatch.context() as mp:
        fast_reports(mp)
        return driftscope.sweep(manifest(run, run["root"] / "m.json"), tmp_path_factory.mktemp("one-pass"))


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    fast_reports(monkeypatch)


def _count_drift_calls(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    original = R.drift

    def counting(base, tuned, data, out=None, **kw):
        calls.append([Path(t).name for t in tuned])
        return original(base, tuned, data, out, **kw)

    monkeypatch.setattr(R, "drift", counting)
    return calls


def test_curves_are_monotone_in_the_distance_from_the_base(one_pass):
    """Checkpoint t = base + t·noise, t = 0.1 ... 0.5: KL both ways, sampled KL, top-1 disagreement, hidden-state
    distance at every layer past the embeddings grow with t; cosine and CKA fall."""
    rows = one_pass.sweep["checkpoints"]
    assert [r["ordinal"] for r in rows] == [10, 20, 30, 40, 50]
    for task in ("a", "b"):
        t = [r["tasks"][task] for r in rows]
        series = {"kl_tb": [x["kl_tb"]["token_mean"] for x in t], "kl_bt": [x["kl_bt"]["token_mean"] for x in t],
                  "sampled_kl": [x["sampled_kl"] for x in t], "disagreement": [1 - x["top1_agreement"] for x in t]}
        for layer in range(1, len(t[0]["layers"])):
            series[f"rel_l2[{layer}]"] = [x["layers"][layer]["rel_l2"] for x in t]
            series[f"-cosine[{layer}]"] = [-x["layers"][layer]["cosine"] for x in t]
            series[f"-cka[{layer}]"] = [-x["layers"][layer]["cka"] for x in t]
        for name, ys in series.items():
            assert all(a < b for a, b in zip(ys, ys[1:])), f"{task} {name} is not increasing along t: {ys}"
        assert t[0]["kl_tb"]["token_mean"] > 0


def test_every_number_equals_separate_drift_runs(run, one_pass):
    """Counts and floats: the sweep's per-task blocks are the separate drift runs' blocks, leaf for leaf."""
    for row, ckpt in zip(one_pass.sweep["checkpoints"], run["checkpoints"]):
        ref = drift_tasks(run["base"], ckpt, run["data"])
        diff = differences(ref, row["tasks"])
        assert not diff, f"{row['label']}: {len(diff)} leaves differ, first {diff[:3]}"


def test_sweep_json_is_the_contract(run, one_pass):
    s = json.loads((one_pass.out / "sweep.json").read_text())
    assert s == json.loads(json.dumps(one_pass.sweep))
    assert set(s) == SWEEP_KEYS
    assert s["manifest"] == str(run["root"] / "m.json")
    assert s["ordinal"] == "step" and s["base"] == {"path": str(run["root"] / "base"), "kind": "hf"}
    assert s["data"] == {"a": str(run["root"] / "data/a.jsonl"), "b": str(run["root"] / "data/b.jsonl")}
    assert s["options"] == json.loads(json.dumps(DriftOptions(max_batch_tokens=64, progress=False).as_dict()))
    assert s["eval"] is None
    for r in s["checkpoints"]:
        assert set(r) == ENTRY_KEYS and r["kind"] == "hf" and r["scores"] is None
        assert set(r["tasks"]) == {"a", "b"}
    (p,) = s["passes"]
    assert p["labels"] == [r["label"] for r in s["checkpoints"]] and p["id"] == P.pass_id(p["labels"])
    summary = json.loads((one_pass.out / p["summary"]).read_text())
    for r, (name, model) in zip(s["checkpoints"], summary["models"].items()):
        assert model["tasks"] == r["tasks"] and model["rank_shift_mean_of_task_means"] == \
            r["rank_shift_mean_of_task_means"]
    assert s["timing"]["base_passes"] == 1 and s["timing"]["checkpoints"] == 5 and s["timing"]["computed_now"] == 5


def test_groups_of_two_are_three_passes_with_the_same_numbers(run, one_pass, tmp_path, monkeypatch):
    calls = _count_drift_calls(monkeypatch)
    rep = driftscope.sweep(manifest(run, run["root"] / "m2.json", max_group=2), tmp_path)
    assert calls == [["checkpoint-10", "checkpoint-20"], ["checkpoint-30", "checkpoint-40"], ["checkpoint-50"]]
    assert rep.sweep["timing"]["base_passes"] == 3 and len(rep.passes_run) == 3
    assert [r["pass"] for r in rep.sweep["checkpoints"]] == [rep.passes_run[i] for i in (0, 0, 1, 1, 2)]
    for a, b in zip(one_pass.sweep["checkpoints"], rep.sweep["checkpoints"]):
        assert not differences(a["tasks"], b["tasks"]), a["label"]


def test_group_sizes_come_from_free_memory(run, tmp_path, monkeypatch):
    """J from the measured sizes: room for 2.5 checkpoints next to the base and the activations gives groups of 2."""
    base = Checkpoint.open(run["base"], "base")
    numel = sum(v.numel() for v in run["state"].values())
    for dtype, elem in (("float32", 4), ("bfloat16", 2)):  # HF: the safetensors headers, converted to --dtype
        assert P.weight_bytes(base, dtype, "merge") == numel * elem
    margin = P.activation_bytes(base.config(), 64)
    assert margin == 64 * 32 * 3 * 4 * P.ACTIVATION_FACTOR
    monkeypatch.setattr(P, "free_bytes", lambda device: numel * 4 + margin + int(2.5 * numel * 4))
    calls = _count_drift_calls(monkeypatch)
    driftscope.sweep(manifest(run, run["root"] / "m3.json"), tmp_path)
    assert [len(c) for c in calls] == [2, 2, 1]


def test_next_fit_groups():
    b = P.Budget(bytes=10, max_group=3)
    assert P.group(list("abcde"), dict(a=4, b=4, c=4, d=1, e=20), b) == [["a", "b"], ["c", "d"], ["e"]]
    assert P.group(list("abcd"), dict.fromkeys("abcd", 1), b) == [["a", "b", "c"], ["d"]]
    assert P.group(list("ab"), dict(a=5, b=5), P.Budget(bytes=-1, max_group=8)) == [["a"], ["b"]]


def test_eval_scores_give_accuracy_and_ti_per_checkpoint(run, tmp_path):
    scores = {"base": {b: 30.0 + 2 * k for k, b in enumerate(BENCHMARKS)}}
    for i, c in enumerate(run["checkpoints"][:3]):  # math gains, other reasoning a little, non-reasoning loses
        scores[c.name] = {b: v + (3.0 + i if GROUP_OF[b] == "math" else 1.0 if GROUP_OF[b] == "other" else -i)
                          for b, v in scores["base"].items()}
    files = {}
    for label, s in scores.items():
        files[label] = str(tmp_path / f"{label}.json")
        Path(files[label]).write_text(json.dumps(s))
    out = driftscope.sweep(manifest(run, run["root"] / "m4.json", eval={"scores": files}), tmp_path / "out").sweep
    base = scores.pop("base")
    ref = {k: json.loads(json.dumps(v.to_dict())) for k, v in transferability_indices(base, scores).items()}
    assert json.loads(json.dumps(out["eval"])) == {"base": base, "ti": ref}
    assert [r["scores"] for r in out["checkpoints"]] == [*scores.values(), None, None]
    assert all(v["ti_other"] is not None and v["ti_non"] is not None for v in ref.values())


def test_mixed_series_of_hf_lora_and_gguf_checkpoints(run, tmp_path):
    """An HF folder, a PEFT adapter (side paths) and a GGUF file in one pass: each entry equals its separate drift."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the test-side HF -> GGUF converter lives there
    from gguf_writer import Q, write_gguf

    hf = transformers.AutoModelForCausalLM.from_pretrained(run["base"], dtype=torch.float32)
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.save_pretrained(tmp_path / "adapter-7")
    gguf_file = write_gguf(run["checkpoints"][2], tmp_path / "quant-4.gguf", Q.F16)
    hf_dir = shutil.copytree(run["checkpoints"][4], tmp_path / "full-9")
    items = [{"path": str(tmp_path / "adapter-7"), "label": "lora", "bits": 7},
             {"path": str(gguf_file), "label": "gguf", "bits": 4}, {"path": str(hf_dir), "label": "hf", "bits": 9}]
    m = manifest(run, tmp_path / "m.json", checkpoints=items, ordinal="bits", lora="side")
    s = driftscope.sweep(m, tmp_path / "out").sweep
    assert [(r["label"], r["kind"], r["ordinal"]) for r in s["checkpoints"]] == \
        [("gguf", "gguf", 4), ("lora", "lora", 7), ("hf", "hf", 9)]
    assert s["timing"]["base_passes"] == 1 and s["ordinal"] == "bits"
    paths = {"lora": tmp_path / "adapter-7", "gguf": gguf_file, "hf": hf_dir}
    for r in s["checkpoints"]:
        diff = differences(drift_tasks(run["base"], paths[r["label"]], run["data"], lora="side"), r["tasks"])
        assert not diff, f"{r['label']}: {len(diff)} leaves differ, first {diff[:3]}"


def test_command_line_prints_a_line_per_checkpoint(run, one_pass, capsys):
    """`driftscope sweep` on a finished sweep: nothing computed, a line per checkpoint with its KL per task."""
    assert main(["sweep", str(run["root"] / "m.json"), "--out", str(one_pass.out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for row, line in zip(one_pass.sweep["checkpoints"], lines):
        kl = ", ".join(f"{t} {row['tasks'][t]['kl_tb']['token_mean']:.5f}" for t in ("a", "b"))
        assert line == f"{row['label']} (step {row['ordinal']}): KL(tuned||base) {kl}"
    assert lines[5] == "0 of 5 checkpoints computed now; 1 base pass"
    assert lines[6] == f"sweep.json: {one_pass.out / 'sweep.json'}"


def test_budget_subtracts_the_base_only_on_its_own_device(run, monkeypatch):
    base = Checkpoint.open(run["base"], "base")
    monkeypatch.setattr(P, "free_bytes", lambda device: 10**9)
    weights, margin = P.weight_bytes(base, "float32", "merge"), P.activation_bytes(base.config(), 64)
    assert P.budget(base, "float32", 64, "cpu", None, 8) == P.Budget(10**9 - weights - margin, 8)
    assert P.budget(base, "float32", 64, "cuda", "cuda:0", 8).bytes == 10**9 - weights - margin
    assert P.budget(base, "float32", 64, "cuda:0", "cuda:1", 3) == P.Budget(10**9 - margin, 3)
