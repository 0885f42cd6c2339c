"""Scorers read off activations (and their gradients) at the output projections' inputs.

- ``salience``: sum over examples, tokens and a structure's dims of |a * dL/da| (an upper bound on the
  structure's |first-order loss change|, summed per token: a proxy);
- ``apt_salience`` (APT, as its code computes it): per batch and input channel of the output projection,
  (sum over the batch's tokens of |a|) x (sum of |dL/da|), summed over a head's channels and over batches;
  with ``kurtosis=True`` APT's outlier term is added per batch (see :func:`apt_kurtosis_terms`);
- ``salience_kurtosis``: ``apt_salience`` with the kurtosis term: APT's score for pruning before training;
- ``wanda_sp`` (Wanda-sp, as in the FLAP paper): per channel j of an output projection's input,
  ||X_j||_2 (over the sample's tokens) x sum_i |W_ij|; a head sums its channels;
- ``flap`` (FLAP's WIFV fluctuation metric): per channel, Var_tokens(X_j) x ||W_:,j||^2, the expected
  squared change of the projection's output when the channel is replaced by its mean (which
  :func:`prunetune.importance.compensate` then folds into the bias). ``bias_compensation=False`` scores
  E[X_j^2] x ||W_:,j||^2 instead: the error of dropping the channel without compensation.

With ``hidden``: APT reads salience at every norm of width hidden (where the hidden mask acts);
Wanda-sp and FLAP score a hidden dim by the same formula over every linear that reads the hidden stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune import adapters
from prunetune.families import hidden_sites, layer_sites
from prunetune.importance.passes import TokenRows, each_batch, loss_of, observe, scoring, stack_mask_keys
from prunetune.importance.scores import PROXY, Scores, register, scores_from
from prunetune.importance.stats import ActivationStats
from prunetune.masks import Masks, attach


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a (possibly LoRA-wrapped) linear applies: base + B @ A x scaling of active, unmerged adapters."""
    w = adapters.base_layer(linear).weight.detach().float()
    delta = adapters.active_delta(linear)
    return w if delta is None else w + delta


def _activation_pass(model: nn.Module, batches: Iterable[dict] | None, *, hidden: bool, signal: str,
                     means: bool = False, after_backward: Callable[[ActivationStats], None] | None = None
                     ) -> ActivationStats:
    """Forward and backward over the data with ActivationStats on; `after_backward` sees each step."""
    with scoring(model):
        # All-ones masks that require grad make the hooked activations require grad (the weights do not).
        masks = Masks.ones(model, hidden=hidden, requires_grad=True)
        with attach(model, masks):
            # Hooks run in registration order: the statistics hooks go on after the masks, so on the norms
            # they see the masked output the loss depends on (registered first, no gradient reached them).
            stats = ActivationStats(model, hidden=hidden, signal=signal, means=means)
            try:
                for batch in each_batch(model, batches):
                    masks.zero_grad()
                    loss_of(model, batch).backward()
                    if after_backward is not None:
                        after_backward(stats)
                    stats.step()
            finally:
                stats.remove()
    return stats


