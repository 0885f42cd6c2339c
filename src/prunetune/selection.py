"""Choosing what to keep under a budget: heads, FFN neurons and hidden dims ranked together by score per cost.

Scores of one scorer share a unit (an estimate of the loss change from removing a structure), so every
kind is ranked on one scale, by score per parameter (or FLOP): the split between attention, FFN and
width comes from the scores. A scorer whose kinds are not comparable (weight magnitude, scores
normalised per layer) says so with ``Scores.meta["comparable"] = False`` (importance/scores.py), and they are
then normalised per kind; the caller's ``normalize`` overrides either:

- ``"none"``: raw scores (the default for comparable kinds);
- ``"per_kind"``: each kind's scores rescaled so an average unit's score equals its cost share;
- ``"per_layer"``: each layer's scores of a kind L2-normalised first (layers weigh equally), then per kind.

The greedy takes chains of dependent units (a GQA layer's per-group slices, which must be kept in rank
order and whose first slice carries the KV rows) as the segments of their upper concave envelope, so the
KV cost is spread over the slices it enables. Hidden dims scale the cost of everything else: the number
kept is searched for, the heads and neurons being chosen at exact costs for each candidate. plan.select
turns the choice into a plan and checks its cost on a weightless copy of the model.

``Budget.granularity`` lets a cost budget remove whole attention blocks, FFN blocks and layers, valued by
their own scores (``Scores.layers``), on their own ("blocks", "layers") or ranked with the units ("mixed");
see layer_units.py. The greedy itself is in knapsack.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from prunetune.costs import head_costs, input_norm_costs, neuron_cost
from prunetune.errors import PrunetuneError
from prunetune.families import hidden_size, layer_sites
from prunetune.knapsack import TOLERANCE, Unit, knapsack
from prunetune.layer_units import (
    DEFAULT_GRANULARITY,
    GRANULARITIES,
    Granularity,
    Group,
    block_key,
    build_groups,
    layer_chain,
)

Normalize = Literal["none", "per_kind", "per_layer"]
NORMALIZE_MODES: tuple[str, ...] = ("none", "per_kind", "per_layer")
DEFAULT_NORMALIZE: Normalize = "none"  # scores of one scorer share a unit: compare them as they are
HIDDEN_GRID = 24  # hidden sizes tried in the coarse pass of the hidden search (then refined by halving)



@dataclass
class Budget:
    """How much to keep. Fractions are in (0, 1]; counts (heads/neurons) may be given as integers > 1."""

    keep_params: float | None = None  # fraction of the prunable layer parameters
    keep_flops: float | None = None  # fraction of the layers' FLOPs per token at `seq_len`
    seq_len: int = 128
    heads_keep: float | None = None  # fraction of heads, or a count when > 1
    neurons_keep: float | None = None
    hidden_keep: float | None = None
    gqa: Literal["per_group", "whole_group"] = "per_group"
    round_to: int = 1  # keep neuron counts (and hidden sizes) in multiples of this where the budget allows
    reference: float | None = None  # the dense cost the fractions refer to (default: the live model's)
    prune_hidden: bool = False  # let keep_params / keep_flops remove hidden dims too, ranked with the rest
    # see GRANULARITIES; None: "units", or "layers" for scores that score whole layers only (block_influence)
    granularity: Granularity | None = None
    # the same numbers of query heads, KV heads and FFN neurons in every layer (which ones may differ), so that a
    # stock config describes the result (see uniform.py)
    uniform: bool = False

    def check(self) -> None:
        for name in ("keep_params", "keep_flops", "hidden_keep"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise PrunetuneError(f"budget --{name.replace('_', '-')} must be in (0, 1], got {v}")
        for name in ("heads_keep", "neurons_keep"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or (v > 1 and v != int(v))):
                raise PrunetuneError(f"budget --{name.replace('_', '-')} must be a fraction in (0, 1] or a count")
        if self.keep_params is not None and self.keep_flops is not None:
            raise PrunetuneError("give either --keep-params or --keep-flops, not both")
        if all(
            getattr(self, n) is None
            for n in ("keep_params", "keep_flops", "heads_keep", "neurons_keep", "hidden_keep")
        ):
            raise PrunetuneError("no budget given: use --keep-params, --heads-keep, --neurons-keep or --hidden-keep")
        if self.prune_hidden and self.keep_params is None and self.keep_flops is None:
            raise PrunetuneError("pruning hidden dims with the rest needs --keep-params or --keep-flops")
        if self.prune_hidden and self.hidden_keep is not None:
            raise PrunetuneError("give either --hidden-keep (a fixed count) or hidden pruning by the budget, not both")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise PrunetuneError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if self.uniform and self.granularity not in (None, "units"):
            raise PrunetuneError(f"--uniform keeps every layer (a stock config has one layer shape), so it cannot be "
                                 f"combined with granularity {self.granularity!r}")
        if self.granularity not in (None, "units"):
            if self.keep_params is None and self.keep_flops is None:
                raise PrunetuneError(f"granularity {self.granularity!r} removes whole blocks or layers under a cost "
                                     "budget: give --keep-params or --keep-flops")
            if self.heads_keep is not None or self.neurons_keep is not None:
                raise PrunetuneError(f"granularity {self.granularity!r} chooses which blocks keep heads and neurons: "
                                     "it cannot be combined with --heads-keep / --neurons-keep")


def resolve_normalize(normalize: str | None, scores) -> tuple[Normalize, str]:
    """The normalisation to apply and where it came from: the argument, the scorer (Scores.meta), or the default."""
    if normalize is not None:
        mode, source = normalize, "argument"
    elif (getattr(scores, "meta", None) or {}).get("comparable") is not None:
        # the scorer states whether its kinds share a unit; where they do not, a head's score and a neuron's
        # can only meet after each kind is put on its cost share (recorded as coming from the scorer)
        mode = "none" if scores.meta["comparable"] else "per_kind"
        source = "scorer: comparable kinds" if scores.meta["comparable"] else "scorer: kinds not comparable"
    else:
        mode, source = DEFAULT_NORMALIZE, "default"
    if mode not in NORMALIZE_MODES:
        raise PrunetuneError(f"unknown score normalisation {mode!r}; known: {', '.join(NORMALIZE_MODES)}")
    return mode, source


def resolve_granularity(budget: Budget, scores) -> tuple[Granularity, str]:
    """What the budget may remove and where that came from: the budget, the scores (whole-layer scores and no
    head or neuron scores: whole layers, as ShortGPT), or the default."""
    if budget.granularity is not None:
        return budget.granularity, "budget"
    cost_budget = budget.keep_params is not None or budget.keep_flops is not None
    if cost_budget and scores.layers and not scores.heads and not scores.neurons:
        return "layers", "scores: whole layers only"
    return DEFAULT_GRANULARITY, "default"


def _l2(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _per_kind(units: list[Unit], scores: list[float] | None = None, total_cost: float | None = None) -> float:
    """Rescale a kind so an average unit's score equals its cost share (in place; `scores` for hidden dims).
    Returns the factor applied."""
    total_s = sum(u.score for u in units) if scores is None else sum(scores)
    total_c = sum(u.cost_const + u.cost_hidden for u in units) if total_cost is None else total_cost
    if total_s <= 0 or total_c <= 0:
        return 1.0
    if scores is None:
        for u in units:
            u.score = u.score / total_s * total_c
    else:
        scores[:] = [v / total_s * total_c for v in scores]
    return total_c / total_s


def site_scores(scores, site, per_layer: bool) -> list[float]:
    """An attention site's head scores (or a layer's neuron scores, for an FFN site), L2-normalised per layer when
    asked; structures the scores do not cover score 1."""
    table, n = (scores.heads, site.num_heads) if hasattr(site, "num_heads") else (scores.neurons, site.width)
    s = list(table.get(site.key, [1.0] * n))
    return _l2(s) if per_layer else s


def _head_chains(model: nn.Module, scores, gqa: str, flops_seq: int | None, per_layer: bool) -> list[list[Unit]]:
    chains: list[list[Unit]] = []
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if not site.num_heads:
                continue
            s = site_scores(scores, site, per_layer)
            # costs are linear in the hidden scale: (constant part, hidden-scaled part)
            (q0, kv0), (q_all, kv_all) = head_costs(site, 0.0, flops_seq), head_costs(site, 1.0, flops_seq)
            q1, kv1 = q_all - q0, kv_all - kv0
            if not site.spec.kv_groups_attr or site.group_size == 1:
                order = sorted(range(site.num_heads), key=lambda h: -s[h])
                chains += [[Unit("heads", site.key, [h], s[h], q0 + kv0, q1 + kv1, r / len(order))]
                           for r, h in enumerate(order)]
                continue
            g = site.group_size
            groups = [list(range(j * g, (j + 1) * g)) for j in range(site.num_kv_heads)]
            if gqa == "whole_group":
                groups.sort(key=lambda grp: -sum(s[h] for h in grp))
                chains += [[Unit("heads", site.key, grp, sum(s[h] for h in grp), g * q0 + kv0, g * q1 + kv1,
                                 r / len(groups))] for r, grp in enumerate(groups)]
                continue
            # slice r takes the r-th best query head of every group: groups stay equal in size. The KV rows
            # are only freed when every slice goes, so the first slice carries them and slice r can only be
            # kept after slice r - 1: one chain, whose kept prefix costs exactly the sum of its slices.
            ranked = [sorted(grp, key=lambda h: -s[h]) for grp in groups]
            chain = []
            for r in range(g):
                ids = sorted(rk[r] for rk in ranked)
                n = len(groups)
                chain.append(Unit("heads", site.key, ids, sum(s[h] for h in ids),
                                  n * (q0 + (kv0 if r == 0 else 0.0)), n * (q1 + (kv1 if r == 0 else 0.0)), r / g))
            chains.append(chain)
    return chains


def _neuron_chains(model: nn.Module, scores, round_to: int, flops_seq: int | None, per_layer: bool) -> list[list[Unit]]:
    chains: list[list[Unit]] = []
    for lay in layer_sites(model):
        n = lay.ffn.width
        if not n:
            continue
        s = site_scores(scores, lay.ffn, per_layer)
        c0 = neuron_cost(lay.ffn, 0.0, flops_seq)
        c1 = neuron_cost(lay.ffn, 1.0, flops_seq) - c0
        order = sorted(range(n), key=lambda i: -s[i])
        step = max(1, round_to)
        for start in range(0, n, step):
            ids = order[start : start + step]
            chains.append([Unit("neurons", lay.key, ids, sum(s[i] for i in ids), c0 * len(ids), c1 * len(ids),
                                start / n)])
    return chains


def top_count(units: list[Unit], keep: float, total: int) -> list[Unit]:
    """The best units covering `keep` of `total` structures (a fraction, or a count when > 1)."""
    target = round(keep * total) if keep <= 1 else int(keep)
    if target > total:
        raise PrunetuneError(f"budget keeps {target} but the model has only {total}")
    chosen, count = [], 0
    for u in sorted(units, key=lambda u: (-u.score, u.rank)):  # a GQA chain's slices stay in rank order
        if count + len(u.ids) <= target:
            chosen.append(u)
            count += len(u.ids)
    return chosen


@dataclass
class Choice:
    """What selection keeps: units (heads and neurons), hidden dims (None: all) and the free chains it chose from."""

    units: list[Unit]
    hidden: list[int] | None
    hidden_scale: float
    free_chains: list[list[Unit]]


class Pool:
    """The selectable units of a model, scored (normalised as asked) and costed, and selection from them."""

    def __init__(self, model: nn.Module, scores, budget: Budget, mode: Normalize, flops_seq: int | None,
                 granularity: Granularity = DEFAULT_GRANULARITY):
        self.budget = budget
        self.mode = mode
        self.granularity = granularity
        per_layer = mode == "per_layer"
        self.head_chains = _head_chains(model, scores, budget.gqa, flops_seq, per_layer)
        self.neuron_chains = _neuron_chains(model, scores, budget.round_to, flops_seq, per_layer)
        self.total_heads = sum(s.num_heads for lay in layer_sites(model) for s in lay.attentions.values())
        self.total_neurons = sum(lay.ffn.width for lay in layer_sites(model))
        self.hidden_now = hidden_size(model)
        self.hidden_scores: list[float] | None = None
        self._hidden_normalized = False
        if scores.hidden is not None or budget.hidden_keep is not None:
            self.hidden_scores = list(scores.hidden or [1.0] * self.hidden_now)
        self.head_units = [u for c in self.head_chains for u in c]
        self.neuron_units = [u for c in self.neuron_chains for u in c]
        self.factors = {"heads": 1.0, "neurons": 1.0}  # what per-kind normalisation multiplied each kind by
        if mode != "none":
            for name, kind in (("heads", self.head_units), ("neurons", self.neuron_units)):
                self.factors[name] = _per_kind(kind)
        # a parameter budget counts the input norms that go with emptied blocks (FLOPs budgets count no norm)
        self.norm_costs = {} if flops_seq else input_norm_costs(model)
        # whole blocks and layers: per layer, its units with what keeping each block and the layer is worth
        self.groups: list[Group] = []
        if granularity != "units":
            self.groups = build_groups(self.head_chains + self.neuron_chains, scores.layers, granularity,
                                       self.norm_costs)
        self.block_of = {id(u): b.key for g in self.groups for b in g.blocks for u in b.units}

    def kept_value(self, units: list[Unit]) -> float:
        """The score a selection keeps: its units' scores; with whole blocks and layers, the loss it avoids
        against removing every layer (see Group.kept_value)."""
        if not self.groups:
            return sum(u.score for u in units)
        kept: dict[str, float] = {}
        block_of = self.block_of
        for u in units:
            key = block_of[id(u)]
            kept[key] = kept.get(key, 0.0) + u.score
        return sum(g.kept_value(kept) for g in self.groups)

    @property
    def norms_per_dim(self) -> float:
        """The input norms of every pre-norm block per hidden dim kept: fixed for a selection that keeps every
        block (units chosen one by one, uniform shapes), carried by the blocks otherwise."""
        return sum(self.norm_costs.values()) / self.hidden_now

    def own_cost(self, units: list[Unit], scale: float) -> float:
        """What the blocks a selection keeps any of cost beyond their units (pre-norm input norms, which surgery
        drops with an emptied block; layer_units.Block), at hidden scale `scale`."""
        return sum(self.norm_costs.get(key, 0.0) for key in {block_key(u) for u in units}) * scale

    def at_scale(self, s: float) -> None:
        for units in (self.head_units, self.neuron_units):
            for u in units:
                u.cost = u.cost_const + u.cost_hidden * s

    def _fixed_counts(self) -> tuple[list[Unit], list[list[Unit]]]:
        """Units a count budget fixes (heads_keep / neurons_keep), and the chains left free."""
        required: list[Unit] = []
        free: list[list[Unit]] = []
        for chains, keep, total in ((self.head_chains, self.budget.heads_keep, self.total_heads),
                                    (self.neuron_chains, self.budget.neurons_keep, self.total_neurons)):
            if keep is None:
                free += chains
            else:
                required += top_count([u for c in chains for u in c], keep, total)
        return required, free

    def _hidden_by_count(self) -> list[int] | None:
        keep = self.budget.hidden_keep
        if keep is None or keep >= 1:
            return None
        return self._best_hidden(max(1, round(keep * self.hidden_now)))

    def _best_hidden(self, n: int) -> list[int] | None:
        if n >= self.hidden_now:
            return None
        order = sorted(range(self.hidden_now), key=lambda i: -self.hidden_scores[i])
        return sorted(order[:n])

    def by_counts(self) -> Choice:
        """Count budgets only: the best structures of each kind, no cost involved."""
        required, free = self._fixed_counts()
        hidden = self._hidden_by_count()
        scale = len(hidden) / self.hidden_now if hidden else 1.0
        return Choice(required + [u for c in free for u in c], hidden, scale, free)

    def by_cost(self, target: float, fixed: tuple[float, float], reference: float) -> Choice:
        """Heads and neurons (and, with prune_hidden, hidden dims) whose cost stays within `target`.

        `fixed`: what no selection of heads and neurons removes (norms, biases, T5's position bias), as a
        constant plus a cost per hidden dim kept. Refuses a target below the least any selection keeps.
        """
        const, per_dim = fixed
        required, free = self._fixed_counts()
        step = max(1, self.budget.round_to)
        if self.budget.prune_hidden:
            if self.hidden_scores is None:
                raise PrunetuneError("pruning hidden dims needs hidden-dim scores: score with hidden=True")
            fewest = min(step, self.hidden_now)
            self.normalize_hidden(per_dim)
        else:
            hidden = self._hidden_by_count()
            fewest = len(hidden) if hidden else self.hidden_now

        def floor(h: int) -> float:  # the least cost at h hidden dims: fixed parts and the fixed-count units
            s = h / self.hidden_now
            return const + per_dim * h + sum(u.at_scale(s) for u in required)

        if target < floor(fewest) - TOLERANCE:
            raise PrunetuneError(
                f"the budget keeps {target / reference:.4g} of the layers' cost, but no selection keeps less than "
                f"{floor(fewest) / reference:.4g} (norms and biases"
                + (", and the structures --heads-keep / --neurons-keep fix" if required else "")
                + "): raise the budget"
            )
        if not self.budget.prune_hidden:
            return self._fill(fewest, target - floor(fewest), required, free)
        return self._search_hidden(target, floor, required, free, fewest, step)

    def normalize_hidden(self, per_dim: float) -> None:
        """Put hidden-dim scores on their cost share when kinds are normalised (once)."""
        if self.mode != "none" and not self._hidden_normalized:
            # a hidden dim owns the hidden side of everything (see Unit)
            owned = sum(u.cost_hidden for u in self.head_units + self.neuron_units) + per_dim * self.hidden_now
            _per_kind([], self.hidden_scores, owned)
            self._hidden_normalized = True

    def _fill(self, h: int, capacity: float, required: list[Unit], free: list[list[Unit]]) -> Choice:
        scale = h / self.hidden_now
        self.at_scale(scale)
        if self.groups:  # the layers' chains depend on the costs, so on the scale
            chains = [layer_chain(g, scale) for g in self.groups]
            chosen = knapsack(chains, capacity)
            free = [c.units() for c in chains]
        else:
            chosen = knapsack(free, capacity)
        hidden = self._best_hidden(h) if (self.budget.prune_hidden or self.budget.hidden_keep is not None) else None
        return Choice(required + chosen, hidden, scale, free)

    def _search_hidden(self, target, floor, required, free, fewest: int, step: int) -> Choice:
        """The hidden size whose best heads and neurons keep the most score.

        Every hidden size h gives an exact knapsack over heads and neurons (their costs scale with h); the
        total kept score (best h hidden dims + chosen units) is maximised over h: a coarse grid, then steps
        halved around the best. At the optimum the last hidden dim's score per marginal cost meets the
        greedy's threshold, which is what ranking hidden dims with the rest means when costs interact.
        """
        ranked = sorted(self.hidden_scores, reverse=True)
        prefix = [0.0]
        for v in ranked:
            prefix.append(prefix[-1] + v)
        memo: dict[int, tuple[float, Choice]] = {}

        def value(h: int) -> float:
            if h not in memo:
                if target < floor(h) - TOLERANCE:
                    memo[h] = (-math.inf, None)
                else:
                    choice = self._fill(h, target - floor(h), required, free)
                    memo[h] = (prefix[h] + self.kept_value(choice.units), choice)
            return memo[h][0]

        def better(h: int) -> tuple[float, int]:  # equal scores: the wider model (fewer odd shapes)
            return value(h), h

        sizes = sorted({*range(fewest, self.hidden_now + 1, step), self.hidden_now})
        stride = max(1, math.ceil(len(sizes) / HIDDEN_GRID))
        best = max(sizes[::stride] + [sizes[-1]], key=better)
        while stride > 1:
            stride = max(1, stride // 2)
            i = sizes.index(best)
            best = max([best] + [sizes[j] for j in (i - stride, i + stride) if 0 <= j < len(sizes)], key=better)
        choice = memo[best][1]
        self.at_scale(choice.hidden_scale)  # the chosen scale's costs stay on the units (plan.select reads them)
        return choice


__all__ = ["DEFAULT_GRANULARITY", "DEFAULT_NORMALIZE", "GRANULARITIES", "NORMALIZE_MODES", "Budget", "Choice",
           "Granularity", "Normalize", "Pool", "Unit", "knapsack", "resolve_granularity", "resolve_normalize",
           "top_count"]
