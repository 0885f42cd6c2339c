"""Wanda-sp and FLAP structured pruning of LLaMA heads and FFN neurons: peer baselines, not prunetune code.

No pip package ships either method; this follows the FLAP authors' code (CASIA-IVA-Lab/FLAP, `lib/prune.py`
and `lib/layerwrapper.py`), adapted where the model differs:

* **Wanda-sp** (`prune_wanda_sp`, FLAP's `prune_wanda_sp`): layer by layer, on inputs that already went
  through the pruned earlier layers. Score of input channel j of the attention output projection and of the
  FFN down projection: mean over output rows of |W_ij| * ||X_j|| (Wanda's weight x activation norm); a head
  sums its channels. Uniform structure (FLAP's UL-UM): every layer keeps the same share of heads and neurons.
* **FLAP** (`prune_flap`, FLAP's `prune_flap`): fluctuation metric WIFV = Var_t(X_j) * ||W_:,j||^2 (squared
  for attention channels, as in the original), from one pass over the unpruned model; adaptive structure
  (AL-AM): each layer's channel metrics are standardised, heads take their channels' mean, and heads and
  neurons of all layers are ranked together, each weighted by its parameter cost; bias compensation: the
  removed channels' mean input times their weights becomes a bias of the output projection.

Adaptations: (1) grouped-query attention: FLAP's code assumes one KV head per query head. Here every KV group
keeps the same number of query heads (its best ones), as transformers requires, and K/V rows stay; at least one
head and one neuron per layer stay (the stock LLaMA modules cannot run without). (2) The budget is the exact
layer-parameter fraction (the original's ratio counts only q/k/v/o and MLP matrices of a 4096-wide MHA model,
with a fixed 512/3 head-to-neuron cost ratio); the parameters FLAP's compensation biases add are counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .common import (
    AttnShape,
    LayerCosts,
    add_output_bias,
    advance,
    attn_shape,
    best_per_group,
    decoder_layers,
    first_layer_inputs,
    keep_heads,
    keep_neurons,
    layer_costs,
    layer_pass,
)


def uniform_counts(costs: LayerCosts, shape: AttnShape, ffn: int, keep: float, extra: int = 0) -> tuple[int, int]:
    """Query heads per KV group and neurons that keep `keep` of the layer's parameters at about one ratio.

    Heads come in steps of one per KV group (a third of the heads for SmolLM2), so the head count is the
    nearest step to `keep` and the neurons take up the rest of the budget exactly. `extra`: parameters the
    method adds (compensation biases).
    """
    per_group = min(shape.group, max(1, round(keep * shape.group)))
    room = keep * costs.total - costs.fixed - extra - per_group * shape.kv_heads * costs.per_head
    neurons = min(ffn, max(1, math.floor(room / costs.per_neuron)))
    return per_group, neurons


def _wanda_channel_scores(lin: nn.Linear, mean_sq: torch.Tensor) -> torch.Tensor:
    """FLAP's wanda_sp metric: mean over output rows of |W| * sqrt(E[x^2]) per input channel."""
    w = lin.weight.detach().double().abs()
    return (w * mean_sq.sqrt().unsqueeze(0)).mean(0)


def _bias_missing(lin: nn.Linear, hidden: int) -> int:
    return hidden if lin.bias is None else 0


@torch.no_grad()
def prune_wanda_sp(model: nn.Module, batches: Iterable[dict], keep: float) -> dict:
    """Wanda-sp at a uniform per-layer ratio: each layer pruned in turn, on the pruned model's activations."""
    inputs = first_layer_inputs(model, batches)
    kept_heads, kept_neurons = [], []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        shape, costs = attn_shape(attn), layer_costs(layer)
        watch = {"o": attn.o_proj, "down": mlp.down_proj}
        stats, _ = layer_pass(layer, inputs, watch)
        head_scores = _wanda_channel_scores(attn.o_proj, stats["o"].mean_sq).view(shape.heads, -1).sum(1)
        neuron_scores = _wanda_channel_scores(mlp.down_proj, stats["down"].mean_sq)
        per_group, n_neurons = uniform_counts(costs, shape, neuron_scores.numel(), keep)
        heads = best_per_group(head_scores, shape, per_group)
        neurons = torch.topk(neuron_scores, n_neurons).indices.tolist()
        if len(heads) < shape.heads:
            keep_heads(attn, heads)
        if n_neurons < neuron_scores.numel():
            keep_neurons(mlp, neurons)
        kept_heads.append(len(heads))
        kept_neurons.append(n_neurons)
        # Wanda-sp feeds the next layer what this *pruned* layer outputs (FLAP's prune_wanda_sp)
        _, outputs = layer_pass(layer, inputs, {})
        inputs = advance(inputs, outputs)
    return {"heads_per_layer": kept_heads, "neurons_per_layer": kept_neurons, "structure": "UL-UM"}


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


