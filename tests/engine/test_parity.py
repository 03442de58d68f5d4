"""Forward parity with transformers (eager attention, float32 CPU) on tiny random checkpoints of every architecture."""
from __future__ import annotations

import pytest
import torch

from driftscope.engine.loader import load_model
from engine_helpers import CASE_IDS, CASES, STYLES, assert_close

LENGTHS = [7, 1, 13, 4]  # packed batch: odd lengths and a length-1 sequence
TOL_FP32 = 1e-4  # max|Δ| / max|ref|; measured ~4e-7 on these configs


def _packed(vocab: int, lengths: list[int], seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # [B+1]
    return seqs, torch.cat(seqs), cu


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:  # [L] -> [L, V]
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_packed_logits_match_transformers(checkpoints, case, style):
    hf = checkpoints.hf_model(case)
    model = load_model(checkpoints.path(case, style))
    seqs, ids, cu = _packed(hf.config.vocab_size, LENGTHS)
    hidden = model.forward(ids, cu).hidden  # [T, d]
    logits = torch.nn.functional.linear(hidden, model.lm_head_weight).float()  # [T, V]
    for b, seq in enumerate(seqs):
        s, e = int(cu[b]), int(cu[b + 1])
        assert_close(logits[s:e], _hf_logits(hf, seq), TOL_FP32, f"{case.id}/{style} sequence {b} (len {len(seq)})")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hidden_states_match_transformers(checkpoints, case):
    hf = checkpoints.hf_model(case)
    model = load_model(checkpoints.path(case))
    seqs, ids, cu = _packed(hf.config.vocab_size, LENGTHS, seed=2)
    out = model.forward(ids, cu, output_hidden_states=True)
    L = hf.config.num_hidden_layers
    assert out.hidden_states is not None and len(out.hidden_states) == L + 1
    assert torch.equal(out.hidden_states[-1], out.hidden)
    b = 2  # the longest sequence, in the middle of the pack
    s, e = int(cu[b]), int(cu[b + 1])
    with torch.no_grad():
        ref = hf(seqs[b][None], output_hidden_states=True).hidden_states
    assert len(ref) == L + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref)):
        assert_close(ours[s:e], theirs[0], TOL_FP32, f"{case.id} hidden_states[{i}]")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_packing_equals_running_alone(checkpoints, case):
    model = load_model(checkpoints.path(case))
    seqs, ids, cu = _packed(model.config.vocab_size, LENGTHS, seed=3)
    packed = model.forward(ids, cu).hidden
    for b, seq in enumerate(seqs):
        alone = model.forward(seq).hidden
        assert_close(packed[int(cu[b]) : int(cu[b + 1])], alone, 1e-5, f"{case.id} sequence {b}")


def test_the_parity_check_has_teeth(checkpoints):
    """Without resetting positions and causality at the sequence boundary the outputs move far beyond TOL_FP32."""
    case = CASES[5]
    model = load_model(checkpoints.path(case))
    seqs, ids, cu = _packed(model.config.vocab_size, LENGTHS, seed=4)
    packed = model.forward(ids, cu).hidden
    one_long_sequence = model.forward(ids).hidden
    s, e = int(cu[2]), int(cu[3])
    err = (packed[s:e] - one_long_sequence[s:e]).abs().max() / packed[s:e].abs().max()
    assert err > 100 * TOL_FP32, f"relative change {err:.3e} is too small for the parity tests to mean anything"


def test_batched_logits_rows_are_independent(checkpoints):
    case = CASES[2]  # llama3 rope
    hf = checkpoints.hf_model(case)
    model = load_model(checkpoints.path(case))
    ids = torch.randint(0, hf.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(5))
    ours = model.logits(ids)  # [B, T, V]
    assert ours.dtype == torch.float32 and ours.shape == (3, 9, hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert_close(ours, ref, TOL_FP32, "logits([B, T])")
    assert_close(model.logits(ids[1]), ref[1], TOL_FP32, "logits([T])")


def test_bf16_checkpoint_as_float32(checkpoints):
    """bf16-stored weights upcast on load: same weights as transformers loading them as float32."""
    from transformers import AutoModelForCausalLM

    case = CASES[5]
    path = checkpoints.path(case, dtype="bfloat16")
    model = load_model(path, dtype="float32")
    assert model.lm_head_weight.dtype == torch.float32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    seqs, ids, cu = _packed(hf.config.vocab_size, LENGTHS, seed=6)
    logits = torch.nn.functional.linear(model.forward(ids, cu).hidden, model.lm_head_weight)
    for b, seq in enumerate(seqs):
        assert_close(logits[int(cu[b]) : int(cu[b + 1])], _hf_logits(hf, seq), TOL_FP32, f"bf16->fp32 sequence {b}")


def test_bf16_checkpoint_as_bfloat16(checkpoints):
    """bf16 compute: our error against the fp32 forward of the same weights is at most ~2x transformers' bf16 error."""
    from transformers import AutoModelForCausalLM

    case = CASES[5]
    path = checkpoints.path(case, dtype="bfloat16")
    ours16 = load_model(path, dtype="bfloat16")
    assert ours16.lm_head_weight.dtype == torch.bfloat16
    ref32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    seqs, ids, cu = _packed(ref32.config.vocab_size, LENGTHS, seed=7)
    ours = ours16.logits(seqs[2])  # [13, V] float32
    ref = _hf_logits(ref32, seqs[2])
    theirs = _hf_logits(hf16, seqs[2])
    scale = ref.abs().max()
    err_ours = ((ours - ref).abs().max() / scale).item()
    err_hf = ((theirs - ref).abs().max() / scale).item()
    assert err_ours <= 2 * err_hf + 1e-3, f"bf16: ours {err_ours:.3e} vs transformers {err_hf:.3e} (relative to fp32)"
    packed = ours16.forward(ids, cu).hidden
    assert packed.dtype == torch.bfloat16 and torch.isfinite(packed.float()).all()
