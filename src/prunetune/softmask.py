"""Soft-mask decay before each hard removal (APT's code): what a pruning step removes fades out first.

The plan of a pruning step at step s is chosen some steps earlier, at d (``decay_windows``); over the steps
d+1 .. s the masks of the structures it removes (heads, FFN neurons, hidden dims: masks.py's hooks) go linearly
from 1 to 0, reaching exactly 0 in the forward of step s, and after step s the surgery removes exactly those
structures. A structure whose mask is 0 contributes nothing, so the removal does not change the function: the
training sees no jump, and the rest of the network has had the decay steps to take over the removed part.
"""

from __future__ import annotations

import torch
from torch import nn

from prunetune.importance.rescale import plan_masks
from prunetune.masks import MaskHandle, Masks, attach
from prunetune.plan import PruningPlan


def decay_windows(removals: list[int], warmup: int, share: float) -> dict[int, int]:
    """Removal step -> the step after which its plan is chosen: `share` of the steps since the previous removal
    (the first: since the salience warm-up ended), at least one step after it; equal to the removal step when
    there is no room (the plan is then chosen and applied at once)."""
    out, previous = {}, warmup
    for s in sorted(removals):
        out[s] = s - int(share * max(0, s - previous - 1))
        previous = s
    return out


class SoftMaskDecay:
    """The pending plan of one pruning step and its fading masks."""

    def __init__(self):
        self.plan: PruningPlan | None = None
        self.decided = 0
        self.removal = 0
        self._keep: Masks | None = None  # 0/1: which units the plan keeps
        self._live: Masks | None = None  # the values the hooks read
        self._handle: MaskHandle | None = None

    @property
    def active(self) -> bool:
        return self.plan is not None

    def begin(self, model: nn.Module, plan: PruningPlan, decided: int, removal: int) -> None:
        self.plan, self.decided, self.removal = plan, decided, removal
        keep = plan_masks(model, plan)
        # only what the plan touches gets a hook
        keep.heads = {k: v for k, v in keep.heads.items() if not bool(v.all())}
        keep.neurons = {k: v for k, v in keep.neurons.items() if not bool(v.all())}
        if keep.hidden is not None and bool(keep.hidden.all()):
            keep.hidden = None
        self._keep = keep
        self._live = Masks({k: v.clone() for k, v in keep.heads.items()},
                           {k: v.clone() for k, v in keep.neurons.items()},
                           keep.hidden.clone() if keep.hidden is not None else None)
        self._handle = attach(model, self._live)
        self.set_for(decided)

    def level(self, step: int) -> float:
        """The removed units' mask value in the forward of the step after `step`."""
        span = max(1, self.removal - self.decided)
        return max(0.0, (self.removal - step - 1) / span)

    @torch.no_grad()
    def set_for(self, step: int) -> None:
        """Set the masks for the forward of step + 1."""
        level = self.level(step)
        for keep, live in zip(self._keep.tensors(), self._live.tensors(), strict=True):
            live.copy_(keep + (1 - keep) * level)

    def finish(self) -> PruningPlan:
        """Take the masks off (the surgery follows) and hand over the plan."""
        plan = self.plan
        self.remove()
        self.plan = None
        return plan

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._keep, self._live = None, None, None

    def state_dict(self) -> dict:
        return {"plan": self.plan.to_dict() if self.plan is not None else None, "decided": self.decided,
                "removal": self.removal}

    def load_state_dict(self, state: dict, model: nn.Module, step: int) -> None:
        """Back to the state saved after optimizer step `step` (the model has the structure it had then)."""
        self.remove()
        self.plan = None
        if state["plan"] is not None:
            self.begin(model, PruningPlan.from_dict(state["plan"]), int(state["decided"]), int(state["removal"]))
            self.set_for(step)
