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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import nn

from prunetune.costs import head_costs, neuron_cost
from prunetune.errors import PrunetuneError
from prunetune.families import hidden_size, layer_sites
from prunetune.knapsack import TOLERANCE, LayerChain, Unit, envelope, knapsack

Normalize = Literal["none", "per_kind", "per_layer"]
NORMALIZE_MODES: tuple[str, ...] = ("none", "per_kind", "per_layer")
DEFAULT_NORMALIZE: Normalize = "none"  # scores of one scorer share a unit: compare them as they are
HIDDEN_GRID = 24  # hidden sizes tried in the coarse pass of the hidden search (then refined by halving)

# What a cost budget may remove: "units" (heads, FFN neuron groups, hidden dims), "blocks" (whole attention and
# FFN blocks), "layers" (whole layers), "mixed" (units, blocks and layers, ranked together).
Granularity = Literal["units", "blocks", "layers", "mixed"]
GRANULARITIES: tuple[str, ...] = ("units", "blocks", "layers", "mixed")
DEFAULT_GRANULARITY: Granularity = "units"
# a block's (layer's) bonus smaller than this share of its scores counts as none: it then orders nothing
BONUS_EPS = 1e-9


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


def _per_kind(units: list[Unit], scores: list[float] | None = None, total_cost: float | None = None) -> None:
    """Rescale a kind so an average unit's score equals its cost share (in place; `scores` for hidden dims)."""
    total_s = sum(u.score for u in units) if scores is None else sum(scores)
    total_c = sum(u.cost_const + u.cost_hidden for u in units) if total_cost is None else total_cost
    if total_s <= 0 or total_c <= 0:
        return
    if scores is None:
        for u in units:
            u.score = u.score / total_s * total_c
    else:
        scores[:] = [v / total_s * total_c for v in scores]


def _head_chains(model: nn.Module, scores, gqa: str, flops_seq: int | None, per_layer: bool) -> list[list[Unit]]:
    chains: list[list[Unit]] = []
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if not site.num_heads:
                continue
            s = list(scores.heads.get(site.key, [1.0] * site.num_heads))
            if per_layer:
                s = _l2(s)
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
        s = list(scores.neurons.get(lay.key, [1.0] * n))
        if per_layer:
            s = _l2(s)
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


# ---------------------------------------------------------------------------------------------------------
# Whole blocks and layers (granularities "blocks", "layers", "mixed")
# ---------------------------------------------------------------------------------------------------------


def block_key(u: Unit) -> str:
    """The block a unit belongs to, as Scores.layers names it: the attention site, or "<layer>/ffn"."""
    return u.key if u.kind == "heads" else f"{u.key}/ffn"


def _anchored(whole: float, parts: float) -> bool:
    """Whether a structure's score differs from its parts' sum at all (then keeping it at all is worth something
    of its own, and its parts can only be valued after the piece that opens it)."""
    return abs(whole - parts) > BONUS_EPS * max(abs(whole), abs(parts))


@dataclass
class Block:
    """An attention block or FFN block: its units as selection builds them, and what removing it whole loses.

    The loss of removing the whole block is its block score B (Scores.layers), not the sum S of its units'
    scores (the block's estimate has the terms between units): keeping any of it is worth `bonus` = B - S on
    top of the units kept, so a kept set K scores bonus + sum(K) = B - (S - sum(K)), the loss avoided.
    """

    key: str
    units: list[Unit]  # a GQA site's per-group slices in chain order (`chained`), else in any order
    chained: bool  # each unit needs the one before it (GQA per-group slices, the first carrying the KV rows)
    score: float  # B: the loss of removing it whole
    parts: float  # S: its units' scores summed
    whole: bool  # kept or dropped as one (granularity "blocks")

    def __post_init__(self) -> None:
        # what layer_chain reads at every hidden size the search tries, as arrays once
        self.singles = [[u] for u in self.units]
        self.scores = np.array([u.score for u in self.units])
        self.ranks = np.array([u.rank for u in self.units])
        self.cost_const = np.array([u.cost_const for u in self.units])
        self.cost_hidden = np.array([u.cost_hidden for u in self.units])

    @property
    def bonus(self) -> float:
        return self.score - self.parts

    @property
    def anchored(self) -> bool:
        return _anchored(self.score, self.parts)


