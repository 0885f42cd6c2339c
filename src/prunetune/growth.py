"""APT's adaptive tuning: which LoRA adapters grow in rank after a pruning step, and by how much.

``GROWTH`` holds the policies (``AptOptions.growth``):

- ``adapter`` (APT's code, the default): each adapter is valued by its own salience, per rank row
  |sum_j A_rj x dL/dA_rj| (the first-order loss change of removing the row), smoothed over steps (EMA) and summed
  over its rows. After the i-th of n pruning steps the total LoRA rank is brought to r0 x (1 + (B - 1) i / n)
  (B = ``tuning_budget``, 4: paced linearly to 4x by the last pruning step): the most salient adapters below
  their cap (``max_rank_mult`` x their start rank) grow first, each by its start rank per round.
- ``layer`` (prunetune's earlier rule): the adapters of the layers with the most head salience,
  ``grow_fraction`` of them, each by its start rank, while the LoRA parameters stay within ``tuning_budget`` x
  the start.

New rows start with B's columns at zero (the function does not move; adapters.grow_rank) and get a fresh Adam
at their own age (optim.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunetune import adapters
from prunetune.families import layer_sites


class AdapterSalience:
    """Per LoRA layer (by module name) and rank row: |sum over the row of A x dL/dA|, as an EMA over steps."""

    def __init__(self, ema: float):
        self.ema = ema
        self.rows: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """Read this step's gradients (before the optimizer step; under fp16 already unscaled)."""
        now = {}
        for name, layer in adapters.lora_layers(model).items():
            a, _ = adapters.lora_weights(layer)
            if a.grad is None or a.numel() == 0:
                continue
            now[name] = (a.detach().float() * a.grad.float()).sum(1).abs().cpu()
        if not all(bool(torch.isfinite(v).all()) for v in now.values()):
            return  # an fp16 overflow: the optimizer skips this step too
        for name, v in now.items():
            old = self.rows.get(name)
            if old is not None and old.shape[0] < v.shape[0]:  # grown rows: no history yet
                old = torch.cat([old, old.new_zeros(v.shape[0] - old.shape[0])])
            self.rows[name] = v if old is None else self.ema * old + (1 - self.ema) * v

    def score(self, name: str) -> float:
        v = self.rows.get(name)
        return float(v.sum()) if v is not None else 0.0


def _trainable(layer: nn.Module) -> bool:
    a, b = adapters.lora_weights(layer)
    return a.shape[1] > 0 and b.shape[0] > 0  # an adapter on an emptied projection trains nothing


def grow_by_adapter(hook, model: nn.Module, step: int) -> dict[str, int]:
    """Bring the total rank to its share of the budget at this pruning step, the most salient adapters first."""
    layers = adapters.lora_layers(model)
    order = sorted(hook.schedule)
    if step not in order or not layers:
        return {}
    start_total = sum(hook.start_rank.values())
    target = round(start_total * (1 + (hook.cfg.tuning_budget - 1) * (order.index(step) + 1) / len(order)))
    ranks = {n: adapters.lora_rank(m) for n, m in layers.items()}
    need = target - sum(ranks.values())
    cap = {n: hook.cfg.max_rank_mult * hook.start_rank.get(n, r) for n, r in ranks.items()}
    # salience first; ties (no salience yet) in module order, so the choice is the same on every rank
    eligible = sorted((n for n in layers if _trainable(layers[n]) and ranks[n] < cap[n]),
                      key=lambda n: -hook.adapter_salience.score(n))
    new = dict(ranks)
    while need > 0 and eligible:
        for name in list(eligible):
            add = min(hook.start_rank.get(name, ranks[name]), cap[name] - new[name], need)
            new[name] += add
            need -= add
            if new[name] >= cap[name]:
                eligible.remove(name)
            if need <= 0:
                break
    return {n: r for n, r in new.items() if r > ranks[n]}


def grow_by_layer(hook, model: nn.Module, step: int) -> dict[str, int]:
    """The adapters of the layers with the most head salience, within the LoRA parameter budget."""
    layers = adapters.lora_layers(model)
    if not layers:
        return {}
    lora_ids = {id(x) for x in layers.values()}
    layer_of = {id(m): lay.key for lay in layer_sites(model) for m in lay.module.modules() if id(m) in lora_ids}
    sal: dict[str, float] = {}
    for key, v in hook.stats.salience.items():
        if "/" in key:
            sal[key.split("/")[0]] = sal.get(key.split("/")[0], 0.0) + float(v.sum())
    ranked = sorted(layers.items(), key=lambda kv: -sal.get(layer_of.get(id(kv[1]), ""), 0.0))
    ranked = ranked[: max(1, int(len(ranked) * hook.cfg.grow_fraction))]
    budget = hook.cfg.tuning_budget * hook.start_lora_params
    lora_params, out = hook.lora_params(model), {}
    for name, layer in ranked:
        r0 = hook.start_rank.get(name, adapters.lora_rank(layer))
        new_r = min(adapters.lora_rank(layer) + r0, hook.cfg.max_rank_mult * r0)
        a, b = adapters.lora_weights(layer)
        extra = (new_r - a.shape[0]) * (a.shape[1] + b.shape[0])
        if extra <= 0 or lora_params + extra > budget:
            continue
        out[name] = new_r
        lora_params += extra
    return out


GROWTH: dict[str, Callable[..., dict[str, int]]] = {"adapter": grow_by_adapter, "layer": grow_by_layer}
