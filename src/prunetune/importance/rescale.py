"""Making a chosen plan cost less accuracy before it is applied: FLAP's bias compensation and Kwon et al.'s
mask rearrangement and least-squares rescaling.

All three take the dense model and a plan, change weights (or the plan) so that the plan removes less, and
are called between selection and ``apply_plan``::

    plan = kwon_rearrange(model, plan, batches)        # same counts per layer, lower block Fisher
    kwon_rescale(model, plan, batches)                  # kept heads/neurons scaled to match the dense outputs
    compensate(model, plan, channel_stats(model, batches))  # removed channels' mean folded into the bias
    apply_plan(model, plan)

Masking with the plan after any of them gives the same outputs as applying it (the changes touch only kept
columns and output biases).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from functools import partial

import torch
from torch import nn

from prunetune import adapters
from prunetune.errors import PrunetuneError
from prunetune.families import family_of, layer_input, layer_output, layer_sites, unwrap
from prunetune.importance.activation_scorers import ChannelStats, effective_weight
from prunetune.importance.mask_scorers import MaskGradients, mask_gradients
from prunetune.importance.passes import LayerReplay, Stop, TokenRows, each_batch, scoring, stack_mask_keys
from prunetune.masks import Masks, attach
from prunetune.plan import PruningPlan, kv_groups_kept


def _channels(units: list[int], width: int) -> torch.Tensor:
    return torch.tensor([u * width + j for u in units for j in range(width)], dtype=torch.long)


def _removed(n: int, kept: list[int]) -> list[int]:
    keep = set(kept)
    return [i for i in range(n) if i not in keep]


def _base(linear: nn.Module) -> nn.Module:
    return adapters.base_layer(linear)


# ---------------------------------------------------------------------------------------------------------
# FLAP: bias compensation
# ---------------------------------------------------------------------------------------------------------


def _add_zero_bias(linear: nn.Module) -> None:
    base = _base(linear)
    if base.bias is None:
        w = base.weight
        base.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                 requires_grad=w.requires_grad)


def _enable_biases(model: nn.Module, kind: str) -> None:
    """Give every attention (or FFN) projection a bias and set the config flag that rebuilds them on reload.

    The flag covers every layer's projections (LLaMA: q/k/v/o or gate/up/down), so all get a (zero) bias:
    otherwise the reloaded model would have biases the checkpoint lacks.
    """
    top = unwrap(model)
    fam = family_of(top)
    flag = fam.config.attention_bias if kind == "attention" else fam.config.ffn_bias
    if flag is None:
        raise PrunetuneError(
            f"bias compensation needs a bias on the {kind} output projection, which {fam.name} has not and "
            "cannot keep through export and reload (its config has no bias flag)"
        )
    setattr(top.config, flag, True)
    for lay in layer_sites(model):
        if kind == "attention":
            for site in lay.attentions.values():
                for which in ("q", "k", "v", "o"):
                    if (lin := site.proj(which)) is not None:
                        _add_zero_bias(lin)
        else:
            for lin in [*lay.ffn.inputs, lay.ffn.output]:
                _add_zero_bias(lin)


@torch.no_grad()
def _fold_mean(model: nn.Module, linear: nn.Module, removed: torch.Tensor, mean: torch.Tensor, kind: str) -> None:
    """bias += W[:, removed] @ mean[removed] (through the module itself, so LoRA adapters count too)."""
    base = _base(linear)
    if base.bias is None:
        _enable_biases(model, kind)
    w = base.weight
    x = torch.zeros(1, w.shape[1], dtype=torch.float64, device=w.device)
    idx = removed.to(w.device)
    x[0, idx] = mean.to(w.device, torch.float64)[idx]
    zero = torch.zeros_like(x)
    delta = (linear(x.to(w.dtype)) - linear(zero.to(w.dtype)))[0]
    base.bias.add_(delta.to(base.bias.dtype))


def compensate(model: nn.Module, plan: PruningPlan, stats: ChannelStats | dict[str, torch.Tensor]) -> None:
    """FLAP's bias compensation: fold each removed head's and neuron's mean contribution into the bias.

    `stats`: ``channel_stats(model, batches)`` of the dense model (or its ``means()``). For every output
    projection the plan narrows, bias += W[:, removed] @ mean(X[:, removed]): the pruned layer then outputs
    what the removed channels gave on average. A projection without a bias gets one, with the config flag
    that rebuilds it on reload (LLaMA: ``attention_bias``/``mlp_bias``); families without such a flag
    (T5, Mistral, Qwen2) are refused. Call before ``apply_plan``; hidden dims are not compensated.
    """
    plan.validate(model)
    means = stats.means() if isinstance(stats, ChannelStats) else stats
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            kept = plan.heads.get(site.key)
            if kept is None or not site.num_heads or len(kept) == site.num_heads:
                continue
            removed = _removed(site.num_heads, kept)
            _fold_mean(model, site.proj("o"), _channels(removed, site.head_dim), means[site.key], "attention")
        kept = plan.neurons.get(lay.key)
        if kept is not None and lay.ffn.width and len(kept) != lay.ffn.width:
            removed = _removed(lay.ffn.width, kept)
            _fold_mean(model, lay.ffn.output, _channels(removed, 1), means["ffn:" + lay.key], "ffn")
    plan.meta["bias_compensation"] = True


# ---------------------------------------------------------------------------------------------------------
# Kwon et al.: mask rearrangement
# ---------------------------------------------------------------------------------------------------------


def block_fisher(grads: torch.Tensor, removed: list[int]) -> float:
    """0.5 x mean over examples of (sum of the removed units' gradients)^2: the loss change the layer's
    Fisher block (off-diagonal terms included) predicts for removing them together. grads: (examples, units)."""
    if not removed:
        return 0.0
    return 0.5 * float(grads[:, removed].sum(1).pow(2).mean())


def rearrange_units(grads: torch.Tensor, kept: list[int]) -> list[int]:
    """Kwon et al.'s greedy: the same number of units kept, chosen for a low block Fisher of the removed set.

    Start from the units with the smallest diagonal Fisher, then, in that order, add each further unit to
    the removed set and drop from it the one whose absence leaves the smallest norm of the summed gradient.
    Returns the better (lower block Fisher) of that and the given choice.
    """
    n = grads.shape[1]
    p = n - len(kept)
    if p == 0 or not kept:
        return list(kept)
    g = grads.double()
    diag = g.pow(2).sum(0)
    order = torch.argsort(diag, stable=True).tolist()
    removed = order[:p]
    total = g[:, removed].sum(1)
    for idx in order[p:]:
        removed.append(idx)
        total += g[:, idx]
        # |total - g_k|^2 = |total|^2 - 2 g_k . total + |g_k|^2: drop the k minimising the last two terms
        crit = diag[removed] - 2 * (g[:, removed].t() @ total)
        drop = int(torch.argmin(crit))
        total -= g[:, removed[drop]]
        del removed[drop]
    if block_fisher(g, removed) >= block_fisher(g, _removed(n, kept)):
        return list(kept)
    return _removed(n, removed)


def _rearrange_heads(site, kept: list[int], grads: torch.Tensor) -> list[int]:
    """Heads keep grouped-query attention valid: whole KV groups are swapped as groups, a per-group count
    is kept per group."""
    gs = site.group_size
    if not site.spec.kv_groups_attr or gs <= 1:
        return rearrange_units(grads, kept)
    groups = kv_groups_kept(kept, gs)
    if all(len(v) == gs for v in groups.values()):
        per_group = grads.view(grads.shape[0], -1, gs).sum(2)
        kept_groups = rearrange_units(per_group, sorted(groups))
        return [g * gs + j for g in kept_groups for j in range(gs)]
    out = []
    for g, members in sorted(groups.items()):
        local = rearrange_units(grads[:, g * gs : (g + 1) * gs], [h - g * gs for h in members])
        out.extend(g * gs + h for h in local)
    return sorted(out)


def kwon_rearrange(model: nn.Module, plan: PruningPlan, batches: Iterable[dict] | None = None, *,
                   grads: MaskGradients | None = None) -> PruningPlan:
    """Kwon et al.'s mask rearrangement: within each attention site and FFN, re-pick which heads/neurons the
    plan keeps (same counts, grouped-query attention kept valid) to lower the layer's block Fisher.

    `grads`: ``mask_gradients(model, batches, keep_per_example=True)`` when already at hand; otherwise one
    pass over `batches` computes them (memory: examples x units per layer). Returns a new plan; meta
    "rearrangement" records the summed block Fisher before and after.
    """
    plan.validate(model)
    if grads is None or grads.per_example is None:
        grads = mask_gradients(model, batches, keep_per_example=True)
    per_example = grads.per_example
    new = PruningPlan.from_dict(plan.to_dict())
    before = after = 0.0
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            kept = plan.heads.get(site.key)
            if kept is None or site.key not in per_example:
                continue
            g = per_example[site.key].double()
            was = block_fisher(g, _removed(site.num_heads, kept))
            heads = _rearrange_heads(site, kept, g)
            now = block_fisher(g, _removed(site.num_heads, heads))
            if now >= was:  # groups rearranged one by one ignore the terms between groups: keep the plan's
                heads, now = list(kept), was
            new.heads[site.key] = heads
            before, after = before + was, after + now
        kept = plan.neurons.get(lay.key)
        key = "ffn:" + lay.key
        if kept is not None and key in per_example:
            g = per_example[key].double()
            new.neurons[lay.key] = rearrange_units(g, kept)
            before += block_fisher(g, _removed(lay.ffn.width, kept))
            after += block_fisher(g, _removed(lay.ffn.width, new.neurons[lay.key]))
    new.validate(model)
    new.meta["rearrangement"] = {"block_fisher_before": before, "block_fisher_after": after}
    return new


# ---------------------------------------------------------------------------------------------------------
# Kwon et al.: least-squares rescaling of the kept structures
# ---------------------------------------------------------------------------------------------------------


def plan_masks(model: nn.Module, plan: PruningPlan) -> Masks:
    """0/1 masks that switch off exactly what the plan removes."""
    masks = Masks.ones(model, hidden=plan.hidden is not None)

    def keep(ones: torch.Tensor, kept: list[int] | None) -> torch.Tensor:
        if kept is None:
            return ones
        out = torch.zeros_like(ones)
        out[torch.tensor(kept, dtype=torch.long, device=ones.device)] = 1.0
        return out

    masks.heads = {k: keep(v, plan.heads.get(k)) for k, v in masks.heads.items()}
    masks.neurons = {k: keep(v, plan.neurons.get(k)) for k, v in masks.neurons.items()}
    if plan.hidden is not None:
        masks.hidden = keep(masks.hidden, plan.hidden)
    return masks


def _residual_points(lay, index: int) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]]:
    """Where sublayer `index` of a layer (attention blocks, then the FFN) reads the residual stream it adds to,
    and where the sum (residual + its output) can be read: the layer's input and output and its norms'
    inputs (pre-norm: each sublayer's own norm reads the stream before it) or outputs (post-norm)."""
    norms = lay.norms
    if lay.stack.post_norm:
        before = ("layer_in", lay.module) if index == 0 else ("out", norms[index - 1])
        return before, ("in", norms[index])
    after = ("in", norms[index + 1]) if index + 1 < len(norms) else ("layer_out", lay.module)
    return ("in", norms[index]), after


def _capture(run, points: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """What the model has at each point (in forward order) while `run()` calls it; the call stops at the last."""
    got: dict[int, torch.Tensor] = {}
    last = len(points) - 1
    handles = []

    def keep(i: int, value: torch.Tensor) -> None:
        got[i] = value.detach()
        if i == last:
            raise Stop

    for i, (kind, module) in enumerate(points):
        if kind == "in":
            handles.append(module.register_forward_pre_hook(lambda m, args, i=i: keep(i, args[0])))
        elif kind == "out":
            handles.append(module.register_forward_hook(lambda m, args, out, i=i: keep(i, out)))
        elif kind == "layer_in":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: keep(i, layer_input(args, kwargs)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, i=i: keep(i, layer_output(out))))
    try:
        with suppress(Stop):
            run()
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(points))]


