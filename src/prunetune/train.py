"""One training loop for every method: AdamW, warm-up + linear decay, accumulation, evaluation, best state.

``fit`` receives every dependency (model, loaders, evaluation, options, hooks, the run's context) and owns
one serialisable :class:`~prunetune.state.RunState`: position in the data, optimizer, scheduler, RNG states,
best evaluation, history, the structure changes applied so far and the hooks' own state. The step count is
computed here, once, and handed to the hooks. A hook that wants the model's structure changed (APT) returns
a :class:`~prunetune.structure.Change` and the loop applies it in one place (surgery, optimizer remapped,
hooks follow, the data-parallel wrapper rebuilt); nothing restarts. With a context that saves every N steps,
the state goes to a checkpoint (the caller writes it); given a saved state, ``fit`` rebuilds the shapes it
recorded and goes on exactly where it stopped.
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

from prunetune.config import DEFAULT_SEED, TrainingOptions
from prunetune.errors import PrunetuneError
from prunetune.optim import growth_state, load_growth_state
from prunetune.runtime import Runtime, TrainData
from prunetune.state import RunState, capture_rng, decode, encode, restore_rng
from prunetune.structure import Change, change_structure, first_difference, step_changes

__all__ = ["DEFAULT_SEED", "FitResult", "RunContext", "TrainConfig", "TrainHook", "fit", "predict"]

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
    """A tqdm bar on stderr for one stage (hidden when progress is off, or `enabled` is False).

    Redrawn at most every 30 s when stderr is a file or pipe (a log would get a line per update otherwise).
    """
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                mininterval=0.1 if interactive else 30.0, disable=not (enabled and _PROGRESS["enabled"]))


def status(message: str) -> None:
    """One line on stderr announcing a stage (printed through tqdm so it does not break a live bar)."""
    if _PROGRESS["enabled"]:
        tqdm.write(f"prunetune: {message}", file=sys.stderr)


# The loop reads the run configuration's training part (config.TrainingOptions): one source of defaults.
TrainConfig = TrainingOptions


@dataclass
class FitResult:
    """What a run produced: history, best evaluation, time and memory."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_step: int = -1
    train_time_s: float = 0.0
    steps: int = 0
    precision: str = "fp32"  # the autocast dtype the steps actually ran in
    changes: list[dict] = field(default_factory=list)  # the structure changes applied: {"step", "change"}


