"""Parity with transformers (float64) for the architecture features: sliding-window attention (Mistral, Qwen2/Qwen3
per-layer windows) in packed prefill, shared-prefix trees and paged decode past the window; every rope type
(linear, dynamic, yarn, longrope) on both sides of its length limit; partial_rotary_factor."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from arch_helpers import TOL, assert_decode_matches, assert_packed_matches, build, random_seqs
from engine_helpers import assert_close

from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Transformer
from driftscope.engine.rope import inv_freq_per_token, rope_attention_factor, rope_inv_freq
from driftscope.kernels._dispatch import use_backend

GQA = dict(num_attention_heads=4, num_key_value_heads=2)
WINDOW_CASES = {
    "mistral-w5": ("mistral", dict(**GQA, sliding_window=5)),
    "qwen2-w4-from-layer1": ("qwen2", dict(**GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-w6-layer-types": ("qwen3", dict(**GQA, head_dim=16, use_sliding_window=True, sliding_window=6,
                                            layer_types=["sliding_attention", "full_attention"])),
}
_LONG = [0.5 + 0.25 * i for i in range(8)]  # 8 = head_dim / 2 factors
ROPE_CASES = {
    "linear": ("llama", dict(**GQA, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    "dynamic": ("llama", dict(**GQA, max_position_embeddings=16,
                              rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    "yarn": ("qwen2", dict(**GQA, max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16})),
    "yarn-mscale-untruncated": ("llama", dict(**GQA, max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False})),
    "longrope": ("llama", dict(**GQA, max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": _LONG})),
    "longrope-qwen3-attention-factor": ("qwen3", dict(**GQA, head_dim=16, max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16, "attention_factor": 1.3,
        "short_factor": [1.0] * 8, "long_factor": _LONG})),
}
# transformers' Llama/Qwen3 classes ignore partial_rotary_factor (default rope) or fail on it (scaled ropes); its
# partial-rotary models (Phi3, ...) rotate the first rotary dims, rotate-half within them: the reference patches that
# in (fixture phi3_rotary).
PARTIAL_CASES = {
    "partial-0.5-llama": ("llama", dict(**GQA, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                               "partial_rotary_factor": 0.5})),
    "partial-0.3-odd-qwen3": ("qwen3", dict(**GQA, head_dim=24, rope_parameters={  # int(24 · 0.3) = 7 -> 8 dims
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3})),
    "partial-0.5-yarn-llama": ("llama", dict(**GQA, max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "partial_rotary_factor": 0.5})),
}
LENGTHS = [24, 7, 16, 17, 1]  # past a window / the length limit of 16, exactly at it, just over it, one token


@pytest.fixture
def phi3_rotary(monkeypatch):
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen3 import modeling_qwen3

    default = staticmethod(modeling_phi3.Phi3RotaryEmbedding.compute_default_rope_parameters)
    for mod, rotary in ((modeling_llama, modeling_llama.LlamaRotaryEmbedding),
                        (modeling_qwen3, modeling_qwen3.Qwen3RotaryEmbedding)):
        monkeypatch.setattr(mod, "apply_rotary_pos_emb", modeling_phi3.apply_rotary_pos_emb)
        monkeypatch.setattr(rotary, "compute_default_rope_parameters", default)


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_sliding_window_prefill(tmp_path, case):
    model_type, kw = WINDOW_CASES[case]
    hf, model = build(tmp_path, model_type, kw)
    assert any(w is not None for w in model.config.layer_windows)
    assert [w is not None for w in model.config.layer_windows] == [
        t == "sliding_attention" for t in hf.config.layer_types] if model_type != "mistral" else True
    assert_packed_matches(hf, model, LENGTHS, case)


def test_sliding_window_parity_has_teeth(tmp_path):
    hf, model = build(tmp_path, *WINDOW_CASES["mistral-w5"])
    full = Transformer(ModelConfig.from_dict({**hf.config.to_dict(), "sliding_window": None}))
    full.load_state_dict(model.state_dict())
    seq = random_seqs(model.config.vocab_size, [24])[0]
    a, b = model.logits(seq), full.logits(seq)
    assert torch.equal(a[:5], b[:5])  # within the window nothing changes
    assert ((a - b).abs().max() / a.abs().max()).item() > 100 * TOL


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_sliding_window_decode(tmp_path, case, backend):
    """Prompts shorter and longer than the window, 10 new tokens: decode crosses the window over 4-slot blocks, in
    steps that mix decodes and admitted prefills (2 sequences at a time)."""
    hf, model = build(tmp_path, *WINDOW_CASES[case])
    prompts = [s.tolist() for s in random_seqs(model.config.vocab_size, [3, 12, 7, 1], seed=3)]
    with use_backend(backend):
        parted = assert_decode_matches(hf, model, prompts, 10, case, block_size=4, max_num_seqs=2)
    assert parted <= 1


def test_sliding_window_tree(tmp_path):
    """A shared prefix of 9 tokens and branches of 4 and 3: each branch token equals the branch run alone."""
    hf, model = build(tmp_path, *WINDOW_CASES["qwen2-w4-from-layer1"])
    prefix, b1, b2 = random_seqs(model.config.vocab_size, [9, 4, 3], seed=5)
    ids = torch.cat([prefix, b1, b2])
    n = len(ids)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:9, :9] = torch.ones(9, 9, dtype=torch.bool).tril()
    for s, e in ((9, 13), (13, 16)):
        mask[s:e, :9] = True
        mask[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(9), torch.arange(9, 13), torch.arange(9, 12)])
    cu = torch.tensor([0, n], dtype=torch.int32)
    batch = model.prepare_tree(ids, cu, positions, (mask,))
    hidden = model.forward(ids, batch=batch).hidden
    for (s, e), branch in (((9, 13), b1), ((13, 16), b2)):
        alone = model.forward(torch.cat([prefix, branch])).hidden[9:]
        assert_close(hidden[s:e], alone, 1e-5, f"tree branch {s}:{e}")


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_types_prefill(tmp_path, case):
    hf, model = build(tmp_path, *ROPE_CASES[case])
    assert model.config.rope_type == ROPE_CASES[case][1]["rope_parameters"]["rope_type"]
    assert_packed_matches(hf, model, LENGTHS, case)


@pytest.mark.parametrize("case", ["longrope", "longrope-qwen3-attention-factor", "yarn"])
def test_rope_types_decode(tmp_path, case):
    """longrope switches to the long factors for tokens past position 16 while the cached keys keep the short ones,
    as transformers' cached generate does."""
    hf, model = build(tmp_path, *ROPE_CASES[case])
    prompts = [s.tolist() for s in random_seqs(model.config.vocab_size, [10, 20, 3], seed=4)]
    assert assert_decode_matches(hf, model, prompts, 12, case, block_size=4) <= 1


