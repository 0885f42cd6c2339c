"""Whole-layer scorers.

- ``block_influence`` (ShortGPT, Men et al.): per layer, 1 - cos(h_in, h_out) between the hidden states a
  layer reads and the ones it returns, averaged over the sample's (unpadded) tokens. A layer that changes
  its input little can be dropped whole. A proxy in Scores.layers only (keys: the layer keys).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunetune.families import layer_input, layer_output, layer_sites
from prunetune.importance.passes import TokenRows, observe, stack_mask_keys
from prunetune.importance.scores import PROXY, Scores, register


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
