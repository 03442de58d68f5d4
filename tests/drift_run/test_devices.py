"""A model per device (--base-device/--tuned-device) and layer streaming (--stream-layers) in drift runs: on the CPU
both go through the same code path as a GPU run (the moves are no-ops) and give bitwise the plain run's numbers;
device options that do not fit the run are one-line InputErrors naming the option."""
from __future__ import annotations

import json

import pytest
import torch

from driftscope import drift, load_model
from driftscope.drift_run.options import DriftOptions
from driftscope.cli import main
from driftscope.errors import InputError

OPTS = {"progress": False, "max_batch_tokens": 64}


@pytest.fixture(scope="module")
def plain(models, records):
    return drift(models["base"], [models["tuned"], models["late"]], records, **OPTS).summary


@pytest.mark.parametrize("options", [
    {"base_device": "cpu", "tuned_device": "cpu"},
    {"base_device": "cpu", "tuned_device": ("cpu", torch.device("cpu"))},
    {"stream_layers": True},
    {"stream_layers": True, "tuned_device": ("cpu",), "pca": "paper", "pca_queries": 4},
], ids=["one-for-all", "one-per-tuned", "streamed", "streamed-paper-pca"])
def test_device_options_give_the_plain_runs_numbers(models, records, plain, options):
    ref = plain
    if options.get("pca") == "paper":
        ref = drift(models["base"], [models["tuned"], models["late"]], records, **OPTS, pca="paper",
                    pca_queries=4).summary
    got = drift(models["base"], [models["tuned"], models["late"]], records, **OPTS, **options).summary
    assert json.dumps(got["models"], sort_keys=True) == json.dumps(ref["models"], sort_keys=True)
    cfg = got["config"]
    assert cfg["stream_layers"] == options.get("stream_layers", False)
    assert all(isinstance(d, str) for d in cfg["tuned_device"])


def test_device_counts_and_names_are_checked(models, records):
    two = [models["tuned"], models["late"]]
    with pytest.raises(InputError, match=r"tuned_device \(--tuned-device\) is given 3 times for 2 tuned models"):
        drift(models["base"], two, records, **OPTS, tuned_device=("cpu",) * 3)
    with pytest.raises(InputError, match=r"base_device='gpu:0' \(--base-device\) is not a torch device string"):
        DriftOptions(base_device="gpu:0")
    with pytest.raises(InputError, match=r"tuned_device='tpu' \(--tuned-device\) is not a torch device"):
        DriftOptions(tuned_device=("cpu", "tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="base_device='cuda:1': CUDA is not available here"):
            DriftOptions(base_device="cuda:1")
    with pytest.raises(InputError, match=r"--stream-layers\) with generate=True"):
        DriftOptions(stream_layers=True, generate=True)
    for mode in ({"generate": True}, {"pca": "paper"}):  # meta: a second device that every machine has
        with pytest.raises(InputError, match=r"(generate|paper).* runs every model on one device, .* over cpu, meta"):
            DriftOptions(tuned_device=("cpu", "meta"), **mode).model_devices(2)
    assert DriftOptions(device="cpu", tuned_device=("cpu",)).model_devices(3) == ("cpu", ["cpu"] * 3)


def test_cli_device_errors_are_one_line(models, records, tmp_path, capsys):
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(records),
               "--out", str(tmp_path / "o"), "--no-progress", "--tuned-device", "cpu", "--tuned-device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--tuned-device) is given 2 times for 1 tuned models" in err


def test_place_head_keeps_the_head_beside_the_other_model(models):
    m = load_model(models["base"])
    w = m.lm_head_weight
    m.place_head("cpu")  # one device: nothing moves
    assert m.lm_head_weight is w
    m.place_head("meta")  # another device: the (untied) head moves there, the embedding stays
    assert m.lm_head_weight.device.type == "meta" and m.device.type == "cpu"
