"""APT inside a user's own ``transformers.Trainer``: a callback, the Trainer keeping its loop.

``PruningCallback`` drives the same parts ``prunetune finetune --method apt`` does: :class:`~prunetune.apt.AptHook`
(salience on the ordinary backward pass, the cubic schedule, rank growth), applied through
:func:`~prunetune.structure.step_changes` (surgery, the optimizer re-pointed with its state sliced, the salience
summed over the ranks through :class:`~prunetune.runtime.Runtime`). What differs is who owns what:

- The Trainer builds the optimizer and the scheduler; changes remap *its* optimizer in place (the torch
  optimizer inside accelerate's wrapper), so the object it holds, and the scheduler holding that, keep working.
- The salience of one optimizer step is everything the micro-batches of that step left, folded in at
  ``on_step_end`` (after the Trainer's step, as ``fit`` folds it after its own), so gradient accumulation
  sums it exactly as ``fit`` does.
- The Trainer's checkpoints save the adapter (PEFT saves LoRA weights only) and the optimizer. ``on_save`` adds
  prunetune's part to the checkpoint folder: the structure changes so far, every trainable tensor (norms and
  task head included, which PEFT's save leaves out), the grown rows' ages and every rank's salience. The Trainer
  loads a checkpoint's weights in ``train()`` before any callback event, onto the model as it is: so a resumed
  run calls :meth:`PruningCallback.prepare_resume` on the freshly built model first, which replays the
  changes; the Trainer then loads its weights and optimizer state onto the right shapes.
- Under data parallelism the Trainer's DistributedDataParallel wrapper is rebuilt in place after a change (its
  gradient hooks point at tensors that are gone).

Self-distillation changes the loss, which a callback cannot: it is off here (``prunetune finetune`` has it).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, fields, replace
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune import adapters
from prunetune.apt import AptHook, flops_seq, plan_before_training
from prunetune.config import AptOptions, RunConfig
from prunetune.errors import PrunetuneError
from prunetune.export import save_compact
from prunetune.optim import growth_state, load_growth_state
from prunetune.plan import Budget, layer_cost
from prunetune.runtime import Runtime
from prunetune.state import decode, encode
from prunetune.structure import Change, change_structure, first_difference, step_changes

STATE_JSON, STATE_TENSORS = "prunetune_pruning.json", "prunetune_pruning.safetensors"
FORMAT = 1
# the calibration sample of pruning before training, when none is given (the CLI's --samples default)
DEFAULT_SAMPLES = {f.name: f.default for f in fields(RunConfig)}["samples"]


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's AcceleratedOptimizer: its state and step hooks are the real ones."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class PruningCallback(TrainerCallback):
    """APT (salience, the cubic schedule with physical removal, optimizer remapping, rank growth), or pruning
    before training, for a ``transformers.Trainer`` training a PEFT LoRA model (``prunetune.adapters.apply_lora``).

    `budget`: the final target (``Budget(keep_params=0.4)``, or ``keep_flops`` with ``seq_len``); `options`: APT's
    settings (``AptOptions``; ``prune_before_training=True`` scores `calibration` once at the start, with
    ``options.scorer``, and prunes to the target). `calibration`: batches for that score (default: the first
    `samples` training rows, in order). After training, :meth:`export` writes the merged compact model.
    """

    def __init__(self, budget: Budget, options: AptOptions | None = None, *, calibration: Iterable[dict] | None = None,
                 samples: int = DEFAULT_SAMPLES):
        if options is None:  # APT's settings less the distillation a callback cannot add (below)
            options = AptOptions(distill=False)
        if options.distill:
            warnings.warn("PruningCallback: self-distillation changes the Trainer's loss, which a callback cannot; "
                          "it is off (prunetune finetune --method apt --distill has it)", stacklevel=2)
            options = replace(options, distill=False)
        self.budget, self.options = budget, options
        self.calibration, self.samples = calibration, samples
        self.hook: AptHook | None = None  # made on the model as training starts (after pruning before training)
        self.changes: list[dict] = []  # the structure changes applied: {"step", "change"} (as fit records them)
        self.dense_cost: float | None = None
        self.runtime = Runtime.single()
        self.seed = 0
        self._optimizer: torch.optim.Optimizer | None = None  # the Trainer's (accelerate's wrapper)
        self._resumed: dict | None = None  # what prepare_resume read, finished at on_train_begin

    # -- what the run did ------------------------------------------------------------------------------

    @property
    def plans(self) -> list[dict]:
        """The pruning plans applied, in order (each relative to the model at its step)."""
        return [r["change"]["plan"] for r in self.changes if r["change"]["plan"] is not None]

    @property
    def timeline(self) -> list[dict]:
        """Parameters, heads, neurons and LoRA ranks at every pruning step (as `finetune`'s report)."""
        return self.hook.timeline.rows if self.hook is not None else []

    # -- the model -------------------------------------------------------------------------------------

    def _first_sight(self, model: nn.Module) -> None:
        """The schedule's fractions refer to the dense model: its cost is taken before anything is removed."""
        if self.dense_cost is None:
            self.dense_cost = float(layer_cost(model, flops_seq(self.budget)))

    def _make_hook(self, model: nn.Module) -> None:
        options = replace(self.options, prune_steps=0) if self.options.prune_before_training else self.options
        self.hook = AptHook(model, options, self.budget, self.dense_cost)

    def _rewrap(self, model: nn.Module) -> None:
        if self.runtime.distributed:
            for wrapper in Runtime.wrappers_of(model):
                self.runtime.rebuild_in_place(wrapper)

    def _calibration(self, args, train_dataloader) -> Iterable[dict]:
        if self.calibration is not None:
            return self.calibration
        if train_dataloader is None:
            raise PrunetuneError("PruningCallback: pruning before training needs calibration batches (calibration=)")
        # the first rows in order, read through a loader of its own: the Trainer's draws nothing for it
        batch = args.per_device_train_batch_size
        loader = DataLoader(train_dataloader.dataset, batch_size=batch, collate_fn=train_dataloader.collate_fn)
        return list(islice(loader, max(1, -(-self.samples // batch))))

    # -- the Trainer's events --------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if args.load_best_model_at_end and (self.options.prune_steps > 0 and not self.options.prune_before_training):
            raise PrunetuneError("PruningCallback: load_best_model_at_end would load a checkpoint of another shape "
                                 "(pruning changes it during training); leave it off")
        self.runtime = Runtime(rank=args.process_index, world_size=args.world_size,
                               local_rank=args.local_process_index, device=args.device)
        self._optimizer = optimizer
        inner = _torch_optimizer(optimizer)
        saved = self._resumed
        if state.global_step > 0:  # the Trainer resumed from a checkpoint
            if saved is None or saved["step"] != state.global_step:
                raise PrunetuneError(
                    f"PruningCallback: the Trainer resumed at step {state.global_step}; call "
                    "callback.prepare_resume(model, checkpoint) on the freshly built model before "
                    "trainer.train(resume_from_checkpoint=checkpoint)")
            if saved["seed"] != args.seed:
                raise PrunetuneError(f"PruningCallback: the checkpoint's run had seed {saved['seed']}, this one "
                                     f"{args.seed}")
            self.seed = args.seed
            self.hook.start(state.max_steps, self.runtime)
            load_growth_state(inner, saved["growth"], dict(model.named_parameters()))
            self.hook.load_state_dict(saved["ranks"][self.runtime.rank]["hook"])
            self._resumed = None
            return
        self.seed = args.seed
        self.changes = []
        self._first_sight(model)
        if self.options.prune_before_training:
            plan = plan_before_training(model, self._calibration(args, train_dataloader), self.budget, self.options,
                                        self.runtime)
            change = Change.from_dict(self.runtime.broadcast(Change(plan=plan, note={"before_training": True})
                                                             .to_dict()))
            self.changes.append({"step": 0, "change": change.to_dict()})
            change_structure(model, change, [], seed=self.seed, step=0, optimizer=inner)
            self._rewrap(model)
        self._make_hook(model)
        self.hook.start(state.max_steps, self.runtime)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # under fp16 the gradients the salience read were of the scaled loss (accelerate's scaler is the optimizer's)
        scaler = getattr(self._optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self.hook.gradient_scale(float(scaler.get_scale()))
        # the Trainer has clipped the gradients by now, as fit has when it calls its hooks here (adapter salience)
        self.hook.before_optimizer_step(state.global_step + 1, model, _torch_optimizer(self._optimizer))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # after the optimizer and scheduler stepped and the gradients were zeroed, as in fit
        changed = step_changes(state.global_step, model, [self.hook], seed=self.seed,
                               optimizer=_torch_optimizer(self._optimizer), runtime=self.runtime, record=self.changes)
        if changed:
            self._rewrap(model)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if self.hook is not None and metrics is not None:
            self.hook.after_eval(state.global_step, metrics, model, False)  # no teacher here: "best" is not needed

    def on_save(self, args, state, control, model=None, **kwargs):
        self.save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", model, state.global_step,
                  write=args.should_save)

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.close()  # no salience hooks on the trained model's inference

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self, folder: str | Path, model: nn.Module, step: int, *, write: bool = True) -> None:
        """Write the pruning state into a Trainer checkpoint folder (a collective under data parallelism: every
        rank calls it, `write` on the one that writes)."""
        named = dict(model.named_parameters())
        names = {id(p): n for n, p in named.items()}
        local = {"hook": self.hook.state_dict()}
        if self.runtime.distributed:  # every rank's salience (it differs between pruning steps), as fit keeps it
            tensors: dict = {}
            meta = encode(local, tensors, "rank")
            ranks = [decode(m, t) for m, t in self.runtime.gather((meta, tensors))]
        else:
            ranks = [local]
        if not write:
            return
        state = {"step": step, "seed": self.seed, "dense_cost": self.dense_cost, "changes": self.changes,
                 "shapes": {n: list(p.shape) for n, p in named.items()},
                 "params": {n: p for n, p in named.items() if p.requires_grad},
                 "growth": growth_state(_torch_optimizer(self._optimizer), names), "ranks": ranks}
        tensors = {}
        meta = {"format": FORMAT, **encode(state, tensors, "state")}
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # tensors first, the JSON last and renamed into place: a folder with the JSON has both
        save_file(tensors, str(folder / STATE_TENSORS))
        tmp = folder / f".{STATE_JSON}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, folder / STATE_JSON)

    def prepare_resume(self, model: nn.Module, checkpoint: str | Path) -> None:
        """Before ``trainer.train(resume_from_checkpoint=checkpoint)``: give the freshly built model (dense, with its
        adapters, as before the first run) the structure the checkpoint's run had, and its trainable tensors.

        The Trainer loads a checkpoint's weights before any callback event, onto the model as it is; so the
        pruning and growth are replayed here first. Build `model` exactly as the first run did (same seed).
        """
        folder = Path(checkpoint)
        if not (folder / STATE_JSON).is_file():
            raise PrunetuneError(f"{folder} holds no {STATE_JSON}: not a checkpoint of a run with PruningCallback")
        meta = json.loads((folder / STATE_JSON).read_text())
        if meta.pop("format", None) != FORMAT:
            raise PrunetuneError(f"{folder / STATE_JSON}: another format (another prunetune?)")
        saved = decode(meta, load_file(str(folder / STATE_TENSORS)))
        self.dense_cost = None
        self._first_sight(model)
        if abs(self.dense_cost - saved["dense_cost"]) > 1e-9 * max(1.0, saved["dense_cost"]):
            raise PrunetuneError("prepare_resume: the model is not the one the checkpoint's run started from (build it "
                                 "as before: dense, with fresh adapters)")
        self.hook = None
        for record in saved["changes"]:
            change = Change.from_dict(record["change"])
            if self.hook is None and not change.note.get("before_training"):
                self._make_hook(model)
            # no optimizer yet: the Trainer builds it on the rebuilt model
            change_structure(model, change, [self.hook] if self.hook else [], seed=saved["seed"], step=record["step"])
        if self.hook is None:
            self._make_hook(model)
        live = {n: list(p.shape) for n, p in model.named_parameters()}
        if live != saved["shapes"]:
            raise PrunetuneError("prepare_resume: the checkpoint does not fit this model ("
                                 + first_difference(saved["shapes"], live) + ")")
        params = dict(model.named_parameters())
        if {n for n, p in params.items() if p.requires_grad} != set(saved["params"]):
            raise PrunetuneError("prepare_resume: the checkpoint trained other parameters than this model does")
        with torch.no_grad():
            for n, v in saved["params"].items():
                params[n].copy_(v)
        self.changes = list(saved["changes"])
        self._resumed = saved

    # -- the result ------------------------------------------------------------------------------------

    def export(self, model: nn.Module, out: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
        """The adapters merged into the pruned weights, saved compact (reloadable with the stock Auto classes after
        ``import prunetune``). The PEFT model is merged in place: export last."""
        if adapters.lora_layers(model):
            model = adapters.merge(model)
        method = "apt (prune before training)" if self.options.prune_before_training else "apt"
        settings = {**{k: v for k, v in asdict(self.budget).items() if k != "reference"}, **asdict(self.options)}
        return save_compact(model, out, tokenizer, overwrite=overwrite,
                            card={"method": f"{method}, transformers Trainer", "settings": settings})
