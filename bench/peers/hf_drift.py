"""Token-level drift with transformers, the two ways users compute it (one process; prints one JSON line).

    python -m bench.peers.hf_drift {full,sampled} BASE TUNED [TUNED ...] RECORDS

full: the way model-diffing toolkits compute per-token KL, written as a fair baseline: every model loaded once,
inference mode, samples sorted by length into right-padded batches of <= BATCH_TOKENS tokens; per batch the
base's and each tuned model's final hidden states at the scored positions go through the LM head (full logits
[n, V] of both, float32), then exact KL both ways, the target token's log-prob, rank and entropy under each.
sampled: the paper's way (DESIGN.md: each model separately, as separate vLLM runs would): one model at a time over
every batch, keeping only the target token's log-prob; sampled KL = mean over tokens of log p_tuned - log p_base.
Scored positions are driftscope's: those that predict a response token, within each record's first 256 tokens.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.peers.workloads import DRIFT_MAX_TOKENS, cut_ids, read_jsonl

BATCH_TOKENS = 4096


def batches(tok, records: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-sorted right-padded batches: (ids [b, L], attention mask [b, L], scored mask [b, L], targets [n])."""
    samples = sorted((cut_ids(tok, r, DRIFT_MAX_TOKENS) for r in records), key=lambda s: len(s[0]))
    out, group = [], []
    for s in samples + [None]:
        if s is not None and (len(group) + 1) * len(s[0]) <= BATCH_TOKENS:
            group.append(s)
            continue
        if group:
            width = max(len(ids) for ids, _ in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            att = torch.zeros(len(group), width, dtype=torch.long)
            scored = torch.zeros(len(group), width, dtype=torch.bool)
            for i, (x, n_prompt) in enumerate(group):
                ids[i, : len(x)] = torch.tensor(x)
                att[i, : len(x)] = 1
                scored[i, max(n_prompt, 1) - 1 : len(x) - 1] = True  # positions predicting a response token
            targets = ids[:, 1:][scored[:, :-1]]
            out.append((ids, att, scored, targets))
        group = [s] if s is not None else []
    return out


def scored_logits(model, ids, att, scored) -> torch.Tensor:
    """[n, V] float32 logits at the scored positions (the LM head on those rows only)."""
    h = model.model(input_ids=ids, attention_mask=att).last_hidden_state  # [b, L, d]
    return model.lm_head(h[scored])


def stats(zb: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token [KL(t||b), KL(b||t), logp_b(y), logp_t(y), rank_b(y), rank_t(y), H_b, H_t] summed, float64."""
    lb, lt = torch.log_softmax(zb, -1), torch.log_softmax(zt, -1)
    pb, pt = lb.exp(), lt.exp()
    kl_tb = (pt * (lt - lb)).sum(-1)
    kl_bt = (pb * (lb - lt)).sum(-1)
    yb, yt = zb.gather(1, y[:, None]), zt.gather(1, y[:, None])
    rank_b = 1 + (zb > yb).sum(-1)
    rank_t = 1 + (zt > yt).sum(-1)
    ent_b, ent_t = -(pb * lb).sum(-1), -(pt * lt).sum(-1)
    cols = [kl_tb, kl_bt, lb.gather(1, y[:, None])[:, 0], lt.gather(1, y[:, None])[:, 0], rank_b, rank_t, ent_b, ent_t]
    return torch.stack([c.double() for c in cols]).sum(-1)


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def full(base: Path, tuned: list[Path], bs) -> dict:
    mb, mts = load(base), [load(t) for t in tuned]
    sums, n = [torch.zeros(8, dtype=torch.float64) for _ in tuned], 0
    for ids, att, scored, y in bs:
        zb = scored_logits(mb, ids, att, scored)
        for j, mt in enumerate(mts):
            sums[j] += stats(zb, scored_logits(mt, ids, att, scored), y)
        n += len(y)
    return {"scored": n, "kl_tb": [float(s[0] / n) for s in sums], "kl_bt": [float(s[1] / n) for s in sums]}


@torch.inference_mode()
def sampled(base: Path, tuned: list[Path], bs) -> dict:
    logp = []
    for path in [base, *tuned]:  # one model at a time
        model = load(path)
        logp.append(torch.cat([torch.log_softmax(scored_logits(model, ids, att, sc), -1).gather(1, y[:, None])[:, 0]
                               for ids, att, sc, y in bs]).double())
        del model
    n = len(logp[0])
    return {"scored": n, "sampled_kl": [float((lt - logp[0]).mean()) for lt in logp[1:]]}


def main(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    way, base, *tuned, records = argv
    tok = AutoTokenizer.from_pretrained(base)
    bs = batches(tok, read_jsonl(Path(records)))
    fn = {"full": full, "sampled": sampled}[way]
    print(json.dumps(fn(Path(base), [Path(t) for t in tuned], bs)))


if __name__ == "__main__":
    main(sys.argv[1:])
