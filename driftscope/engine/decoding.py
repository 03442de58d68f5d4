"""The decoding loop: requests -> scheduler steps -> one packed forward per step and model -> sampled tokens.

`GenerationEngine(models, sample_from=0)` generates with `models[sample_from]`; any other models (a base model in a
drift run) consume the same tokens in lockstep, each with its own KV cache under the shared block tables, and the
`on_layer` / `on_step` hooks see every model's hidden states of the step's newest positions, layer by layer.
A step packs the decode tokens of running sequences and the whole prefills of newly admitted (or recomputed) ones.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from driftscope.engine.kv_cache import BlockAllocator, KVCache, bytes_per_block, default_cache_bytes
from driftscope.engine.model import KVStep, LayerBatch, Transformer
from driftscope.engine.runner import run_layers
from driftscope.engine.sampling import SamplingParams, sample, uniforms_for
from driftscope.engine.scheduler import Scheduler, SchedulerStats, Seq
from driftscope.engine.stopping import StopChecker, final_text
from driftscope.kernels.linear import linear
from driftscope.kernels.paged_attention import FLASH_PAGE_MULTIPLE, use_flash_paged

# on_layer(index, h_models[0] [B, d], [h_models[1:] [B, d]]) over the step's newest positions (B = sequences)
LayerHook = Callable[[int, torch.Tensor, list[torch.Tensor]], None]


@dataclass
class StepOutput:
    """What `on_step` sees: the step's sequences (decode first, then prefill), each model's final normed hidden
    state at their newest position [B, d], the sampled tokens [B] (the targets those positions predict), and
    which of them is the first generated token of its sequence [B] bool."""

    seqs: list[Seq]
    hidden: list[torch.Tensor]
    tokens: torch.Tensor
    first: torch.Tensor


@dataclass
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_index: int = 0
    sample_index: int = 0
    where: str = ""  # names the prompt in error messages ("prompts[3]", "file.jsonl:4")


@dataclass
class Generation:
    """One finished sequence. `token_ids` are all generated ids (a terminating EOS included); `text` is their
    decoded text without that EOS and cut before a stop string (None without a tokenizer)."""

    index: int  # prompt index
    sample: int  # sample index within the prompt (0 .. n-1)
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length" | "context"
    stop_reason: int | str | None = None
    prompt: str | None = None  # the rendered prompt text, when the prompt was text or messages


def eos_ids_of(model: Transformer, tokenizer) -> tuple[int, ...]:
    """Every id that ends generation: config.json's eos_token_id, the tokenizer's and generation_config.json's."""
    ids = list(model.config.eos_token_ids)
    if tokenizer is not None:
        ids += list(getattr(tokenizer, "eos_token_ids", ()) or ())
    return tuple(dict.fromkeys(ids))