@dataclass
class Group:
    """A layer's blocks, and the loss of removing the layer whole (its score; not the sum of its blocks')."""

    key: str
    blocks: list[Block]
    score: float
    whole: bool  # kept or dropped as one (granularity "layers")

    @property
    def bonus(self) -> float:
        return self.score - sum(b.score for b in self.blocks)

    @property
    def anchored(self) -> bool:
        return _anchored(self.score, sum(b.score for b in self.blocks))

    def kept_value(self, kept: dict[str, float]) -> float:
        """The loss avoided by keeping, of each block, units whose scores sum to kept[block key] (a block
        missing from `kept` is removed), against removing the layer whole. Removing part of a structure is
        taken to lose no more than removing all of it: the estimate is capped by the block's and the layer's
        (second-order estimates need not be monotone; the loss is)."""
        if not any(b.key in kept for b in self.blocks):
            return 0.0
        loss = sum(min(b.score, b.parts - kept[b.key]) if b.key in kept else b.score for b in self.blocks)
        return max(0.0, self.score - loss)


def build_groups(chains: list[list[Unit]], layers: dict[str, float], granularity: Granularity) -> list[Group]:
    """The layers' groups, from the unit chains and the whole-structure scores (Scores.layers)."""
    by_block: dict[str, list[list[Unit]]] = {}
    for chain in chains:
        by_block.setdefault(block_key(chain[0]), []).append(chain)
    by_layer: dict[str, list[str]] = {}
    for key in by_block:
        by_layer.setdefault(key.split("/")[0], []).append(key)
    needed = set(by_layer) if granularity == "layers" else set(by_block)
    missing = sorted(needed - set(layers))
    if missing:
        what = "whole-layer" if granularity == "layers" else "attention-block and FFN-block"
        raise PrunetuneError(
            f"granularity {granularity!r} needs {what} scores (Scores.layers), which these scores lack for "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: score with fisher, taylor or head_grad"
            + (" (or block_influence)" if granularity == "layers" else "")
        )
    groups = []
    for lay, keys in by_layer.items():
        blocks = []
        for key in keys:
            units = [u for c in by_block[key] for u in c]
            parts = sum(u.score for u in units)
            # "layers" values a layer by its own score alone: its blocks' scores, if any, change nothing
            score = parts if granularity == "layers" else layers[key]
            chained = len(by_block[key]) == 1 and len(units) > 1
            blocks.append(Block(key, units, chained, score, parts, granularity == "blocks"))
        # a layer without a score of its own: removing it is removing its blocks
        score = layers.get(lay, sum(b.score for b in blocks))
        groups.append(Group(lay, blocks, score, granularity == "layers"))
    return groups


def _last_argmax_prefix(values: np.ndarray, costs: np.ndarray) -> int:
    """The longest prefix with the highest value per cost: where the envelope's first segment ends (when every
    later piece needs the first and the later ones come best first)."""
    r = np.cumsum(values) / np.cumsum(costs)
    return len(r) - 1 - int(np.argmax(r[::-1]))


@dataclass
class _Runs:
    """A block's pieces in the order the greedy should meet them, and its envelope segments ("runs")."""

    pieces: list[list[Unit]]
    values: np.ndarray
    costs: np.ndarray
    starts: list[int]  # where each run starts
    chained: bool  # GQA slices: each piece needs the one before it


def _block_runs(block: Block, scale: float) -> _Runs:
    costs = block.cost_const + block.cost_hidden * scale  # as Unit.at_scale, elementwise
    if block.whole:
        return _Runs([block.units], np.array([block.score]), np.array([costs.sum()]), [0], False)
    pieces, scores = block.singles, block.scores
    n = len(pieces)
    if not block.chained:  # independent units, best value per cost first (the better rank on ties)
        order = np.lexsort((block.ranks, -(scores / costs)))
        pieces, scores, costs = [pieces[i] for i in order], scores[order], costs[order]
    values = scores.copy()
    if block.anchored:
        values[0] += block.bonus
    if block.chained:
        starts = [a for a, _ in envelope(values.tolist(), costs.tolist(), [(i - 1,) if i else () for i in range(n)])]
    elif block.anchored and block.bonus < 0:  # the opening unit is worth less: judged with the best that follow
        starts = [0, *range(_last_argmax_prefix(values, costs) + 1, n)]
    else:
        starts = list(range(n))
    return _Runs(pieces, values, costs, starts, block.chained)


