"""ShortGPT-style layer dropping (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect"): a peer baseline, not prunetune code.

Block influence of layer i on the calibration sample: BI_i = 1 - E_t[cos(h_i,t, h_i+1,t)], the mean over
real tokens of one minus the cosine between the layer's input and output hidden state. The layers that
change the residual stream least are removed whole, least influential first, until the kept layer
parameters fit the budget. No weight is changed; nothing is retrained.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .common import advance, decoder_layers, first_layer_inputs, keep_layers, layer_params, run_layer


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict]) -> list[float]:
    """BI of every decoder layer, token-weighted over the batches (layer by layer, on the dense model)."""
    inputs = first_layer_inputs(model, batches)
    influence = []
    for layer in decoder_layers(model):
        outputs = [run_layer(layer, lb) for lb in inputs]
        cos_sum, count = 0.0, 0
        for lb, out in zip(inputs, outputs, strict=True):
            cos = F.cosine_similarity(lb.hidden.double(), out.double(), dim=-1)  # (batch, seq)
            cos_sum += float(cos[lb.tokens].sum())
            count += int(lb.tokens.sum())
        influence.append(1.0 - cos_sum / max(count, 1))
        inputs = advance(inputs, outputs)
    return influence


def prune_shortgpt(model: nn.Module, batches: Iterable[dict], keep: float) -> dict:
    """Drop the least influential layers until at most `keep` of the layer parameters remain."""
    influence = block_influence(model, batches)
    layers = decoder_layers(model)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    target = keep * layer_params(model)
    kept = set(range(len(layers)))
    for i in sorted(kept, key=lambda i: influence[i]):
        if sum(sizes[j] for j in kept) <= target * (1 + 1e-9) or len(kept) == 1:
            break
        kept.discard(i)
    removed = sorted(set(range(len(layers))) - kept)
    keep_layers(model, sorted(kept))
    return {"block_influence": influence, "removed_layers": removed}
