"""The one place a model's structure changes during training: pruning plans and LoRA rank growth.

A training hook never edits the model: it returns a :class:`Change` (a plan, or new ranks for some adapters)
and ``fit`` applies it here — surgery, then the optimizer re-pointed at the new tensors with its state
transformed — before every hook follows (salience, teacher) and the data-parallel wrapper is built again.
Changes are plain data (JSON), so a checkpoint records them and a resumed run rebuilds the same shapes by
replaying them on the freshly built model before its tensors are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune import adapters
from prunetune.optim import remap_optimizer
from prunetune.plan import PruningPlan
from prunetune.runtime import Runtime
from prunetune.surgery import SliceLog, apply_plan


@dataclass
class Change:
    """A structure change: a plan (indices relative to the model now) and/or new ranks of LoRA layers (by the
    module's full name). `note` travels with it for the record (e.g. the target it meets)."""

    plan: PruningPlan | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    note: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.plan is None and not self.ranks

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict() if self.plan is not None else None, "ranks": dict(self.ranks),
                "note": dict(self.note)}

    @classmethod
    def from_dict(cls, d: dict) -> Change:
        plan = PruningPlan.from_dict(d["plan"]) if d.get("plan") is not None else None
        return cls(plan, {k: int(v) for k, v in (d.get("ranks") or {}).items()}, dict(d.get("note") or {}))


def growth_generator(seed: int, step: int) -> torch.Generator:
    """The generator new adapter rows are drawn from: fixed by the run's seed and the step, so a resumed run, every
    rank and a single process draw the same rows whatever the global RNG went through."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def apply_change(model: nn.Module, change: Change, *, seed: int, step: int,
                 optimizer: torch.optim.Optimizer | None = None) -> SliceLog:
    """Apply `change` to `model` (the unwrapped model) and re-point `optimizer` at the new tensors.

    Returns the log of replaced parameters, which hooks follow (see TrainHook.after_change).
    """
    log = SliceLog()
    with torch.no_grad():
        if change.plan is not None:
            apply_plan(model, change.plan, log)
        if change.ranks:
            layers = adapters.lora_layers(model)
            g = growth_generator(seed, step)
            for name in sorted(change.ranks):  # a fixed order: the rows drawn do not depend on dict order
                adapters.grow_rank(layers[name], change.ranks[name], log, generator=g)
    if optimizer is not None:
        remap_optimizer(optimizer, log, model)
    return log


def change_structure(model: nn.Module, change: Change, hooks, *, seed: int, step: int,
                     optimizer: torch.optim.Optimizer | None = None) -> list[Change | None]:
    """Apply `change`, then let every hook follow it; returns each hook's follow-up request (or None)."""
    before = dict(model.named_parameters())
    log = apply_change(model, change, seed=seed, step=step, optimizer=optimizer)
    return [h.after_change(step, change, model, log, before) for h in hooks]


def step_changes(step: int, model: nn.Module, hooks, *, seed: int, optimizer: torch.optim.Optimizer | None,
                 runtime: Runtime, record: list[dict]) -> bool:
    """Ask every hook, in turn, for a change after optimizer step `step`; apply the main rank's (and the follow-ups
    its hook asks for) on every rank, appending each to `record`. True when the structure changed."""
    changed = False
    for i, hook in enumerate(hooks):
        change = hook.after_step(step, model)
        while change is not None:
            change = Change.from_dict(runtime.broadcast(change.to_dict()))
            if change.empty:
                break
            record.append({"step": step, "change": change.to_dict()})
            change = change_structure(model, change, hooks, seed=seed, step=step, optimizer=optimizer)[i]
            changed = True
    return changed


def first_difference(saved: dict[str, list[int]], live: dict[str, list[int]]) -> str:
    """The first parameter whose shape differs between a saved state and a rebuilt model, in words."""
    for name in sorted(set(saved) | set(live)):
        if saved.get(name) != live.get(name):
            return f"{name}: {saved.get(name) or 'absent'} in the checkpoint, {live.get(name) or 'absent'} here"
    return ""
