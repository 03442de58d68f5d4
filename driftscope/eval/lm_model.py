"""lm-evaluation-harness model `driftscope`: lm-eval's tasks run on the driftscope engine.

    import driftscope.eval.lm_model  # registers "driftscope" with lm-eval (needs `pip install 'driftscope[eval]'`)
    lm_eval.simple_evaluate(model="driftscope", model_args="pretrained=DIR,dtype=float32", tasks=[...])

lm-eval 0.4.13 has no plugin entry points and fills its registry lazily on first use, so this module imports
`lm_eval.models` before registering (registering into an empty registry would hide the built-in models); the
`lm_eval.models` entry point in pyproject.toml is there for releases that read it. `driftscope lm-eval ...`
runs lm-eval's own CLI with the model registered and driftscope's tasks on the include path.

- `loglikelihood` / `loglikelihood_rolling`: packed varlen forwards, LM head only on scored rows (eval.loglik).
- `generate_until`: every request goes to one GenerationEngine run (continuous batching, paged KV cache);
  each keeps its own `until`, `max_gen_toks`, `do_sample`, `temperature`, `top_p`, `top_k`. Sampling draws from a
  counter-based stream keyed by (seed, request content digest, occurrence of that content, step), not by a request's
  place in the list, so `repeats` give distinct samples, a rerun gives the same ones, and so does any world size.
- Data parallel under torchrun (WORLD_SIZE > 1): the model joins the process group (gloo on CPU, nccl on
  cuda:LOCAL_RANK), lm-eval deals the docs over the ranks and gathers the metrics on rank 0; the requests lm-eval
  pads a short rank with are not computed and their responses are removed again (`_pads`, `barrier`).
- Chat templates: the checkpoint's (sandboxed), `enable_thinking=True|False` passed to it.

Model arguments: pretrained (folder), max_length, allow_pickle, gen_cache (a JSONL file where every finished
generation is appended and from which a rerun takes them: resume; under torchrun rank r appends to
`<stem>.rank{r}.jsonl` and every rank reads them all), and the fields of driftscope.options.LMOptions (device, dtype
auto|float32|bfloat16|float16, dist_timeout, max_batch_tokens, cache_memory in bytes, max_num_seqs, seed,
enable_thinking for thinking). lm-eval's `batch_size` is accepted and ignored: batches are sized in tokens.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import subprocess
from argparse import ArgumentTypeError
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import lm_eval.api.task
import lm_eval.evaluator
import lm_eval.models  # noqa: F401  -- fills lm-eval's registry with its own models first (see the docstring)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.loggers.utils import get_commit_from_path
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from driftscope.cli_options import on_off
from driftscope.distributed import World
from driftscope.engine.checkpoint import Checkpoint
from driftscope.eval.loglik import score_continuations
from driftscope.options import LMOptions
from driftscope.util import DTYPE_NAMES

__all__ = ["DriftscopeLM"]

log = logging.getLogger("driftscope.eval")
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
# lm-eval's hint to every task with a custom_dataset (all ds_* tasks) about --metadata kwargs they do not take
lm_eval.api.task.eval_logger.addFilter(lambda r: "Custom kwargs can be passed to `--metadata`" not in r.getMessage())


def _git_hash() -> str | None:  # lm-eval's (results' git_hash), without git's "fatal: not a git repository"
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL, text=True).strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


lm_eval.evaluator.get_git_commit_hash = _git_hash


def _flag(value: Any, name: str) -> bool | None:
    try:
        return value if value is None or isinstance(value, bool) else on_off(str(value).strip())
    except ArgumentTypeError:
        raise ValueError(f"model argument {name}={value!r}: expected true or false") from None


def _lm_options(options: LMOptions, model_args: dict) -> LMOptions:
    """`options` with lm-eval's model_args put in: strings, or what lm-eval made of them (1e9 is a float)."""
    args = {"thinking" if k == "enable_thinking" else k: v for k, v in model_args.items()}
    kinds = {k: f.type.split(" ")[0] for k, f in LMOptions.__dataclass_fields__.items()}  # "int | None" -> int
    if unknown := sorted(set(args) - set(kinds)):
        raise ValueError(f"unknown model argument(s) {unknown} for model 'driftscope'; see "
                         "driftscope.eval.lm_model's docstring for the accepted ones")
    cast = {"int": lambda v: int(float(v)), "float": float, "bool": lambda v: _flag(v, "enable_thinking")}
    return replace(options, **{k: cast[kinds[k]](v) if v is not None and kinds[k] in cast else v
                               for k, v in args.items()})


def _resolve_dtype(dtype: str, device: str, config_dtype: str | None) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return config_dtype if config_dtype in DTYPE_NAMES else "bfloat16"
    return "float32"  # CPU: bf16 GEMMs are slow there and fp32 is the exact reference


