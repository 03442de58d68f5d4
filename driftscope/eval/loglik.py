"""Log-likelihood of continuations on the engine: packed batches, the LM head only where a token is scored.

`score_continuations(model, pairs)` takes (context ids, continuation ids) pairs and returns, per pair, the sum of
the continuation's log-probabilities and whether every continuation token is the model's argmax (lm-eval's
`(logprob, is_greedy)`). Sequences are sorted by length and packed next-fit into batches of at most
`max_batch_tokens` tokens (no padding, one varlen forward per batch); the LM head runs only on the rows that
predict a continuation token, in chunks of `head_rows` rows, so memory is O(head_rows × V), never O(tokens × V).
Log-softmax is taken in float32 whatever the model dtype.

Like lm-eval's `hf` model, a pair longer than `max_length + 1` tokens keeps its last `max_length + 1` tokens, and
the last token is never fed (it is only predicted). `score_continuations_torch` is the obviously-correct
reference: one sequence at a time, full float64 logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from driftscope.engine.data import next_fit
from driftscope.engine.model import Transformer

__all__ = ["score_continuations", "score_continuations_torch", "window"]


def window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """(input ids, number of scored positions at their end) for one pair, cut to the model's context."""
    if len(continuation) == 0:
        raise ValueError("an empty continuation has no log-likelihood (lm-eval never sends one)")
    if len(context) == 0:
        raise ValueError("the context is empty: lm-eval conditions an empty context on the prefix (EOS/BOS) token")
    full = (list(context) + list(continuation))[-(max_length + 1):]
    return full[:-1], min(len(continuation), len(full) - 1)


@torch.inference_mode()
def score_continuations(
    model: Transformer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int | None = None,
    max_batch_tokens: int = 8192,
    head_rows: int = 512,
    progress=None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all-greedy) per pair, in the order given."""
    max_length = max_length or model.config.max_position_embeddings
    if max_batch_tokens < 1 or head_rows < 1:
        raise ValueError(f"max_batch_tokens={max_batch_tokens} and head_rows={head_rows} must be positive")
    items = []
    for i, (ctx, cont) in enumerate(pairs):
        ids, n_scored = window(ctx, cont, max_length)
        items.append((i, ids, n_scored, list(cont)[-n_scored:]))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
    lengths = [len(items[i][1]) for i in order]
    out: list[tuple[float, bool] | None] = [None] * len(items)
    dev = model.device
    w = model.lm_head_weight
    for group in next_fit(lengths, max_batch_tokens):
        batch = [items[order[g]] for g in group]
        ids = torch.tensor([t for _, seq, _, _ in batch for t in seq], dtype=torch.int64, device=dev)
        bounds = [0]
        for _, seq, _, _ in batch:
            bounds.append(bounds[-1] + len(seq))
        cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
        hidden = model.forward(ids, cu).hidden  # [T, d]
        rows = torch.tensor([e - n + k for (_, _, n, _), e in zip(batch, bounds[1:]) for k in range(n)], device=dev)
        targets = torch.tensor([t for _, _, _, cont in batch for t in cont], dtype=torch.int64, device=dev)
        logp = torch.empty(len(rows), dtype=torch.float64, device=dev)
        greedy = torch.empty(len(rows), dtype=torch.bool, device=dev)
        for s in range(0, len(rows), head_rows):
            h = hidden.index_select(0, rows[s:s + head_rows])
            logits = F.linear(h, w).float()  # [r, V]
            y = targets[s:s + head_rows]
            lsm = logits.log_softmax(-1)
            logp[s:s + head_rows] = lsm.gather(1, y[:, None])[:, 0].double()
            greedy[s:s + head_rows] = logits.argmax(-1) == y
        logp_l, greedy_l = logp.tolist(), greedy.tolist()
        at = 0
        for i, _, n, _ in batch:
            out[i] = (float(sum(logp_l[at:at + n])), bool(all(greedy_l[at:at + n])))
            at += n
        if progress is not None:
            progress.update(len(batch))
    return out  # type: ignore[return-value]


@torch.inference_mode()
def score_continuations_torch(
    model: Transformer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int | None = None,
    max_batch_tokens: int = 8192,
    head_rows: int = 512,
    progress=None,
) -> list[tuple[float, bool]]:
    """Reference: one unpacked sequence at a time, float64 log-softmax over the full logits."""
    max_length = max_length or model.config.max_position_embeddings
    out = []
    for ctx, cont in pairs:
        ids, n = window(ctx, cont, max_length)
        logits = model.logits(torch.tensor(ids, dtype=torch.int64, device=model.device)).double()[-n:]
        y = torch.tensor(list(cont)[-n:], device=logits.device)
        lsm = logits.log_softmax(-1)
        out.append((float(lsm.gather(1, y[:, None]).sum()), bool((logits.argmax(-1) == y).all())))
    return out