# salience and APT's salience are one quantity for every kind (a channel's |a| and |dL/da| summed over its
# structure), which APT ranks globally, raw: comparable. The kurtosis sum, Wanda-sp and FLAP are not.
@register("salience", unit=PROXY, comparable=True)
def salience(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    """Sum over examples, tokens and a structure's dims of |activation x gradient|."""
    return _activation_pass(model, batches, hidden=hidden, signal="salience").to_scores()


def excess_kurtosis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Fisher's (excess) kurtosis along `dim`, population moments; -3 where the values are all equal
    (APT sets the z-scores of a constant to 0)."""
    c = x - x.mean(dim, keepdim=True)
    m2 = c.pow(2).mean(dim)
    m4 = c.pow(4).mean(dim)
    flat = m2 <= 1e-30
    return torch.where(flat, torch.full_like(m2, -3.0), m4 / m2.clamp_min(1e-30).pow(2) - 3)


def apt_kurtosis_terms(weight: torch.Tensor, mean_input: torch.Tensor, heads: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """APT's outlier terms of one output projection for one batch: sqrt(max(excess kurtosis, 0)) of the
    entries of C = W * mean_input (each input channel's mean contribution to each output).

    Per unit, the kurtosis is taken over the unit's entries of C (a neuron: its column; a head: its head_dim
    columns); per hidden dim (an output row) over the row. Returns (per unit, per hidden dim).
    APT's code reshapes (heads, head_dim, hidden) straight to (-1, heads), which mixes the heads' entries;
    here each head gets its own entries, as the paper describes.
    """
    contrib = weight.float() * mean_input.float()[None, :]  # (hidden, channels)
    if heads:
        per_unit = contrib.view(contrib.shape[0], heads, -1).permute(1, 0, 2).reshape(heads, -1)
        unit_k = excess_kurtosis(per_unit, 1)
    else:
        unit_k = excess_kurtosis(contrib, 0)
    hidden_k = excess_kurtosis(contrib, 1)
    return unit_k.clamp_min(0).sqrt().double(), hidden_k.clamp_min(0).sqrt().double()


def _apt(model: nn.Module, batches: Iterable[dict] | None, *, hidden: bool, kurtosis: bool) -> Scores:
    projections = {}
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.num_heads:
                projections[site.key] = (site.proj("o"), site.num_heads)
        if lay.ffn.width:
            projections["ffn:" + lay.key] = (lay.ffn.output, None)

    def add_kurtosis(stats: ActivationStats) -> None:
        # APT adds the term per batch, to that batch's salience, before accumulating.
        for key, mean in stats.step_means().items():
            if key not in projections:
                continue
            lin, heads = projections[key]
            unit_term, hidden_term = apt_kurtosis_terms(effective_weight(lin), mean, heads)
            stats.add_to_step(key, unit_term.to(mean.device).float())
            if hidden:
                stats.add_to_step("hidden", hidden_term.to(mean.device).float())

    stats = _activation_pass(model, batches, hidden=hidden, signal="apt", means=kurtosis,
                             after_backward=add_kurtosis if kurtosis else None)
    return stats.to_scores()


@register("apt_salience", unit=PROXY, comparable=True)
def apt_salience(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False,
                 kurtosis: bool = False) -> Scores:
    """APT's salience, per batch (sum |a|) x (sum |dL/da|) per channel; `kurtosis`: plus APT's outlier term."""
    scores = _apt(model, batches, hidden=hidden, kurtosis=kurtosis)
    if kurtosis:  # the outlier term is added unscaled: heads and neurons no longer share a unit
        scores.meta["comparable_override"] = False
    return scores


@register("salience_kurtosis", unit=PROXY)
def salience_kurtosis(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    """APT's score for pruning before training: its salience plus sqrt(max(excess kurtosis, 0)) per batch."""
    return _apt(model, batches, hidden=hidden, kurtosis=True)


# ---------------------------------------------------------------------------------------------------------
# Forward-only channel statistics (Wanda-sp, FLAP, bias compensation)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Moments:
    """Per input channel over the sample's (unpadded) tokens: count, sum x and sum x^2 (float64)."""

    count: float = 0.0
    s1: torch.Tensor | float = 0.0
    s2: torch.Tensor | float = 0.0

    def add(self, rows: torch.Tensor) -> None:
        r = rows.detach().double()
        self.count += r.shape[0]
        self.s1 = self.s1 + r.sum(0)
        self.s2 = self.s2 + r.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / max(self.count, 1.0)

    @property
    def second(self) -> torch.Tensor:
        return self.s2 / max(self.count, 1.0)

    @property
    def var(self) -> torch.Tensor:
        return (self.second - self.mean.pow(2)).clamp_min(0)


@dataclass
class ChannelStats:
    """Input moments of every output projection (site key, "ffn:<layer>") and, with readers, of every linear
    reading the hidden stream (in hidden_sites(model)["linear_in"] order)."""

    sites: dict[str, Moments] = field(default_factory=dict)
    readers: list[Moments] = field(default_factory=list)

    def means(self) -> dict[str, torch.Tensor]:
        return {k: m.mean for k, m in self.sites.items()}


def channel_stats(model: nn.Module, batches: Iterable[dict] | None, *, readers: bool = False) -> ChannelStats:
    """One forward pass (no gradients) collecting the input moments of the output projections."""
    out = ChannelStats()
    rows = TokenRows()
    mask_key = stack_mask_keys(model)
    handles = []

    def hook(store: Moments, key: str):
        def pre(module, args):
            store.add(rows(args[0], key))

        return pre

    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.num_heads:
                out.sites[site.key] = Moments()
                handles.append(site.proj("o").register_forward_pre_hook(hook(out.sites[site.key], mask_key[lay.key])))
        if lay.ffn.width:
            out.sites["ffn:" + lay.key] = m = Moments()
            handles.append(lay.ffn.output.register_forward_pre_hook(hook(m, mask_key[lay.key])))
    if readers:
        for lin, _ in hidden_sites(model)["linear_in"]:
            out.readers.append(m := Moments())
            handles.append(lin.register_forward_pre_hook(hook(m, "attention_mask")))
    observe(model, batches, handles, rows)
    return out


def _per_unit(per_channel: torch.Tensor, heads: int | None) -> torch.Tensor:
    return per_channel.view(heads, -1).sum(1) if heads else per_channel


def _channel_scorer(model: nn.Module, batches, hidden: bool,
                    metric: Callable[[Moments, torch.Tensor], torch.Tensor]) -> Scores:
    """Score every channel by metric(input moments, weight) and sum a head's channels."""
    stats = channel_stats(model, batches, readers=hidden)
    values: dict[str, torch.Tensor] = {}
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.num_heads:
                w = effective_weight(site.proj("o")).double()
                values[site.key] = _per_unit(metric(stats.sites[site.key], w), site.num_heads)
        if lay.ffn.width:
            w = effective_weight(lay.ffn.output).double()
            values["ffn:" + lay.key] = metric(stats.sites["ffn:" + lay.key], w)
    if hidden:
        total = None
        for (lin, _), mom in zip(hidden_sites(model)["linear_in"], stats.readers, strict=True):
            part = metric(mom, effective_weight(lin).double())
            total = part if total is None else total + part
        values["hidden"] = total
    return scores_from(values)


@register("wanda_sp", unit=PROXY)
def wanda_sp(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False,
             bias_compensation: bool = False) -> Scores:
    """||X_j||_2 x sum_i |W_ij| per input channel of the output projections (Wanda-sp); a head sums its channels.

    `bias_compensation` only records that the caller folds the removed channels' mean into the bias
    (prunetune.importance.compensate): Wanda-sp scores the same either way.
    """
    return _channel_scorer(model, batches, hidden,
                           lambda mom, w: torch.as_tensor(mom.s2).sqrt() * w.abs().sum(0))


@register("flap", unit=PROXY)
def flap(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False, bias_compensation: bool = True
         ) -> Scores:
    """FLAP's fluctuation metric Var(X_j) x ||W_:,j||^2 per channel (E[X_j^2] x ||W_:,j||^2 without compensation)."""
    if bias_compensation:
        return _channel_scorer(model, batches, hidden, lambda mom, w: mom.var * w.pow(2).sum(0))
    return _channel_scorer(model, batches, hidden, lambda mom, w: mom.second * w.pow(2).sum(0))
