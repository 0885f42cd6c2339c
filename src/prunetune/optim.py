"""Keeping an optimizer across surgery: re-point it at the new parameters and transform its state.

APT's code resets the optimizer after each pruning step and loses Adam's running averages; here the
moments of every surviving entry are kept (sliced at the kept indices), and new LoRA rank directions
start with zero moments. The learning-rate scheduler holds the optimizer, not the parameters, so it
carries on untouched.

Rows added by rank growth share their tensor's step count, which Adam uses for bias correction: zero
moments corrected as if they were t steps old make a new row move up to 3-6x the learning rate for
its first hundreds of steps (at step t, 1 - beta^t is about 1, where a fresh Adam divides by
1 - beta1^k and 1 - beta2^k, k being the row's own age). No initial moment fixes that for every later
step (the correction a fresh row needs changes each step, and Adam's update of the moments cannot be
rescaled for m and v at once), and splitting grown rows into their own tensors would break PEFT's
single-weight adapters. So the moments stay exactly what a fresh Adam would hold (zero at birth, the
same recursion after), and an optimizer step hook replaces the new rows' update by the one a fresh
Adam makes at their own age: exact, up to rounding, for Adam and AdamW (amsgrad, weight decay and
maximize included; other optimizers keep no bias correction and are left alone). The rows' birth steps
live beside the optimizer (weakly keyed by it), not in its state_dict, so the training loop's run state
stores them (growth_state / load_growth_state): a run resumed from the optimizer's state alone would treat
them as old rows.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from prunetune.errors import PrunetuneError
from prunetune.surgery import SliceLog


def _transform(value: torch.Tensor, ops: list[tuple]) -> torch.Tensor:
    for kind, dim, payload in ops:
        if kind == "slice":
            value = value.index_select(dim, payload.to(value.device))
        else:  # grow by `payload` zero entries along dim
            shape = list(value.shape)
            shape[dim] = payload
            value = torch.cat([value, value.new_zeros(shape)], dim)
    return value


@dataclass
class _Births:
    """For one parameter: the optimizer step at which each index along `dim` was born (0: an original one)."""

    dim: int
    step: torch.Tensor  # float64, one entry per index along dim
    seen: float  # the parameter's step count when last corrected (a step without a gradient leaves it)


class _GrowthCorrection:
    """The step hook of one Adam/AdamW optimizer: rows born at step b of a tensor now at step t update as a
    fresh Adam does at age t - b (see the module docstring)."""

    def __init__(self):
        self.births: dict[torch.Tensor, _Births] = {}

    def follow(self, optimizer, old: torch.Tensor, new: torch.Tensor, ops: list[tuple], state: dict) -> None:
        """Carry `old`'s birth steps over to `new` through the surgery's ops, adding the rows grown now."""
        entry = self.births.pop(old, None)
        # NAdam, RAdam... correct their moments otherwise; other optimizers keep no bias correction
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or "exp_avg_sq" not in state:
            return
        now = float(state["step"])
        shape = list(old.shape)
        for kind, dim, payload in ops:
            if kind == "slice":
                if entry is not None and dim == entry.dim:
                    entry.step = entry.step.index_select(0, payload.cpu())
                shape[dim] = len(payload)
                continue
            if entry is None or (dim != entry.dim and not bool((entry.step > 0).any())):
                entry = _Births(dim, torch.zeros(shape[dim], dtype=torch.float64), now)
            elif dim != entry.dim:
                raise PrunetuneError("a parameter grew along two dimensions: Adam's bias correction cannot follow")
            entry.step = torch.cat([entry.step, torch.full((payload,), now, dtype=torch.float64)])
            shape[dim] += payload
        if entry is not None and bool((entry.step > 0).any()):
            entry.seen = now
            self.births[new] = entry

    @torch.no_grad()
    def __call__(self, optimizer, args, kwargs) -> None:
        if not self.births:
            return
        for group in optimizer.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            lr, eps = float(group["lr"]), float(group["eps"])
            for p in group["params"]:
                entry = self.births.get(p)
                state = optimizer.state.get(p)
                if entry is None or not state or float(state["step"]) == entry.seen:
                    continue  # not grown, or no gradient this step (Adam left it alone)
                t = entry.seen = float(state["step"])
                young = (entry.step > 0).nonzero().flatten()
                age = t - entry.step[young]
                # once beta^age is below float64 resolution both corrections are 1: the row is grown up
                grown_up = (beta1**age < 1e-16) & (beta2**age < 1e-16)
                entry.step[young[grown_up]] = 0.0
                if bool(grown_up.all()):
                    del self.births[p]
                    continue
                idx = young.to(p.device)
                m = state["exp_avg"].index_select(entry.dim, idx)
                v = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"].index_select(entry.dim, idx)
                # what Adam applied (its own arithmetic: lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps))...
                stale = m / (v.sqrt() / (1 - beta2**t) ** 0.5 + eps) * (lr / (1 - beta1**t))
                # ...and what a fresh Adam applies at each row's own age
                shape = [1] * p.dim()
                shape[entry.dim] = -1
                age = age.view(shape)
                bc1, bc2 = (1 - beta1**age).to(p), (1 - beta2**age).to(p)
                fresh = m / (v.sqrt() / bc2.sqrt() + eps) * (lr / bc1)
                p.index_add_(entry.dim, idx, stale - fresh)


_CORRECTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _correction(optimizer: torch.optim.Optimizer) -> _GrowthCorrection:
    if optimizer not in _CORRECTIONS:
        hook = _GrowthCorrection()
        optimizer.register_step_post_hook(hook)
        _CORRECTIONS[optimizer] = hook
    return _CORRECTIONS[optimizer]


def remap_optimizer(optimizer: torch.optim.Optimizer, log: SliceLog, model: torch.nn.Module | None = None) -> int:
    """Swap replaced parameters in the optimizer for their new tensors and transform their state.

    Returns how many parameters were remapped. State entries shaped like the parameter (Adam's
    exp_avg, exp_avg_sq) are transformed; scalars (step) are kept, and grown rows are bias-corrected by
    their own age from then on (see the module docstring).
    """
    remapped = 0
    correction = _correction(optimizer)
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            entry = log.lineage.get(id(p))
            if entry is None:
                continue
            _, new, ops = entry
            group["params"][i] = new
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[new] = {
                    k: _transform(v, ops) if torch.is_tensor(v) and v.shape == p.shape else v
                    for k, v in state.items()
                }
                correction.follow(optimizer, p, new, ops, state)
            remapped += 1
    if model is not None:  # parameters of removed modules (a block that lost every head) leave with their state
        live = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            for p in [p for p in group["params"] if id(p) not in live]:
                optimizer.state.pop(p, None)
                correction.births.pop(p, None)
            group["params"] = [p for p in group["params"] if id(p) in live]
    return remapped


def growth_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """The grown rows' birth steps, by parameter name (`names`: id of a parameter -> its name), for a checkpoint."""
    hook = _CORRECTIONS.get(optimizer)
    if hook is None:
        return {}
    return {names[id(p)]: {"dim": e.dim, "step": e.step.clone(), "seen": e.seen} for p, e in hook.births.items()}


def load_growth_state(optimizer: torch.optim.Optimizer, state: dict, params: dict[str, torch.nn.Parameter]) -> None:
    """Put saved birth steps back (`params`: the model's parameters by name)."""
    if not state:
        return
    hook = _correction(optimizer)
    hook.births = {params[name]: _Births(int(d["dim"]), d["step"].to(torch.float64), float(d["seen"]))
                   for name, d in state.items()}