@torch.no_grad()
def prune_flap(
    model: nn.Module,
    batches: Iterable[dict],
    keep: float,
    *,
    structure: str = "AL-AM",
    bias: bool = True,
) -> dict:
    """FLAP: WIFV metric, adaptive structure (AL-AM, or uniform UL-UM), bias compensation (on by default)."""
    if structure not in ("AL-AM", "UL-UM"):
        raise ValueError(f"FLAP structure {structure!r}: only AL-AM (the paper's default) and UL-UM are implemented")
    inputs = first_layer_inputs(model, batches)
    layers = list(decoder_layers(model))
    head_metric, neuron_metric, means = [], [], []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        shape = attn_shape(attn)
        stats, outputs = layer_pass(layer, inputs, {"o": attn.o_proj, "down": mlp.down_proj})
        w_o, w_d = attn.o_proj.weight.detach().double(), mlp.down_proj.weight.detach().double()
        attn_ch = (stats["o"].var * w_o.pow(2).sum(0)).pow(2)  # WIFV, squared for attention as in FLAP
        ffn_ch = stats["down"].var * w_d.pow(2).sum(0)
        if structure == "AL-AM":  # per-layer standardisation; a head is its channels' mean
            head_metric.append(_standardise(attn_ch).view(shape.heads, -1).mean(1))
            neuron_metric.append(_standardise(ffn_ch))
        else:
            head_metric.append(attn_ch.view(shape.heads, -1).sum(1))
            neuron_metric.append(ffn_ch)
        means.append((stats["o"].mean, stats["down"].mean))
        # FLAP scores every layer on the unpruned model's activations (one pass; pruning comes after)
        inputs = advance(inputs, outputs)

    hidden = layers[0].mlp.down_proj.weight.shape[0]
    extra = [
        (_bias_missing(lay.self_attn.o_proj, hidden) + _bias_missing(lay.mlp.down_proj, hidden)) if bias else 0
        for lay in layers
    ]
    shapes = [attn_shape(lay.self_attn) for lay in layers]
    costs = [layer_costs(lay) for lay in layers]
    if structure == "UL-UM":
        plan = []
        for i in range(len(layers)):
            per_group, n = uniform_counts(costs[i], shapes[i], neuron_metric[i].numel(), keep, extra[i])
            plan.append((best_per_group(head_metric[i], shapes[i], per_group),
                         torch.topk(neuron_metric[i], n).indices.tolist()))
    else:
        plan = _adaptive_plan(head_metric, neuron_metric, shapes, costs, keep, extra)

    for layer, (heads, neurons), (mean_o, mean_d), shape in zip(layers, plan, means, shapes, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if bias:  # what the removed channels contributed on average moves into a bias
            _compensate(attn.o_proj, mean_o, _rows_removed(heads, shape))
            _compensate(mlp.down_proj, mean_d, _removed(neurons, mlp.down_proj.weight.shape[1]))
        if len(heads) < shape.heads:
            keep_heads(attn, heads)
        if len(neurons) < mlp.down_proj.weight.shape[1]:
            keep_neurons(mlp, neurons)
    return {
        "heads_per_layer": [len(h) for h, _ in plan],
        "neurons_per_layer": [len(n) for _, n in plan],
        "structure": structure,
        "metric": "WIFV",
        "bias_compensation": bias,
    }


def _removed(kept: list[int], width: int) -> list[int]:
    keep = set(kept)
    return [i for i in range(width) if i not in keep]


def _rows_removed(heads: list[int], shape: AttnShape) -> list[int]:
    return [h * shape.head_dim + j for h in _removed(heads, shape.heads) for j in range(shape.head_dim)]


def _compensate(lin: nn.Linear, mean: torch.Tensor, removed: list[int]) -> None:
    if not removed:
        return
    idx = torch.tensor(removed, dtype=torch.long)
    w = lin.weight.detach().double()[:, idx]
    add_output_bias(lin, w @ mean[idx])


def _adaptive_plan(
    head_metric: list[torch.Tensor],
    neuron_metric: list[torch.Tensor],
    shapes: list[AttnShape],
    costs: list[LayerCosts],
    keep: float,
    extra: list[int],
) -> list[tuple[list[int], list[int]]]:
    """FLAP's AL-AM: rank heads and neurons of all layers together, each weighted by its cost.

    FLAP keeps the best-scored structures until their cost weights reach the budget. Here the costs are the
    exact parameter counts and the budget the layer parameters; heads are then made whole per KV group (the
    nearest equal count, at least one), and the neurons refilled to the budget with what the heads left.
    """
    n_layers = len(shapes)
    capacity = keep * sum(c.total for c in costs) - sum(c.fixed for c in costs) - sum(extra)
    units = [(float(s), c.per_head, "h", i, h) for i, (m, c) in enumerate(zip(head_metric, costs, strict=True))
             for h, s in enumerate(m)]
    units += [(float(s), c.per_neuron, "n", i, j) for i, (m, c) in enumerate(zip(neuron_metric, costs, strict=True))
              for j, s in enumerate(m)]
    units.sort(key=lambda u: -u[0])
    heads_count = [0] * n_layers
    spent = 0.0
    for _score, cost, kind, i, _ in units:
        if spent + cost > capacity:
            break  # FLAP: one global threshold on the sorted metrics
        spent += cost
        if kind == "h":
            heads_count[i] += 1
    heads = []
    for i, shape in enumerate(shapes):
        per_group = min(shape.group, max(1, round(heads_count[i] / shape.kv_heads)))
        heads.append(best_per_group(head_metric[i], shape, per_group))
    room = capacity - sum(len(h) * c.per_head for h, c in zip(heads, costs, strict=True))
    # one neuron per layer first (the module cannot be emptied), then the best by standardised score
    neurons: list[list[int]] = [[int(torch.argmax(m))] for m in neuron_metric]
    room -= sum(c.per_neuron for c in costs)
    for _score, cost, kind, i, j in units:
        if kind != "n" or j == neurons[i][0]:
            continue
        if cost > room:
            break
        neurons[i].append(j)
        room -= cost
    return [(h, sorted(n)) for h, n in zip(heads, neurons, strict=True)]