class NormalEquations:
    """Least squares for the kept units' scales s of one block, over the sample's tokens:
    sum_k s_k W_k x_k + b  against  dense (residual + sublayer) - pruned residual  (Kwon et al.).

    x is the pruned model's input to the output projection (earlier blocks already rescaled); the target asks the
    block to restore the dense residual sum, absorbing what earlier blocks lost. The equations are built from
    X'X and W'W (no per-unit output is materialised); a ridge of `damp` x the mean diagonal pulls towards s = 1
    where the sample says little.
    """

    def __init__(self, proj: nn.Module, kept: list[int], width: int, hidden_rows: torch.Tensor | None) -> None:
        self.k, self.width = len(kept), width
        self.chan = _channels(kept, width)
        w = effective_weight(proj).double()
        bias = _base(proj).bias
        b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                         device=w.device)
        self.hidden_rows = None if hidden_rows is None else hidden_rows.to(w.device)
        if self.hidden_rows is not None:
            w, b = w[self.hidden_rows], b[self.hidden_rows]
        self.wk, self.b = w[:, self.chan.to(w.device)], b
        n = len(self.chan)
        self.xtx = torch.zeros(n, n, dtype=torch.float64, device=w.device)
        self.xty = torch.zeros(n, dtype=torch.float64, device=w.device)

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """x: (tokens, projection inputs), target: (tokens, hidden) of one batch."""
        if self.hidden_rows is not None:
            target = target[:, self.hidden_rows.to(target.device)]
        x = x.double()[:, self.chan.to(x.device)]
        self.xtx += x.t() @ x
        self.xty += (x * ((target.double() - self.b) @ self.wk)).sum(0)

    def solve(self, damp: float) -> torch.Tensor:
        k, width = self.k, self.width
        gram = (self.xtx * (self.wk.t() @ self.wk)).view(k, width, k, width).sum((1, 3))
        rhs = self.xty.view(k, width).sum(1)
        ridge = damp * gram.diagonal().mean().clamp_min(1e-30)
        ones = torch.ones(k, dtype=torch.float64, device=gram.device)
        eye = torch.eye(k, dtype=torch.float64, device=gram.device)
        return ones + torch.linalg.solve(gram + ridge * eye, rhs - gram @ ones)


