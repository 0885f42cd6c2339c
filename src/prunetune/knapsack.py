"""The greedy behind selection: units with costs and scores, chains of dependent units, and a knapsack over them.

Nothing here knows about models (selection.py builds the units). Two kinds of chain:

- a plain chain (a list of Units): its units must be kept in order (a GQA layer's per-group slices, the first
  carrying the KV rows); most chains are a single unit;
- a LayerChain: one layer's structures, as pieces (a unit, or a whole block or layer) each with the value
  keeping it adds and the earlier pieces it cannot be kept without (the piece that opens its block or layer,
  whose value carries what keeping the block or layer at all is worth; the previous GQA slice).

Both are cut at the vertices of their upper concave envelope (kept value against cumulative cost), so a
piece that only pays off with the ones after it is judged together with them; the greedy then takes
envelope segments by value per cost, a segment only after those it needs, and fills what is left with the
leading pieces of chains whose next segment did not fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

TOLERANCE = 1e-6  # absolute slack on costs (parameters, FLOPs) for floating-point sums


@dataclass
class Unit:
    """A selectable piece of structure: `ids` are kept together.

    Costs are linear in the fraction of hidden dims kept, s: cost = cost_const + cost_hidden * s; `cost` holds
    the value at the s being evaluated (see selection.Pool.at_scale).
    """

    kind: Literal["heads", "neurons"]
    key: str
    ids: list[int]
    score: float
    cost_const: float
    cost_hidden: float
    # its place among its layer's units of its kind, best first, in [0, 1): on equal score per cost the
    # greedy takes every layer's best before any layer's second best (flat scores prune layers evenly)
    rank: float = 0.0
    cost: float = field(default=0.0, compare=False)

    def at_scale(self, s: float) -> float:
        return self.cost_const + self.cost_hidden * s


@dataclass
class LayerChain:
    """One layer's structures in the order the greedy should meet them (see selection.layer_chain).

    pieces[i] is kept or dropped as one; values[i] is what keeping it adds to the kept score (its units' scores,
    plus the bonus of the block or layer it opens); needs[i] lists the earlier pieces it cannot be kept without.
    The envelope segments (parallel lists: segment s spans pieces bounds[s] to bounds[s + 1]) are cut from
    these when not given (selection.layer_chain cuts them itself, faster).
    """

    pieces: list[list[Unit]]
    values: list[float]
    costs: list[float]
    needs: list[tuple[int, ...]]
    bounds: list[int] = field(default_factory=list)
    seg_value: list[float] = field(default_factory=list)
    seg_cost: list[float] = field(default_factory=list)
    seg_needs: list[tuple[int, ...]] = field(default_factory=list)  # the earlier segments each needs

    def __post_init__(self) -> None:
        if not self.bounds:
            self.cut()

    def cut(self) -> None:
        """The envelope segments, from the pieces."""
        cuts = envelope(self.values, self.costs, self.needs)
        seg_of = [0] * len(self.pieces)
        for s, (a, b) in enumerate(cuts):
            seg_of[a:b] = [s] * (b - a)
        self.bounds = [a for a, _ in cuts] + [len(self.pieces)]
        self.seg_value = [sum(self.values[a:b]) for a, b in cuts]
        self.seg_cost = [sum(self.costs[a:b]) for a, b in cuts]
        self.seg_needs = [tuple(sorted({seg_of[j] for k in range(a, b) for j in self.needs[k]} - {s}))
                          for s, (a, b) in enumerate(cuts)]

    def units(self) -> list[Unit]:
        return [u for p in self.pieces for u in p]


def ratio(value: float, cost: float) -> float:
    return value / cost if cost > 0 else math.inf


def envelope(values: Sequence[float], costs: Sequence[float],
             needs: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Pieces in a fixed order cut at the vertices of their upper concave envelope: (start, end) ranges.

    A piece joins the segment before it when its value per cost is higher, or equal and it needs a piece of
    that segment; so segments have non-increasing ratios, strictly decreasing along every dependency (the
    greedy meets a segment after those it needs) while independent pieces of equal ratio stay apart.
    """
    stack: list[list] = []  # [start, end, value, cost]
    for i in range(len(values)):
        start, end, v, c = i, i + 1, values[i], costs[i]
        while stack:
            ps, pe, pv, pc = stack[-1]
            r0, r1 = ratio(pv, pc), ratio(v, c)
            if r0 < r1 or (r0 == r1 and any(ps <= j < pe for k in range(start, end) for j in needs[k])):
                stack.pop()
                start, v, c = ps, pv + v, pc + c
            else:
                break
        stack.append([start, end, v, c])
    return [(s[0], s[1]) for s in stack]


def segments(chain: list[Unit]) -> list[tuple[float, float, list[Unit]]]:
    """A plain chain's envelope segments: (value, cost, units). Each unit needs the one before it."""
    values = [u.score for u in chain]
    costs = [u.cost for u in chain]
    cuts = envelope(values, costs, [() if i == 0 else (i - 1,) for i in range(len(chain))])
    return [(sum(values[a:b]), sum(costs[a:b]), chain[a:b]) for a, b in cuts]


