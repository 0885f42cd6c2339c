"""APT (Zhao, Hajishirzi, Cao, ICML 2024): adaptive pruning and tuning during fine-tuning, done properly.

As its authors run it, with the deviations README.md lists. During LoRA training, after a warm-up, hooks
collect APT's salience of heads, FFN neurons (and hidden dims) on the ordinary backward pass, per channel
(sum |a|) x (sum |dL/da|), smoothed by an exponential moving average. At a few steps early in training (a cubic
schedule: much at first, less later) the engine's selection picks what to keep; the structures to go fade out
over the steps before (softmask.py) and the surgery then removes them, so every later step runs on the smaller
model; the optimizer's state is sliced, not reset. After each pruning step the adapters with the most salience
of their own grow in rank, the total paced to 4x by the last pruning step (growth.py; new directions start at
zero, so the function does not move). Self-momentum distillation (distill.py) is on by default: a teacher that
shares every frozen weight with the student and keeps its own moving average of the trainable tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from prunetune import adapters
from prunetune.config import AptOptions, RunConfig, target_budget, targets_for
from prunetune.distill import Distiller, dense_copy
from prunetune.families import unwrap
from prunetune.growth import GROWTH, AdapterSalience
from prunetune.importance import DEFAULT_DECODER_SCORER, PROXY, ActivationStats, compute
from prunetune.plan import Budget, PruningPlan, layer_cost, model_info, select
from prunetune.runtime import Runtime
from prunetune.softmask import SoftMaskDecay, decay_windows
from prunetune.structure import Change
from prunetune.surgery import SliceLog, apply_plan, own_storage
from prunetune.train import RunContext, TrainHook, fit


def target_keep(target: Budget) -> float:
    """The fraction a budget keeps, of parameters or (given keep_flops) of FLOPs."""
    return target.keep_flops if target.keep_flops is not None else target.keep_params


def flops_seq(target: Budget) -> int | None:
    """The sequence length costs are FLOPs at, or None when the budget is in parameters."""
    return target.seq_len if target.keep_flops is not None else None


def cubic_schedule(options: AptOptions, keep: float, total_steps: int) -> dict[int, float]:
    """Optimizer step -> fraction of the dense layer cost (parameters or FLOPs) to keep after that step."""
    if options.prune_steps <= 0:
        return {}
    start = max(1, round(options.prune_start * total_steps))
    end = max(start, round(options.prune_end * total_steps))
    n = max(1, options.prune_steps)
    out: dict[int, float] = {}
    for i in range(1, n + 1):
        t = i / n
        step = start + round((end - start) * (i - 1) / max(1, n - 1)) if n > 1 else start
        out[step] = keep + (1 - keep) * (1 - t) ** 3
    out[max(out)] = keep  # the last step reaches the target exactly
    return out


@dataclass
class Timeline:
    """The model's shape and the adapters' ranks at every pruning step."""

    rows: list[dict] = field(default_factory=list)

    def add(self, step: int, model: nn.Module, **extra) -> None:
        """A row for the model as it is now (replacing the last row when it is of the same step: after growth)."""
        if self.rows and self.rows[-1]["step"] == step and step > 0:
            self.rows.pop()
        info = model_info(model)
        ranks = [adapters.lora_rank(m) for m in adapters.lora_layers(model).values()]
        self.rows.append({
            "step": step, "params": info["params"], "layer_params": info["layer_params"], "heads": info["heads"],
            "neurons": info["ffn"], "hidden": info["hidden"], "lora_rank_total": sum(ranks),
            "lora_rank_max": max(ranks, default=0), **extra,
        })


def plot_timeline(rows: list[dict], evals: list[dict], path, metric: str = "main") -> None:
    """Parameters, heads, neurons and total LoRA rank at each pruning step, and the task's `metric` over training
    (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in rows]
    base = rows[0]
    for key, label in (("layer_params", "layer params"), ("heads", "heads"), ("neurons", "FFN neurons"),
                       ("lora_rank_total", "LoRA rank (sum)")):
        ax1.plot(steps, [r[key] / max(base[key], 1) for r in rows], marker="o", label=label)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("relative to the start")
    ax1.legend(fontsize=8)
    ax1.set_title("pruning timeline")
    if evals:
        ax2.plot([e["step"] for e in evals], [e[metric] for e in evals], marker="o")
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel(metric)
        ax2.set_title("evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class AptHook(TrainHook):
    """Salience collection, scheduled pruning with soft-mask decay, rank growth and self-distillation inside `fit`.

    The hook decides, `fit` acts: some steps before a scheduled pruning step the hook chooses its plan (the
    salience averaged over the ranks, the main rank selecting) and fades the structures it removes
    (softmask.py); at the pruning step it hands `fit` that plan, and once it is applied, the adapters to grow
    (growth.py). Salience (of units and of adapters) is collected only after the warm-up.
    """

    def __init__(self, model: nn.Module, options: AptOptions, target: Budget, dense_cost: float,
                 dense_teacher: nn.Module | None = None):
        """`target`: the final budget (keep_params or keep_flops); `dense_cost`: the dense model's layer parameters
        (or FLOPs per token, for keep_flops): the schedule's fractions refer to it, not to the model at each step;
        `dense_teacher`: for distillation from the dense model, its copy (distill.dense_copy) from before any
        pruning."""
        self.cfg = options
        self.target = target
        self.keep = target_keep(target)
        self.reference = dense_cost
        self.model = model
        self.schedule: dict[int, float] = {}  # set by start(), from the run's step count
        self.warmup = 0  # steps before salience is collected (set by start())
        self.decide_at: dict[int, int] = {}  # step a plan is chosen at -> the pruning step that applies it
        self.steps_done = 0
        self.runtime = Runtime.single()
        self.stats = ActivationStats(unwrap(model), hidden=options.prune_hidden, ema=options.ema,
                                     signal=options.signal)
        self.adapter_salience = AdapterSalience(options.ema)
        self.decay = SoftMaskDecay()
        layers = adapters.lora_layers(model)
        self.start_rank = {n: adapters.lora_rank(m) for n, m in layers.items()}
        self.start_lora_params = self.lora_params(model)
        self.timeline = Timeline()
        self.timeline.add(0, model)
        self.distiller = Distiller(options, dense_teacher) if options.distill else None
        self.eval_history: list[dict] = []

    @staticmethod
    def lora_params(model: nn.Module) -> int:
        return sum(p.numel() for p in adapters.lora_parameters(model))

    def budget(self, keep: float) -> Budget:
        """The engine's budget for keeping `keep` of the dense cost, in the target's unit (APT ranks hidden dims,
        heads and neurons together by salience per parameter when hidden dims are pruned)."""
        field_name = "keep_flops" if self.target.keep_flops is not None else "keep_params"
        return replace(self.target, **{field_name: keep}, reference=self.reference)

    def start(self, total: int, runtime: Runtime) -> None:
        self.schedule = cubic_schedule(self.cfg, self.keep, total)
        self.runtime = runtime
        first = min(self.schedule, default=total + 1)
        # at least one step of salience before the first plan
        self.warmup = min(round(self.cfg.salience_warmup * total), max(0, first - 1))
        windows = decay_windows(list(self.schedule), self.warmup, self.cfg.mask_decay)
        self.decide_at = {d: s for s, d in windows.items() if d < s}
        if self.distiller is not None and self.schedule:
            self.distiller.window = (min(windows.values()), max(self.schedule))

    def forward_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.distiller and self.distiller.ready else {}

    def loss(self, model, batch, outputs):
        if self.distiller is None or not self.distiller.ready:
            return None
        return self.distiller.loss(model, batch, outputs, outputs.loss)

    def after_eval(self, step, metrics, model, is_best):
        self.eval_history.append({"step": step, **metrics})
        if self.distiller is not None:
            self.distiller.after_eval(model, is_best)

    def gradient_scale(self, scale: float) -> None:
        self.stats.unscale_step(scale)
        if self.distiller is not None:
            self.distiller.scale = scale

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer) -> None:
        if step > self.warmup and self.cfg.growth == "adapter":
            self.adapter_salience.observe(model)
        if self.distiller is not None:
            self.distiller.before_optimizer_step(optimizer, self.runtime)

    def _plan(self, model: nn.Module, keep: float) -> PruningPlan:
        """The main rank's plan for keeping `keep`, on every rank."""
        # every rank saw its own share of the batch: the mean over ranks is the salience of the whole batch (the
        # moving average is linear, so averaging only now equals averaging every step)
        self.stats.salience = self.runtime.mean(self.stats.salience)
        plan = select(model, self.stats.to_scores(), self.budget(keep)) if self.runtime.is_main else None
        return PruningPlan.from_dict(self.runtime.broadcast(plan.to_dict() if plan is not None else None))

    def after_step(self, step: int, model: nn.Module) -> Change | None:
        self.steps_done = step
        if step > self.warmup:
            self.stats.step(self.runtime)
        else:
            self.stats.skip()
        if self.distiller is not None:
            self.distiller.after_step(step, model)
        if self.decay.active:
            self.decay.set_for(step)
        if step in self.decide_at:  # choose the next plan now; its structures fade until it is applied
            removal = self.decide_at[step]
            self.decay.begin(model, self._plan(model, self.schedule[removal]), step, removal)
            self.stats.rehook(unwrap(model))  # after the masks: the salience reads what the loss sees
            return None
        if step not in self.schedule:
            return None
        keep = self.schedule[step]
        plan = self.decay.finish() if self.decay.active else self._plan(model, keep)
        return Change(plan=plan, note={"target_keep": keep})

    def after_change(self, step: int, change: Change, model: nn.Module, log: SliceLog, before: dict) -> Change | None:
        if change.plan is not None:
            self.stats.follow_plan(change.plan)
            self.stats.rehook(unwrap(model))
        if self.distiller is not None:
            self.distiller.follow_surgery(model, before, log, change.plan.hidden if change.plan else None)
        keep = change.note.get("target_keep")
        self.timeline.add(step, model, target_keep=keep, grown_adapters=len(change.ranks))
        if change.plan is None:
            return None
        # after pruning, the most salient adapters grow (new directions start at zero: the function is unchanged)
        ranks = GROWTH[self.cfg.growth](self, model, step) if self.runtime.is_main else {}
        return Change(ranks=ranks, note={"target_keep": keep})

    def state_dict(self) -> dict:
        return {"salience": dict(self.stats.salience), "timeline": self.timeline.rows,
                "eval_history": self.eval_history, "steps_done": self.steps_done,
                "adapter_salience": dict(self.adapter_salience.rows), "decay": self.decay.state_dict(),
                "distiller": self.distiller.state_dict() if self.distiller is not None else None}

    def load_state_dict(self, state: dict) -> None:
        device = self.runtime.device
        self.stats.salience = {k: v.to(device) for k, v in state["salience"].items()}
        self.timeline.rows = list(state["timeline"])
        self.eval_history = list(state["eval_history"])
        self.steps_done = int(state["steps_done"])
        self.adapter_salience.rows = dict(state["adapter_salience"])
        self.decay.load_state_dict(state["decay"], self.model, self.steps_done)
        if self.decay.active:
            self.stats.rehook(unwrap(self.model))
        if self.distiller is not None and state["distiller"] is not None:
            self.distiller.load_state_dict(state["distiller"], device)

    def close(self) -> None:
        self.stats.remove()
        self.decay.remove()


