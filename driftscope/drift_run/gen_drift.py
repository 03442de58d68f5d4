"""Drift while generating (`drift(..., generate=True)`): each tuned model generates from the records' prompts and
the base model consumes the same tokens in lockstep, with its own KV cache; the probes run in the generation pass.

At every step the newest position of each sequence is scored: its target is the token just sampled from the tuned
model (the first generated token's position is the prompt's last). These are exactly the positions a teacher-forced
run scores on the generated `output_token_ids`, so `drift --generate` equals `generate` then `drift`. Per-token
probe results are kept per chunk of prompts and folded in when the chunk is done (TokenMetrics takes a sample whole);
the per-layer probes see each step's states at once. A chunk is the unit of resume.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from driftscope.engine.decoding import GenerationEngine, GenRequest, StepOutput
from driftscope.engine.prompts import render_prompt
from driftscope.records import read_prompts
from driftscope.kernels.vocab_probe import vocab_probe
from driftscope.probes.token_metrics import PROBE_FIELDS as _FIELDS

if TYPE_CHECKING:  # annotations only
    from driftscope.drift_run.bundle import TaskProbes
    from driftscope.engine.model import Transformer
    from driftscope.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptItem:
    index: int  # the record's ordinal in its file: the sample id and the random stream's prompt key
    ids: list[int]
    where: str
    text: str | None  # the rendered prompt


def read_prompt_items(o, tok: "Tokenizer", path) -> tuple[list[PromptItem], list[str]]:
    records, problems = read_prompts(path, o.prompt_field)
    items = []
    for r in records:
        text, ids = render_prompt(r.prompt, tok, r.where, chat=o.chat, system=o.system, thinking=o.thinking,
                                  chat_template_kwargs=o.chat_template_kwargs, rendered=r.rendered)
        items.append(PromptItem(r.index, ids, r.where, text))
    return items, problems


def generate_chunk(o, base: "Transformer", tuned: "Transformer", j: int, tok: "Tokenizer",
                   items: Sequence[PromptItem], probes: "TaskProbes", valid_vocab: int | None) -> list[dict]:
    """Generate `items` with tuned model j (`tuned`), the base in lockstep; feed `probes` (tuned model j's part).
    Returns the responses as records {index, output, output_token_ids, finish_reason, stop_reason}, by index."""
    params = o.sampling()
    engine = GenerationEngine([base, tuned], tok, sample_from=1, cache_memory=o.cache_memory,
                              max_num_seqs=o.max_num_seqs, max_step_tokens=o.max_batch_tokens)
    for it in items:
        engine.check_request(GenRequest(it.ids, params, it.index, 0, it.where), it.where)
    buf: dict[str, list[torch.Tensor]] = {f: [] for f in (*_FIELDS, "sample_ids", "first", "targets")}

    def on_layer(i: int, hb: torch.Tensor, hts: list[torch.Tensor]) -> None:
        probes.on_layer(i, hb, hts, j=j)

    def on_step(st: StepOutput) -> None:
        r = vocab_probe(st.hidden[0], base.lm_head_weight, st.hidden[1], tuned.lm_head_weight, st.tokens,
                        valid_vocab=valid_vocab)
        for f in _FIELDS:
            buf[f].append(getattr(r, f).detach().cpu())
        buf["sample_ids"].append(torch.tensor([s.prompt_index for s in st.seqs], dtype=torch.int64))
        buf["first"].append(st.first.cpu())
        buf["targets"].append(st.tokens.cpu())

    reqs = [GenRequest(it.ids, params, it.index, 0, it.where) for it in items]
    rows = [{"index": g.index, "output": g.text, "output_token_ids": g.token_ids, "finish_reason": g.finish_reason,
             "stop_reason": g.stop_reason} for g in engine.run(reqs, on_layer=on_layer, on_step=on_step)]
    if buf["sample_ids"]:
        cat = {f: torch.cat(v) for f, v in buf.items()}
        order = torch.argsort(cat["sample_ids"], stable=True)  # sample by sample, each in generation order
        cat = {f: v[order] for f, v in cat.items()}
        probes.on_vocab(j, {f: cat[f] for f in _FIELDS}, cat["targets"], cat["sample_ids"], cat["first"])
    return sorted(rows, key=lambda r: r["index"])