def knapsack(chains: Sequence[list[Unit] | LayerChain], capacity: float) -> list[Unit]:
    """Greedy by value per cost over envelope segments; what is left is filled with the leading pieces of
    chains whose next segment did not fit (after the main pass, so they never displace a better one)."""
    # one item per envelope segment, in parallel lists (a tuple per item made the garbage collector sweep the
    # whole heap: a decoder has ~10^5 neurons, and the hidden search runs this some 40 times)
    ratios: list[float] = []
    rank: list[float] = []
    cost: list[float] = []
    chain_of: list[int] = []
    start: list[int] = []  # position of the item's first unit (plain chains) or its segment (LayerChain)
    members: list[list[Unit]] = []
    needs: list[tuple[int, ...]] = []
    first_item: dict[int, int] = {}  # LayerChain -> its first item
    for ci, chain in enumerate(chains):
        if isinstance(chain, LayerChain):
            first_item[ci] = len(members)
            _layer_items(chain, ci, ratios, rank, cost, chain_of, start, members, needs)
            continue
        if len(chain) == 1:  # most chains (neurons, MHA heads): no envelope to compute
            u = chain[0]
            ratios.append(ratio(u.score, u.cost))
            rank.append(u.rank)
            cost.append(u.cost)
            chain_of.append(ci)
            start.append(0)
            members.append(chain)
            needs.append(())
            continue
        at = 0
        for k, (value, seg_cost, units) in enumerate(segments(chain)):
            ratios.append(ratio(value, seg_cost))
            rank.append(units[0].rank)
            cost.append(seg_cost)
            chain_of.append(ci)
            start.append(at)
            members.append(units)
            needs.append(() if k == 0 else (len(members) - 2,))
            at += len(units)
    # best ratio first, then the better-ranked unit; a segment comes after those it needs (higher ratio, or equal
    # ratio and no better rank, see _layer_items; lexsort is stable)
    order = np.lexsort((np.asarray(rank), -np.asarray(ratios))).tolist()
    needed = [False] * len(members)  # whether a later item needs it
    for wanted in needs:
        for j in wanted:
            needed[j] = True
    chosen: list[Unit] = []
    taken = [False] * len(members)
    spent = 0.0
    blocked: dict[int, int] = {}  # chain -> start of its first item that did not fit (insertion = ratio order)
    for i in order:
        if not all(taken[j] for j in needs[i]):
            continue
        if spent + cost[i] <= capacity + TOLERANCE:
            chosen += members[i]
            spent += cost[i]
            taken[i] = True
        elif needed[i] or len(members[i]) > 1:
            # a lone unit that does not fit now never will; a segment's leading units, or what needs it, may
            blocked.setdefault(chain_of[i], start[i])
    for ci, at in blocked.items():
        chain = chains[ci]
        if isinstance(chain, LayerChain):
            have = [False] * len(chain.pieces)
            first = first_item[ci]
            for s in range(len(chain.seg_value)):
                if taken[first + s]:
                    have[chain.bounds[s]:chain.bounds[s + 1]] = [True] * (chain.bounds[s + 1] - chain.bounds[s])
            added, spent = _fill_layer(chain, have, capacity, spent)
            chosen += added
            continue
        for u in chain[at:]:
            if spent + u.cost > capacity + TOLERANCE:
                break
            chosen.append(u)
            spent += u.cost
    return chosen


def _layer_items(chain: LayerChain, ci: int, ratios, rank, cost, chain_of, start, members, needs) -> None:
    """Append a LayerChain's envelope segments as knapsack items (the parallel lists of knapsack)."""
    base = len(members)
    bounds, pieces, seg_needs = chain.bounds, chain.pieces, chain.seg_needs
    n = len(chain.seg_value)
    value, seg_cost = np.asarray(chain.seg_value), np.asarray(chain.seg_cost)
    ratios += np.where(seg_cost > 0, value / np.where(seg_cost > 0, seg_cost, 1.0), np.inf).tolist()
    cost += chain.seg_cost
    chain_of += [ci] * n
    start += range(n)
    members += [pieces[a] if b == a + 1 else [u for p in pieces[a:b] for u in p]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # on equal ratio the rank decides the order: never before a segment it needs (needs come earlier)
    first = [pieces[a][0].rank for a in bounds[:-1]]
    for s, wanted in enumerate(seg_needs):
        for j in wanted:
            if first[j] > first[s]:
                first[s] = first[j]
    rank += first
    needs += [tuple(base + j for j in w) if w else () for w in seg_needs]


def _fill_layer(chain: LayerChain, have: list[bool], capacity: float, spent: float) -> tuple[list[Unit], float]:
    """The pieces of a layer that still fit, in chain order, each only after those it needs.

    A piece may add a negative value here (it opens a block whose bonus is negative: its block score is below
    its units' sum); it is kept all the same: removing part of a structure is taken to lose no more than
    removing all of it (the loss is monotone in what is removed, whatever a second-order estimate says), so
    keeping more never loses value and the budget is spent.
    """
    added: list[Unit] = []
    for k, piece in enumerate(chain.pieces):
        if have[k] or not all(have[j] for j in chain.needs[k]):
            continue
        if spent + chain.costs[k] <= capacity + TOLERANCE:
            have[k] = True
            added += piece
            spent += chain.costs[k]
    return added, spent


__all__ = ["TOLERANCE", "LayerChain", "Unit", "envelope", "knapsack", "ratio", "segments"]
