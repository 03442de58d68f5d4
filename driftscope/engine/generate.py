"""`driftscope.generate(model, prompts, ...)`: text generation on the engine, with continuous batching.

`model` is a checkpoint folder or a loaded `Transformer`; `prompts` are strings, token-id lists or chat message
lists. Returns one `Generation` per (prompt, sample), ordered by prompt then sample.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from driftscope.engine.decoding import GenerationEngine, GenRequest, Generation
from driftscope.engine.model import Transformer
from driftscope.engine.prompts import render_prompt
from driftscope.engine.sampling import SamplingParams

__all__ = ["generate", "load_for_generation", "make_requests", "progress_bar", "Generation", "SamplingParams"]


def load_for_generation(model: str | Path | Transformer, tokenizer=None, *, device: str = "cpu",
                        dtype: str = "float32", allow_pickle: bool = False) -> tuple[Transformer, Any]:
    """(model, tokenizer or None): a folder is loaded; the tokenizer comes from the model's folder when not given
    (None when that folder has no tokenizer.json, which is fine for token-id prompts)."""
    from driftscope.engine.loader import load_model
    from driftscope.engine.tokenizer import load_tokenizer

    if isinstance(model, Transformer):
        folder = Path(model.config.source).parent if model.config.source != "<dict>" else None
        m = model
    else:
        folder = Path(model)
        if folder.is_file():
            raise ValueError(f"model {folder} is a file; pass the checkpoint folder (config.json + safetensors)")
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        m = load_model(folder, device=device, dtype=dtype, allow_pickle=allow_pickle)
    if tokenizer is None and folder is not None and (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(folder)
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    return m, tokenizer


def make_requests(rendered: Sequence[tuple[int, list[int], str]], params: SamplingParams) -> list[GenRequest]:
    """One request per (prompt, sample): `rendered` holds (prompt index, prompt ids, where)."""
    return [GenRequest(ids, params, index, s, where) for index, ids, where in rendered for s in range(params.n)]


def progress_bar(total: int, enabled: bool | None, desc: str):
    """A tqdm bar over sequences: on when `enabled`, off when False, and with None only when stderr is a TTY."""
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="seq", disable=disable, dynamic_ncols=True)


def generate(
    model: str | Path | Transformer,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    n: int = 1,
    stop: Sequence[str] | str = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    chat: bool = False,
    system: str | None = None,
    thinking: bool | None = None,
    chat_template_kwargs: Mapping | None = None,
    tokenizer=None,
    device: str = "cpu",
    dtype: str = "float32",
    cache_memory: int | None = None,
    block_size: int | None = None,
    max_num_seqs: int = 256,
    max_step_tokens: int = 8192,
    progress: bool | None = None,
) -> list[Generation]:
    """Generate for every prompt (n samples each): a list of Generation, ordered by prompt, then sample.

    model: a checkpoint folder or a loaded Transformer; prompts: strings, token-id lists or chat message lists.
    Decoding (SamplingParams checks each, naming a bad value):
        max_new_tokens: tokens to generate at most (required)
        temperature: 0 = greedy (argmax, lowest id on ties); top_p: nucleus mass in (0, 1]; top_k: 0 = off
        seed: draws are keyed by (seed, prompt, sample, step), so outputs do not depend on batching; n: samples per
        prompt; stop: strings that end a sequence, caught across tokens and cut from the text; stop_token_ids: extra
        ids that end one (besides the model's EOS ids); ignore_eos: keep going past EOS
    Prompts: chat: strings become one user message of the chat template; system: its system prompt;
        thinking: the template's enable_thinking (Qwen3); chat_template_kwargs: more template variables;
        tokenizer: a folder or tokenizer (default: the model folder's tokenizer.json)
    Engine (GenerationEngine): device: a torch device; dtype: 'float32', 'bfloat16' or 'float16'; cache_memory:
        KV cache bytes (default: 90% of free GPU memory, a quarter of RAM on the CPU); block_size: tokens per
        cache block; max_num_seqs: sequences decoded together at most; max_step_tokens: tokens per engine step
        at most; progress: a bar on stderr (None: when stderr is a terminal)
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, n=n, stop=stop, stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos)
    m, tok = load_for_generation(model, tokenizer, device=device, dtype=dtype)
    texts, rendered = [], []
    for i, p in enumerate(prompts):
        text, ids = render_prompt(p, tok, f"prompts[{i}]", chat=chat, system=system, thinking=thinking,
                                  chat_template_kwargs=chat_template_kwargs)
        texts.append(text)
        rendered.append((i, ids, f"prompts[{i}]"))
    engine = GenerationEngine(m, tok, cache_memory=cache_memory, block_size=block_size, max_num_seqs=max_num_seqs,
                              max_step_tokens=max_step_tokens)
    requests = make_requests(rendered, params)
    bar = progress_bar(len(requests), progress, "generate")
    try:
        out = list(engine.run(requests, progress=bar))
    finally:
        bar.close()
    for g in out:
        g.prompt = texts[g.index]
    return sorted(out, key=lambda g: (g.index, g.sample))
