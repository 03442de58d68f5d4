"""Lockstep forward: a base model and one or more tuned models, layer by layer, on the same packed batch.

At every hidden-state index (transformers' convention: 0 = embeddings, i = output of layer i, L = after the
final norm) a callback sees the base state and each tuned state while they are in memory; nothing per layer
is kept. The base forward is computed once per batch and shared by all tuned models.
Each model runs on its own device (`Transformer.device`; all one device by default): the tuned states are moved to
the base's device, where the callback and the caller's probes run (a no-op on one device).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Transformer

# on_layer(index, h_base [T, d], [h_tuned_j [T, d] for each tuned model])
LayerCallback = Callable[[int, torch.Tensor, list[torch.Tensor]], None]


_HF_NAMES = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size"}


def check_compatible_configs(base: ModelConfig, tuned: Sequence[ModelConfig]) -> None:
    """ValueError naming the first config field (and both config files) that makes a lockstep comparison
    meaningless. Needs only the configs, so a run can refuse before it loads any weights."""
    for c in tuned:
        for name, hf in _HF_NAMES.items():
            if getattr(base, name) != getattr(c, name):
                raise ValueError(
                    f"cannot compare layer by layer: {name} ({hf} in config.json) is {getattr(base, name)} in "
                    f"{base.source} but {getattr(c, name)} in {c.source}"
                )


class LockstepRunner:
    """`forward(input_ids, cu_seqlens, on_layer)` -> (final normed base hidden, [final normed tuned hidden])."""

    def __init__(self, base: Transformer, tuned: Sequence[Transformer]):
        if not tuned:
            raise ValueError("need at least one tuned model")
        check_compatible_configs(base.config, [t.config for t in tuned])
        self.base, self.tuned = base, list(tuned)
        self.n_states = base.config.num_layers + 1
        # models on one device whose packed-batch data agree (Transformer.rope_key: dtype, rope tables) share one
        # prepare() per batch; each attention layer carries its own sliding window
        self._prep_keys = [(m.device, m.rope_key) for m in (base, *tuned)]

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def can_share_prefix(self) -> bool:  # rope that depends on the sequence length gives each copy its own states
        return not any(m.length_dependent_rope for m in (self.base, *self.tuned))

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, on_layer: LayerCallback | None = None,
        rows: torch.Tensor | None = None, prefix: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`rows`: see run_layers (the final states, and index L's, of those positions only); `prefix`: sequence 0 is
        a prefix the others continue (Transformer.prepare, engine.data.share_prefix)."""
        models = [self.base, *self.tuned]
        prepared: dict = {}  # rope tables once per distinct (device, dtype, theta/scaling), not once per model
        for m, k in zip(models, self._prep_keys):
            if k not in prepared:
                prepared[k] = m.prepare(to_device(input_ids, m.device), to_device(cu_seqlens, m.device), prefix)
        hs = run_layers(models, input_ids, [prepared[k] for k in self._prep_keys], on_layer, rows)
        return hs[0], hs[1:]


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`: itself when already there; asynchronous unless the copy lands in (pageable) host memory."""
    return x.to(device, non_blocking=device.type != "cpu")


@torch.inference_mode()
def run_layers(models: Sequence[Transformer], ids: torch.Tensor, batches: Sequence,
               on_layer: LayerCallback | None = None, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every model over the same tokens, layer i of all models before layer i+1, each on its device; `batches[j]`
    is model j's LayerBatch. Calls on_layer(index, h_models[0], [h_models[1:]]) at every hidden-state index, and
    returns the final normed hidden states [T, d] of each model, all on models[0]'s device.

    `rows` (int64 [R], on models[0]'s device): the positions whose final state the caller reads (a drift's scored
    tokens, a generation step's newest ones). The last layer then computes only those outputs (no later layer reads
    the others), so index L's states and the returned ones are [R, d], in `rows`' order."""
    dev = models[0].device
    hs = [m.embed(to_device(ids, m.device)) for m in models]  # [T, d] each, on its model's device
    last = models[0].config.num_layers
    at = [None if rows is None else to_device(rows, m.device) for m in models]
    if on_layer is not None:
        on_layer(0, hs[0], [to_device(h, dev) for h in hs[1:]])
    for i in range(last):
        sel = at if i == last - 1 else [None] * len(models)
        hs = [m.layers[i](h, bt, r) for m, h, bt, r in zip(models, hs, batches, sel)]  # all devices at once
        if i == last - 1:  # transformers reports the final *normed* state at index L
            hs = [m.final_norm(h) for m, h in zip(models, hs)]
        if on_layer is not None:
            on_layer(i + 1, hs[0], [to_device(h, dev) for h in hs[1:]])
    return [hs[0], *(to_device(h, dev) for h in hs[1:])]


@torch.inference_mode()
def pad_states(model: Transformer, pad_id: int) -> list[torch.Tensor]:
    """The L+1 hidden states [d] of a left-padding token whose attention output is zero.

    That is what a padded position carries in the paper's PCA run (flash-attention skips masked rows, so
    attention contributes nothing): embedding, then per layer only the residual MLP path, then the final norm.
    """
    h = model.embed(torch.tensor([pad_id], device=model.device))  # [1, d]
    states = [h[0]]
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        if layer.attn.wo.bias is not None:
            h = h + layer.attn.wo.bias  # attention output wo(0) = its bias
        h = h + layer.mlp(layer.mlp_norm(h))
        states.append(model.final_norm(h)[0] if i == n - 1 else h[0])
    return states
