"""Physical removal: small index-based prune ops per layer type, and applying a plan with them.

Every op replaces a parameter by its kept slice (a new, smaller tensor) and records the slice in a
:class:`SliceLog`, so that an optimizer's state can be sliced the same way (see ``optim.py``). Weights
shared by several modules (tied embeddings, T5's shared table) are sliced once and re-pointed.
LoRA-wrapped linears (PEFT) are handled in place: the base weight, ``lora_A`` columns on the input side
and ``lora_B`` rows on the output side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune import adapters
from prunetune.families import (
    AttentionSite,
    drop_dead_norms,
    family_of,
    get,
    hidden_sites,
    hidden_size,
    install_position_bias_hooks,
    layer_sites,
    make_empty_attention,
    set_head_count,
    set_module,
    unwrap,
)
from prunetune.plan import PruningPlan, kv_groups_kept, model_shapes

LAYOUT_ATTR = "prunetune_layout"  # config attribute: the plan, relative to the dense model, applied so far
BASE_TYPE_ATTR = "prunetune_base_model_type"
MODEL_TYPE_PREFIX = "prunetune_"  # an export's model_type: prunetune_<family>, registered by importing prunetune


@dataclass
class SliceLog:
    """What each replaced parameter became, and the ops that made it: ("slice", dim, index) or ("grow", dim, n).

    Keyed by the original parameter's id; successive ops on one parameter chain, so an optimizer holding
    the original can be re-pointed at the final tensor with its state transformed the same way.
    """

    lineage: dict[int, tuple[nn.Parameter, nn.Parameter, list[tuple]]] = field(default_factory=dict)
    _by_new: dict[int, int] = field(default_factory=dict)

    def _add(self, old: nn.Parameter, new: nn.Parameter, op: tuple) -> None:
        origin_id = self._by_new.pop(id(old), id(old))
        origin, _, ops = self.lineage.get(origin_id, (old, None, []))
        self.lineage[origin_id] = (origin, new, [*ops, op])
        self._by_new[id(new)] = origin_id

    def record(self, old: nn.Parameter, new: nn.Parameter, dim: int, index: torch.Tensor) -> None:
        self._add(old, new, ("slice", dim, index))

    def record_growth(self, old: nn.Parameter, new: nn.Parameter, dim: int, old_size: int) -> None:
        self._add(old, new, ("grow", dim, new.shape[dim] - old_size))

    def replacement(self, old: nn.Parameter) -> nn.Parameter | None:
        entry = self.lineage.get(id(old))
        return entry[1] if entry else None


def slice_parameter(
    module: nn.Module, name: str, dim: int, index: torch.Tensor, log: SliceLog, done: dict[int, tuple]
) -> None:
    """Replace `module.<name>` by its slice along `dim`; a tensor shared with another module is sliced once."""
    old = getattr(module, name, None)
    if old is None:
        return
    key = id(old)
    if key in done:  # tied: re-point to the slice already made (must be the same slice)
        new, d, idx = done[key]
        assert d == dim and torch.equal(idx, index), "tied weights sliced differently"
        setattr(module, name, new)
        return
    idx = index.to(old.device)
    new = nn.Parameter(old.detach().index_select(dim, idx).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    done[key] = (new, dim, index)
    log.record(old, new, dim, index)


def prune_linear(linear: nn.Module, side: str, index: torch.Tensor, log: SliceLog, done: dict) -> None:
    """Keep `index` on the output ("out": weight rows, bias) or input ("in": weight columns) side."""
    base = adapters.base_layer(linear)
    factors = adapters.lora_factors(linear)
    if side == "out":
        slice_parameter(base, "weight", 0, index, log, done)
        slice_parameter(base, "bias", 0, index, log, done)
        base.out_features = len(index)
        for _, b in factors:
            slice_parameter(b, "weight", 0, index, log, done)
            b.out_features = len(index)
    else:
        slice_parameter(base, "weight", 1, index, log, done)
        base.in_features = len(index)
        for a, _ in factors:
            slice_parameter(a, "weight", 1, index, log, done)
            a.in_features = len(index)
    if base is not linear:  # PEFT keeps its own copy of the shape
        linear.in_features, linear.out_features = base.in_features, base.out_features


def prune_embedding(emb: nn.Module, index: torch.Tensor, log: SliceLog, done: dict) -> None:
    slice_parameter(emb, "weight", 1, index, log, done)
    emb.embedding_dim = len(index)


def prune_norm(norm: nn.Module, index: torch.Tensor, log: SliceLog, done: dict) -> None:
    slice_parameter(norm, "weight", 0, index, log, done)
    slice_parameter(norm, "bias", 0, index, log, done)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(index),)


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Weight rows of the given heads."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long, device="cpu")


def _prune_heads(site: AttentionSite, kept: list[int], full_heads: int, log: SliceLog, done: dict) -> None:
    mod = site.module
    original = list(getattr(mod, "_prunetune_heads", range(site.num_heads)))
    new_original = [original[h] for h in kept]
    if not kept:
        prune_linear(site.proj("o"), "in", torch.zeros(0, dtype=torch.long, device="cpu"), log, done)
        path, empty = make_empty_attention(site)
        set_module(site.layer, path, empty)
        empty._prunetune_heads = []
        if site.spec.position_bias:
            install_position_bias_hooks(site, [], full_heads)
        return
    if site.spec.kv_groups_attr and site.num_kv_heads:
        groups = kv_groups_kept(kept, site.group_size)
        kv = sorted(groups)
    else:
        kv = kept
    rows = _rows(kept, site.head_dim)
    kv_rows = _rows(kv, site.head_dim)
    prune_linear(site.proj("q"), "out", rows, log, done)
    prune_linear(site.proj("k"), "out", kv_rows, log, done)
    prune_linear(site.proj("v"), "out", kv_rows, log, done)
    prune_linear(site.proj("o"), "in", rows, log, done)
    set_head_count(site, len(kept), len(kv))
    mod._prunetune_heads = new_original
    if site.spec.position_bias:
        install_position_bias_hooks(site, new_original, full_heads)


def apply_plan(model: nn.Module, plan: PruningPlan, log: SliceLog | None = None) -> SliceLog:
    """Remove, for real, everything the plan does not keep. Returns the log of sliced parameters."""
    plan.validate(model)
    # a layout (the plan from the dense model) records the dense shapes: taken here, before the first cut
    dense_shapes = None if current_layout(model) else model_shapes(model)
    log = log if log is not None else SliceLog()
    done: dict[int, tuple] = {}
    top = unwrap(model)
    fam = family_of(top)
    full_heads = int(getattr(top.config, fam.config.heads))
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            kept = plan.heads.get(site.key)
            if kept is not None and site.num_heads and len(kept) != site.num_heads:
                _prune_heads(site, kept, full_heads, log, done)
        kept_n = plan.neurons.get(lay.key)
        if kept_n is not None and len(kept_n) != lay.ffn.width:
            idx = torch.tensor(kept_n, dtype=torch.long, device="cpu")
            for lin in lay.ffn.inputs:
                prune_linear(lin, "out", idx, log, done)
            prune_linear(lay.ffn.output, "in", idx, log, done)
    if plan.hidden is not None and len(plan.hidden) != hidden_size(model):
        idx = torch.tensor(plan.hidden, dtype=torch.long, device="cpu")
        sites = hidden_sites(model)
        for emb, _ in sites["embedding"]:
            prune_embedding(emb, idx, log, done)
        for norm, _ in sites["norm"]:
            prune_norm(norm, idx, log, done)
        for lin, _ in sites["linear_in"]:
            prune_linear(lin, "in", idx, log, done)
        for lin, _ in sites["linear_out"]:
            prune_linear(lin, "out", idx, log, done)
    # an empty sublayer ignores its input: the norm feeding it goes too (pre-norm stacks), so a layer emptied
    # whole leaves nothing behind (selection counts these norms with their blocks, see layer_units.Block)
    for lay in layer_sites(model):
        drop_dead_norms(lay)
    _record_layout(top, plan, dense_shapes)
    return log


def _record_layout(top: nn.Module, plan: PruningPlan, dense_shapes: dict | None) -> None:
    """Keep on the config the plan relative to the dense model, which export writes and reload replays.

    With the dense shapes in it, a reload refuses a checkpoint whose config does not build those shapes.
    """
    config = top.config
    previous = getattr(config, LAYOUT_ATTR, None)
    step = PruningPlan(plan.family, plan.heads, plan.neurons, plan.hidden, shapes=dense_shapes)
    layout = PruningPlan.from_dict(previous).compose(step) if previous else step
    setattr(config, LAYOUT_ATTR, layout.to_dict())
    if getattr(config, BASE_TYPE_ATTR, None) is None:
        setattr(config, BASE_TYPE_ATTR, config.model_type)


def current_layout(model: nn.Module) -> PruningPlan | None:
    """The plan (relative to the dense model) that gives this model its shapes; None when dense."""
    d = getattr(unwrap(model).config, LAYOUT_ATTR, None)
    return PruningPlan.from_dict(d) if d else None


def restore_layout(model: nn.Module, layout: PruningPlan) -> None:
    """Shrink a freshly built dense model to a saved layout (used when an export is loaded)."""
    top = unwrap(model)
    setattr(top.config, LAYOUT_ATTR, None)
    with torch.no_grad():
        apply_plan(model, layout)


@torch.no_grad()
def own_storage(model: nn.Module) -> None:
    """Copy every parameter and buffer into memory of its own, off the checkpoint file.

    transformers memory-maps safetensors checkpoints on the CPU. After pruning, the tensors surgery kept as
    they were (embeddings, norms) hold the mapping open, and every page of it a forward pass has touched,
    the pruned weights' included, stays resident: pruning a 540 MB model before training saved 35 MB of
    peak memory instead of the weights it removed. Called once after pruning before training; the copies
    are transient (one tensor at a time).
    """
    seen: set[int] = set()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:  # tied weights are one Parameter: copied once, still tied
                seen.add(id(p))
                p.data = p.data.clone()
        for name, b in list(mod.named_buffers(recurse=False)):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                mod._buffers[name] = b.clone()


__all__ = ["SliceLog", "apply_plan", "current_layout", "get", "own_storage", "prune_linear", "restore_layout"]
