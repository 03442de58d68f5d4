"""Drift over the checkpoints people have. A LoRA adapter as --tuned gives the merged checkpoint's numbers: merged, bit
for bit (PEFT's merge arithmetic); as side paths on the shared base, within float32 rounding with the counts exact.
A quantization drift of two GGUF files of one model agrees with float64 logits of the dequantized weights."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from analysis_helpers import TOKENIZER_FILES, reference_tokens
from json_helpers import leaves

from driftscope import drift, load_tokenizer
from driftscope.errors import InputError
from driftscope.records import load_samples
from driftscope.testing import write_checkpoint

peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the test-side HF -> GGUF converter lives there
from gguf_writer import Q, write_gguf  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COUNTS = ("tokens", "samples")


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters for the drift base (random B, so the deltas are not zero) and PEFT's merged checkpoints."""
    root = tmp_path_factory.mktemp("lora-drift")
    out = {}
    for name, seed, kw in (("all7", 3, dict(r=4, lora_alpha=8, target_modules=MODULES)),
                           ("qv", 4, dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True))):
        hf = transformers.AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
        torch.manual_seed(seed)
        pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **kw))
        with torch.no_grad():  # PEFT's random B is large next to these weights: a fine-tune-sized delta
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)
        pm.save_pretrained(root / name)
        pm.merge_and_unload().save_pretrained(root / f"{name}-merged", safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (models["base"] / f).exists():
                shutil.copy(models["base"] / f, root / f"{name}-merged" / f)
        out[name], out[f"{name}-merged"] = root / name, root / f"{name}-merged"
    return out


def _tasks(summary: dict, name: str) -> dict:
    return summary["models"][name]["tasks"]


def _assert_close(got: dict, ref: dict, tokens: int) -> None:
    """Floats within float32 rounding; token and sample counts exact; a rank- or argmax-based mean may move by one
    token in `tokens` (a near-tie that rounding flips is not a difference between the two computations)."""
    a, b = dict(leaves(got)), dict(leaves(ref))
    assert a.keys() == b.keys()
    for k, v in a.items():
        if k.rsplit(".", 1)[-1] in COUNTS or isinstance(v, (str, bool)) or v is None:
            assert v == b[k], k
        elif any(s in k for s in ("rank", "top", "same_top", "histograms", "shifted_tokens", "percentiles")):
            continue  # order statistics and integer ranks: compared through the means below
        else:
            assert v == pytest.approx(b[k], rel=2e-4, abs=2e-5), k
    for task in got:
        for m in ("rank_shift", "rank_base", "rank_tuned"):
            g, r = got[task][m]["token_mean"], ref[task][m]["token_mean"]
            assert abs(g - r) <= 1e-6 + 100.0 / tokens, (task, m)  # a flip moves a rank mean by < V / tokens
        assert abs(got[task]["top1_agreement"] - ref[task]["top1_agreement"]) <= 1.0 / tokens, task


def test_adapter_merged_is_bit_equal_to_peft_merged_checkpoint(models, records, adapters, tmp_path):
    merged = drift(models["base"], [adapters["all7-merged"], adapters["qv-merged"]], records, tmp_path / "m",
                   progress=False, max_batch_tokens=96)
    lora = drift(models["base"], [adapters["all7"], adapters["qv"]], records, tmp_path / "l", progress=False,
                 max_batch_tokens=96, lora="merge")
    for name in ("all7", "qv"):
        assert _tasks(lora.summary, name) == _tasks(merged.summary, f"{name}-merged")
    assert lora.summary["config"]["kinds"] == {"base": "hf", "tuned": {"all7": "lora", "qv": "lora"}}
    assert lora.summary["config"]["lora_applied"] == "merge"
    assert _tasks(merged.summary, "all7-merged")["mixed"]["kl_tb"]["token_mean"] > 1e-3  # the adapter changes it


def test_adapter_side_paths_equal_merged_within_rounding(models, records, adapters, tmp_path):
    merged = drift(models["base"], [adapters["all7-merged"], adapters["qv-merged"]], records, tmp_path / "m",
                   progress=False, max_batch_tokens=96)
    side = drift(models["base"], [adapters["all7"], adapters["qv"]], records, tmp_path / "s", progress=False,
                 max_batch_tokens=96, lora="side")
    assert side.summary["config"]["lora_applied"] == "side"
    for name in ("all7", "qv"):
        ref = _tasks(merged.summary, f"{name}-merged")
        _assert_close(_tasks(side.summary, name), ref, ref["mixed"]["tokens"])


def test_quantization_drift_of_two_ggufs_against_float64(models, records, tmp_path):
    """F32 GGUF vs Q8_0 GGUF of the drift base: what quantizing the weights did, against float64 transformers
    logits of the same GGUFs' tensors as the gguf library dequantizes them."""
    f32 = write_gguf(models["base"], tmp_path / "base-f32.gguf", Q.F32)
    q8 = write_gguf(models["base"], tmp_path / "base-Q8_0.gguf", Q.Q8_0)
    report = drift(f32, [q8], records, tmp_path / "out", progress=False, max_batch_tokens=96)
    assert report.summary["config"]["kinds"] == {"base": "gguf", "tuned": {"base-Q8_0": "gguf"}}
    got = _tasks(report.summary, "base-Q8_0")["mixed"]
    samples, _ = load_samples(records, load_tokenizer(f32))
    ref = _gguf_reference(models["base"], [f32, q8], samples)
    n = ref["kl_tb"].numel()
    assert got["tokens"] == n
    assert 0 < ref["kl_bt"].mean().item() < 1e-2  # a small, real difference: quantization noise
    tol = 1e-6 + 1e-4 * ref["kl_bt"].mean().item()  # per-token KL within ~1e-7 of float64 here (test_drift)
    assert got["kl_tb"]["token_mean"] == pytest.approx(ref["kl_tb"].mean().item(), abs=tol)
    assert got["kl_bt"]["token_mean"] == pytest.approx(ref["kl_bt"].mean().item(), abs=tol)
    assert got["llama_cpp"]["mean_kld"] == pytest.approx(ref["kl_bt"].mean().item(), abs=tol)
    agree = (ref["top_base"] == ref["top_tuned"]).double().mean().item()
    assert abs(got["top1_agreement"] - agree) <= 1.0 / n
    shift = (ref["rank_base"] - ref["rank_tuned"]).double().mean().item()
    assert abs(got["rank_shift"]["token_mean"] - shift) <= 1e-9 + 100.0 / n


def _gguf_reference(base_hf: Path, files: list[Path], samples) -> dict[str, torch.Tensor]:
    """reference_tokens (float64 transformers) on HF folders holding each GGUF's tensors as the gguf library
    dequantizes them, mapped to HF names by its own name table (Qwen3: no q/k permutation)."""
    from safetensors.torch import load_file

    hf = load_file(str(base_hf / "model.safetensors"))
    cfg = json.loads((base_hf / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, cfg["num_hidden_layers"])
    folders = []
    for f in files:
        stored = {t.name: t for t in gguf.GGUFReader(f).tensors}
        state = {}
        for key, w in hf.items():
            t = stored[names.get_name(key, try_suffixes=(".weight", ".bias"))]
            state[key] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")).view(w.shape)
        folders.append(f.parent / f"{f.stem}-hf")
        write_checkpoint(folders[-1], cfg, state)
    return reference_tokens(folders[0], folders[1], samples)


def test_checkpoint_kinds_refused_in_one_line(models, records, adapters, tmp_path):
    """An adapter as --base; an adapter for another base (a base with another hidden size); a file that is not
    GGUF; a LoRA adapter with --stream-layers: one line each, before any weights load, naming the path."""
    with pytest.raises(InputError, match=f"--base {adapters['qv']} is a LoRA adapter") as e:
        drift(adapters["qv"], [models["tuned"]], records, tmp_path / "o", progress=False)
    assert "\n" not in str(e.value)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOTGGUF" * 10)
    with pytest.raises(InputError, match=f"--tuned {fake} is a file but not a GGUF file"):
        drift(models["base"], [fake], records, tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="LoRA adapter: it needs the base's layers in memory"):
        drift(models["base"], [adapters["qv"]], records, tmp_path / "o", progress=False, stream_layers=True)
    other = tmp_path / "other-base"
    shutil.copytree(models["base"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = 32, 48
    (other / "config.json").write_text(json.dumps(cfg))  # the weights never load: the adapter check comes first
    with pytest.raises(InputError) as e:
        drift(other, [adapters["qv"]], records, tmp_path / "o", progress=False)
    assert str(adapters["qv"]) in str(e.value) and str(other) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
