"""Uniform selection (``Budget.uniform``): one shape for every layer, so that a stock config describes the model.

A stock config states one number of query heads, of KV heads and of FFN neurons for all layers (and one hidden
size), so ``--uniform`` chooses those counts globally; each layer then keeps its own best heads and neurons (which
ones may differ between layers, only the counts may not). The counts are searched exhaustively: for every
hidden size allowed and every (KV groups, query heads per group) pair, the FFN gets the widest multiple of
``round_to`` that still fits the budget, and the shape keeping the most score wins (equal scores: the costlier,
that is the one closest to the budget). With GQA the query heads stay an equal number per KV group, so the
number of attention heads is a multiple of the number of KV heads, as stock configs need.

Where a family states its head size in the config (LLaMA/Mistral/Qwen2 ``head_dim``, T5 ``d_kv``), only shapes for
which transformers builds a stock config are tried (LLaMA's config wants the hidden size to be a multiple of the
number of heads). BERT and RoBERTa derive the head size from hidden / heads, so no stock config has fewer heads of
the original size: there, uniform shapes with pruned heads (or hidden dims) are still chosen when the budget asks
for them, and the export says it needs prunetune and why (families.stock_config).

T5's layers all read the relative position bias that layer 0 computes, one row per head: a stock T5 pairs
head j of every layer with row j of layer 0's table, so in a stock export every layer of a stack keeps the same
heads. The sites that share such a table are therefore chosen together (by their summed scores).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunetune.costs import head_costs, neuron_cost
from prunetune.errors import PrunetuneError
from prunetune.families import family_of, get, layer_sites, stock_config, unwrap
from prunetune.knapsack import TOLERANCE, Unit
from prunetune.selection import Budget, Pool, site_scores


@dataclass(frozen=True)
class Shape:
    """Per attention site: `kv` KV groups of `per_group` query heads; per layer `neurons`; `hidden` dims."""

    kv: int
    per_group: int
    neurons: int
    hidden: int

    @property
    def heads(self) -> int:
        return self.kv * self.per_group


@dataclass
class Candidate:
    shape: Shape
    value: float
    cost: float
    units: list[Unit]
    hidden: list[int] | None


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


class UniformPool:
    """The scored structures of a model seen as uniform counts: per count, what every layer keeps and its cost."""

    def __init__(self, model: nn.Module, pool: Pool, scores, budget: Budget, flops_seq: int | None):
        self.model, self.pool, self.budget, self.flops_seq = model, pool, budget, flops_seq
        self.fam = family_of(unwrap(model))
        self.config = unwrap(model).config
        per_layer = pool.mode == "per_layer"
        layers = layer_sites(model)
        self.sites = [s for lay in layers for s in lay.attentions.values() if s.num_heads]
        self.ffns = [lay.ffn for lay in layers if lay.ffn.width]
        if not self.sites and not self.ffns:
            raise PrunetuneError("--uniform: the model has no heads or FFN neurons left")
        fh, fn = pool.factors["heads"], pool.factors["neurons"]
        self.head_scores = {s.key: [v * fh for v in site_scores(scores, s, per_layer)] for s in self.sites}
        self.neuron_order, self.neuron_prefix = {}, {}
        for f in self.ffns:
            s = [v * fn for v in site_scores(scores, f, per_layer)]
            order = sorted(range(f.width), key=lambda i: -s[i])
            self.neuron_order[f.key] = order
            self.neuron_prefix[f.key] = _prefix([s[i] for i in order])
        self.group_size = min((self._group(s) for s in self.sites), default=1)
        self.kv_max = min((s.num_heads // self._group(s) for s in self.sites), default=0)
        self.width_max = min((f.width for f in self.ffns), default=0)
        self.head_dim = self.sites[0].head_dim if self.sites else 0
        self.shared = self._shared_sets()
        # costs are linear in the hidden scale s: (at s = 0, per unit of s), summed over the sites / layers
        q = [head_costs(s, 0.0, flops_seq) for s in self.sites]
        q1 = [head_costs(s, 1.0, flops_seq) for s in self.sites]
        self.q_cost = (sum(a for a, _ in q), sum(a for a, _ in q1) - sum(a for a, _ in q))
        self.kv_cost = (sum(b for _, b in q), sum(b for _, b in q1) - sum(b for _, b in q))
        n0 = sum(neuron_cost(f, 0.0, flops_seq) for f in self.ffns)
        self.n_cost = (n0, sum(neuron_cost(f, 1.0, flops_seq) for f in self.ffns) - n0)
        self._stock: dict[tuple[int, int, int], bool | str] = {}
        self._heads: dict[tuple[int, int], tuple[float, dict[str, list[int]]]] = {}

    def _group(self, site) -> int:
        return site.group_size if site.spec.kv_groups_attr else 1

    def _shared_sets(self) -> dict[str, list]:
        """Sites that must keep the same heads: a stack's blocks of one kind reading layer 0's position-bias table."""
        source = self.fam.position_bias_source
        groups: dict[str, list] = {}
        if not source:
            return groups
        for s in self.sites:
            if s.spec.position_bias:
                groups.setdefault(f"{s.key.split('.')[0]}/{s.spec.name}", []).append(s)
        return {k: v for k, v in groups.items()
                if get(v[0].module, source) is not None and len({s.num_heads for s in v}) == 1}

    # -- what each count keeps ------------------------------------------------------------------------------

    def heads_kept(self, kv: int, per_group: int) -> tuple[float, dict[str, list[int]]]:
        """The score kept and the heads every site keeps with `kv` groups of `per_group` query heads."""
        if (kv, per_group) in self._heads:
            return self._heads[(kv, per_group)]
        value, kept = 0.0, {}
        in_shared = set()
        for sites in self.shared.values():
            summed = [sum(self.head_scores[s.key][h] for s in sites) for h in range(sites[0].num_heads)]
            top = sorted(sorted(range(len(summed)), key=lambda h: -summed[h])[: kv * per_group])
            for s in sites:
                kept[s.key] = top
                in_shared.add(s.key)
            value += sum(summed[h] for h in top)
        for site in self.sites:
            if site.key in in_shared:
                continue
            s, g = self.head_scores[site.key], self._group(site)
            groups = []
            for j in range(site.num_heads // g):
                best = sorted(range(j * g, (j + 1) * g), key=lambda h: -s[h])[:per_group]
                groups.append((sum(s[h] for h in best), best))
            groups.sort(key=lambda t: -t[0])
            kept[site.key] = sorted(h for _, best in groups[:kv] for h in best)
            value += sum(v for v, _ in groups[:kv])
        self._heads[(kv, per_group)] = (value, kept)
        return value, kept

    def head_shapes(self) -> list[tuple[int, int]]:
        """(KV groups, query heads per group) pairs: every count up to the fewest any site has, whole groups only
        under gqa="whole_group", and only the count a --heads-keep budget gives."""
        if not self.sites:
            return [(0, 0)]
        per = [self.group_size] if self.budget.gqa == "whole_group" else range(1, self.group_size + 1)
        shapes = [(kv, r) for kv in range(1, self.kv_max + 1) for r in per]
        keep = self.budget.heads_keep
        if keep is not None:
            total = sum(s.num_heads for s in self.sites)
            wanted = (round(keep * total) if keep <= 1 else int(keep)) / len(self.sites)
            fit = [(kv, r) for kv, r in shapes if kv * r <= wanted + 1e-9] or [min(shapes, key=lambda t: t[0] * t[1])]
            most = max(kv * r for kv, r in fit)
            shapes = [(kv, r) for kv, r in fit if kv * r == most]
        return shapes

    def neuron_counts(self) -> list[int]:
        """FFN widths allowed: multiples of round_to up to the narrowest layer's width, and that width."""
        if not self.ffns:
            return [0]
        step = max(1, self.budget.round_to)
        counts = sorted({*range(step, self.width_max + 1, step), self.width_max})
        keep = self.budget.neurons_keep
        if keep is not None:
            total = sum(f.width for f in self.ffns)
            wanted = (round(keep * total) if keep <= 1 else int(keep)) / len(self.ffns)
            counts = [max([n for n in counts if n <= wanted + 1e-9] or counts[:1])]
        return counts

    def hidden_sizes(self) -> list[int]:
        now, step = self.pool.hidden_now, max(1, self.budget.round_to)
        if self.budget.prune_hidden:
            return sorted({*range(step, now + 1, step), now})
        keep = self.budget.hidden_keep
        return [max(1, round(keep * now))] if keep is not None and keep < 1 else [now]

    def stock(self, kv: int, per_group: int, hidden: int) -> bool | str:
        """True when a stock config builds these shapes, else the reason (cached; the FFN width is free)."""
        key = (kv, per_group, hidden)
        if key not in self._stock:
            counts = {"hidden": hidden, "heads": kv * per_group, "ffn": max(self.width_max, 1),
                      "kv_heads": kv, "head_dim": self.head_dim}
            if not self.sites:
                self._stock[key] = "no attention head is left"
            else:
                made = stock_config(self.config, counts)
                self._stock[key] = True if not isinstance(made, str) else made
        return self._stock[key]

    # -- choosing -------------------------------------------------------------------------------------------

    def _hidden_value(self, h: int) -> tuple[float, list[int] | None]:
        if h >= self.pool.hidden_now:
            return 0.0, None
        scores = self.pool.hidden_scores
        order = sorted(range(self.pool.hidden_now), key=lambda i: -scores[i])[:h]
        return sum(scores[i] for i in order), sorted(order)

    def candidate(self, shape: Shape) -> Candidate:
        s = shape.hidden / self.pool.hidden_now
        value, heads = self.heads_kept(shape.kv, shape.per_group) if self.sites else (0.0, {})
        units = [Unit("heads", k, ids, 0.0, 0.0, 0.0) for k, ids in heads.items()]
        for f in self.ffns:
            value += self.neuron_prefix[f.key][shape.neurons]
            units.append(Unit("neurons", f.key, sorted(self.neuron_order[f.key][: shape.neurons]), 0.0, 0.0, 0.0))
        hidden_value, hidden = self._hidden_value(shape.hidden)
        cost = (shape.heads * (self.q_cost[0] + s * self.q_cost[1])
                + shape.kv * (self.kv_cost[0] + s * self.kv_cost[1])
                + shape.neurons * (self.n_cost[0] + s * self.n_cost[1]))
        if not self.budget.prune_hidden:
            hidden_value = 0.0  # a fixed hidden size: the same for every candidate
        return Candidate(shape, value + hidden_value, cost, units, hidden)

    def _valid(self, kv: int, r: int, h: int) -> bool:
        # families that state their head size in the config: stay within what a stock config can say
        return not (self.fam.config.head_dim and self.stock(kv, r, h) is not True)

    def by_counts(self) -> list[Candidate]:
        """Count budgets only: the largest allowed counts of each kind."""
        h = self.hidden_sizes()[0]
        shapes = [(kv, r) for kv, r in self.head_shapes() if self._valid(kv, r, h)] or self.head_shapes()
        n = self.neuron_counts()[-1]
        best = max((self.candidate(Shape(kv, r, n, h)) for kv, r in shapes), key=lambda c: c.value)
        return [best]

    def by_cost(self, target: float, fixed: tuple[float, float]) -> list[Candidate]:
        """Every shape within `target` (with the FFN as wide as fits), best first: most score kept, then cost."""
        const, per_dim = fixed
        if self.budget.prune_hidden:
            if self.pool.hidden_scores is None:
                raise PrunetuneError("pruning hidden dims needs hidden-dim scores: score with hidden=True")
            self.pool.normalize_hidden(per_dim)
        widths = self.neuron_counts()
        out: list[Candidate] = []
        for h in self.hidden_sizes():
            s = h / self.pool.hidden_now
            room = target - const - per_dim * h
            per_neuron = self.n_cost[0] + s * self.n_cost[1]
            for kv, r in self.head_shapes():
                if self.sites and not self._valid(kv, r, h):
                    continue
                heads = kv * r * (self.q_cost[0] + s * self.q_cost[1]) + kv * (self.kv_cost[0] + s * self.kv_cost[1])
                left = room - heads
                fits = [n for n in widths if n * per_neuron <= left + TOLERANCE]
                if fits:
                    c = self.candidate(Shape(kv, r, fits[-1], h))
                    c.cost += const + per_dim * h
                    out.append(c)
        out.sort(key=lambda c: (-c.value, -c.cost, -c.shape.heads))
        return out

    def least(self, fixed: tuple[float, float]) -> float:
        """The cost of the smallest uniform shape (for the error when nothing fits)."""
        h = min(self.hidden_sizes())
        kv, r = min(self.head_shapes(), key=lambda t: t[0] * t[1])
        c = self.candidate(Shape(kv, r, self.neuron_counts()[0], h))
        return c.cost + fixed[0] + fixed[1] * h


def describe(shape: Shape, stock: bool | str) -> dict:
    """The plan's meta["uniform"] entry (without the measured fractions, which plan.select adds)."""
    return {"heads": shape.heads, "kv_heads": shape.kv, "ffn": shape.neurons, "hidden": shape.hidden,
            "stock": stock is True, **({} if stock is True else {"needs_prunetune_because": stock})}


__all__ = ["Candidate", "Shape", "UniformPool", "describe"]
