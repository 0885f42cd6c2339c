"""Data-free scorer: the L2 norm of the weights each structure owns."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunetune import adapters
from prunetune.families import hidden_sites, layer_sites
from prunetune.importance.scores import PROXY, Scores, register


def _norm_rows(w: torch.Tensor, hd: int) -> torch.Tensor:
    return w.detach().float().view(-1, hd, w.shape[-1]).pow(2).sum((1, 2))


def _weight(lin: nn.Module) -> torch.Tensor:
    return adapters.base_layer(lin).weight


@register("magnitude", unit=PROXY, needs_data=False)
def magnitude(model: nn.Module, batches: Iterable[dict] | None = None, *, hidden: bool = False) -> Scores:
    """Data-free: L2 norm of the weights a structure owns (q/k/v rows and o columns; FFN rows and columns)."""
    out = Scores()
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if not site.num_heads:
                continue
            hd = site.head_dim
            sq = _norm_rows(_weight(site.proj("q")), hd) + _norm_rows(_weight(site.proj("o")).t(), hd)
            kv = _norm_rows(_weight(site.proj("k")), hd) + _norm_rows(_weight(site.proj("v")), hd)
            sq = sq + kv.repeat_interleave(site.num_heads // max(site.num_kv_heads, 1))
            out.heads[site.key] = [float(x) for x in sq.sqrt()]
        if lay.ffn.width:
            sq = sum(_weight(lin).detach().float().pow(2).sum(1) for lin in lay.ffn.inputs)
            sq = sq + _weight(lay.ffn.output).detach().float().pow(2).sum(0)
            out.neurons[lay.key] = [float(x) for x in sq.sqrt()]
    if hidden:
        sites = hidden_sites(model)
        total = torch.zeros(())
        for mod, _ in sites["embedding"] + sites["linear_in"]:  # hidden is the column index
            total = total + _weight(mod).detach().float().pow(2).sum(0)
        for mod, _ in sites["linear_out"]:  # hidden is the row index
            total = total + _weight(mod).detach().float().pow(2).sum(1)
        out.hidden = [float(x) for x in total.sqrt()]
    return out
