"""Plumbing shared by the peer baselines, on plain transformers LLaMA models (no prunetune code).

* Layer-by-layer calibration (as SparseGPT, Wanda and FLAP do it): the input of the first decoder layer is
  captured once for every calibration batch, together with what the model passes each layer (causal mask,
  rotary embeddings); each layer then runs on its own, so a statistic of layer i never costs a full forward
  with the 49k-word LM head.
* Removal of query heads (in whole grouped-query slices), FFN neurons and whole layers from a
  `LlamaForCausalLM`, writing the attributes transformers 5 reads at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class PeerFailure(RuntimeError):
    """A peer could not prune the model: the benchmark reports `str(self)` in place of figures.

    `ratio_independent` marks failures that happen before the pruning ratio is used (e.g. while the peer
    analyses the model), so the benchmark need not repeat them at every budget.
    """

    def __init__(self, message: str, *, stage: str, ratio_independent: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        self.ratio_independent = ratio_independent


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_params(model: nn.Module) -> int:
    """Parameters of the decoder layers (attention, MLP, norms): the budget's unit, embeddings excluded."""
    return sum(p.numel() for p in decoder_layers(model).parameters())


@dataclass(frozen=True)
class AttnShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head: query head h reads KV head h // group (transformers' repeat_kv)."""
        return self.heads // self.kv_heads