@torch.no_grad()
def _fold_scales(proj: nn.Module, chan: torch.Tensor, scale: torch.Tensor) -> None:
    """Scale input columns: the base weight's and every LoRA A's (the adapter reads the same input)."""
    targets = [_base(proj).weight, *(a.weight for a, _ in adapters.lora_factors(proj))]
    for w in targets:
        idx = chan.to(w.device)
        w[:, idx] = w[:, idx] * scale.to(w.device, w.dtype)[None, :]


def _stacks(model: nn.Module) -> list[list]:
    """The layers grouped by stack, in forward order (T5: encoder, then decoder)."""
    out: list[list] = []
    for lay in layer_sites(model):
        if not out or out[-1][0].stack.name != lay.stack.name:
            out.append([])
        out[-1].append(lay)
    return out


def _blocks(lay, plan: PruningPlan, masks: Masks) -> list[tuple]:
    """A layer's narrowable blocks in forward order: (key, output projection, units, unit width, kept, mask
    store, mask key)."""
    blocks = [(a.key, a.proj("o"), a.num_heads, a.head_dim, plan.heads.get(a.key), masks.heads, a.key)
              for a in lay.attentions.values()]
    blocks.append(("ffn:" + lay.key, lay.ffn.output, lay.ffn.width, 1, plan.neurons.get(lay.key), masks.neurons,
                   lay.key))
    return blocks


