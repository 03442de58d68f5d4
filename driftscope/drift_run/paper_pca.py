"""Paper-mode PCA shift inputs: the paper's k query texts, truncated and left-padded, mean over all W positions.

Queries run packed (no padding) through the lockstep runner; each padded position's state is the pad token's
state with zero attention output (`engine.runner.pad_states`), so vector = (Σ_real h + (W − T)·h_pad) / W.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from driftscope.engine.data import next_fit, record_texts

from driftscope.records import Record
from driftscope.engine.runner import LockstepRunner, pad_states
from driftscope.engine.tokenizer import Tokenizer


def paper_select_texts(texts: Sequence[str], k: int = 30, seed: int = 42, method: str = "shuffle") -> list[str]:
    """The paper's query choice: `random.seed(42)` then `random.shuffle(texts)[:k]` ("shuffle", HF datasets) or
    `random.sample(data, k)` ("sample", its OlympiadBench path)."""
    rng = random.Random(seed)
    if method == "shuffle":
        out = list(texts)
        rng.shuffle(out)
        return out[:k]
    if method == "sample":
        return rng.sample(list(texts), k)
    raise ValueError(f"method must be 'shuffle' or 'sample', got {method!r}")


def query_texts(opts, tok: Tokenizer, records: Sequence[Record] = (), prompts: Sequence[str] | None = None,
                ) -> list[str]:
    """The k selected queries: from the `pca_texts` file's non-empty lines, else from the rendered prompts
    (generate mode) or the records' prompts (their text for {"text"} records)."""
    if opts.pca_texts is not None:
        texts = [line for line in Path(opts.pca_texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    elif prompts is not None:
        texts = [p for p in prompts if p]
    else:
        texts = []
        for rec in records:
            prompt, response = record_texts(rec, tok, opts.chat_template_kwargs)
            texts.append(prompt or response)
    return paper_select_texts(texts, k=opts.pca_queries, seed=opts.pca_seed)


@torch.inference_mode()
def paper_pca(runner: LockstepRunner, tok: Tokenizer, texts: Sequence[str], opts) -> list[torch.Tensor]:
    """The query vectors [L+1, Q, d] float32 of each model (base first, then the runner's tuned models)."""
    if len(texts) < 2:
        raise ValueError(f"paper-mode PCA needs at least 2 query texts, found {len(texts)}")
    # the paper's `tokenizer(texts, truncation=True, max_length=128)` adds the special tokens (Llama's BOS)
    ids = [tok.encode(t, add_special_tokens=True)[: opts.pca_max_length] for t in texts]
    width = max(len(x) for x in ids)  # padding=True pads to the longest truncated text
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError(f"{tok.path}: paper-mode PCA needs a pad_token or eos_token in tokenizer_config.json")
    models = [runner.base, *runner.tuned]
    pads = [torch.stack(pad_states(m, pad_id)).double() for m in models]  # [L+1, d] per model
    n_states, d = pads[0].shape
    device = runner.device
    lengths = [len(x) for x in ids]
    sums = [torch.zeros(n_states, len(ids), d, dtype=torch.float64, device=device) for _ in models]
    for group in next_fit(lengths, max(opts.max_batch_tokens, opts.pca_max_length)):
        flat = torch.tensor([t for q in group for t in ids[q]], dtype=torch.int64)
        lens = torch.tensor([lengths[q] for q in group])
        cu = torch.zeros(len(group) + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        seg = torch.repeat_interleave(torch.arange(len(group)), lens).to(device)  # token -> slot in group
        rows = torch.tensor(group, device=device)

        def on_layer(i: int, hb: torch.Tensor, hts: list[torch.Tensor]) -> None:
            for m, h in enumerate([hb, *hts]):
                s = torch.zeros(len(group), d, dtype=torch.float64, device=h.device).index_add_(0, seg, h.double())
                sums[m][i, rows] = s

        runner.forward(flat, cu, on_layer)
    n_pad = torch.tensor([width - n for n in lengths], dtype=torch.float64, device=device)  # [Q]
    return [((s + n_pad[None, :, None] * p[:, None, :]) / width).float() for s, p in zip(sums, pads)]