# the report's names of autocast dtypes (None: no autocast, full precision)
PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TrainHook:
    """Extension point of the loop. A hook never changes the model's structure itself: it returns a Change, which
    the loop applies (see structure.py), and then tells every hook (after_change)."""

    def start(self, total: int, runtime: Runtime) -> None:
        """Called once before the first step (and before a resumed run replays its changes): the run's step count
        and its ranks."""

    def gradient_scale(self, scale: float) -> None:
        """Before an optimizer step under fp16: its gradients are of the loss times `scale` (the gradient scaler's),
        and are not finite when the step overflowed (the scaler then skips it)."""

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before optimizer step `step`: the step's gradients are in `.grad` (unscaled, reduced over the ranks,
        clipped); what the hook itself trains outside the model (a distillation map) steps here at the
        optimizer's current learning rate."""

    def after_step(self, step: int, model: nn.Module) -> Change | None:
        """After each optimizer step: a structure change to apply now, or None. Under data parallelism every rank
        must return a Change at the same steps; the main rank's is applied everywhere."""
        return None

    def after_change(self, step: int, change: Change, model: nn.Module, log, before: dict) -> Change | None:
        """After the loop applied a change (`log`: the replaced parameters; `before`: the parameters by name before
        it): follow it; the hook whose change it was may ask for a follow-up change (e.g. growth after pruning)."""
        return None

    def after_eval(self, step: int, metrics: dict, model: nn.Module, is_best: bool) -> None:
        pass

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments for the model's forward (e.g. output_hidden_states for distillation)."""
        return {}

    def loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        """Replace the task loss (e.g. distillation); None keeps it."""
        return None

    def state_dict(self) -> dict:
        """The hook's own state for a checkpoint (tensors allowed, at any depth)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class RunContext:
    """What a run gives the loop besides its options: ranks and device, where the metrics go, where checkpoints go,
    and a saved state to resume from."""

    runtime: Runtime = field(default_factory=Runtime.single)  # default: one process, on the GPU when there is one
    log_path: Path | None = None  # metrics per step, JSONL (the main rank writes it)
    progress: bool = True
    save_every: int = 0  # optimizer steps between checkpoints (0: none)
    save: Callable[[RunState], None] | None = None  # writes a checkpoint; called on the main rank only
    resume: RunState | None = None


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


def make_optimizer(model: nn.Module, cfg: TrainingOptions, total_steps: int, names: list[str] | None = None):
    """AdamW over the trainable parameters (or the named ones, in that order) with linear warm-up and decay."""
    if cfg.lr is None:
        raise PrunetuneError("training needs a learning rate (TrainingOptions.lr)")
    if names is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        by_name = dict(model.named_parameters())
        params = [by_name[n] for n in names]
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


class _Loop:
    """One run of `fit`: the model, its wrapper, optimizer, scheduler and the RunState they advance."""

    def __init__(self, model: nn.Module, train_loader, evaluate, cfg: TrainingOptions, hooks, ctx: RunContext,
                 main_metric: str, device: torch.device | None):
        self.model, self.evaluate, self.cfg, self.hooks, self.ctx = model, evaluate, cfg, list(hooks), ctx
        self.main_metric = main_metric
        self.runtime = ctx.runtime if device is None or ctx.runtime.distributed else Runtime.single(device)
        self.device = self.runtime.device
        self.data = TrainData(train_loader, self.runtime, cfg.seed)
        per_epoch = self.data.per_epoch()
        if per_epoch == 0:
            raise PrunetuneError("no training batch: the training set is empty")
        # the run's step count, computed here once; hooks get it from start()
        self.total = max(1, math.ceil(math.ceil(per_epoch / cfg.grad_accum) * cfg.epochs))
        self.eval_every = cfg.eval_every or math.ceil(per_epoch / cfg.grad_accum)
        self.state = RunState(total_steps=self.total, world_size=self.runtime.world_size)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.amp = autocast_dtype(cfg.precision, self.device)

    # -- setting up, resuming --------------------------------------------------------------------------

    def setup(self) -> None:
        seed_everything(self.cfg.seed)
        self.model.to(self.device)
        for h in self.hooks:
            h.start(self.total, self.runtime)
        resume = self.ctx.resume
        if resume is not None:
            self._rebuild(resume)
        names = [n for group in resume.param_names for n in group] if resume is not None else None
        self.optimizer, self.scheduler = (make_optimizer(self.model, self.cfg, self.total, names) if names
                                          else make_optimizer(self.model, self.cfg, self.total))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        if resume is not None:
            self._load(resume)
        self.wrapped = self.runtime.wrap(self.model)

    def _rebuild(self, saved: RunState) -> None:
        """Replay the recorded structure changes on the freshly built model, then load its trainable tensors."""
        if saved.total_steps != self.total:
            raise PrunetuneError(f"--resume: the checkpoint's run has {saved.total_steps} steps, this one "
                                 f"{self.total} (other data or epochs?)")
        if saved.world_size != self.runtime.world_size:
            raise PrunetuneError(f"--resume: the checkpoint was written by {saved.world_size} process(es), this run "
                                 f"has {self.runtime.world_size}; the data order and batches depend on it")
        for record in saved.changes:  # no optimizer yet: it is built on the rebuilt model
            change_structure(self.model, Change.from_dict(record["change"]), self.hooks, seed=self.cfg.seed,
                             step=record["step"])
        live = {n: list(p.shape) for n, p in self.model.named_parameters()}
        if live != saved.shapes:
            raise PrunetuneError("--resume: the checkpoint does not fit the model this run builds ("
                                 + first_difference(saved.shapes, live) + ")")
        params = dict(self.model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if trainable != set(saved.params):
            raise PrunetuneError("--resume: the checkpoint trained other parameters than this run does")
        with torch.no_grad():
            for n, v in saved.params.items():
                params[n].copy_(v)

    def _load(self, saved: RunState) -> None:
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        if self.scaler is not None and saved.scaler:
            self.scaler.load_state_dict(saved.scaler)
        load_growth_state(self.optimizer, saved.growth, dict(self.model.named_parameters()))
        for name in ("step", "epoch", "batch", "train_time_s", "history", "best", "best_step", "changes"):
            setattr(self.state, name, getattr(saved, name))
        self.best_state = ({n: v.to(self.device) for n, v in saved.best_state.items()}
                           if saved.best_state is not None else None)
        mine = saved.ranks[self.runtime.rank]
        for hook, hook_state in zip(self.hooks, mine["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        restore_rng(mine["rng"])  # last: nothing may draw between here and the next step

    def capture(self) -> RunState:
        """The whole state now (a step boundary). A collective under data parallelism: every rank calls it."""
        s = self.state
        named = dict(self.model.named_parameters())
        names = {id(p): n for n, p in named.items()}
        local = {"rng": capture_rng(), "hooks": [h.state_dict() for h in self.hooks]}
        if self.runtime.distributed:  # plain CPU data over the wire; every rank's part kept
            tensors: dict = {}
            meta = encode(local, tensors, "rank")
            ranks = [decode(m, t) for m, t in self.runtime.gather((meta, tensors))]
        else:
            ranks = [local]
        return RunState(
            step=s.step, epoch=s.epoch, batch=s.batch, total_steps=s.total_steps, world_size=s.world_size,
            train_time_s=s.train_time_s + (time.perf_counter() - self.started), history=list(s.history),
            best=s.best, best_step=s.best_step, best_state=self.best_state, changes=list(s.changes),
            params={n: p for n, p in named.items() if p.requires_grad},
            shapes={n: list(p.shape) for n, p in named.items()},
            param_names=[[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups],
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            growth=growth_state(self.optimizer, names), ranks=ranks,
        )

    # -- structure changes -----------------------------------------------------------------------------

    def _structure(self, step: int) -> bool:
        """Apply the changes the hooks ask for after this step (see structure.step_changes)."""
        changed = step_changes(step, self.model, self.hooks, seed=self.cfg.seed, optimizer=self.optimizer,
                               runtime=self.runtime, record=self.state.changes)
        if changed:  # shapes changed: DDP's buckets, and an earlier best state, no longer fit
            self.best_state, self.state.best = None, None
            self.runtime.release(self.wrapped)
            self.wrapped = self.runtime.wrap(self.model)
        return changed

    # -- the steps -------------------------------------------------------------------------------------

    def _forward_backward(self, batch: dict, sync: bool) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.runtime.no_sync(self.wrapped, skip=not sync):
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                extra = {k: v for h in self.hooks for k, v in h.forward_kwargs().items()}
                outputs = self.wrapped(**batch, **extra)
                loss = outputs.loss
                for h in self.hooks:
                    replaced = h.loss(self.model, batch, outputs)
                    loss = replaced if replaced is not None else loss
            scaled = loss / self.cfg.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach(), batch["input_ids"].shape[0]

    def _optimizer_step(self) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        if scaler:
            for h in self.hooks:  # gradients read off the backward pass (APT's salience) are scaled too
                h.gradient_scale(float(scaler.get_scale()))
            scaler.unscale_(optimizer)
        if self.cfg.max_grad_norm:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        # after clipping, where transformers' Trainer calls its callbacks too: hooks read the gradients the
        # optimizer steps on, so the Trainer callback (integrations) and fit see the same ones
        for h in self.hooks:
            h.before_optimizer_step(self.state.step + 1, self.model, optimizer)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _evaluate(self, step: int, entry: dict) -> None:
        self.model.eval()
        metrics = self.evaluate(self.model)
        self.model.train()
        entry["eval"] = metrics
        s = self.state
        improves = getattr(self.evaluate, "improves", None)  # a task's evaluation knows its metric's direction
        if s.best is None:
            is_best = True
        elif improves is not None:
            is_best = improves(metrics, s.best)
        else:
            is_best = metrics[self.main_metric] >= s.best[self.main_metric]
        if is_best:
            s.best, s.best_step, self.best_state = metrics, step, _snapshot(self.model)
        for h in self.hooks:
            h.after_eval(step, metrics, self.model, is_best)

    def _checkpoint(self) -> None:
        state = self.capture()
        if self.runtime.is_main:
            self.ctx.save(state)
        self.runtime.barrier()  # no rank runs ahead of a checkpoint being written

    def run(self) -> FitResult:
        s, cfg = self.state, self.cfg
        self.started = time.perf_counter()
        first_step = s.step
        main = self.runtime.is_main
        log = open(self.ctx.log_path, "a") if self.ctx.log_path and main else None  # noqa: SIM115 (closed below)
        if log:  # a resumed run's log starts with the steps done before
            log.writelines(json.dumps(e) + "\n" for e in s.history)
        bar = progress(total=self.total, enabled=self.ctx.progress and main, desc="train", unit="step", leave=True)
        bar.update(s.step)
        micro = 0
        try:
            self.model.train()
            while s.step < self.total:
                for batch in self.data.epoch(s.epoch, s.batch):
                    s.batch += 1
                    micro += 1
                    sync = micro % cfg.grad_accum == 0
                    loss, rows = self._forward_backward(batch, sync)
                    if not sync:
                        continue
                    self._optimizer_step()
                    s.step += 1
                    self._structure(s.step)
                    entry = {"step": s.step, "loss": float(loss), "lr": self.scheduler.get_last_lr()[0]}
                    done = (s.step - first_step) * cfg.grad_accum * rows * self.runtime.world_size
                    entry["examples_per_s"] = done / (time.perf_counter() - self.started)
                    bar.update(1)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", ex_per_s=f"{entry['examples_per_s']:.1f}")
                    if s.step % self.eval_every == 0 or s.step == self.total:
                        self._evaluate(s.step, entry)
                    s.history.append(entry)
                    if log:
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                    every = self.ctx.save_every
                    if every and self.ctx.save and (s.step % every == 0 or s.step == self.total):
                        self._checkpoint()
                    if s.step >= self.total:
                        break
                else:  # the epoch is over
                    s.epoch, s.batch = s.epoch + 1, 0
                    continue
                break
        finally:
            bar.close()
            if log:
                log.close()
            self.runtime.release(self.wrapped)
        elapsed = s.train_time_s + (time.perf_counter() - self.started)
        if self.best_state is not None:
            _restore(self.model, self.best_state)
        self.model.eval()
        return FitResult(history=s.history, best=s.best, best_step=s.best_step, train_time_s=elapsed, steps=s.step,
                         precision=PRECISION_NAMES[self.amp], changes=s.changes)


def fit(
    model: nn.Module,
    train_loader: Iterable[dict],
    evaluate: Callable[[nn.Module], dict],
    cfg: TrainingOptions,
    *,
    hooks: Iterable[TrainHook] = (),
    context: RunContext | None = None,
    device: torch.device | None = None,
    main_metric: str = "main",
) -> FitResult:
    """Train, evaluating every epoch (or `eval_every` steps); the best evaluation's weights are restored.

    The best evaluation is the one a task's evaluation (tasks.Evaluation) says `improves` on the others, in the
    direction of its main metric; for a plain function, the highest `main_metric`.
    `context`: ranks, metrics log, checkpoints and a state to resume from (default: one process, no files).
    `device` picks the device of a single-process run (default: the GPU when there is one).
    """
    loop = _Loop(model, train_loader, evaluate, cfg, hooks, context or RunContext(), main_metric, device)
    loop.setup()
    return loop.run()


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