def _pads(requests) -> dict[int, int]:
    """lm-eval's padding of a short rank: {position of a pad: position of the real request it copies}.

    With world_size > 1, evaluator.evaluate evens out the ranks by appending `[req] * req.repeats` per missing
    instance, `req` being this rank's last request: a real Instance appears exactly `repeats` times in the list,
    so each further appearance of the same object is a pad."""
    first: dict[int, int] = {}
    seen: dict[int, int] = {}
    pads = {}
    for i, req in enumerate(requests):
        k = id(req)
        first.setdefault(k, i)
        seen[k] = seen.get(k, 0) + 1
        if seen[k] > (getattr(req, "repeats", None) or 1):
            pads[i] = first[k]
    return pads


@register_model("driftscope")
class DriftscopeLM(TemplateLM):
    def __init__(self, pretrained: str, options: LMOptions | None = None, *, gen_cache: str | None = None,
                 max_length: int | None = None, allow_pickle: bool | str = False, **model_args: Any):
        """`options`: an LMOptions (an EvalOptions is one); `model_args`: lm-eval's strings, any LMOptions field by
        name (enable_thinking for thinking), replacing it there; lm-eval's batch_size and max_batch_size are ignored
        (batches are sized in tokens)."""
        super().__init__()
        from driftscope.engine.decoding import GenerationEngine
        from driftscope.engine.generate import load_for_generation

        batch_size, max_batch_size = model_args.pop("batch_size", None), model_args.pop("max_batch_size", None)
        o = _lm_options(options or LMOptions(), model_args)
        folder = Path(pretrained)
        ckpt = Checkpoint.open(folder, "pretrained=")
        if ckpt.tokenizer_file() is None and (ckpt.kind != "lora" or ckpt.base.tokenizer_file() is None):
            raise FileNotFoundError(f"pretrained={pretrained}: no tokenizer.json in that folder")
        self.world = World.from_env()
        if self.world.rank != 0:  # under torchrun every process would log and show lm-eval's bars: rank 0 does
            for name in ("lm_eval", "driftscope.eval"):
                logging.getLogger(name).setLevel(logging.ERROR)
            lm_eval.api.task.tqdm = partial(tqdm, disable=True)
        device = o.device
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's CLI asks for cuda by default; its hf model falls back the same way
                log.warning("device=%s is not available here; using cpu", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # torchrun: join the process group (an existing one is reused); this rank's device is cuda:LOCAL_RANK
        device = self.world.join(str(device), o.dist_timeout, "device")
        self._rank, self._world_size = self.world.rank, self.world.size
        self._padded: list = []  # the Instances lm-eval padded this rank with: barrier() trims their responses
        config_dtype = ckpt.config().torch_dtype
        self._dtype = _resolve_dtype(o.dtype, str(device), config_dtype)
        self.model, self.tokenizer = load_for_generation(folder, device=str(device), dtype=self._dtype,
                                                         allow_pickle=bool(_flag(allow_pickle, "allow_pickle")),
                                                         flag="pretrained=")
        self.pretrained = str(folder)
        self._device = torch.device(device)
        self._max_length = int(max_length) if max_length else int(self.model.config.max_position_embeddings)
        self.max_batch_tokens, self.seed, self.enable_thinking = o.max_batch_tokens, o.seed, o.thinking
        self.gen_cache = Path(gen_cache) if gen_cache else None
        self.engine = GenerationEngine(self.model, self.tokenizer, cache_memory=o.cache_memory,
                                       max_num_seqs=o.max_num_seqs, max_step_tokens=self.max_batch_tokens)
        if batch_size not in (None, "auto", 1, "1") or max_batch_size is not None:
            log.info("driftscope batches by tokens (max_batch_tokens=%d); batch_size=%s is ignored",
                     self.max_batch_tokens, batch_size)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        eos = next((e for e in (self.tokenizer.eos_token_id, *self.model.config.eos_token_ids) if e is not None), None)
        if eos is None:
            raise ValueError(f"{self.pretrained}: neither the tokenizer nor config.json names an EOS token")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        name = chat_template if isinstance(chat_template, str) else None
        return self.tokenizer._template_source(name)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=self.enable_thinking, tokenize=False)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ data parallelism (lm-eval's evaluator)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world, *tensor.shape]: every rank's `tensor` in rank order (lm-eval gathers 0-d request counts)."""
        if self.world.size == 1:
            return tensor.unsqueeze(0).clone()
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        """Every rank's picklable `obj` in rank order on rank `dst`, None on the others."""
        return self.world.gather(obj, dst)

    def barrier(self) -> None:
        # lm-eval 0.4.13 (evaluator.evaluate) calls barrier() when world_size > 1 right after appending one request
        # type's responses to its Instances: a padded Instance then holds its `repeats` real responses followed by
        # the pads' copies, which would enter its metrics and its logged sample. Take the copies off again.
        for inst in self._padded:
            del inst.resps[getattr(inst, "repeats", None) or 1:]
        self._padded.clear()
        self.world.barrier()

    def _unpadded(self, requests, compute) -> list:
        """`compute(requests)` without lm-eval's pads (driftscope ranks need no even batches: no collectives inside
        a forward); a pad gets the result of the request it copies, and is remembered for barrier()."""
        pads = _pads(requests) if self.world_size > 1 else {}
        if not pads:
            return compute(requests)
        self._padded.extend(requests[i] for i in pads)
        keep = [i for i in range(len(requests)) if i not in pads]
        got = dict(zip(keep, compute([requests[i] for i in keep])))
        return [got[pads.get(i, i)] for i in range(len(requests))]

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._unpadded(requests, partial(TemplateLM.loglikelihood, self,
                                                disable_tqdm=disable_tqdm or self.rank != 0))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), desc="driftscope loglikelihood", disable=disable_tqdm or self.rank != 0)
        try:
            scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                         max_length=self.max_length, max_batch_tokens=self.max_batch_tokens,
                                         progress=bar)
        finally:
            bar.close()
        for (key, _, _), answer in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._unpadded(requests, partial(self._rolling, disable_tqdm=disable_tqdm))

    def _rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling(self, gen_kwargs: dict, where: str):
        from driftscope.engine.sampling import SamplingParams

        kw = copy.deepcopy(dict(gen_kwargs))
        if unknown := set(kw) - _GEN_KEYS:
            log.warning("%s: generation kwargs %s are not supported by driftscope and are ignored",
                        where, sorted(unknown))
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos_text and eos_text not in until:
            until.append(eos_text)  # as lm-eval's hf model does
        do_sample = _flag(kw.get("do_sample", None), "do_sample")
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0  # transformers' default when sampling is asked for without a temperature
        return SamplingParams(
            max_new_tokens=int(kw.get("max_gen_toks", 256)), temperature=temperature,
            top_p=float(kw.get("top_p", 1.0) or 1.0) if temperature > 0 else 1.0,
            top_k=int(kw.get("top_k", 0) or 0) if temperature > 0 else 0,
            seed=int(kw.get("seed", self.seed)), stop=tuple(s for s in until if s),
        )

    def _sink(self) -> Path | None:
        """The gen_cache file this process appends to: `<stem>.rank{r}.jsonl` beside it under torchrun."""
        if self.gen_cache is None or self.world.size == 1:
            return self.gen_cache
        return self.gen_cache.with_name(f"{self.gen_cache.stem}.rank{self.rank}{self.gen_cache.suffix}")

    def _cached(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """Generations already finished (gen_cache and its per-rank files, whatever world size wrote them: keys are
        content): {(request key, occurrence): text}; a torn last line is skipped."""
        if self.gen_cache is None:
            return {}
        c = self.gen_cache
        files = [c, *sorted(c.parent.glob(f"{c.stem}.rank*{c.suffix}"))] if c.parent.is_dir() else []
        wanted, done = set(keys), {}
        for line in (x for f in files if f.is_file() for x in f.read_text(encoding="utf-8").splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (row["key"], row["n"])
            if key in wanted:
                done[key] = row["text"]
        return done

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._unpadded(requests, partial(self._generate, disable_tqdm=disable_tqdm))

    def _generate(self, requests, disable_tqdm: bool = False) -> list[str]:
        from driftscope.engine.decoding import GenRequest

        keys, seen = [], {}
        for req in requests:  # repeats share their arguments: the occurrence number tells them apart
            digest = hashlib.sha256(json.dumps(req.args, sort_keys=True, default=str).encode()).hexdigest()[:32]
            seen[digest] = seen.get(digest, -1) + 1
            keys.append((digest, seen[digest]))
        texts: list[str | None] = [None] * len(requests)
        done = self._cached(keys)
        gen_requests, at = [], {}
        for i, req in enumerate(requests):
            if keys[i] in done:
                texts[i] = done[keys[i]]
                continue
            context, gen_kwargs = req.args
            params = self._sampling(gen_kwargs, f"request {i}")
            # lm-eval's hf model cuts the context from the left to leave max_gen_toks of room; here never below half
            # the context (a 32k max_gen_toks must not cut a prompt to nothing): generation then ends at "context"
            ids = self.tok_encode(context)[-max(self.max_length - params.max_new_tokens, self.max_length // 2):]
            # the random stream is keyed by content (digest, occurrence), not by the place in this rank's list: the
            # same samples whichever rank lm-eval deals the doc to, and in whatever order
            stream = (int(keys[i][0][:16], 16), keys[i][1])
            at[stream] = i
            gen_requests.append(GenRequest(ids, params, prompt_index=stream[0], sample_index=stream[1],
                                           where=f"request {i}"))
        bar = tqdm(total=len(requests), initial=len(requests) - len(gen_requests), desc="driftscope generate_until",
                   disable=disable_tqdm or self.rank != 0)
        sink = None
        path = self._sink()
        if path is not None and gen_requests:
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = open(path, "a", encoding="utf-8")
        try:
            for g in self.engine.run(gen_requests, progress=bar) if gen_requests else ():
                i = at[(g.index, g.sample)]
                texts[i] = g.text or ""
                if sink is not None:
                    key, n = keys[i]
                    sink.write(json.dumps({"key": key, "n": n, "text": texts[i]}, ensure_ascii=False) + "\n")
                    sink.flush()
        finally:
            bar.close()
            if sink is not None:
                sink.close()
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts  # type: ignore[return-value]
