"""Tiny base/tuned checkpoint pairs written by transformers, records files, and a float64 transformers reference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from driftscope.testing import write_checkpoint, write_tokenizer

MATH = [
    "Let x be a real number such that 3x + 7 = 22. Subtracting 7 from both sides gives 3x = 15, so x = 5.",
    "The sum of the first n positive integers is n(n + 1)/2, so the sum of 1 through 100 is 5050.",
    "A triangle with sides 3, 4 and 5 is a right triangle because 9 + 16 = 25.",
    "If a fair die is rolled twice, the probability that both rolls show six is 1/36.",
    "The derivative of x squared is 2x, and the integral of 2x from 0 to 3 is 9.",
    "Since 91 = 7 × 13, the number 91 is not prime, although it is often mistaken for one.",
    "The greatest common divisor of 48 and 180 is 12, found by the Euclidean algorithm.",
    "A geometric series with ratio 1/2 starting at 1 converges to 2.",
]
GENERAL = [
    "The museum opens at nine in the morning and closes at five in the afternoon on weekdays.",
    "She packed an umbrella because the forecast said it would rain in the evening.",
    "Rivers carry sediment downstream and deposit it where the water slows near the coast.",
    "Please summarise the following paragraph in one sentence and keep the original tone.",
    "The committee postponed the vote until every member had read the final report.",
    "Bread rises because yeast ferments sugar and releases carbon dioxide into the dough.",
    "Answer the question using only the information given in the passage above.",
    "The train to the city leaves from platform four every twenty minutes.",
]

TEXTS = MATH + GENERAL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_base(root: Path, *, layers: int = 3, vocab: int | None = None, seed: int = 0) -> Path:
    import transformers

    tok_dir = write_tokenizer(root, TEXTS, vocab_size=350)
    from driftscope.engine.tokenizer import load_tokenizer

    n_vocab = vocab or load_tokenizer(tok_dir).vocab_size
    cfg = transformers.Qwen3Config(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        max_position_embeddings=512, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)  # peaked enough that ranks and argmaxes are not all ties of noise
    model.save_pretrained(root, safe_serialization=True)
    return root


def write_tuned(base: Path, out: Path, *, from_layer: int, noise: float = 0.3, seed: int = 1,
                head: bool = True) -> Path:
    """Copy of `base` whose layers >= from_layer (and the LM head when `head`) get relative Gaussian noise."""
    cfg = json.loads((base / "config.json").read_text())
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name, w in state.items():
        parts = name.split(".")
        in_layer = name.startswith("model.layers.") and int(parts[2]) >= from_layer
        if (in_layer and w.dim() == 2) or (head and name == "lm_head.weight"):
            state[name] = w + noise * w.std() * torch.randn(w.shape, generator=g)
    write_checkpoint(out, cfg, state)
    for f in TOKENIZER_FILES:
        if (base / f).exists():
            shutil.copy(base / f, out / f)
    return out


def write_records(path: Path, n: int | None = None, *, shuffle_seed: int | None = None) -> Path:
    texts = list(TEXTS if n is None else TEXTS[:n])
    rows = []
    for i, t in enumerate(texts):
        cut = 12 + (i * 7) % 25
        if i % 5 == 3:
            rows.append({"messages": [{"role": "user", "content": t[:cut]}, {"role": "assistant", "content": t[cut:]}]})
        elif i % 5 == 4:
            rows.append({"text": t})
        else:
            rows.append({"prompt": t[:cut], "response": t[cut:]})
    if shuffle_seed is not None:
        import random

        random.Random(shuffle_seed).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def reference_tokens(base: Path, tuned: Path, samples) -> dict[str, torch.Tensor]:
    """Per scored token, float64 transformers logits: kl_tb, kl_bt, logp_*, rank_*, top_*, rank_shift_top,
    sample ids."""
    import transformers

    mb = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64, attn_implementation="eager")
    mt = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float64, attn_implementation="eager")
    cols: dict[str, list] = {k: [] for k in ("kl_tb", "kl_bt", "logp_base", "logp_tuned", "rank_base", "rank_tuned",
                                             "top_base", "top_tuned", "rank_shift_top", "sample_id", "first")}
    for s in samples:
        ids = s.input_ids[None]
        zb, zt = mb(ids).logits[0], mt(ids).logits[0]  # [L, V] float64
        a, b = s.first_scored, len(s.input_ids) - 1
        zb, zt, y = zb[a:b], zt[a:b], s.input_ids[a + 1 : b + 1]
        lq, lp = torch.log_softmax(zb, -1), torch.log_softmax(zt, -1)
        p, q = lp.exp(), lq.exp()
        cols["kl_tb"].append((p * (lp - lq)).sum(-1))
        cols["kl_bt"].append((q * (lq - lp)).sum(-1))
        cols["logp_base"].append(lq.gather(1, y[:, None])[:, 0])
        cols["logp_tuned"].append(lp.gather(1, y[:, None])[:, 0])
        cols["rank_base"].append(1 + (zb > zb.gather(1, y[:, None])).sum(-1))
        cols["rank_tuned"].append(1 + (zt > zt.gather(1, y[:, None])).sum(-1))
        tb, tt = zb.argmax(-1), zt.argmax(-1)
        cols["top_base"].append(tb)
        cols["top_tuned"].append(tt)
        cols["rank_shift_top"].append(1 + (zb > zb.gather(1, tt[:, None])).sum(-1))
        cols["sample_id"].append(torch.full((b - a,), s.sample_id))
        first = torch.zeros(b - a, dtype=torch.bool)
        first[0] = True
        cols["first"].append(first)
    return {k: torch.cat(v) for k, v in cols.items()}
