"""What to keep: a pure, JSON-serialisable pruning plan, and its selection from scores under a budget.

A plan lists, per attention site, the query heads kept; per layer, the FFN neurons kept; and the hidden
dims kept. Indices are relative to the model the plan is applied to. Nothing here touches weights.
The ranking is in selection.py and the cost model in costs.py; `select`, `Budget` and the costs are
importable from here too.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from prunetune.costs import layer_cost, layer_param_count
from prunetune.errors import PrunetuneError, PruningWarning
from prunetune.families import family_of, hidden_size, in_width, layer_sites, unwrap
from prunetune.selection import Budget, Choice, Normalize, Pool, Unit, resolve_granularity, resolve_normalize
from prunetune.uniform import UniformPool, describe


@dataclass
class PruningPlan:
    """Kept indices per structure. A key missing from `heads`/`neurons` (or `hidden` None) keeps everything.

    `shapes` (see model_shapes) records the model the indices refer to, so that a plan is refused on any
    other model; plans written before it existed have none and are checked as far as their indices allow.
    """

    family: str
    heads: dict[str, list[int]] = field(default_factory=dict)
    neurons: dict[str, list[int]] = field(default_factory=dict)
    hidden: list[int] | None = None
    meta: dict = field(default_factory=dict)
    shapes: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        try:
            return cls(
                family=str(d["family"]),
                heads={k: [int(i) for i in v] for k, v in d.get("heads", {}).items()},
                neurons={k: [int(i) for i in v] for k, v in d.get("neurons", {}).items()},
                hidden=None if d.get("hidden") is None else [int(i) for i in d["hidden"]],
                meta=dict(d.get("meta", {})),
                shapes=None if d.get("shapes") is None else _read_shapes(d["shapes"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PrunetuneError(f"not a prunetune plan: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PrunetuneError(f"cannot read plan {path}: {e}") from e

    @classmethod
    def identity(cls, model: nn.Module) -> PruningPlan:
        """The plan that keeps everything of the live model, written out in full."""
        layers = layer_sites(model)
        return cls(
            family=family_of(unwrap(model)).name,
            heads={s.key: list(range(s.num_heads)) for lay in layers for s in lay.attentions.values()},
            neurons={lay.key: list(range(lay.ffn.width)) for lay in layers},
            hidden=list(range(hidden_size(model))),
            shapes=model_shapes(model),
        )

    def compose(self, later: PruningPlan) -> PruningPlan:
        """The single plan equal to applying `self`, then `later` (whose indices refer to self's result)."""

        def pick(base: list[int] | None, nxt: list[int] | None) -> list[int] | None:
            if nxt is None:
                return base
            if base is None:
                return list(nxt)
            return [base[i] for i in nxt]

        keys_h = set(self.heads) | set(later.heads)
        keys_n = set(self.neurons) | set(later.neurons)
        return PruningPlan(
            family=self.family,
            heads={k: pick(self.heads.get(k), later.heads.get(k)) for k in sorted(keys_h)},
            neurons={k: pick(self.neurons.get(k), later.neurons.get(k)) for k in sorted(keys_n)},
            hidden=pick(self.hidden, later.hidden),
            meta={**self.meta, **later.meta},
            shapes=self.shapes,  # the composed plan applies to the model `self` applies to
        )

    def validate(self, model: nn.Module) -> None:
        """Refuse a plan that does not fit the model: wrong family, made for other shapes, unknown keys, indices
        out of range, GQA."""
        fam = family_of(unwrap(model))
        if self.family != fam.name:
            raise PrunetuneError(f"plan is for family {self.family!r} but the model is {fam.name!r}")
        if self.shapes is not None and (mismatch := _shape_mismatch(self.shapes, model_shapes(model))):
            raise PrunetuneError(
                f"plan was made for a model with {mismatch[0]}, this one has {mismatch[1]} (a plan only fits the "
                "model it was selected on)"
            )
        sites = {s.key: s for lay in layer_sites(model) for s in lay.attentions.values()}
        ffn = {lay.key: lay.ffn.width for lay in layer_sites(model)}
        for key, kept in self.heads.items():
            if key not in sites:
                raise PrunetuneError(f"plan names attention {key!r}, which the model does not have")
            site = sites[key]
            _check_indices(f"heads of {key}", kept, site.num_heads)
            if site.spec.kv_groups_attr and kept:
                groups = kv_groups_kept(kept, site.group_size)
                counts = {len(v) for v in groups.values()}
                if len(counts) != 1:
                    raise PrunetuneError(
                        f"plan breaks grouped-query attention in {key}: kept query heads per KV group differ "
                        f"({sorted(counts)}); keep whole groups or equal numbers per group"
                    )
        for key, kept in self.neurons.items():
            if key not in ffn:
                raise PrunetuneError(f"plan names FFN {key!r}, which the model does not have")
            _check_indices(f"neurons of {key}", kept, ffn[key])
        if self.hidden is not None:
            _check_indices("hidden dims", self.hidden, hidden_size(model))
            if not self.hidden:
                raise PrunetuneError("plan removes every hidden dim")


def model_shapes(model: nn.Module) -> dict:
    """The live shapes a plan's indices refer to: hidden size, layers per stack, and per site the query heads,
    KV heads and FFN width."""
    layers = layer_sites(model)
    stacks: dict[str, int] = {}
    for lay in layers:
        stacks[lay.stack.name] = stacks.get(lay.stack.name, 0) + 1
    return {
        "hidden": hidden_size(model),
        "layers": stacks,
        "heads": {s.key: s.num_heads for lay in layers for s in lay.attentions.values()},
        "kv_heads": {s.key: s.num_kv_heads for lay in layers for s in lay.attentions.values()},
        "ffn": {lay.key: lay.ffn.width for lay in layers},
    }


def _read_shapes(d: dict) -> dict:
    return {
        "hidden": int(d["hidden"]),
        "layers": {str(k): int(v) for k, v in d["layers"].items()},
        **{kind: {str(k): int(v) for k, v in d[kind].items()} for kind in ("heads", "kv_heads", "ffn")},
    }


def _shape_mismatch(planned: dict, live: dict) -> tuple[str, str] | None:
    """The first way the shapes a plan was made for differ from the live model's, in words; None if equal."""
    if planned["layers"] != live["layers"]:
        def show(layers: dict) -> str:
            return " and ".join(f"{n} {stack} layers" for stack, n in layers.items()) or "no layers"

        return show(planned["layers"]), show(live["layers"])
    if planned["hidden"] != live["hidden"]:
        return f"hidden size {planned['hidden']}", f"hidden size {live['hidden']}"
    for kind, what in (("heads", "query heads"), ("kv_heads", "KV heads"), ("ffn", "FFN neurons")):
        for key in sorted(set(planned[kind]) | set(live[kind])):
            if planned[kind].get(key) != live[kind].get(key):
                return f"{planned[kind].get(key)} {what} in {key}", f"{live[kind].get(key)}"
    return None


def _check_indices(what: str, kept: list[int], n: int) -> None:
    if any(i < 0 or i >= n for i in kept):
        raise PrunetuneError(f"plan {what}: index out of range 0..{n - 1}")
    if len(set(kept)) != len(kept) or kept != sorted(kept):
        raise PrunetuneError(f"plan {what}: indices must be sorted and unique")


def kv_groups_kept(kept_heads: list[int], group_size: int) -> dict[int, list[int]]:
    """Kept query heads by the KV head (group) they read."""
    groups: dict[int, list[int]] = {}
    for h in kept_heads:
        groups.setdefault(h // group_size, []).append(h)
    return groups


# ---------------------------------------------------------------------------------------------------------
# Selection (the ranking itself is in selection.py)
# ---------------------------------------------------------------------------------------------------------


def select(model: nn.Module, scores, budget: Budget, *, normalize: Normalize | None = None) -> PruningPlan:
    """Choose what to keep from `scores` (see importance.Scores) so that the budget holds.

    Counts (`heads_keep`, `neurons_keep`, `hidden_keep`) pick the best structures of that kind; a
    parameter or FLOPs budget picks heads and neurons (and hidden dims, with `prune_hidden`) together by
    score per cost, so the split between attention, FFN and width comes from the task, not from a fixed
    ratio. `normalize` ("none", "per_kind", "per_layer"; default: "none" when the scorer's kinds are
    comparable, `Scores.meta["comparable"]`, else "per_kind") makes kinds comparable; see selection.py.
    `budget.granularity` lets a cost budget remove whole attention blocks, FFN blocks and layers by their own
    scores (`Scores.layers`): "units" (default), "blocks", "layers" (the default for scores of whole layers
    only, such as block_influence) or "mixed"; see layer_units.py. The plan's meta records the normalisation,
    the granularity, the target and the measured cost, `dropped` (the layers removed whole and the blocks
    removed from the others) and, under "units", `warnings` (also raised as PruningWarning) naming every layer
    that loses all its heads or neurons.
    """
    budget.check()
    mode, source = resolve_normalize(normalize, scores)
    granularity, granularity_from = resolve_granularity(budget, scores)
    if granularity in ("blocks", "mixed") and mode != "none":
        # a block's bonus (block score - its units' scores) and a layer's are differences of loss estimates
        raise PrunetuneError(
            f"granularity {granularity!r} weighs whole blocks against their heads and neurons, which needs scores "
            f"in one unit, compared as they are; these are normalised {mode!r} ({source}): use scores whose kinds "
            "are comparable (fisher, taylor), or pass normalize='none' to compare them anyway"
        )
    fam = family_of(unwrap(model))
    fraction = budget.keep_params if budget.keep_params is not None else budget.keep_flops
    flops_seq = budget.seq_len if budget.keep_flops is not None else None
    pool = Pool(model, scores, budget, mode, flops_seq, granularity)
    meta: dict = {"budget": asdict(budget), "normalize": mode, "normalize_from": source,
                  "granularity": granularity, "granularity_from": granularity_from}
    if budget.uniform:
        plan = _uniform(model, fam.name, pool, scores, budget, meta, fraction, flops_seq)
    elif fraction is None:
        plan = _build(model, fam.name, pool.by_counts(), meta)
    else:
        reference = budget.reference or layer_cost(model, flops_seq)  # APT: fractions of the dense model
        target = fraction * reference
        # FLOPs: norms and biases are not counted. The input norms of pre-norm blocks go with an emptied block:
        # whole blocks carry theirs (layer_units.Block); units, chosen one by one, count them as fixed
        bare = (0.0, 0.0) if flops_seq else _fixed_cost(model)
        fixed = bare if granularity != "units" else (bare[0], bare[1] + pool.norms_per_dim)
        choice = pool.by_cost(target, fixed, reference)
        hidden_kept = len(choice.hidden) if choice.hidden is not None else hidden_size(model)
        meta.update({
            "target_cost": target, "reference_cost": reference, "cost_kind": "flops" if flops_seq else "params",
            "estimated_cost": bare[0] + bare[1] * hidden_kept + sum(u.cost for u in choice.units)
            + pool.own_cost(choice.units, choice.hidden_scale),
        })
        plan = _hold(model, fam.name, choice, meta, target, flops_seq)
    plan.meta["dropped"] = dropped(model, plan)
    emptied = _emptied(model, plan)
    # emptying blocks is what the coarser granularities are for (meta["dropped"] counts them); under "units" it
    # is worth a word
    if emptied and granularity == "units":
        plan.meta["warnings"] = emptied
        warnings.warn("pruning plan empties " + "; ".join(emptied), PruningWarning, stacklevel=2)
    plan.shapes = model_shapes(model)
    return plan


UNIFORM_TRIES = 20  # shapes measured on a weightless copy before a uniform selection gives up


def _uniform(model: nn.Module, family: str, pool: Pool, scores, budget: Budget, meta: dict, fraction: float | None,
             flops_seq: int | None) -> PruningPlan:
    """The best uniform shape (see uniform.py) whose measured cost holds the budget; meta["uniform"] says which
    counts, whether a stock config describes them, and the fraction kept against the one asked for."""
    upool = UniformPool(model, pool, scores, budget, flops_seq)
    reference = target = None
    if fraction is None:
        ranked = upool.by_counts()
    else:
        reference = budget.reference or layer_cost(model, flops_seq)
        target = fraction * reference
        # a uniform shape empties no block: every input norm stays
        fixed = (0.0, 0.0) if flops_seq else _fixed_cost(model)
        fixed = (fixed[0], fixed[1] + pool.norms_per_dim)
        ranked = upool.by_cost(target, fixed)
        if not ranked:
            raise PrunetuneError(
                f"the budget keeps {fraction:.4g} of the layers' cost, but no uniform shape keeps less than "
                f"{upool.least(fixed) / reference:.4g} (one KV group and {max(1, budget.round_to)} FFN neurons per "
                "layer, norms and biases): raise the budget or drop --uniform"
            )
        meta.update({"target_cost": target, "reference_cost": reference,
                     "cost_kind": "flops" if flops_seq else "params"})
    for cand in ranked[:UNIFORM_TRIES]:
        plan = _build(model, family, Choice(cand.units, cand.hidden, cand.shape.hidden / pool.hidden_now, []), meta)
        kept = planned_cost(model, plan, flops_seq)
        if target is None or kept <= target * (1 + 1e-9):
            shape = cand.shape
            info = describe(shape, upool.stock(shape.kv, shape.per_group, shape.hidden))
            info["round_to"] = max(1, budget.round_to)
            if target is not None:
                meta.update({"estimated_cost": cand.cost, "kept_cost": kept})
                info.update({"target_fraction": fraction, "kept_fraction": kept / reference})
            meta["uniform"] = info
            return plan
    raise PrunetuneError("--uniform: no uniform shape's measured cost holds the budget (the cost model and the "
                         "model disagree); raise the budget")


def dropped(model: nn.Module, plan: PruningPlan) -> dict:
    """The layers a plan removes whole (every attention block and the FFN), and the blocks it removes from the
    layers that stay: counts and keys ("decoder.3", "decoder.3/self", "decoder.3/ffn", as Scores.layers)."""
    layers, attention, ffn = [], [], []
    for lay in layer_sites(model):
        gone = [s.key for s in lay.attentions.values() if s.num_heads and plan.heads.get(s.key) == []]
        had = [s.key for s in lay.attentions.values() if s.num_heads]
        ffn_gone = bool(lay.ffn.width) and plan.neurons.get(lay.key) == []
        if (had or lay.ffn.width) and len(gone) == len(had) and (ffn_gone or not lay.ffn.width):
            layers.append(lay.key)
            continue
        attention += gone
        if ffn_gone:
            ffn.append(f"{lay.key}/ffn")
    return {"layers": len(layers), "attention_blocks": len(attention), "ffn_blocks": len(ffn),
            "keys": layers + attention + ffn}


def _build(model: nn.Module, family: str, choice: Choice, meta: dict) -> PruningPlan:
    kept: dict[tuple[str, str], list[int]] = {}
    for u in choice.units:
        kept.setdefault((u.kind, u.key), []).extend(u.ids)
    plan = PruningPlan(family=family, hidden=choice.hidden, meta=meta)
    for lay in layer_sites(model):
        for s in lay.attentions.values():
            plan.heads[s.key] = sorted(kept.get(("heads", s.key), []))
        if lay.ffn.width:
            plan.neurons[lay.key] = sorted(kept.get(("neurons", lay.key), []))
    return plan


def _fixed_cost(model: nn.Module) -> tuple[float, float]:
    """Parameters no choice of heads and neurons removes (norms, output biases, T5's position bias), measured
    on weightless copies with every head and neuron removed: (constant, per hidden dim kept).

    The input norms of pre-norm sublayers are not in it: surgery drops them with an emptied sublayer
    (costs.input_norm_costs gives them, per block)."""
    layers = layer_sites(model)
    nothing = PruningPlan(
        family_of(unwrap(model)).name,
        heads={s.key: [] for lay in layers for s in lay.attentions.values() if s.num_heads},
        neurons={lay.key: [] for lay in layers if lay.ffn.width},
    )
    width = hidden_size(model)
    full = planned_cost(model, nothing)
    if width == 1:
        return full, 0.0
    nothing.hidden = [0]
    per_dim = (full - planned_cost(model, nothing)) / (width - 1)
    return full - per_dim * width, per_dim


def _hold(model: nn.Module, family: str, choice: Choice, meta: dict, target: float, flops_seq) -> PruningPlan:
    """The plan of `choice`, its cost measured on a weightless copy; should a family's costs not add up
    exactly, the weakest chosen units (the last of their chain) go until the budget holds."""
    plan = _build(model, family, choice, meta)
    kept = planned_cost(model, plan, flops_seq)
    position = {id(u): ci for ci, chain in enumerate(choice.free_chains) for u in chain}
    ids = {id(u) for u in choice.units}
    tails = {ci: [u for u in chain if id(u) in ids] for ci, chain in enumerate(choice.free_chains)}
    while kept > target * (1 + 1e-9) and any(tails.values()):
        weakest = min((t[-1] for t in tails.values() if t), key=lambda u: u.score / u.cost if u.cost else math.inf)
        tails[position[id(weakest)]].pop()
        choice.units = [u for u in choice.units if u is not weakest]
        plan = _build(model, family, choice, meta)
        kept = planned_cost(model, plan, flops_seq)
    meta["kept_cost"] = kept
    return plan


def _emptied(model: nn.Module, plan: PruningPlan) -> list[str]:
    """The layers the plan takes every head or every FFN neuron from (that still had some)."""
    out = []
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.num_heads and plan.heads.get(site.key) == []:
                out.append(f"{site.key}: every attention head removed")
        if lay.ffn.width and plan.neurons.get(lay.key) == []:
            out.append(f"{lay.key}: every FFN neuron removed")
    return out


def _pruned_shadow(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A weightless (meta) copy of the model with `plan` applied."""
    import copy

    import torch

    from prunetune.surgery import apply_plan

    top = unwrap(model)
    memo = {id(t): torch.nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
            for t in top.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in top.buffers()})
    shadow = copy.deepcopy(top, memo)
    apply_plan(shadow, PruningPlan(plan.family, plan.heads, plan.neurons, plan.hidden))
    return shadow


def planned_param_count(model: nn.Module, plan: PruningPlan) -> int:
    """Exact prunable-layer parameters after `plan`, from a weightless (meta) copy of the model."""
    return layer_param_count(_pruned_shadow(model, plan))


def planned_cost(model: nn.Module, plan: PruningPlan, flops_seq: int | None = None) -> float:
    """Parameters (or FLOPs per token at `flops_seq`, see layer_cost) of the prunable layers after `plan`."""
    return layer_cost(_pruned_shadow(model, plan), flops_seq)


# ---------------------------------------------------------------------------------------------------------
# Describing a model
# ---------------------------------------------------------------------------------------------------------


def model_info(model: nn.Module) -> dict:
    """Total and per-layer parameters, heads, KV heads, FFN width and hidden size of the live model."""
    top = unwrap(model)
    layers = []
    for lay in layer_sites(model):
        params = sum(
            p.numel() for n, p in lay.module.named_parameters() if "lora_" not in n
        )
        layers.append(
            {
                "layer": lay.key,
                "params": params,
                "heads": {k: s.num_heads for k, s in lay.attentions.items()},
                "kv_heads": {k: s.num_kv_heads for k, s in lay.attentions.items()},
                "ffn": lay.ffn.width,
            }
        )
    return {
        "family": family_of(top).name,
        "params": sum(p.numel() for n, p in top.named_parameters() if "lora_" not in n),
        "layer_params": layer_param_count(model),
        "hidden": hidden_size(model),
        "heads": sum(sum(v["heads"].values()) for v in layers),
        "ffn": sum(v["ffn"] for v in layers),
        "layers": layers,
    }


__all__ = [
    "Budget", "PruningPlan", "Unit", "in_width", "kv_groups_kept", "layer_cost", "layer_param_count", "model_info",
    "model_shapes", "planned_cost", "planned_param_count", "select",
]
