"""Whole attention blocks, FFN blocks and layers as units of selection (``Budget.granularity``).

Removing a block whole loses its block score B (``Scores.layers["decoder.3/self"]``, ``"decoder.3/ffn"``),
not the sum S of its units' scores: the block's estimate has the terms between units (Fisher's off-diagonal
ones). Removing a layer whole loses the layer's score, not its blocks' sum. So per layer the choice is a tree:
keep the layer at all (worth layer score - sum of block scores), keep each block at all (B - S), then its
heads or neurons (their scores). A kept set of a block then scores (B - S) + sum(kept) = B - (loss of what
it removes): the loss avoided, on the scale of the units' scores, which is what the knapsack maximises.

Each "keep at all" bonus is carried by the first piece of its block or layer, which every other piece of it
needs (knapsack.LayerChain); a negative bonus merges that piece with the best ones after it (the envelope), a
positive one puts it first. A layer's blocks are merged into one chain by value per cost (Horn's rule for
trees), and the greedy and its fill work on that chain: exact on the budget as for units, since every piece's
cost is the exact cost of its units (removing a block = keeping none of its heads, which the engine supports;
in pre-norm stacks the block's input norm goes with it, a cost the block's first piece carries, so a layer
emptied whole costs nothing, as ShortGPT's dropped layers do). Where a block's score equals its units' sum (and
a layer's its blocks') and it owns no norm, nothing is anchored and "mixed" gives the plan "units" gives.

- "units": heads, neuron groups, hidden dims (the default; block scores are not read);
- "blocks": whole attention and FFN blocks only, kept or removed as one;
- "layers": whole layers only (ShortGPT's layer dropping, with block_influence or any whole-layer score);
- "mixed": all of these, ranked together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from prunetune.errors import PrunetuneError
from prunetune.knapsack import LayerChain, Unit, envelope

# What a cost budget may remove: "units" (heads, FFN neuron groups, hidden dims), "blocks" (whole attention and
# FFN blocks), "layers" (whole layers), "mixed" (units, blocks and layers, ranked together).
Granularity = Literal["units", "blocks", "layers", "mixed"]
GRANULARITIES: tuple[str, ...] = ("units", "blocks", "layers", "mixed")
DEFAULT_GRANULARITY: Granularity = "units"
# a block's (layer's) bonus smaller than this share of its scores counts as none: it then orders nothing
BONUS_EPS = 1e-9


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
    # what the block costs beyond its units, at the current hidden size (all of it scales with the hidden
    # size): the input norm of a pre-norm sublayer, which goes when the block is emptied. Carried by the
    # block's first piece, which every other piece then needs.
    own_hidden: float = 0.0

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
        return _anchored(self.score, self.parts) or self.own_hidden > 0


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


def build_groups(chains: list[list[Unit]], layers: dict[str, float], granularity: Granularity,
                 own: dict[str, float] | None = None) -> list[Group]:
    """The layers' groups, from the unit chains and the whole-structure scores (Scores.layers); `own`: what each
    block costs beyond its units (costs.input_norm_costs; none under a FLOPs budget)."""
    own = own or {}
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
            blocks.append(Block(key, units, chained, score, parts, granularity == "blocks", own.get(key, 0.0)))
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
    own = block.own_hidden * scale
    if block.whole:
        return _Runs([block.units], np.array([block.score]), np.array([costs.sum() + own]), [0], False)
    pieces, scores = block.singles, block.scores
    n = len(pieces)
    if not block.chained:  # independent units, best value per cost first (the better rank on ties)
        order = np.lexsort((block.ranks, -(scores / costs)))
        pieces, scores, costs = [pieces[i] for i in order], scores[order], costs[order]
    values = scores.copy()
    costs[0] += own  # the opening piece carries what the block costs beyond its units
    if block.anchored:
        values[0] += block.bonus
    if block.chained:
        starts = [a for a, _ in envelope(values.tolist(), costs.tolist(), [(i - 1,) if i else () for i in range(n)])]
    elif block.anchored and (block.bonus < 0 or own > 0):
        # the opening unit is worth less per cost: judged with the best that follow
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
        cost = sum(float((b.cost_const + b.cost_hidden * scale).sum()) + b.own_hidden * scale for b in group.blocks)
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


__all__ = ["DEFAULT_GRANULARITY", "GRANULARITIES", "Block", "Granularity", "Group", "block_key", "build_groups",
           "layer_chain"]
