"""Real weights, read two ways: driftscope's GGUF loading against transformers' GGUF loading of the same file — the
tokenizer (ids and chat template on real texts), the weights, and the float32 logits of real texts."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real

LOGIT_TEXTS = 8
MAX_TOKENS = 160  # per text: 8 texts ≈ 1,000 tokens, a few seconds of float32 forward per library on 2 cores
# Measured (8 texts, 1,175 tokens, float32 both): max |Δlogit| 9.3e-5 at a logit scale of 44.7, i.e. 2.1e-6 of the
# scale. The two forwards differ only in the order of float32 sums (packed varlen vs one sequence, fused qkv and
# gate/up GEMMs, other attention kernels) over 30 layers: errors of a few float32 ulps (1.2e-7) per op that add up.
# 10x the measured value is the bound; a wrong weight, rope or norm moves logits by O(1).
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def ds_tokenizer(smollm2_gguf):
    import driftscope

    return driftscope.load_tokenizer(smollm2_gguf)


def test_tokenizer_ids_equal_transformers_on_real_texts(ds_tokenizer, hf_tokenizer, real_texts):
    texts = real_texts(40)  # 280 texts, 7 sources
    assert len(texts) == 280
    bad = [(i, t[:60]) for i, t in enumerate(texts)
           if ds_tokenizer.encode(t, add_special_tokens=False) != hf_tokenizer.encode(t, add_special_tokens=False)]
    assert not bad, f"{len(bad)} of {len(texts)} texts tokenize differently, first: {bad[:3]}"
    # adversarial: special tokens inside text, unicode, spaces and digits runs, an empty string
    odd = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "  a\u00a0b\t\t c\r\n\n\n", "12345678901234",
           "naïve café — 東京 🙂 \\frac{1}{2}", "", "<|endoftext|><|endoftext|>x"]
    for t in odd:
        assert ds_tokenizer.encode(t) == hf_tokenizer.encode(t, add_special_tokens=False), repr(t)
        ids = hf_tokenizer.encode(t, add_special_tokens=False)
        assert ds_tokenizer.decode(ids) == hf_tokenizer.decode(ids), repr(t)


def test_chat_template_renders_as_transformers(ds_tokenizer, hf_tokenizer):
    for messages in ([{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
        for gen in (True, False):
            ours = ds_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_weights_equal_the_hf_checkpoint(ds_model, smollm2_hf):
    """The dequantized GGUF and the HF checkpoint transformers wrote of it: the same tensors, bit for bit."""
    import driftscope

    ref = dict(driftscope.load_model(smollm2_hf, device="cpu", dtype="float32").named_parameters())
    ours = dict(ds_model.named_parameters())
    assert ours.keys() == ref.keys()
    bad = [k for k in ours if not torch.equal(ours[k], ref[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"


def test_logits_equal_transformers_on_real_texts(ds_model, hf_model, hf_tokenizer, real_texts):
    both = real_texts(2)
    texts = both[::2] + both[1:2]  # one per source, and a second MATH500 solution: short and long texts
    assert len(texts) == LOGIT_TEXTS
    ids = [torch.tensor(hf_tokenizer.encode(t, add_special_tokens=False)[:MAX_TOKENS]) for t in texts]
    lens = torch.tensor([len(i) for i in ids])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    with torch.inference_mode():
        ours = ds_model.head(ds_model(torch.cat(ids), cu).hidden)  # [T, V], all texts packed in one forward
        ref = torch.cat([hf_model(i[None]).logits[0] for i in ids])  # one text at a time
    assert ours.shape == ref.shape == (int(lens.sum()), 49152)
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    worst = divmod(int(diff.argmax()), ref.shape[1])
    print(f"max |Δlogit| {diff.max().item():.3g} at {worst} (scale {scale:.3g}), mean {diff.mean().item():.3g}")
    assert diff.max().item() <= REL_TOL * scale, (worst, ours[worst].item(), ref[worst].item())
    # argmax: equal except where transformers' top two are within the logit error of each other (a near tie)
    top2 = ref.topk(2, dim=-1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * REL_TOL * scale
    differ = ours.argmax(-1) != ref.argmax(-1)
    agree = 1 - differ.float().mean().item()
    print(f"argmax agreement {agree:.4%} over {len(differ)} tokens; near ties {int(near_tie.sum())}")
    assert not (differ & ~near_tie).any(), torch.nonzero(differ & ~near_tie)[:5].flatten().tolist()
    assert agree >= 0.995  # near ties are rare: 0 of 1,175 tokens measured had top-2 within 2x the bound
