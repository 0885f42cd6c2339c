"""What to keep: a pure, JSON-serialisable pruning plan, and its selection from scores under a budget.

A plan lists, per attention site, the query heads kept; per layer, the FFN neurons kept; and the hidden
dims kept. Indices are relative to the model the plan is applied to. Nothing here touches weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import family_of, hidden_size, in_width, layer_sites, unwrap


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
# Costs: what one head / KV group / neuron / hidden dim costs in parameters or FLOPs
# ---------------------------------------------------------------------------------------------------------


def _numel(linear: nn.Module) -> tuple[int, int, bool]:
    w = linear.weight if hasattr(linear, "weight") else linear.base_layer.weight
    b = linear.bias if hasattr(linear, "weight") else linear.base_layer.bias
    return w.shape[0], w.shape[1], b is not None


def _base_linear(linear: nn.Module) -> nn.Module:
    return getattr(linear, "base_layer", linear)


def layer_param_count(model: nn.Module) -> int:
    """Parameters in the prunable layers (attention, FFN and norms of every layer; no embeddings or heads).

    LoRA adapters are not counted: a budget is about the base model.
    """
    total = 0
    for lay in layer_sites(model):
        total += sum(p.numel() for n, p in lay.module.named_parameters() if "lora_" not in n)
    return total


@dataclass
class Unit:
    """A selectable piece of structure: `ids` are kept together; cost in parameters or FLOPs."""

    kind: Literal["heads", "neurons"]
    key: str
    ids: list[int]
    score: float
    cost: float
    # a unit that must be kept for this one to be kept (GQA per-group slices keep their rank order, which
    # makes their costs add up exactly: see _head_units); compared by identity, so excluded from ==
    after: Unit | None = field(default=None, compare=False, repr=False)


def _head_costs(site, hidden_scale: float, flops_seq: int | None) -> tuple[float, float]:
    """Cost of one query head and of one KV head (k and v rows) of this site."""
    hd = site.head_dim
    _, q_in, q_bias = _numel(site.proj("q"))
    o_out, _, _ = _numel(site.proj("o"))
    q_in, o_out = q_in * hidden_scale, o_out * hidden_scale
    per_q = hd * (q_in + q_bias) + hd * o_out
    k_out, k_in, k_bias = _numel(site.proj("k"))
    per_kv = 2 * hd * (k_in * hidden_scale + k_bias)
    if not site.spec.kv_groups_attr:
        per_q, per_kv = per_q + per_kv, 0.0  # MHA: a head owns its k and v rows
    if flops_seq:
        # per token: 2 FLOPs a weight, plus q.k and attn.v over the sequence
        per_q = 2 * per_q + 4 * flops_seq * hd
        per_kv = 2 * per_kv
    return per_q, per_kv


def _neuron_cost(ffn, hidden_scale: float, flops_seq: int | None) -> float:
    cost = 0.0
    for lin in ffn.inputs:
        _, n_in, bias = _numel(lin)
        cost += n_in * hidden_scale + bias
    out, _, _ = _numel(ffn.output)
    cost += out * hidden_scale
    return 2 * cost if flops_seq else cost


def layer_cost(model: nn.Module, flops_seq: int | None = None) -> float:
    """Parameters (or FLOPs per token at `flops_seq`) of the prunable layers, by the same model as selection."""
    if not flops_seq:
        return float(layer_param_count(model))
    total = 0.0
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.num_heads:
                q, kv = _head_costs(site, 1.0, flops_seq)
                total += q * site.num_heads + kv * site.num_kv_heads
        total += _neuron_cost(lay.ffn, 1.0, flops_seq) * lay.ffn.width
    return total


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------


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
    round_to: int = 1  # keep neuron counts in multiples of this where the budget allows (GPU-friendly)
    reference: float | None = None  # the dense cost the fractions refer to (default: the live model's)

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


def _normalise_layer(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _head_units(model, scores, budget: Budget, hidden_scale: float, flops_seq, layer_norm: bool) -> list[Unit]:
    units: list[Unit] = []
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if not site.num_heads:
                continue
            s = list(scores.heads.get(site.key, [1.0] * site.num_heads))
            if layer_norm:
                s = _normalise_layer(s)
            per_q, per_kv = _head_costs(site, hidden_scale, flops_seq)
            if not site.spec.kv_groups_attr or site.group_size == 1:
                units += [Unit("heads", site.key, [h], s[h], per_q + per_kv) for h in range(site.num_heads)]
                continue
            g = site.group_size
            groups = [list(range(j * g, (j + 1) * g)) for j in range(site.num_kv_heads)]
            if budget.gqa == "whole_group":
                for grp in groups:
                    units.append(Unit("heads", site.key, grp, sum(s[h] for h in grp), g * per_q + per_kv))
            else:
                # slice r takes the r-th best query head of every group: groups stay equal in size.
                # The KV rows are only freed when every slice goes, so the first slice carries them and
                # slice r can only be kept after slice r - 1: the costs of kept slices then add up exactly.
                # (They used to be spread evenly over the slices, which under-counted any layer keeping
                # some but not all slices: --keep-flops plans exceeded their budget, and --keep-params
                # plans fell far below it once the correction loop below dropped units to compensate.)
                ranked = [sorted(grp, key=lambda h: -s[h]) for grp in groups]
                before = None
                for r in range(g):
                    ids = sorted(rk[r] for rk in ranked)
                    cost = len(groups) * (per_q + (per_kv if r == 0 else 0.0))
                    before = Unit("heads", site.key, ids, sum(s[h] for h in ids), cost, after=before)
                    units.append(before)
    return units


def _neuron_units(model, scores, budget: Budget, hidden_scale: float, flops_seq) -> list[Unit]:
    units: list[Unit] = []
    for lay in layer_sites(model):
        n = lay.ffn.width
        if not n:
            continue
        s = list(scores.neurons.get(lay.key, [1.0] * n))
        cost = _neuron_cost(lay.ffn, hidden_scale, flops_seq)
        order = sorted(range(n), key=lambda i: -s[i])
        step = max(1, budget.round_to)
        for start in range(0, n, step):
            ids = order[start : start + step]
            units.append(Unit("neurons", lay.key, ids, sum(s[i] for i in ids), cost * len(ids)))
    return units


def _top_count(units: list[Unit], keep: float, total: int) -> list[Unit]:
    """The best units covering `keep` of `total` structures (a fraction, or a count when > 1)."""
    target = round(keep * total) if keep <= 1 else int(keep)
    if target > total:
        raise PrunetuneError(f"budget keeps {target} but the model has only {total}")
    chosen, count = [], 0
    for u in sorted(units, key=lambda u: -u.score):
        if count + len(u.ids) <= target:
            chosen.append(u)
            count += len(u.ids)
    return chosen


def _normalise_kind(units: list[Unit]) -> None:
    """Put a kind's scores on a common scale: an average unit's score equals its cost share."""
    total_s = sum(u.score for u in units)
    total_c = sum(u.cost for u in units)
    if total_s <= 0 or total_c <= 0:
        return
    for u in units:
        u.score = u.score / total_s * total_c


def _knapsack(units: list[Unit], capacity: float, required: list[Unit]) -> list[Unit]:
    """Greedy by score per cost; units of a layer stay in their rank order (APT's and Kwon's selection)."""
    chosen = list(required)
    taken = {id(u) for u in chosen}
    spent = sum(u.cost for u in chosen)
    waiting: dict[int, list[Unit]] = {}  # units whose `after` unit is not taken yet, by that unit

    def take(u: Unit) -> None:
        nonlocal spent
        chosen.append(u)
        taken.add(id(u))
        spent += u.cost
        # a unit that came earlier in the order (better ratio) but had to wait for this one
        for nxt in waiting.pop(id(u), []):
            if spent + nxt.cost <= capacity + 1e-6:
                take(nxt)

    for u in sorted(units, key=lambda u: -(u.score / u.cost if u.cost else math.inf)):
        if u.after is not None and id(u.after) not in taken:
            waiting.setdefault(id(u.after), []).append(u)
        elif spent + u.cost <= capacity + 1e-6:
            take(u)
    return chosen


def select(model: nn.Module, scores, budget: Budget, *, layer_norm_heads: bool = False) -> PruningPlan:
    """Choose what to keep from `scores` (see importance.Scores) so that the budget holds.

    Counts (`heads_keep`, `neurons_keep`, `hidden_keep`) pick the best structures of that kind; a
    parameter or FLOPs budget picks heads and neurons together by score per cost, so the split between
    attention and FFN comes from the task, not from a fixed ratio.
    """
    budget.check()
    fam = family_of(unwrap(model))
    hidden_now = hidden_size(model)
    hidden_kept: list[int] | None = None
    if budget.hidden_keep is not None and budget.hidden_keep < 1:
        n_keep = max(1, round(budget.hidden_keep * hidden_now))
        h_scores = list(scores.hidden or [1.0] * hidden_now)
        hidden_kept = sorted(sorted(range(hidden_now), key=lambda i: -h_scores[i])[:n_keep])
    hidden_scale = (len(hidden_kept) / hidden_now) if hidden_kept else 1.0
    flops_seq = budget.seq_len if budget.keep_flops is not None else None

    head_units = _head_units(model, scores, budget, hidden_scale, flops_seq, layer_norm_heads)
    neuron_units = _neuron_units(model, scores, budget, hidden_scale, flops_seq)
    sites = [s for lay in layer_sites(model) for s in lay.attentions.values()]
    total_heads = sum(s.num_heads for s in sites)
    total_neurons = sum(lay.ffn.width for lay in layer_sites(model))

    fixed_heads = budget.heads_keep is not None
    fixed_neurons = budget.neurons_keep is not None
    chosen_heads = _top_count(head_units, budget.heads_keep, total_heads) if fixed_heads else head_units
    chosen_neurons = (
        _top_count(neuron_units, budget.neurons_keep, total_neurons) if fixed_neurons else neuron_units
    )
    fraction = budget.keep_params if budget.keep_params is not None else budget.keep_flops
    reference = 0.0
    meta: dict = {"budget": asdict(budget)}
    if fraction is not None:
        current = layer_cost(model, flops_seq)
        reference = budget.reference or current  # APT: fractions of the dense model, pruned step by step
        # what no selection can remove: norms and output biases (params); nothing (FLOPs)
        units_cost = sum(u.cost for u in head_units + neuron_units)
        fixed = 0.0 if flops_seq else max(current * hidden_scale - units_cost, 0.0)
        capacity = fraction * reference - fixed
        required = (chosen_heads if fixed_heads else []) + (chosen_neurons if fixed_neurons else [])
        free = [u for u in head_units if not fixed_heads] + [u for u in neuron_units if not fixed_neurons]
        _normalise_kind([u for u in free if u.kind == "heads"])
        _normalise_kind([u for u in free if u.kind == "neurons"])
        chosen = _knapsack(free, capacity - sum(u.cost for u in required), [])
        chosen_heads = [u for u in required + chosen if u.kind == "heads"]
        chosen_neurons = [u for u in required + chosen if u.kind == "neurons"]
        meta["target_cost"] = fraction * reference
        meta["kept_cost"] = fixed + sum(u.cost for u in chosen_heads + chosen_neurons)  # estimate
        meta["reference_cost"] = reference
        meta["cost_kind"] = "flops" if flops_seq else "params"

    def build(heads: list[Unit], neurons: list[Unit]) -> PruningPlan:
        plan = PruningPlan(family=fam.name, hidden=hidden_kept, meta=meta)
        for s in sites:
            plan.heads[s.key] = sorted(h for u in heads if u.key == s.key for h in u.ids)
        for lay in layer_sites(model):
            if lay.ffn.width:
                plan.neurons[lay.key] = sorted(i for u in neurons if u.key == lay.key for i in u.ids)
        return plan

    plan = build(chosen_heads, chosen_neurons)
    if fraction is not None:
        # The unit costs are exact per unit, but KV rows and shared biases make a layer's total slightly
        # non-additive: measure the real count and drop the weakest free units until the budget holds.
        # (FLOPs too: this check used to run for parameter budgets only, and a --keep-flops plan of a GQA
        # model could keep more than asked, as per-group slices spread KV costs that stay until the last goes.)
        target = fraction * reference
        droppable = sorted(
            [u for u in chosen_heads if not fixed_heads] + [u for u in chosen_neurons if not fixed_neurons],
            key=lambda u: u.score / u.cost if u.cost else math.inf,
        )
        while (kept := planned_cost(model, plan, flops_seq)) > target * (1 + 1e-9) and droppable:
            weakest = droppable.pop(0)
            chosen_heads = [u for u in chosen_heads if u is not weakest]
            chosen_neurons = [u for u in chosen_neurons if u is not weakest]
            plan = build(chosen_heads, chosen_neurons)
        meta["kept_cost"] = kept
    plan.shapes = model_shapes(model)
    return plan


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
    "Budget", "PruningPlan", "Unit", "in_width", "kv_groups_kept", "layer_cost", "model_info", "model_shapes", "select",
]
