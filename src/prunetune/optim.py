"""Keeping an optimizer across surgery: re-point it at the new parameters and transform its state.

APT's code resets the optimizer after each pruning step and loses Adam's running averages; here the
moments of every surviving entry are kept (sliced at the kept indices), and new LoRA rank directions
start with zero moments. The learning-rate scheduler holds the optimizer, not the parameters, so it
carries on untouched.
"""

from __future__ import annotations

import torch

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


def remap_optimizer(optimizer: torch.optim.Optimizer, log: SliceLog, model: torch.nn.Module | None = None) -> int:
    """Swap replaced parameters in the optimizer for their new tensors and transform their state.

    Returns how many parameters were remapped. State entries shaped like the parameter (Adam's
    exp_avg, exp_avg_sq) are transformed; scalars (step) are kept.
    """
    remapped = 0
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
            remapped += 1
    if model is not None:  # parameters of removed modules (a block that lost every head) leave with their state
        live = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            for p in [p for p in group["params"] if id(p) not in live]:
                optimizer.state.pop(p, None)
            group["params"] = [p for p in group["params"] if id(p) in live]
    return remapped