def kwon_rescale(model: nn.Module, plan: PruningPlan, batches: Iterable[dict], *, damp: float = 1e-4,
                 max_scale: float = 10.0) -> dict[str, list[float]]:
    """Kwon et al.'s rescaling: per narrowed attention block and FFN, in forward order, least-squares scale
    factors for the kept heads/neurons so that the pruned model's residual sum after the block matches the
    dense model's on the sample (the pruned model's inputs already carry the earlier blocks' scales); folded
    into the output projection's columns. Call before ``apply_plan``.

    As in Kwon et al.'s code, a solve with a scale beyond ±`max_scale` (or not finite) stops the
    procedure there: that block and the later ones keep scale 1. Returns the scales (keys: attention site
    keys, "ffn:<layer>"); plan.meta["kwon_rescale"] records what was rescaled and where it stopped.

    Cost: as Kwon et al.'s code, layer by layer: the dense and the pruned streams are carried from layer to
    layer (:class:`LayerReplay`), so a block costs one layer's compute per pass, not the model's up to it
    (SmolLM2, 60 blocks: about 4 forward passes over the sample rather than 60). Memory: both streams' hidden
    states on the sample, and (kept channels)^2 per block.
    """
    plan.validate(model)
    batches = list(each_batch(model, batches))
    masks = plan_masks(model, plan)
    hidden_rows = None if plan.hidden is None else torch.tensor(plan.hidden, dtype=torch.long)
    mask_key = stack_mask_keys(model)
    rows = TokenRows()
    scales: dict[str, torch.Tensor] = {}
    folds: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    stopped = None
    with scoring(model), torch.no_grad():
        for layers in _stacks(model):
            # recorded per stack: a decoder's recorded encoder states are the rescaled pruned encoder's
            dense = LayerReplay(model, batches, layers)
            with attach(model, masks):
                pruned = LayerReplay(model, batches, layers)
            dense_in, pruned_in = dense.first, pruned.first
            for lay in layers:
                blocks = _blocks(lay, plan, masks)
                # one dense run of the layer: every block's residual sum, and the next layer's input
                points = [_residual_points(lay, i)[1] for i in range(len(blocks))] + [("layer_out", lay.module)]
                dense_runs = [_capture(partial(dense, lay, b, dense_in[b]), points) for b in range(len(batches))]
                for index, (key, proj, units, width, kept, store, mask_name) in enumerate(blocks):
                    if stopped or kept is None or len(kept) in (0, units):
                        continue
                    before = _residual_points(lay, index)[0]
                    eq = NormalEquations(proj, kept, width, hidden_rows)
                    rk = mask_key[lay.key]
                    for b, batch in enumerate(batches):
                        rows.set(batch)
                        with attach(model, masks):
                            residual, x = _capture(partial(pruned, lay, b, pruned_in[b]),
                                                   [before, ("in", proj)])
                        eq.add(rows(x, rk), rows(dense_runs[b][index], rk).double() - rows(residual, rk).double())
                    scale = eq.solve(damp)
                    if not torch.isfinite(scale).all() or float(scale.abs().max()) > max_scale:
                        stopped = key
                        continue
                    # later blocks are fitted on the pruned model with this block's scales in place
                    idx = torch.tensor(kept, dtype=torch.long, device=store[mask_name].device)
                    store[mask_name][idx] = scale.to(store[mask_name].device, store[mask_name].dtype)
                    scales[key] = scale
                    folds.append((proj, _channels(kept, width), scale.repeat_interleave(width)))
                dense_in = [run[-1] for run in dense_runs]
                with attach(model, masks):
                    pruned_in = [layer_output(pruned(lay, b, pruned_in[b])) for b in range(len(batches))]
    for proj, chan, s in folds:
        _fold_scales(proj, chan, s)
    plan.meta["kwon_rescale"] = {"rescaled": list(scales), "stopped_at": stopped}
    return {k: [float(x) for x in v] for k, v in scales.items()}