@pytest.mark.parametrize("case", list(PARTIAL_CASES))
def test_partial_rotary(tmp_path, phi3_rotary, case):
    hf, model = build(tmp_path, *PARTIAL_CASES[case])
    c = model.config
    assert c.rotary_dim == 2 * ((int(c.head_dim * c.partial_rotary_factor) + 1) // 2) < c.head_dim
    assert_packed_matches(hf, model, LENGTHS, case)
    prompts = [s.tolist() for s in random_seqs(c.vocab_size, [5, 18], seed=6)]
    assert assert_decode_matches(hf, model, prompts, 8, case, block_size=4) <= 1


@pytest.mark.parametrize("case", list(ROPE_CASES) + list(PARTIAL_CASES))
def test_rope_frequencies_equal_transformers(case, phi3_rotary):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    model_type, kw = {**ROPE_CASES, **PARTIAL_CASES}[case]
    hf_cfg = AutoConfig.for_model(model_type, **{**dict(hidden_size=64, num_hidden_layers=2), **kw})
    c = ModelConfig.from_dict(hf_cfg.to_dict())
    rope_type = c.rope_type
    init = ROPE_INIT_FUNCTIONS.get(rope_type, Phi3RotaryEmbedding.compute_default_rope_parameters)
    ref, factor = init(hf_cfg, "cpu")
    assert_close(rope_inv_freq(c), ref.float(), 1e-6, f"{case} inv_freq")
    assert rope_attention_factor(c) == pytest.approx(factor, rel=1e-12)
    if rope_type in ("dynamic", "longrope"):
        lens = torch.tensor([5, 16, 17, 40])
        per = inv_freq_per_token(c, rope_inv_freq(c), lens)
        for n, row in zip(lens.tolist(), per):
            want = ref if n <= 16 else init(hf_cfg, "cpu", seq_len=torch.tensor(n) if rope_type == "dynamic" else n)[0]
            assert_close(row, want.float(), 1e-6, f"{case} inv_freq at length {n}")


def test_dynamic_tree_past_the_limit_is_refused(tmp_path):
    _, model = build(tmp_path, *ROPE_CASES["dynamic"])
    ids = torch.arange(20)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        model.prepare_tree(ids, torch.tensor([0, 20], dtype=torch.int32), torch.arange(20), (mask,))
    batch = model.prepare_tree(ids, torch.tensor([0, 20], dtype=torch.int32), torch.arange(20), (None,))
    assert_close(F.linear(model.forward(ids, batch=batch).hidden, model.lm_head_weight), model.logits(ids), 1e-6,
                 "a causal sequence with explicit positions is its plain forward")
