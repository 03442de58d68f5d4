"""`driftscope.generate(model, prompts, ...)`: text generation on the engine, with continuous batching.

`model` is a checkpoint folder or a loaded `Transformer`; `prompts` are strings, token-id lists or chat message
lists. Returns one `Generation` per (prompt, sample), ordered by prompt then sample.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from driftscope.cli_options import options_doc
from driftscope.engine.decoding import GenerationEngine, GenRequest, Generation
from driftscope.engine.model import Transformer
from driftscope.engine.prompts import render_prompt
from driftscope.engine.sampling import SamplingParams
from driftscope.kernels.scratch import release_scratch
from driftscope.options import GenerationOptions

__all__ = ["generate", "load_for_generation", "make_requests", "progress_bar", "Generation", "SamplingParams",
           "GenerationOptions"]


def load_for_generation(model: str | Path | Transformer, tokenizer=None, *, device: str = "cpu",
                        dtype: str = "float32", allow_pickle: bool = False,
                        flag: str = "model") -> tuple[Transformer, Any]:
    """(model, tokenizer or None): a checkpoint (an HF folder, a .gguf file, a LoRA adapter folder whose
    adapter_config.json names a local base) is loaded; the tokenizer comes from the checkpoint when not given (None
    when it has none, which is fine for token-id prompts). `flag` names the argument in messages."""
    from driftscope.engine.checkpoint import Checkpoint
    from driftscope.engine.tokenizer import load_tokenizer

    if isinstance(model, Transformer):
        source = Path(model.config.source) if model.config.source != "<dict>" else None
        source = source if source is None or source.suffix == ".gguf" else source.parent
        ckpt = Checkpoint.open(source, flag) if source is not None and source.exists() else None
        m = model
    else:
        ckpt = Checkpoint.open(model, flag)
        m = ckpt.load(device, dtype, allow_pickle=allow_pickle)
    if tokenizer is None and ckpt is not None:
        tokenizer = ckpt.tokenizer()
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


def _parts(sampling: SamplingParams | None, options: GenerationOptions | None,
           shortcuts: dict) -> tuple[SamplingParams, GenerationOptions]:
    """`sampling` and `options` with the keyword shortcuts (field names of either) put in."""
    names = [{f.name for f in fields(c)} for c in (SamplingParams, GenerationOptions)]
    if unknown := sorted(set(shortcuts) - names[0] - names[1]):
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}; the options are the fields of "
                        "SamplingParams and driftscope.options.GenerationOptions")
    kw = [{k: v for k, v in shortcuts.items() if k in n} for n in names]
    if sampling is None and "max_new_tokens" not in kw[0]:
        raise TypeError("generate() needs max_new_tokens= (or a SamplingParams)")
    sampling = SamplingParams(**kw[0]) if sampling is None else replace(sampling, **kw[0])
    options = GenerationOptions(**kw[1]) if options is None else replace(options, **kw[1])
    return sampling, options


def generate(model: str | Path | Transformer, prompts: Sequence[Any], sampling: SamplingParams | None = None,
             options: GenerationOptions | None = None, *, tokenizer=None, progress: bool | None = None,
             **shortcuts) -> list[Generation]:
    """Generate for every prompt (n samples each): a list of Generation, ordered by prompt, then sample.

    model: a checkpoint folder or a loaded Transformer; prompts: strings, token-id lists or chat message lists.
    sampling: a SamplingParams (it checks each value, naming a bad one; also stop_token_ids: ids that end a sequence
        besides the model's EOS ids); draws are keyed by (seed, prompt, sample, step): outputs do not depend on batching
    options: a driftscope.options.GenerationOptions: the model, how prompts are rendered, the engine's limits
    tokenizer: a folder or tokenizer (default: the model folder's tokenizer.json)
    progress: a bar on stderr (None: when stderr is a terminal)
    shortcuts: any field of either by name (listed below), e.g. generate(model, prompts, max_new_tokens=16, chat=True);
        given with `sampling` or `options`, it replaces that field there
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    params, o = _parts(sampling, options, shortcuts)
    m, tok = load_for_generation(model, tokenizer, device=o.device, dtype=o.dtype)
    texts, rendered = [], []
    for i, p in enumerate(prompts):
        text, ids = render_prompt(p, tok, f"prompts[{i}]", chat=o.chat, system=o.system, thinking=o.thinking,
                                  chat_template_kwargs=o.chat_template_kwargs)
        texts.append(text)
        rendered.append((i, ids, f"prompts[{i}]"))
    engine = GenerationEngine(m, tok, cache_memory=o.cache_memory, block_size=o.block_size,
                              max_num_seqs=o.max_num_seqs, max_step_tokens=o.max_step_tokens)
    requests = make_requests(rendered, params)
    bar = progress_bar(len(requests), progress, "generate")
    try:
        out = list(engine.run(requests, progress=bar))
    finally:
        bar.close()
        release_scratch()  # the forward's reused CPU intermediates (kernels/scratch.py): not kept after the call
    for g in out:
        g.prompt = texts[g.index]
    return sorted(out, key=lambda g: (g.index, g.sample))


generate.__doc__ += options_doc(SamplingParams) + options_doc(GenerationOptions)  # every option, never stale
