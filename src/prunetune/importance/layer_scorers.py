"""Whole-layer scorers.

- ``block_influence`` (ShortGPT, Men et al.): per layer, 1 - cos(h_in, h_out) between the hidden states a
  layer reads and the ones it returns, averaged over the sample's (unpadded) tokens. A layer that changes
  its input little can be dropped whole. A proxy in Scores.layers only (keys: the layer keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from prunetune.families import layer_input, layer_output, layer_sites
from prunetune.importance.passes import TokenRows, batch_size, each_batch, loss_of, observe, scoring, stack_mask_keys
from prunetune.importance.scores import PROXY, Scores, register
from prunetune.masks import Masks, attach


@register("block_influence", unit=PROXY)
def block_influence(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    """1 - cos(layer input, layer output) per layer, averaged over tokens (ShortGPT). `hidden` is not scored."""
    rows = TokenRows()
    mask_key = stack_mask_keys(model)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    handles = []

    def hooks(key: str):
        seen: dict[str, torch.Tensor] = {}

        def pre(module, args, kwargs):
            seen["in"] = layer_input(args, kwargs)

        def post(module, args, kwargs, output):
            h_in = rows(seen.pop("in"), mask_key[key]).double()
            h_out = rows(layer_output(output), mask_key[key]).double()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1, eps=1e-12)
            sums[key] = sums.get(key, 0.0) + float((1 - cos).sum())
            counts[key] = counts.get(key, 0) + cos.shape[0]

        return pre, post

    for lay in layer_sites(model):
        pre, post = hooks(lay.key)
        handles.append(lay.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(lay.module.register_forward_hook(post, with_kwargs=True))
    observe(model, batches, handles, rows)
    return Scores(layers={k: sums[k] / max(counts[k], 1) for k in sums})


@contextmanager
def _replaying(modules: list[nn.Module], output) -> Iterator[None]:
    """Each of `modules` returns `output` instead of computing: the layers before the one being measured, whose
    result (the hidden states the measured layer reads) was recorded once with nothing removed."""
    saved = [m.__dict__.get("forward") for m in modules]  # an instance forward (accelerate's hooks) is kept

    def replay(*args, **kwargs):
        return output

    for m in modules:
        m.forward = replay
    try:
        yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            if old is None:
                del m.forward
            else:
                m.forward = old


def removal_losses(model: nn.Module, batches: list[dict], structures: dict[str, list[str]]) -> dict[str, float]:
    """Measured: the sample's loss with each structure removed (its heads or neurons masked to zero, which is what
    surgery leaves of it) minus its loss with everything kept, averaged over examples.

    `structures` maps a name to the mask keys it removes together (a site key for heads, "ffn:<layer>" for
    neurons), all in one layer. The layers before that one compute nothing new: they return the output their
    stack's previous layer gave in one unmasked pass (recorded per batch), so a structure in layer i costs the
    forward pass from layer i on.
    """
    sites = layer_sites(model)
    at = {lay.key: n for n, lay in enumerate(sites)}
    # per structure, once: its masks and the modules replayed for it (its stack's layers before its own)
    masks: dict[str, Masks] = {}
    before: dict[str, list] = {}
    for name, keys in structures.items():
        own = sites[at[keys[0].removeprefix("ffn:").split("/")[0]]]
        before[name] = [lay for lay in sites[:at[own.key]] if lay.stack is own.stack]
        masks[name] = Masks.ones(model)
        for k in keys:
            (masks[name].neurons[k[4:]] if k.startswith("ffn:") else masks[name].heads[k]).zero_()
    totals = dict.fromkeys(structures, 0.0)
    examples = 0
    with scoring(model), torch.no_grad():
        for batch in each_batch(model, batches):
            batch = {**batch, "use_cache": False}
            outputs: dict[str, object] = {}
            handles = [lay.module.register_forward_hook(_recorder(outputs, lay.key)) for lay in sites]
            try:
                dense = float(loss_of(model, batch))
            finally:
                for h in handles:
                    h.remove()
            size = batch_size(batch)
            for name, prior in before.items():
                replay = _replaying([lay.module for lay in prior], outputs[prior[-1].key]) if prior else nullcontext()
                with replay, attach(model, masks[name]):
                    totals[name] += (float(loss_of(model, batch)) - dense) * size
            examples += size
    return {name: total / max(examples, 1) for name, total in totals.items()}


def _recorder(outputs: dict, key: str):
    def hook(module, args, output):
        outputs[key] = output
    return hook