def plan_before_training(model: nn.Module, sample_loader, target: Budget, options: AptOptions,
                         runtime: Runtime) -> PruningPlan:
    """The plan of `apt --prune-before-training` (large decoders): an outlier-aware score on a calibration sample,
    pruned once to the target, then tuned. Shared by the recipe and the Trainer callback."""
    scorer = options.scorer or DEFAULT_DECODER_SCORER
    # every rank scores the same sample; the main rank's scores decide (GPU kernels need not agree to the bit)
    scores = runtime.broadcast(compute(model, sample_loader, scorer, hidden=options.prune_hidden))
    # scores in a loss unit (Fisher, Taylor) are ranked as they are; a proxy's raw scores differ by orders of
    # magnitude between layers of a decoder, so each layer's are L2-normalised and each kind put on its cost share
    proxy = (scores.meta or {}).get("unit", PROXY) == PROXY
    plan = select(model, scores, target, normalize="per_layer" if proxy else None)
    plan.meta["scorer"] = scorer
    return plan


def run_apt(cfg: RunConfig, model: nn.Module, train_loader, evaluate, context: RunContext, sample_loader):
    """The `apt` method for the fine-tuning recipe (see recipes.py)."""
    from prunetune.recipes import MethodResult, training_options

    target = target_budget(cfg)
    options = cfg.apt
    dense_cost = layer_cost(model, flops_seq(target))
    extra: dict = {}
    teacher = dense_copy(model, options)  # before anything is pruned
    if options.prune_before_training:
        plan = plan_before_training(model, sample_loader, target, options, context.runtime)
        apply_plan(model, plan)
        own_storage(model)  # let the dense checkpoint's mapping go: its pages would stay resident
        extra["plan_before_training"] = plan.to_dict()
        options = replace(options, prune_steps=0)
    peft_model = adapters.apply_lora(model, rank=cfg.lora.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    hook = AptHook(peft_model, options, target, dense_cost, teacher)
    try:
        res = fit(peft_model, train_loader, evaluate, training_options(cfg), hooks=[hook], context=context)
    finally:
        hook.close()
    _, trainable_end = adapters.count_parameters(peft_model)
    extra.update({
        "timeline": hook.timeline.rows,
        "eval_history": hook.eval_history,
        "trainable_params_end": trainable_end,
        "schedule": {str(k): v for k, v in hook.schedule.items()},
        "distill": options.distill,
        # the teacher's private tensors and the layer map with its moments; the teacher's forward, per step
        "teacher_mem_mb": (hook.distiller.memory_bytes() / 2**20) if hook.distiller else 0.0,
        "distill_time_s": hook.distiller.time_s if hook.distiller else 0.0,
    })
    return MethodResult(peft_model, res, trainable, None, extra)