def layer_chain(group: Group, scale: float) -> LayerChain:
    """A layer as one chain at the costs of hidden scale `scale`: each block's pieces cut at their envelope, the
    segments of all blocks merged by value per cost (a block's own keep their order), the layer's bonus carried by
    the first piece. This is Horn's linearisation of the layer's tree (layer -> blocks -> units) for the greedy.

    The segments are cut here rather than by LayerChain.cut (same result): a block's units after its first
    segment come best first, so only the first segments can merge (numpy over ~10^3 pieces a layer, for each
    hidden size the search tries).
    """
    if group.whole:
        units = [u for b in group.blocks for u in b.units]
        cost = sum(float((b.cost_const + b.cost_hidden * scale).sum()) for b in group.blocks)
        return LayerChain([units], [group.score], [cost], [()])
    blocks = [_block_runs(b, scale) for b in group.blocks]
    sizes = np.array([len(r.pieces) for r in blocks])
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # each block's first piece, blocks in order
    n_runs = np.array([len(r.starts) for r in blocks])
    run_offset = np.concatenate([[0], np.cumsum(n_runs)[:-1]])
    values = np.concatenate([r.values for r in blocks])
    costs = np.concatenate([r.costs for r in blocks])
    run_lo = np.concatenate([np.asarray(r.starts) + o for r, o in zip(blocks, offset, strict=True)])
    run_hi = np.concatenate([np.asarray([*r.starts[1:], len(r.pieces)]) + o for r, o in zip(blocks, offset,
                                                                                               strict=True)])
    run_value = np.add.reduceat(values, run_lo)
    run_cost = np.add.reduceat(costs, run_lo)
    order = np.argsort(-(run_value / run_cost), kind="stable")  # a block's runs keep their order
    bonus = group.bonus if group.anchored else 0.0
    run_value[order[0]] += bonus
    merged = _last_argmax_prefix(run_value[order], run_cost[order]) if bonus < 0 else 0  # runs in segment 0
    # pieces in the chain's order
    lengths = run_hi[order] - run_lo[order]
    perm = np.repeat(run_lo[order] - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))  # piece (blocks in order) -> its place in the chain
    flat = [p for r in blocks for p in r.pieces]
    chain_values = values[perm]
    chain_values[0] += bonus
    needs: list[tuple[int, ...]] = [()] * len(perm)
    # segments: the first `merged + 1` sorted runs make segment 0, every other run is a segment of its own
    seg_of_run = np.empty(len(order), dtype=np.int64)
    seg_of_run[order] = np.maximum(np.arange(len(order)) - merged, 0)
    seg_needs: list[tuple[int, ...]] = [()] * (len(order) - merged)
    layer_need = (0,) if group.anchored else ()
    for b, (block, runs) in enumerate(zip(group.blocks, blocks, strict=True)):
        first = int(where[offset[b]])
        first_seg = int(seg_of_run[run_offset[b]])
        anchor = (first,) if block.anchored else ()
        anchor_seg = (first_seg,) if block.anchored else ()
        if first:
            needs[first] = layer_need
        if first_seg:
            seg_needs[first_seg] = layer_need
        shared = tuple(sorted({*layer_need, *anchor}))
        shared_seg = tuple(sorted({*layer_need, *anchor_seg}))
        for i in range(1, sizes[b]):
            at = int(where[offset[b] + i])
            needs[at] = tuple(sorted({*shared, int(where[offset[b] + i - 1])})) if runs.chained else shared
        for j in range(1, n_runs[b]):
            seg = int(seg_of_run[run_offset[b] + j])
            if seg:
                wanted = {*shared_seg, int(seg_of_run[run_offset[b] + j - 1])} if runs.chained else set(shared_seg)
                seg_needs[seg] = tuple(sorted(wanted - {seg}))
    sorted_value, sorted_cost = run_value[order], run_cost[order]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return LayerChain(
        [flat[i] for i in perm], chain_values.tolist(), costs[perm].tolist(), needs,
        bounds=[0, *bounds[merged + 1:].tolist()],
        seg_value=[float(sorted_value[: merged + 1].sum()), *sorted_value[merged + 1:].tolist()],
        seg_cost=[float(sorted_cost[: merged + 1].sum()), *sorted_cost[merged + 1:].tolist()],
        seg_needs=seg_needs,
    )


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
        if scores.hidden is not None or budget.hidden_keep is not None:
            self.hidden_scores = list(scores.hidden or [1.0] * self.hidden_now)
        self.head_units = [u for c in self.head_chains for u in c]
        self.neuron_units = [u for c in self.neuron_chains for u in c]
        if mode != "none":
            for kind in (self.head_units, self.neuron_units):
                _per_kind(kind)
        # whole blocks and layers: per layer, its units with what keeping each block and the layer is worth
        self.groups: list[Group] = []
        if granularity != "units":
            self.groups = build_groups(self.head_chains + self.neuron_chains, scores.layers, granularity)
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
            if self.mode != "none":  # a hidden dim owns the hidden side of everything (see Unit)
                owned = sum(u.cost_hidden for u in self.head_units + self.neuron_units) + per_dim * self.hidden_now
                _per_kind([], self.hidden_scores, owned)
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


__all__ = ["DEFAULT_GRANULARITY", "DEFAULT_NORMALIZE", "GRANULARITIES", "NORMALIZE_MODES", "Block", "Budget", "Choice",
           "Granularity", "Group", "Normalize", "Pool", "Unit", "build_groups", "knapsack", "layer_chain",
           "resolve_granularity", "resolve_normalize", "top_count"]