class GenerationEngine:
    """Reusable: each `run` sizes a KV cache to its workload (within `cache_memory` bytes) and frees it at the end."""

    def __init__(self, models: Transformer | Sequence[Transformer], tokenizer=None, *, sample_from: int = 0,
                 cache_memory: int | None = None, block_size: int | None = None, max_num_seqs: int = 256,
                 max_step_tokens: int = 8192, eos_token_ids: Sequence[int] | None = None):
        self.models = [models] if isinstance(models, Transformer) else list(models)
        if not self.models:
            raise ValueError("GenerationEngine needs at least one model")
        self.sample_from = sample_from
        self.driver = self.models[sample_from]
        self.tokenizer = tokenizer
        dev = self.driver.device
        for m in self.models:
            if m.device != dev:
                raise ValueError(f"models must be on one device: {self.driver.config.source} on {dev}, "
                                 f"{m.config.source} on {m.device}")
        if block_size is None:
            block_size = FLASH_PAGE_MULTIPLE if use_flash_paged(dev, self.driver.dtype, FLASH_PAGE_MULTIPLE) else 16
        for name, value in (("max_num_seqs", max_num_seqs), ("max_step_tokens", max_step_tokens),
                            ("block_size", block_size)):
            if value <= 0:
                raise ValueError(f"{name}={value} is invalid: expected a positive integer")
        if cache_memory is not None and cache_memory <= 0:
            raise ValueError(f"cache_memory={cache_memory} is invalid: expected a positive number of bytes")
        self.block_size, self.max_num_seqs, self.max_step_tokens = block_size, max_num_seqs, max_step_tokens
        self.cache_memory = cache_memory
        self.eos_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(self.driver, tokenizer)
        self.context_len = min(m.config.max_position_embeddings for m in self.models)
        self._prep_keys = [m.rope_key for m in self.models]
        self.stats = SchedulerStats()
        self.cache_tokens = 0  # slots of the last run's cache
        self.trace = False

    # ---- checks ---------------------------------------------------------------------------------------------
    def max_len(self, n_prompt: int, params: SamplingParams) -> int:
        return min(n_prompt + params.max_new_tokens, self.context_len)

    def check_request(self, r: GenRequest, where: str) -> None:
        """ValueError naming the prompt and what is wrong (empty, too long for the context, ids out of range)."""
        n, src = len(r.prompt_ids), self.driver.config.source
        if n == 0:
            raise ValueError(f"{where}: the prompt is empty (0 tokens); every prompt needs at least one token")
        if n >= self.context_len:
            raise ValueError(f"{where}: the prompt has {n} tokens, which leaves no room to generate within the "
                             f"context of {self.context_len} tokens (max_position_embeddings of {src})")
        vocab = min(m.config.vocab_size for m in self.models)
        if bad := [t for t in r.prompt_ids if not 0 <= t < vocab]:
            raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab}) of {src}")

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[GenRequest], *, on_layer: LayerHook | None = None,
            on_step: Callable[[StepOutput], None] | None = None, progress=None) -> Iterator[Generation]:
        """Yield each request's Generation as it finishes (in finishing order)."""
        if not requests:
            return
        for i, r in enumerate(requests):
            self.check_request(r, r.where or f"prompt {r.prompt_index}")
        lens = [self.max_len(len(r.prompt_ids), r.params) for r in requests]
        alloc, caches = self._allocate(lens)
        sched = Scheduler(alloc, self.max_num_seqs, self.max_step_tokens, trace=self.trace)
        for sid, r in enumerate(requests):
            checker = StopChecker(() if r.params.ignore_eos else self.eos_ids, r.params.stop_token_ids, r.params.stop,
                                  r.params.max_new_tokens, lens[sid], self.tokenizer)
            sched.add(Seq(sid, r.prompt_index, r.sample_index, r.prompt_ids, r.params, checker))
        try:
            while not sched.done():
                decode, prefill = sched.schedule()
                seqs = decode + prefill
                tokens = self._step(decode, prefill, caches, on_layer, on_step)
                for seq, tok in zip(seqs, tokens):
                    seq.n_cached = len(seq.tokens)
                    seq.tokens.append(tok)
                    hit = seq.checker.check(tok, seq.n_generated, len(seq.tokens))
                    if hit is not None:
                        seq.finish_reason, seq.stop_reason = hit
                        sched.finish(seq)
                        if progress is not None:
                            progress.update(1)
                        yield self._generation(seq)
            assert alloc.num_free == alloc.num_blocks, f"{alloc.num_blocks - alloc.num_free} blocks leaked"
        finally:
            self.stats = sched.stats
            del caches

    def _allocate(self, lens: list[int]) -> tuple[BlockAllocator, list[KVCache]]:
        bs = self.block_size
        per_block = sum(bytes_per_block(m, bs) for m in self.models)
        budget = self.cache_memory if self.cache_memory is not None else default_cache_bytes(self.driver.device)
        fit = budget // per_block
        longest = max(lens)
        if fit < -(-longest // bs):
            raise ValueError(
                f"cache_memory={budget} bytes holds {fit * bs} tokens ({fit} blocks of {bs}, {per_block} bytes each "
                f"across {len(self.models)} model(s)), but one request needs {longest} tokens; raise cache_memory"
            )
        # never more than can run at once
        wanted = sum(-(-n // bs) for n in sorted(lens, reverse=True)[:self.max_num_seqs])
        num_blocks = max(min(fit, wanted), 1)
        self.cache_tokens = num_blocks * bs
        return BlockAllocator(num_blocks, bs), [KVCache(m, num_blocks, bs) for m in self.models]

    def _generation(self, seq: Seq) -> Generation:
        text = None if self.tokenizer is None else final_text(self.tokenizer, seq.generated, seq.finish_reason,
                                                              seq.stop_reason, seq.params.stop)
        return Generation(seq.prompt_index, seq.sample_index, seq.tokens[:seq.n_prompt], seq.generated, text,
                          seq.finish_reason, seq.stop_reason)

    @torch.inference_mode()
    def _step(self, decode: list[Seq], prefill: list[Seq], caches: list[KVCache], on_layer, on_step) -> list[int]:
        dev, bs = self.driver.device, self.block_size
        ids: list[int] = [s.tokens[-1] for s in decode]
        pos: list[int] = [len(s.tokens) - 1 for s in decode]
        cu = [0]
        for s in prefill:
            ids += s.tokens
            pos += range(len(s.tokens))
            cu.append(cu[-1] + len(s.tokens))
        seqs = decode + prefill
        nd, T = len(decode), len(ids)
        # slots of every new token; per sequence: table[p // bs] * bs + p % bs
        tables = [torch.tensor(s.block_table, dtype=torch.int64) for s in seqs]
        counts = torch.tensor([1] * nd + [len(s.tokens) for s in prefill])
        pos_t = torch.tensor(pos, dtype=torch.int64)
        table_of_token = torch.repeat_interleave(torch.arange(len(seqs)), counts)  # [T]
        flat = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)  # [B, M] (0-padded)
        slots = flat[table_of_token, pos_t // bs] * bs + pos_t % bs  # [T]
        if nd:
            ctx = torch.tensor([len(s.tokens) for s in decode], dtype=torch.int64)  # includes the new token
            lmax = int(ctx.max())
            p = torch.arange(lmax)
            dec_tables = flat[:nd, : -(-lmax // bs)]
            # positions past a sequence's context read its last written slot: masked out, but never uninitialised
            # memory (a NaN there would survive the zero attention weight: 0 · NaN = NaN)
            pc = torch.minimum(p[None, :], (ctx - 1)[:, None])  # [nd, Lmax]
            gather = dec_tables.gather(1, pc // bs) * bs + pc % bs  # [nd, Lmax]
            key_mask = p[None, :] < ctx[:, None]
            meta = dict(gather=gather.to(dev), key_mask=key_mask.to(dev), block_tables=dec_tables.to(dev, torch.int32),
                        context_lens=ctx.to(dev, torch.int32))
        else:
            empty = torch.empty(0, 1, dtype=torch.int64, device=dev)
            meta = dict(gather=empty, key_mask=empty.bool(), block_tables=empty.int(),
                        context_lens=torch.empty(0, dtype=torch.int32, device=dev))
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_d, slots_d = pos_t.to(dev), slots.to(dev)
        # the length each token's rope is computed under (dynamic/longrope): a decode token its position + 1, as in
        # transformers' cached generate; a prefill token the length of its whole (re)computed sequence
        seq_lens = None
        if any(m.length_dependent_rope for m in self.models):
            seq_lens = torch.tensor([p + 1 for p in pos[:nd]] + [len(s.tokens) for s in prefill for _ in s.tokens],
                                    dtype=torch.int64, device=dev)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
        max_seqlen = max((len(s.tokens) for s in prefill), default=0)
        rope: dict = {}
        batches = []
        for m, key, cache in zip(self.models, self._prep_keys, caches):
            if key not in rope:
                rope[key] = m.rope_tables(pos_d, seq_lens)
            cos, sin = rope[key]
            kv = KVStep(k=cache.k, v=cache.v, slot_mapping=slots_d, n_decode=nd, block_size=bs, **meta)
            batches.append(LayerBatch(cu_seqlens=cu_t, max_seqlen=max_seqlen, cos=cos, sin=sin, kv=kv))
        last = torch.tensor(list(range(nd)) + [nd + e - 1 for e in cu[1:]], device=dev)  # newest position per sequence

        n_layers = self.models[0].config.num_layers

        def hook(i, h0, hs):  # the layer probes see only the positions that predict a new token (index L: those)
            if i == n_layers:
                return on_layer(i, h0, hs)
            on_layer(i, h0.index_select(0, last), [h.index_select(0, last) for h in hs])

        rows = None if nd == T else last  # a pure decode step reads every row, in order: nothing to select
        hidden = run_layers(self.models, ids_t, batches, hook if on_layer is not None else None, rows)  # [B, d] each
        logits = self.driver.head(hidden[self.sample_from], gemm=linear)  # [B, V] float32
        prm = [s.params for s in seqs]
        tokens = sample(
            logits,
            torch.tensor([p.temperature for p in prm], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in prm], dtype=torch.int64, device=dev),
            torch.tensor([p.top_p for p in prm], dtype=torch.float32, device=dev),
            uniforms_for([(p.seed, s.prompt_index, s.sample_index, s.n_generated) for p, s in zip(prm, seqs)]).to(dev),
        )
        if on_step is not None:
            first = torch.tensor([s.n_generated == 0 for s in seqs], device=dev)
            on_step(StepOutput(seqs, hidden, tokens, first))
        assert T == int(counts.sum())
        return tokens.tolist()