def attn_shape(attn: nn.Module) -> AttnShape:
    q = getattr(attn, "q_proj", None)
    if q is None:  # an attention block whose heads were all removed (prunetune replaces it by a stub)
        return AttnShape(0, 0, getattr(attn, "head_dim", 0))
    hd = attn.head_dim
    return AttnShape(q.weight.shape[0] // hd, attn.k_proj.weight.shape[0] // hd, hd)


def structure_counts(model: nn.Module) -> dict[str, int]:
    """Layers (those with any head or FFN neuron left: an emptied layer computes nothing), query heads, KV heads
    and FFN neurons of the live model (read from the weights' shapes)."""
    layers = heads = kv = ffn = 0
    for layer in decoder_layers(model):
        shape = attn_shape(layer.self_attn)
        down = layer.mlp.down_proj
        width = getattr(down, "base_layer", down).weight.shape[1]
        heads += shape.heads
        kv += shape.kv_heads
        ffn += width
        layers += bool(shape.heads or width)
    return {"layers": layers, "heads": heads, "kv_heads": kv, "ffn": ffn}


# ---------------------------------------------------------------------------------------------------------
# Removal
# ---------------------------------------------------------------------------------------------------------


def _slice_linear(lin: nn.Linear, dim: int, index: torch.Tensor) -> None:
    """Keep `index` along `dim` of the weight (0: outputs, with the bias; 1: inputs); new, owned tensors."""
    w = lin.weight
    lin.weight = nn.Parameter(w.detach().index_select(dim, index).clone(), requires_grad=w.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[index].clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = len(index)
    else:
        lin.in_features = len(index)


def _rows(units: Sequence[int], width: int) -> torch.Tensor:
    return torch.tensor([u * width + j for u in units for j in range(width)], dtype=torch.long)


def keep_heads(attn: nn.Module, kept: Sequence[int]) -> None:
    """Keep these query heads. Every KV group keeps the same number of them, or none (its K/V rows go too).

    Transformers repeats each KV head for `num_key_value_groups` consecutive query heads, so groups of unequal
    size cannot be described; such a selection is refused rather than silently mis-wired.
    """
    shape = attn_shape(attn)
    kept = sorted(set(kept))
    if not kept:
        raise ValueError("keep_heads: removing every head of a layer is not supported by the peers")
    per_group: dict[int, int] = {}
    for h in kept:
        per_group[h // shape.group] = per_group.get(h // shape.group, 0) + 1
    if len(set(per_group.values())) != 1:
        raise ValueError(f"keep_heads: unequal query heads per KV group {per_group}")
    kv_kept = sorted(per_group)
    q_rows, kv_rows = _rows(kept, shape.head_dim), _rows(kv_kept, shape.head_dim)
    _slice_linear(attn.q_proj, 0, q_rows)
    _slice_linear(attn.k_proj, 0, kv_rows)
    _slice_linear(attn.v_proj, 0, kv_rows)
    _slice_linear(attn.o_proj, 1, q_rows)
    attn.num_key_value_groups = len(kept) // len(kv_kept)


def keep_neurons(mlp: nn.Module, kept: Sequence[int]) -> None:
    """Keep these FFN neurons: gate/up rows and down-projection columns together (gated MLP)."""
    if not kept:
        raise ValueError("keep_neurons: removing every neuron of a layer is not supported by the peers")
    index = torch.tensor(sorted(set(kept)), dtype=torch.long)
    _slice_linear(mlp.gate_proj, 0, index)
    _slice_linear(mlp.up_proj, 0, index)
    _slice_linear(mlp.down_proj, 1, index)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(index)


def add_output_bias(lin: nn.Linear, bias: torch.Tensor) -> None:
    """Add a constant to a linear's output (FLAP's bias compensation); LLaMA projections have no bias yet."""
    bias = bias.detach().to(lin.weight.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(bias.clone(), requires_grad=lin.weight.requires_grad)
    else:
        lin.bias = nn.Parameter(lin.bias.detach() + bias, requires_grad=lin.bias.requires_grad)


def keep_layers(model: nn.Module, kept: Sequence[int]) -> None:
    """Keep these decoder layers (in order), renumbering what transformers indexes by layer."""
    kept = sorted(set(kept))
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    cfg = model.config
    # LlamaModel runs `layers[: config.num_hidden_layers]` and caches are built per config layer
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache slot this layer writes


# ---------------------------------------------------------------------------------------------------------
# Layer-by-layer calibration
# ---------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook: nothing past the first layer needs to run."""


@dataclass
class LayerBatch:
    """One calibration batch at the input of the current layer."""

    hidden: torch.Tensor  # (batch, seq, hidden)
    kwargs: dict  # what LlamaModel passes each decoder layer: causal mask, rotary cos/sin, position ids
    tokens: torch.Tensor  # (batch, seq) bool: real tokens; statistics leave padding out


@torch.no_grad()
def first_layer_inputs(model: nn.Module, batches: Iterable[dict]) -> list[LayerBatch]:
    """The input of decoder layer 0 (the embeddings) for every batch, with the per-layer keyword arguments."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _Stop

    out: list[LayerBatch] = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            ids = batch["input_ids"]
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden, kwargs = captured.pop()
            tokens = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            out.append(LayerBatch(hidden, kwargs, tokens))
    finally:
        handle.remove()
    return out


def run_layer(layer: nn.Module, lb: LayerBatch) -> torch.Tensor:
    out = layer(lb.hidden, **lb.kwargs)
    return out[0] if isinstance(out, tuple) else out


class InputStats:
    """Per input channel of a linear layer: count, sum and sum of squares of its inputs over real tokens."""

    def __init__(self, width: int) -> None:
        self.n = 0
        # float64: sums over ~30k tokens of squared activations lose the variance in float32
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)

    def add(self, x: torch.Tensor, tokens: torch.Tensor) -> None:
        rows = x[tokens].double()
        self.n += rows.shape[0]
        self.sum += rows.sum(0)
        self.sumsq += rows.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        """E[x^2]: Wanda's ||X_j||^2 / N."""
        return self.sumsq / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased sample variance over tokens: FLAP's fluctuation of the input feature."""
        n = max(self.n, 2)
        return ((self.sumsq - self.sum.pow(2) / n) / (n - 1)).clamp_min(0)


@torch.no_grad()
def layer_pass(
    layer: nn.Module, inputs: list[LayerBatch], watch: dict[str, nn.Linear]
) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Run one layer on every batch: input statistics of the `watch`ed linears, and the layer's outputs."""
    stats = {name: InputStats(lin.weight.shape[1]) for name, lin in watch.items()}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            stats[name].add(args[0], current["tokens"])

        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in watch.items()]
    outputs = []
    try:
        for lb in inputs:
            current["tokens"] = lb.tokens
            outputs.append(run_layer(layer, lb))
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def advance(inputs: list[LayerBatch], outputs: list[torch.Tensor]) -> list[LayerBatch]:
    """The next layer's inputs: this layer's outputs, same masks and rotary embeddings."""
    return [LayerBatch(out, lb.kwargs, lb.tokens) for lb, out in zip(inputs, outputs, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCosts:
    """Parameters of one layer: per query head, per FFN neuron, and what neither removes (K/V rows, norms)."""

    per_head: int
    per_neuron: int
    fixed: int
    total: int


def layer_costs(layer: nn.Module) -> LayerCosts:
    attn, mlp = layer.self_attn, layer.mlp
    shape = attn_shape(attn)
    hd = shape.head_dim
    q, o = attn.q_proj, attn.o_proj
    # a query head owns head_dim rows of q (and their bias) and head_dim columns of o
    per_head = hd * q.weight.shape[1] + (hd if q.bias is not None else 0) + hd * o.weight.shape[0]
    per_neuron = sum(lin.weight.shape[1] + (1 if lin.bias is not None else 0) for lin in (mlp.gate_proj, mlp.up_proj))
    per_neuron += mlp.down_proj.weight.shape[0]
    total = sum(p.numel() for p in layer.parameters())
    ffn = mlp.down_proj.weight.shape[1]
    return LayerCosts(per_head, per_neuron, total - shape.heads * per_head - ffn * per_neuron, total)


def best_per_group(scores: torch.Tensor, shape: AttnShape, per_group: int) -> list[int]:
    """The `per_group` best query heads of every KV group (groups stay equal, as transformers needs)."""
    kept: list[int] = []
    for g in range(shape.kv_heads):
        ids = list(range(g * shape.group, (g + 1) * shape.group))
        kept += sorted(ids, key=lambda h: -float(scores[h]))[:per_group]
    return sorted(kept)
