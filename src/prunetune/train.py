"""One training loop for every method: AdamW, warm-up + linear decay, accumulation, evaluation, best state.

``fit`` receives every dependency (model, loaders, evaluation, config, hooks) and owns none of the I/O
beyond the metrics log. Methods that change the model mid-training (APT) do so through a hook that runs
after an optimizer step and may replace parameters; the loop keeps the optimizer and scheduler, whose
state the hook transforms (see optim.py), so nothing restarts.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_SEED = 42  # every command's default seed: importance, prune and finetune pick the same sample and head

# Progress bars and stage lines on stderr; library users (and tests) may turn them off, as with transformers'
# and datasets' own bars.
_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Show (or hide) prunetune's progress bars and stage lines."""
    _PROGRESS["enabled"] = enabled


def progress_enabled() -> bool:
    return _PROGRESS["enabled"]


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "batch",
             leave: bool = False, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr for one stage (hidden when progress is off, or `enabled` is False)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=not (enabled and _PROGRESS["enabled"]))


def status(message: str) -> None:
    """One line on stderr announcing a stage (printed through tqdm so it does not break a live bar)."""
    if _PROGRESS["enabled"]:
        tqdm.write(f"prunetune: {message}", file=sys.stderr)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method."""

    epochs: float = 1.0  # may be fractional
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06  # fraction of the steps with a linear warm-up
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0
    eval_every: int = 0  # optimizer steps between evaluations; 0 = at the end of every epoch
    seed: int = DEFAULT_SEED
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    progress: bool = True
    log_path: Path | None = None  # metrics per step, JSONL


@dataclass
class FitResult:
    """What a run produced: history, best evaluation, time and memory."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_step: int = -1
    train_time_s: float = 0.0
    steps: int = 0
    precision: str = "fp32"  # the autocast dtype the steps actually ran in


# the report's names of autocast dtypes (None: no autocast, full precision)
PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TrainHook:
    """Extension point: called after each optimizer step and after each evaluation."""

    def after_step(self, step: int, total: int, model: nn.Module, optimizer) -> bool:
        """Return True when the model's structure changed (the best state is then reset)."""
        return False

    def after_eval(self, step: int, metrics: dict, model: nn.Module, is_best: bool) -> None:
        pass

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments for the model's forward (e.g. output_hidden_states for distillation)."""
        return {}

    def loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        """Replace the task loss (e.g. distillation); None keeps it."""
        return None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (a new task head and new adapters draw from torch's generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only where it helps: on GPU. 'auto' = bf16 where supported, else fp16."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters with linear warm-up and linear decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable state (small for LoRA) plus norms; enough to restore the best evaluation."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            if n in params and params[n].shape == v.shape:
                params[n].copy_(v)


def fit(
    model: nn.Module,
    train_loader: Iterable[dict],
    evaluate: Callable[[nn.Module], dict],
    cfg: TrainConfig,
    *,
    hooks: list[TrainHook] = (),
    device: torch.device | None = None,
    main_metric: str = "main",
) -> FitResult:
    """Train, evaluating every epoch (or `eval_every` steps); the best evaluation's weights are restored.

    The best evaluation is the one a task's evaluation (tasks.Evaluation) says `improves` on the others, in the
    direction of its main metric; for a plain function, the highest `main_metric`.
    """
    improves = getattr(evaluate, "improves", None)
    seed_everything(cfg.seed)
    device = device or pick_device()
    model.to(device)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    optimizer, scheduler = make_optimizer(model, cfg, total)
    amp = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    log = open(cfg.log_path, "a") if cfg.log_path else None  # noqa: SIM115 (closed in finally)
    result = FitResult(precision=PRECISION_NAMES[amp])
    best_state, step, micro = None, 0, 0
    eval_every = cfg.eval_every or steps_per_epoch
    bar = progress(total=total, enabled=cfg.progress, desc="train", unit="step", leave=True)
    start = time.perf_counter()
    try:
        model.train()
        while step < total:
            for batch in train_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    extra = {k: v for h in hooks for k, v in h.forward_kwargs().items()}
                    outputs = model(**batch, **extra)
                    loss = outputs.loss
                    for h in hooks:
                        replaced = h.loss(model, batch, outputs)
                        loss = replaced if replaced is not None else loss
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                # Fix: a list, not a generator: any() stopped at the first hook that changed the model, so
                # the hooks after it never saw that step.
                changed = any([h.after_step(step, total, model, optimizer) for h in hooks])
                if changed:  # shapes changed: an earlier best state no longer fits
                    best_state, result.best = None, None
                entry = {"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0]}
                entry["examples_per_s"] = step * cfg.grad_accum * batch["input_ids"].shape[0] / (
                    time.perf_counter() - start
                )
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", ex_per_s=f"{entry['examples_per_s']:.1f}")
                if step % eval_every == 0 or step == total:
                    model.eval()
                    metrics = evaluate(model)
                    model.train()
                    entry["eval"] = metrics
                    if result.best is None:
                        is_best = True
                    elif improves is not None:
                        is_best = improves(metrics, result.best)
                    else:
                        is_best = metrics[main_metric] >= result.best[main_metric]
                    if is_best:
                        result.best, result.best_step, best_state = metrics, step, _snapshot(model)
                    for h in hooks:
                        h.after_eval(step, metrics, model, is_best)
                result.history.append(entry)
                if log:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                if step >= total:
                    break
    finally:
        bar.close()
        if log:
            log.close()
    result.train_time_s = time.perf_counter() - start
    result.steps = step
    if best_state is not None:
        _restore(model, best_state)
    model.eval()
    return result


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[dict], device: torch.device | None = None, *,
    outputs: tuple[str, ...] = ("logits",), targets: tuple[str, ...] = ("labels",),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The named model outputs, and the batches' named targets (kept out of the forward), over a loader.

    Evaluation mode, no gradients. Outputs whose width varies from batch to batch (per-token logits under
    per-batch padding) are right-padded with -inf, which no argmax picks.
    """
    device = device or next(model.parameters()).device
    model.eval()
    got: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    kept: dict[str, list[np.ndarray]] = {k: [] for k in targets}
    for batch in progress(loader, desc="evaluate"):
        batch = {k: v.to(device) for k, v in batch.items()}
        for k in targets:
            kept[k].append(batch.pop(k).cpu().numpy())
        out = model(**batch)
        for k in outputs:
            got[k].append(out[k].float().cpu().numpy())
    return {k: _concatenate(v) for k, v in got.items()}, {k: _concatenate(v) for k, v in kept.items()}


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        raise ValueError("nothing to predict: the loader has no batches")
    if arrays[0].ndim < 2 or len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    fill = -np.inf if np.issubdtype(arrays[0].dtype, np.floating) else 0
    return np.concatenate([np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                  constant_values=fill) for a in arrays])
