"""LoRA adapters (engine/lora.py) against PEFT: merged == PEFT's merge_and_unload checkpoint bit for bit (float32),
attached side paths == merged within float32 rounding, both == the PEFT model's own logits; PEFT's target matching;
shared storage across adapters; greedy decoding through the side paths; bad adapters refused in one line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from gen_helpers import TieOracle, assert_same_greedy, run
from safetensors.torch import load_file, save_file

from driftscope.engine.config import ModelConfig
from driftscope.engine.loader import load_model
from driftscope.engine.lora import MODULES, _pattern, _targeted, attach, identity, is_adapter, merged, read_adapter
from driftscope.engine.sampling import SamplingParams
from driftscope.errors import InputError
from driftscope.testing import random_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=40)
ALL7 = list(MODULES)
# id -> (arch, LoraConfig kwargs)
CASES = {
    "llama-all7": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL7)),
    "qwen3-qv": ("qwen3", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "qwen3-rslora-all7": ("qwen3", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL7)),
    "llama-rank-alpha-pattern": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL7,
                                               rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 3},
                                               alpha_pattern={"o_proj": 3, "up_proj": 5})),
    "qwen3-layers-0-2": ("qwen3", dict(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"],
                                       layers_to_transform=[0, 2])),
    "llama-save-head-up-norm": ("llama", dict(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj", "k_proj"],
                                              modules_to_save=["lm_head", "up_proj", "input_layernorm"])),
    "qwen3-regex": ("qwen3", dict(r=2, lora_alpha=2,
                                  target_modules=r".*\.layers\.[12]\.(self_attn\.[qk]_proj|mlp\.up_proj)")),
}
IDS = list(CASES)


def _ids(n: int = 23, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def make_adapter(root: Path, arch: str, kw: dict, seed: int = 0, base: Path | None = None) -> dict:
    """A base checkpoint (unless given), a PEFT adapter with random B, PEFT's merged checkpoint, PEFT's logits."""
    if base is None:
        base = root / "base"
        random_checkpoint(base, arch, **SHAPE)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    with torch.no_grad():  # modules_to_save copies start equal to the base's: make them differ
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
        peft_logits = pm(_ids()[None]).logits[0].float()
    pm.save_pretrained(root / "adapter")
    merged_hf = pm.merge_and_unload()
    merged_hf.save_pretrained(root / "merged", safe_serialization=True)
    return {"base": base, "adapter": root / "adapter", "merged": root / "merged", "peft_logits": peft_logits,
            "hf_merged": merged_hf}


@pytest.fixture(scope="module", params=IDS)
def case(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    return make_adapter(tmp_path_factory.mktemp(request.param), arch, kw)


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 2e-5) -> None:
    err = (got - ref).abs()
    tol = rtol * max(float(ref.abs().max()), 1.0)
    bad = err > tol
    at = tuple(int(i) for i in (err == err.max()).nonzero()[0])
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {ref.numel()} beyond {tol:.2e}, "
                                 f"max {float(err.max()):.3e} at {at}: {float(got[at]):.6g} vs {float(ref[at]):.6g}")


def test_merged_equals_peft_checkpoint_and_attached_within_rounding(case):
    base = load_model(case["base"])
    before = base.logits(_ids())
    adapter = read_adapter(case["adapter"], base.config, str(case["base"]))
    m = merged(base, adapter)
    ref = load_model(case["merged"])
    ref_params = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        assert torch.equal(p, ref_params[name]), f"{name}: max diff {float((p - ref_params[name]).abs().max()):.3e}"
    ids = _ids()
    z_merged = m.logits(ids)
    assert torch.equal(z_merged, ref.logits(ids))
    z_side = attach(base, adapter).logits(ids)
    assert not torch.equal(z_merged, before), "the adapter changes nothing: the test cannot tell"
    _close(z_side, z_merged, "attach vs merged")
    _close(z_merged, case["peft_logits"], "merged vs PEFT model")
    _close(z_side, case["peft_logits"], "attach vs PEFT model")
    assert torch.equal(base.logits(ids), before), "the base changed"
    assert adapter.nbytes == sum(t.numel() * t.element_size() for t in load_file(case["adapter"] /
                                                                                "adapter_model.safetensors").values())


def test_attached_greedy_decoding_equals_merged(case):
    base = load_model(case["base"])
    adapter = read_adapter(case["adapter"], base.config, "base")
    side, m = attach(base, adapter), merged(base, adapter)
    ps = [_ids(n, seed=n).tolist() for n in (1, 6, 11, 17)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    a, _ = run(side, ps, params, block_size=4, max_num_seqs=3)
    b, _ = run(m, ps, params, block_size=4, max_num_seqs=3)
    oracle = TieOracle(case["hf_merged"])
    for p, ga, gb in zip(ps, a, b):
        assert len(ga.token_ids) == 12
        assert_same_greedy(ga.token_ids, gb.token_ids, p, oracle, "attach vs merged")


def test_adapters_share_the_base_storage(tmp_path):
    base_dir = tmp_path / "base"
    random_checkpoint(base_dir, "llama", **SHAPE)
    kws = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
           dict(r=4, lora_alpha=4, target_modules=ALL7, modules_to_save=["lm_head"]),
           dict(r=3, lora_alpha=9, target_modules=["up_proj", "o_proj"], modules_to_save=["k_proj"])]
    made = [make_adapter(tmp_path / f"a{j}", "llama", kw, seed=j, base=base_dir) for j, kw in enumerate(kws)]
    base = load_model(base_dir)
    ids = _ids()
    before = base.logits(ids)
    base_params = dict(base.named_parameters())
    models = [attach(base, read_adapter(d["adapter"], base.config, "base")) for d in made]
    for j, (model, d) in enumerate(zip(models, made)):
        own = {"output.weight"} if j == 1 else {f"layers.{i}.attn.wqkv.weight" for i in range(3)} if j == 2 else set()
        for name, p in model.named_parameters():
            same = p.data_ptr() == base_params[name].data_ptr()
            assert same != (name in own), f"adapter {j}: {name} {'shares' if same else 'copies'} the base's storage"
        _close(model.logits(ids), load_model(d["merged"]).logits(ids), f"adapter {j} attached vs PEFT merged")
    assert torch.equal(base.logits(ids), before)


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "down_proj"]),
    dict(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["v_proj", "gate_proj"], layers_to_transform=1),
    dict(target_modules=["v_proj", "o_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["v_proj", "o_proj"], layers_to_transform=[1], layers_pattern="blocks"),
    dict(target_modules=r".*\.(1|2)\..*_proj"),
    dict(target_modules=r".*q_proj|.*mlp.*"),
    dict(target_modules=ALL7, exclude_modules=["k_proj"]),
    dict(target_modules=ALL7, exclude_modules=r".*\.0\..*"),
    dict(target_modules=ALL7, modules_to_save=["up_proj"]),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items())[:60])
def test_target_matching_equals_peft(kw):
    from peft.tuners.tuners_utils import check_target_module_exists

    ref_cfg = peft.LoraConfig(**kw)
    cfg = {k: getattr(ref_cfg, k) for k in ("target_modules", "layers_to_transform", "layers_pattern",
                                              "exclude_modules", "modules_to_save")}
    cfg["target_modules"] = sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], set) else \
        cfg["target_modules"]
    cfg["exclude_modules"] = sorted(cfg["exclude_modules"]) if isinstance(cfg["exclude_modules"], set) else \
        cfg["exclude_modules"]
    for i in range(4):
        for n in MODULES:
            key = f"model.layers.{i}.{MODULES[n]}.{n}"
            ref = check_target_module_exists(ref_cfg, key)
            expected = bool(ref) and type(ref).__name__ != "_ExcludedModule"  # PEFT's exclusion marker is truthy
            assert _targeted(cfg, key) == expected, key


def test_pattern_matching_equals_peft():
    from peft.utils.other import get_pattern_key

    pats = {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 3, "proj": 7, r".*\.2\.self_attn\..*": 9}
    for i in range(3):
        for n in MODULES:
            key = f"model.layers.{i}.{MODULES[n]}.{n}"
            assert _pattern(pats, key, 1) == pats.get(get_pattern_key(pats.keys(), key), 1), key


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def qv(tmp_path_factory):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return make_adapter(tmp_path_factory.mktemp("qv"), "llama", kw)


def _copy(src: Path, dst: Path, config=None, tensors=None, drop_weights=False) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text()) | (config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if not drop_weights:
        sd = load_file(src / "adapter_model.safetensors")
        save_file(tensors(sd) if tensors else sd, dst / "adapter_model.safetensors")
    return dst


def _one_line(exc, *names) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, f"{n!r} not in: {msg}"
    return msg


def _config(path: Path) -> ModelConfig:
    return ModelConfig.from_file(path / "config.json")


def test_bad_adapters_refused_in_one_line(qv, tmp_path):
    c = _config(qv["base"])
    src = qv["adapter"]
    d = _copy(src, tmp_path / "noweights", drop_weights=True)
    with pytest.raises(FileNotFoundError) as e:
        read_adapter(d, c, "b")
    _one_line(e, d / "adapter_model.safetensors")
    d = _copy(src, tmp_path / "unknown", config={"target_modules": ["q_proj", "c_attn", "lm_head"]})
    with pytest.raises(InputError) as e:
        read_adapter(d, c, "b")
    _one_line(e, d / "adapter_config.json", "c_attn", "lm_head", " ".join(ALL7))
    d = _copy(src, tmp_path / "extra", tensors=lambda sd: sd | {
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(InputError) as e:
        read_adapter(d, c, "b")
    _one_line(e, d / "adapter_model.safetensors", "layers.0.self_attn.k_proj.lora_A")
    d = _copy(src, tmp_path / "nan", tensors=lambda sd: {k: v.clone().fill_(float("nan")) if "1.self_attn.v_proj.lora_B"
                                                         in k else v for k, v in sd.items()})
    with pytest.raises(InputError) as e:
        read_adapter(d, c, "b")
    _one_line(e, d / "adapter_model.safetensors", "layers.1.self_attn.v_proj.lora_B", "non-finite")
    for field, value in (("use_dora", True), ("bias", "all"), ("peft_type", "IA3"), ("lora_bias", True),
                         ("init_lora_weights", "pissa_niter_4"), ("target_modules", "(q_proj")):
        d = _copy(src, tmp_path / f"cfg-{field}", config={field: value})
        with pytest.raises(InputError) as e:
            read_adapter(d, c, "b")
        _one_line(e, d / "adapter_config.json", field, repr(value))


def test_adapter_for_another_base_names_both(qv, tmp_path):
    other = tmp_path / "other"
    random_checkpoint(other, "llama", **(SHAPE | {"hidden_size": 48}))
    with pytest.raises(InputError) as e:
        read_adapter(qv["adapter"], _config(other), str(other))
    _one_line(e, qv["adapter"] / "adapter_model.safetensors", str(other), str(qv["base"]), "[4, 32]", "[4, 48]",
              "self_attn.q_proj.lora_A")
    deeper = tmp_path / "deeper"  # fewer layers: the adapter's layer 2 matches nothing there
    random_checkpoint(deeper, "llama", **(SHAPE | {"num_layers": 2}))
    with pytest.raises(InputError) as e:
        read_adapter(qv["adapter"], _config(deeper), str(deeper))
    _one_line(e, "layers.2.", str(deeper), str(qv["base"]))


def test_key_forms_pickle_and_streamed_base(qv, tmp_path):
    c = _config(qv["base"])
    ref = read_adapter(qv["adapter"], c, "b")
    d = _copy(qv["adapter"], tmp_path / "named", tensors=lambda sd: {
        re.sub(r"\.weight$", ".default.weight", k): v for k, v in sd.items()})
    named = read_adapter(d, c, "b")
    assert ref.factors.keys() == named.factors.keys()
    assert all(torch.equal(ref.factors[k].b, named.factors[k].b) for k in ref.factors)
    d = _copy(qv["adapter"], tmp_path / "pickled", drop_weights=True)
    torch.save(load_file(qv["adapter"] / "adapter_model.safetensors"), d / "adapter_model.bin")
    with pytest.raises(InputError) as e:
        read_adapter(d, c, "b")
    _one_line(e, d / "adapter_model.bin", "allow_pickle")
    assert read_adapter(d, c, "b", allow_pickle=True).factors.keys() == ref.factors.keys()
    assert is_adapter(qv["adapter"]) and not is_adapter(qv["base"])
    assert set(identity(qv["adapter"])) == {"adapter_config.json", "adapter_model.safetensors"}
    streamed = load_model(qv["base"], stream_layers=True)
    for fn in (attach, merged):
        with pytest.raises(InputError) as e:
            fn(streamed, ref)
        _one_line(e, "--stream-layers")


def test_merged_bfloat16_equals_peft_merge(qv):
    """In bfloat16 PEFT keeps the factors in float32 and adds the float32 delta into the bf16 weight: bit for bit."""
    from driftscope.engine.loader import expected_weights

    hf = transformers.AutoModelForCausalLM.from_pretrained(qv["base"], dtype=torch.bfloat16)
    ref = peft.PeftModel.from_pretrained(hf, qv["adapter"]).merge_and_unload().state_dict()
    base = load_model(qv["base"], dtype="bfloat16")
    m = merged(base, read_adapter(qv["adapter"], base.config, "b"))
    params = dict(m.named_parameters())
    for name, t in expected_weights(m.config, m).items():
        w = params[t.param] if t.rows is None else params[t.param][t.rows[0] : t.rows[1]]
        assert w.dtype == torch.bfloat16 and torch.equal(w, ref[name]), name


def test_side_paths_in_shared_prefix_trees(qv):
    """A tree batch (prefix 0..3, two branches of 2 tokens at positions 4, 5): attach == merged within rounding."""
    base = load_model(qv["base"])
    adapter = read_adapter(qv["adapter"], base.config, "b")
    ids = _ids(8)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 4, 5])
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    mask[6:, 4:6] = False  # the second branch does not see the first
    cu = torch.tensor([0, 8], dtype=torch.int32)
    out = {}
    for name, m in (("attach", attach(base, adapter)), ("merged", merged(base, adapter)), ("base", base)):
        batch = m.prepare_tree(ids, cu, pos, (mask,))
        out[name] = m.head(m.forward(ids, cu, batch=batch).hidden)
    _close(out["attach"], out["merged"], "tree: attach vs merged")
    assert not torch.allclose(out["attach"], out["base"], atol=1e-4)
    linear_run = attach(base, adapter).logits(ids[[0, 1, 2, 3, 6, 7]])  # the second branch as one plain sequence
    _close(out["attach"][6:], linear_run[4:], "tree branch vs plain sequence, attached")


def test_side_paths_follow_to_and_stay_out_of_state_dict(qv):
    base = load_model(qv["base"])
    adapter = read_adapter(qv["adapter"], base.config, "b")
    side = attach(base, adapter)
    assert side.state_dict().keys() == base.state_dict().keys()
    ref = merged(load_model(qv["base"]).to(torch.float64), adapter).logits(_ids())  # merged in float64
    got = side.to(torch.float64).logits(_ids())  # the side-path factors are cast with the weights
    assert got.dtype == torch.float32 and side.layers[0].attn.lora["wqkv"].a.dtype == torch.float64
    _close(got, ref, "float64: attach vs merged", rtol=1e-6)  # b·scaling was rounded to float32 before the cast
    assert base.dtype == torch.float32, "moving the attached model moved the base"
