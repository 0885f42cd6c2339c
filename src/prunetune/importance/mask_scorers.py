"""Scorers read off the gradient of the task loss with respect to all-ones structure masks.

One backward pass per batch with one mask row per example (masks.py) gives every example's own
gradient g_e = dL_e/dmask. From them:

- ``head_grad`` (Michel et al., the Pruning-Adapter paper): mean over examples of |g_e|, the expected
  absolute first-order loss change from removing the structure; per-layer L2 normalisation by default,
  as the paper does (an explicit option; the raw scores stay in meta["raw"]);
- ``taylor``: |mean over examples of g_e|, the first-order estimate of the loss change on the sample;
- ``fisher`` (Kwon et al.): half the mean over examples of g_e^2, the diagonal empirical-Fisher estimate
  of the loss change.

Whole structures get the same estimate from the summed gradient of their units (Scores.layers): the
attention block (all heads of a site), the FFN block and the whole layer. For ``fisher`` that is the
block's Fisher with every off-diagonal term, 0.5 * mean_e (sum_units g_e)^2.

g_e is the gradient of the batch loss with respect to example e's mask row, times the batch size: for a
loss averaged over examples (classification) that is exactly the example's own dL_e/dmask; for a loss
averaged over tokens (language modelling) an example counts by its share of the batch's tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import layer_sites
from prunetune.importance.layer_scorers import removal_losses
from prunetune.importance.passes import batch_size, each_batch, loss_of, scoring
from prunetune.importance.scores import FIRST_ORDER, FISHER, Scores, register, scores_from
from prunetune.masks import Masks, attach


@dataclass
class MaskGradients:
    """Sums over examples of per-example mask gradients, per unit and per whole structure."""

    examples: int = 0
    abs: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_e |g_e| per unit
    signed: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_e g_e
    square: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_e g_e^2
    blocks_abs: dict[str, float] = field(default_factory=dict)  # sum_e |sum_units g_e| per structure
    blocks_signed: dict[str, float] = field(default_factory=dict)
    blocks_square: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, torch.Tensor] | None = None  # (examples, units), when asked for

    def _add(self, store: dict, key: str, value) -> None:
        store[key] = store[key] + value if key in store else value


def _named(masks: Masks) -> dict[str, torch.Tensor]:
    named = {**masks.heads, **{"ffn:" + k: v for k, v in masks.neurons.items()}}
    if masks.hidden is not None:
        named["hidden"] = masks.hidden
    return named


def _structures(model: nn.Module) -> dict[str, list[str]]:
    """Whole structures -> the mask keys whose units they remove together."""
    out: dict[str, list[str]] = {}
    for lay in layer_sites(model):
        members = []
        for site in lay.attentions.values():
            if site.num_heads:
                out[site.key] = [site.key]
                members.append(site.key)
        if lay.ffn.width:
            out[f"{lay.key}/ffn"] = ["ffn:" + lay.key]
            members.append("ffn:" + lay.key)
        if members:
            out[lay.key] = members
    return out


def mask_gradients(model: nn.Module, batches: Iterable[dict] | None, *, hidden: bool = False,
                   keep_per_example: bool = False) -> MaskGradients:
    """One pass over the data: every example's mask gradient, summed (and kept, with keep_per_example)."""
    out = MaskGradients(per_example={} if keep_per_example else None)
    structures = _structures(model)
    kept: dict[str, list[torch.Tensor]] = {}
    with scoring(model):
        for batch in each_batch(model, batches):
            size = batch_size(batch)
            masks = Masks.ones(model, hidden=hidden, requires_grad=True, batch=size)
            with attach(model, masks):
                loss_of(model, batch).backward()
            grads = {}
            for k, m in _named(masks).items():
                g = m.grad.detach().double() if m.grad is not None else torch.zeros_like(m, dtype=torch.float64)
                grads[k] = g * size  # (examples, units): each example's own gradient (see the module doc)
                out._add(out.abs, k, grads[k].abs().sum(0))
                out._add(out.signed, k, grads[k].sum(0))
                out._add(out.square, k, grads[k].pow(2).sum(0))
                if keep_per_example:
                    kept.setdefault(k, []).append(grads[k].cpu())
            for name, members in structures.items():
                block = sum(grads[k].sum(1) for k in members)  # (examples,)
                out._add(out.blocks_abs, name, float(block.abs().sum()))
                out._add(out.blocks_signed, name, float(block.sum()))
                out._add(out.blocks_square, name, float(block.pow(2).sum()))
            out.examples += size
    if keep_per_example:
        out.per_example = {k: torch.cat(v) for k, v in kept.items()}
    return out


def _per_example_mean(g, units: dict, blocks: dict, factor: float = 1.0) -> Scores:
    """Sums over the sample's examples turned into `factor` x their mean, per unit and per block."""
    scale = factor / max(g.examples, 1)
    scores = scores_from({k: v * scale for k, v in units.items()}, {k: v * scale for k, v in blocks.items()})
    scores.meta["examples"] = g.examples
    return scores


@register("head_grad", unit=FIRST_ORDER, normalize="layer")
def head_grad(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    """Mean over examples of |dL_e/dmask| (Michel et al.): the expected absolute first-order loss change."""
    g = mask_gradients(model, batches, hidden=hidden)
    return _per_example_mean(g, g.abs, g.blocks_abs)


@register("taylor", unit=FIRST_ORDER)
def taylor(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    """|mean over examples of dL_e/dmask|: first-order Taylor estimate of the loss change on the sample."""
    g = mask_gradients(model, batches, hidden=hidden)
    return _per_example_mean(g, {k: v.abs() for k, v in g.signed.items()},
                             {k: abs(v) for k, v in g.blocks_signed.items()})


BLOCK_SCORES = ("estimate", "measured")  # fisher's whole-structure scores: its own estimate, or measured


@register("fisher", unit=FISHER)
def fisher(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False, blocks: str = "estimate",
           measure_examples: int = 32) -> Scores:
    """0.5 x mean over examples of (dL_e/dmask)^2 (Kwon et al.): the empirical-Fisher loss change estimate.

    `blocks`: what Scores.layers holds for whole attention blocks, FFN blocks and layers. "estimate": the same
    Fisher estimate of the block (0.5 * mean_e (sum_units g_e)^2). "measured": the loss change measured on the
    first `measure_examples` examples of the sample (0: all) with the block removed. A second-order estimate is
    good for a few heads or neurons and poor for a block whose removal moves the loss far: the measured change
    is in the same unit (loss per example) and ranks blocks against units under granularity "mixed".
    """
    if blocks not in BLOCK_SCORES:
        raise PrunetuneError(f"fisher: blocks must be one of {', '.join(BLOCK_SCORES)}, not {blocks!r}")
    if measure_examples < 0:
        raise PrunetuneError(f"fisher: measure_examples must be >= 0, not {measure_examples}")
    batches = list(batches) if blocks == "measured" else batches  # read twice
    g = mask_gradients(model, batches, hidden=hidden)
    scores = _per_example_mean(g, g.square, g.blocks_square, factor=0.5)
    if blocks == "measured":
        sample = _first_examples(batches, measure_examples)
        scores.layers = removal_losses(model, sample, _structures(model))
        scores.meta["measured_examples"] = sum(batch_size(b) for b in sample)
    return scores


def _first_examples(batches: list[dict], n: int) -> list[dict]:
    """The leading batches holding the first `n` examples (whole batches; n = 0: all of them)."""
    if n == 0:
        return batches
    out, seen = [], 0
    for b in batches:
        if seen >= n:
            break
        out.append(b)
        seen += batch_size(b)
    return out
