"""Paper-mode PCA shift inputs: the paper's k query texts, truncated and left-padded, mean over all W positions.

Queries run packed (no padding) through the lockstep runner; each padded position's state is the pad token's
state with zero attention output (`engine.runner.pad_states`), so vector = (Σ_real h + (W − T)·h_pad) / W.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from driftscope.engine.data import next_fit, record_texts
from driftscope.engine.runner import pad_states
from driftscope.probes.pca import PaperPCAShift, paper_select_texts

if TYPE_CHECKING:
    from driftscope.analysis.run import _Run, _Task


def query_texts(run: "_Run", task: "_Task") -> list[str]:
    """The plain-text file's non-empty lines, or the prompts of the task's records (the text for {"text"}, the
    rendered prompts in generate mode)."""
    o = run.opts
    if o.pca_texts is not None:
        return [line for line in Path(o.pca_texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if task.prompts is not None:  # generate mode: the rendered prompts
        return [p.text for p in task.prompts if p.text]
    texts = []
    for rec in task.records:
        prompt, response = record_texts(rec, run.tok, o.chat_template_kwargs)
        texts.append(prompt or response)
    return texts


@torch.inference_mode()
def paper_pca(run: "_Run", k: int, task: "_Task") -> None:
    """Feed run.acc(j, k, "pca") (a PaperPCAShift) for every tuned model j with the k query vectors per layer."""
    o, tok = run.opts, run.tok
    texts = paper_select_texts(query_texts(run, task), k=o.pca_queries, seed=o.pca_seed)
    if len(texts) < 2:
        raise ValueError(f"{task.path}: paper-mode PCA needs at least 2 query texts, found {len(texts)}")
    # the paper's `tokenizer(texts, truncation=True, max_length=128)` adds the special tokens (Llama's BOS)
    ids = [tok.encode(t, add_special_tokens=True)[: o.pca_max_length] for t in texts]
    width = max(len(x) for x in ids)  # padding=True pads to the longest truncated text
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError(f"{tok.path}: paper-mode PCA needs a pad_token or eos_token in tokenizer_config.json")
    models = [run.base, *run.tuned]
    pads = [torch.stack(pad_states(m, pad_id)).double() for m in models]  # [L+1, d] per model
    n_states, d = pads[0].shape
    lengths = [len(x) for x in ids]
    # vectors[m][layer, q] = Σ over the query's real tokens, then padded-mean below
    sums = [torch.zeros(n_states, len(ids), d, dtype=torch.float64, device=run.device) for _ in models]
    for group in next_fit(lengths, max(o.max_batch_tokens, o.pca_max_length)):
        flat = torch.tensor([t for q in group for t in ids[q]], dtype=torch.int64)
        lens = torch.tensor([lengths[q] for q in group])
        cu = torch.zeros(len(group) + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        seg = torch.repeat_interleave(torch.arange(len(group)), lens).to(run.device)  # token -> slot in group
        rows = torch.tensor(group, device=run.device)

        def on_layer(i: int, hb: torch.Tensor, hts: list[torch.Tensor]) -> None:
            for m, h in enumerate([hb, *hts]):
                s = torch.zeros(len(group), d, dtype=torch.float64, device=h.device).index_add_(0, seg, h.double())
                sums[m][i, rows] = s

        run.runner.forward(flat, cu, on_layer)
    n_pad = torch.tensor([width - n for n in lengths], dtype=torch.float64, device=run.device)  # [Q]
    vecs = [((s + n_pad[None, :, None] * p[:, None, :]) / width).float() for s, p in zip(sums, pads)]  # [L+1, Q, d]
    qids = list(range(len(ids)))
    for j in range(len(run.tuned)):
        acc = PaperPCAShift(n_states, d)  # filled whole, then swapped in: an interrupt never leaves half of it
        for layer in range(n_states):
            acc.update(layer, vecs[0][layer], vecs[j + 1][layer], qids)
        run.accs[f"m{j}.t{k}.pca"] = acc
