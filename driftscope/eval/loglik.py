"""Log-likelihood of continuations on the engine: packed batches, the LM head only where a token is scored.

`score_continuations(model, pairs)` takes (context ids, continuation ids) pairs and returns, per pair, the sum of
the continuation's log-probabilities and whether every continuation token is the model's argmax (lm-eval's
`(logprob, is_greedy)`). Sequences are sorted by length and packed next-fit into batches of at most
`max_batch_tokens` tokens (no padding, one varlen forward per batch); the LM head runs only on the rows that
predict a continuation token, in chunks of `head_rows` rows, so memory is O(head_rows × V), never O(tokens × V).
Pairs that share their context (multiple choice: one question, k answers) are packed as one shared-prefix tree:
the context once, then each continuation, which attends to the context and to itself only and keeps the
positions it would have alone (`kernels.attention.tree_attention`), so the context is computed once, not k times.
Log-softmax is taken in float32 whatever the model dtype.

Like lm-eval's `hf` model, a pair longer than `max_length + 1` tokens keeps its last `max_length + 1` tokens, and
the last token is never fed (it is only predicted). `score_continuations_torch` is the obviously-correct
reference: one sequence at a time, full float64 logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


@dataclass
class _Tree:
    """One packed sequence: a shared prefix, then one branch per member (its fed continuation tokens)."""

    ids: list[int]
    positions: list[int]
    mask: torch.Tensor | None  # None: a single member, plain causal attention
    members: list[tuple[int, list[int], list[int]]]  # (pair index, rows scored within the tree, targets)


def _trees(items, max_tree: int) -> list[_Tree]:
    """Group pairs whose fed context is the same (multiple choice: one context, k continuations) into trees of at
    most `max_tree` tokens; the context's last position predicts every member's first continuation token."""
    by_prefix: dict[tuple[int, ...], list] = {}
    for item in items:
        i, ids, n, targets = item
        p = len(ids) - n + 1  # the fed context: its last token predicts the first continuation token
        by_prefix.setdefault(tuple(ids[:p]), []).append((i, ids[p:], targets))
    trees = []
    for prefix, members in by_prefix.items():
        P, chunk = len(prefix), []
        for m in members + [None]:
            size = P + sum(len(t) for _, t, _ in chunk)
            if m is not None and (not chunk or size + len(m[1]) <= max_tree):
                chunk.append(m)
                continue
            ids, positions, out = list(prefix), list(range(P)), []
            spans = []
            for i, tail, targets in chunk:
                start = len(ids)
                ids += tail
                positions += range(P, P + len(tail))
                out.append((i, [P - 1] + list(range(start, start + len(tail))), targets))
                spans.append((start, len(ids)))
            mask = None
            if len(chunk) > 1:
                L = len(ids)
                mask = torch.zeros(L, L, dtype=torch.bool)
                mask[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
                for s, e in spans:
                    mask[s:e, :P] = True
                    mask[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
            trees.append(_Tree(ids, positions, mask, out))
            chunk = [m] if m is not None else []
    return trees


@torch.inference_mode()
def score_continuations(
    model: Transformer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int | None = None,
    max_batch_tokens: int = 8192,
    head_rows: int = 512,
    share_prefix: bool = True,
    max_tree: int = 2048,
    progress=None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all-greedy) per pair, in the order given. With `share_prefix`, pairs
    with the same context run it once (a tree of at most `max_tree` tokens: the context, then each continuation
    attending to the context and to itself only, at the positions it would have had alone)."""
    max_length = max_length or model.config.max_position_embeddings
    if max_batch_tokens < 1 or head_rows < 1 or max_tree < 1:
        raise ValueError(f"max_batch_tokens={max_batch_tokens}, head_rows={head_rows} and max_tree={max_tree} "
                         "must be positive")
    items = []
    for i, (ctx, cont) in enumerate(pairs):
        ids, n_scored = window(ctx, cont, max_length)
        items.append((i, ids, n_scored, list(cont)[-n_scored:]))
    if share_prefix:
        trees = _trees(items, max_tree)
    else:
        trees = [_Tree(ids, list(range(len(ids))), None, [(i, list(range(len(ids) - n, len(ids))), t)])
                 for i, ids, n, t in items]
    trees.sort(key=lambda t: -len(t.ids))
    out: list[tuple[float, bool] | None] = [None] * len(items)
    dev = model.device
    for group in next_fit([len(t.ids) for t in trees], max_batch_tokens):
        batch = [trees[g] for g in group]
        ids = torch.tensor([t for tree in batch for t in tree.ids], dtype=torch.int64, device=dev)
        bounds = [0]
        for tree in batch:
            bounds.append(bounds[-1] + len(tree.ids))
        cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
        members = [(m, start) for tree, start in zip(batch, bounds) for m in tree.members]
        rows = torch.tensor([start + r for (_, rs, _), start in members for r in rs], device=dev)  # the scored ones
        if any(tree.mask is not None for tree in batch):
            positions = torch.tensor([p for tree in batch for p in tree.positions], dtype=torch.int64, device=dev)
            layer_batch = model.prepare_tree(ids, cu, positions, tuple(tree.mask for tree in batch))
            hidden = model.forward(ids, batch=layer_batch, rows=rows).hidden  # [len(rows), d]
        else:
            hidden = model.forward(ids, cu, rows=rows).hidden
        targets = torch.tensor([t for (_, _, ts), _ in members for t in ts], dtype=torch.int64, device=dev)
        logp = torch.empty(len(rows), dtype=torch.float64, device=dev)
        greedy = torch.empty(len(rows), dtype=torch.bool, device=dev)
        for s in range(0, len(rows), head_rows):
            h = hidden[s:s + head_rows]
            logits = model.head(h)  # [r, V] float32
            y = targets[s:s + head_rows]
            logp[s:s + head_rows] = logits.log_softmax(-1).gather(1, y[:, None])[:, 0].double()
            greedy[s:s + head_rows] = logits.argmax(-1) == y
        logp_l, greedy_l = logp.tolist(), greedy.tolist()
        at = 0
        for (i, rs, _), _ in members:
            n = len(rs)
            out[i] = (float(sum(logp_l[at:at + n])), bool(all(greedy_l[at:at + n])))
            at += n
        if progress is not None:
            progress.update(len(members))
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
