"""APT (Zhao, Hajishirzi, Cao, ICML 2024): adaptive pruning and tuning during fine-tuning, done properly.

During LoRA training, hooks collect |activation x gradient| salience of heads, FFN neurons (and hidden
dims) on the ordinary backward pass, smoothed by an exponential moving average. At a few steps early
in training (a cubic schedule: much at first, less later) the engine's selection picks what to keep
and the surgery removes the rest at once, so every later step runs on the smaller model; the
optimizer's state is sliced, not reset. After each pruning step the most salient adapters grow in rank
(new directions start at zero, so the function does not move). A self-distillation teacher shares all
frozen weights with the student and keeps only its own copy of the adapters, norms and head.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from prunetune import adapters
from prunetune.config import AptOptions, RunConfig, target_budget, targets_for
from prunetune.families import layer_sites, unwrap
from prunetune.importance import ActivationStats, compute
from prunetune.optim import _transform
from prunetune.plan import Budget, PruningPlan, layer_cost, model_info, select
from prunetune.runtime import Runtime
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


def _layer_states(outputs) -> tuple:
    """Hidden states for the layer-mapping loss, aligned with the batch's attention mask.

    Fix: encoder-decoder outputs (T5) have no ``hidden_states`` (they carry ``encoder_hidden_states`` and
    ``decoder_hidden_states``), so distillation raised AttributeError at the first step after the first
    evaluation; the encoder's states are the ones the attention mask describes.
    """
    states = getattr(outputs, "hidden_states", None)
    return states if states is not None else outputs.encoder_hidden_states


class SelfDistiller:
    """Teacher = the student at its best evaluation, sharing every frozen weight (no second backbone).

    The teacher keeps a private copy of the trainable tensors only (adapters, norms, head). Because it
    shares the student's pruned structure, their hidden states live in the same space and the layer
    mapping is the identity; APT needs a learned mapping only because its teacher keeps the dense width.
    """

    def __init__(self, cfg: AptOptions):
        self.cfg = cfg
        self.teacher: dict[str, torch.Tensor] | None = None

    def snapshot(self, model: nn.Module) -> None:
        self.teacher = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.teacher or {}).values())

    def follow_surgery(self, model: nn.Module, before: dict[str, nn.Parameter], log: SliceLog) -> None:
        """Slice (or grow) the teacher's private tensors exactly as the student's were; drop removed ones."""
        if self.teacher is None:
            return
        now = dict(model.named_parameters())
        for name, value in list(self.teacher.items()):
            entry = log.lineage.get(id(before.get(name)))
            if entry is not None:
                value = _transform(value, entry[2])
            if name in now and now[name].shape == value.shape:
                self.teacher[name] = value
            else:  # its module went with a fully pruned block
                del self.teacher[name]

    @torch.no_grad()
    def teacher_outputs(self, model: nn.Module, batch: dict):
        # functional_call swaps the teacher's tensors in for this call only: nothing of the student's graph
        # is modified in place, and the frozen weights are the very same tensors.
        from torch.func import functional_call

        was_training = model.training
        model.eval()  # the teacher's targets carry no dropout noise
        try:
            return functional_call(model, self.teacher, args=(), kwargs={**batch, "output_hidden_states": True},
                                   strict=False)
        finally:
            model.train(was_training)

    def loss(self, model: nn.Module, batch: dict, student, task_loss: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return task_loss
        teacher = self.teacher_outputs(model, batch)
        t = self.cfg.temperature
        # every prediction of the head: a classifier's or LM's logits, a QA head's start and end logits
        heads = [k for k in student if k.endswith("logits")]  # a ModelOutput iterates its keys
        pred = sum(F.kl_div(F.log_softmax(student[k] / t, -1), F.softmax(teacher[k] / t, -1), reduction="batchmean")
                   for k in heads) * t * t / len(heads)
        hs_s, hs_t = _layer_states(student), _layer_states(teacher)
        layers = random.sample(range(1, len(hs_s)), min(self.cfg.distill_layers, len(hs_s) - 1))
        mask = batch.get("attention_mask")
        layer_loss = 0.0
        for i in layers:
            diff = (hs_s[i] - hs_t[i]).pow(2).mean(-1)
            layer_loss = layer_loss + ((diff * mask).sum() / mask.sum() if mask is not None else diff.mean())
        w = self.cfg.distill_weight
        return (1 - w) * task_loss + w * (pred + layer_loss / max(1, len(layers)))


class AptHook(TrainHook):
    """Salience collection, scheduled pruning, rank growth and self-distillation inside `fit`.

    The hook decides, `fit` acts: at a scheduled step it asks for a plan (the salience summed over the ranks
    first, the main rank selecting), then, once the plan is applied, for the adapters to grow.
    """

    def __init__(self, model: nn.Module, options: AptOptions, target: Budget, dense_cost: float):
        """`target`: the final budget (keep_params or keep_flops); `dense_cost`: the dense model's layer parameters
        (or FLOPs per token, for keep_flops): the schedule's fractions refer to it, not to the model at each step."""
        self.cfg = options
        self.target = target
        self.keep = target_keep(target)
        self.reference = dense_cost
        self.schedule: dict[int, float] = {}  # set by start(), from the run's step count
        self.runtime = Runtime.single()
        self.stats = ActivationStats(unwrap(model), hidden=options.prune_hidden, ema=options.ema,
                                     signal=options.signal)
        layers = adapters.lora_layers(model)
        self.start_rank = {n: adapters.lora_rank(m) for n, m in layers.items()}
        self.start_lora_params = self._lora_params(model)
        self.timeline = Timeline()
        self.timeline.add(0, model)
        self.distiller = SelfDistiller(options) if options.distill else None
        self.eval_history: list[dict] = []

    @staticmethod
    def _lora_params(model: nn.Module) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    def budget(self, keep: float) -> Budget:
        """The engine's budget for keeping `keep` of the dense cost, in the target's unit (APT ranks hidden dims,
        heads and neurons together by salience per parameter when hidden dims are pruned)."""
        field_name = "keep_flops" if self.target.keep_flops is not None else "keep_params"
        return replace(self.target, **{field_name: keep}, reference=self.reference)

    def start(self, total: int, runtime: Runtime) -> None:
        self.schedule = cubic_schedule(self.cfg, self.keep, total)
        self.runtime = runtime

    def forward_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.distiller and self.distiller.teacher is not None else {}

    def loss(self, model, batch, outputs):
        if self.distiller is None or self.distiller.teacher is None:
            return None
        return self.distiller.loss(model, batch, outputs, outputs.loss)

    def after_eval(self, step, metrics, model, is_best):
        self.eval_history.append({"step": step, **metrics})
        if is_best and self.distiller is not None:
            self.distiller.snapshot(model)

    def gradient_scale(self, scale: float) -> None:
        self.stats.unscale_step(scale)

    def after_step(self, step: int, model: nn.Module) -> Change | None:
        self.stats.step()
        if step not in self.schedule:
            return None
        # every rank saw its own share of the batch: the mean over ranks is the salience of the whole batch (the
        # moving average is linear, so averaging only now equals averaging every step)
        self.stats.salience = self.runtime.mean(self.stats.salience)
        keep = self.schedule[step]
        if not self.runtime.is_main:
            return Change(note={"target_keep": keep})  # the main rank's plan comes instead
        plan = select(model, self.stats.to_scores(), self.budget(keep))
        return Change(plan=plan, note={"target_keep": keep})

    def after_change(self, step: int, change: Change, model: nn.Module, log: SliceLog, before: dict) -> Change | None:
        if change.plan is not None:
            self.stats.follow_plan(change.plan)
            self.stats.rehook(unwrap(model))
        if self.distiller is not None:
            self.distiller.follow_surgery(model, before, log)
        keep = change.note.get("target_keep")
        self.timeline.add(step, model, target_keep=keep, grown_adapters=len(change.ranks))
        if change.plan is None:
            return None
        # after pruning, the most salient adapters grow (new directions start at zero: the function is unchanged)
        return Change(ranks=self._growth(model) if self.runtime.is_main else {}, note={"target_keep": keep})

    def _growth(self, model: nn.Module) -> dict[str, int]:
        """The new ranks of the most salient adapters (by their layer's head salience), within the tuning budget."""
        layers = adapters.lora_layers(model)
        if not layers:
            return {}
        lora_ids = {id(x) for x in layers.values()}
        layer_of = {id(m): lay.key for lay in layer_sites(model) for m in lay.module.modules() if id(m) in lora_ids}
        sal = {}
        for key, v in self.stats.salience.items():
            if "/" in key:
                sal[key.split("/")[0]] = sal.get(key.split("/")[0], 0.0) + float(v.sum())
        ranked = sorted(layers.items(), key=lambda kv: -sal.get(layer_of.get(id(kv[1]), ""), 0.0))
        ranked = ranked[: max(1, int(len(ranked) * self.cfg.grow_fraction))]
        budget = self.cfg.tuning_budget * self.start_lora_params
        lora_params, out = self._lora_params(model), {}
        for name, layer in ranked:
            r0 = self.start_rank.get(name, adapters.lora_rank(layer))
            new_r = min(adapters.lora_rank(layer) + r0, self.cfg.max_rank_mult * r0)
            a, b = layer.lora_A[adapters.ADAPTER].weight, layer.lora_B[adapters.ADAPTER].weight
            extra = (new_r - a.shape[0]) * (a.shape[1] + b.shape[0])
            if extra <= 0 or lora_params + extra > budget:
                continue
            out[name] = new_r
            lora_params += extra
        return out

    def state_dict(self) -> dict:
        return {"salience": dict(self.stats.salience), "timeline": self.timeline.rows,
                "eval_history": self.eval_history,
                "teacher": self.distiller.teacher if self.distiller is not None else None}

    def load_state_dict(self, state: dict) -> None:
        device = self.runtime.device
        self.stats.salience = {k: v.to(device) for k, v in state["salience"].items()}
        self.timeline.rows = list(state["timeline"])
        self.eval_history = list(state["eval_history"])
        if self.distiller is not None and state["teacher"] is not None:
            self.distiller.teacher = {k: v.to(device) for k, v in state["teacher"].items()}

    def close(self) -> None:
        self.stats.remove()


def plan_before_training(model: nn.Module, sample_loader, target: Budget, options: AptOptions,
                         runtime: Runtime) -> PruningPlan:
    """The plan of `apt --prune-before-training` (large decoders): an outlier-aware score on a calibration sample,
    pruned once to the target, then tuned. Shared by the recipe and the Trainer callback."""
    scorer = options.scorer or "salience_kurtosis"
    # every rank scores the same sample; the main rank's scores decide (GPU kernels need not agree to the bit)
    scores = runtime.broadcast(compute(model, sample_loader, scorer, hidden=options.prune_hidden))
    # each layer's scores are L2-normalised (raw scores differ by orders of magnitude between layers of a
    # decoder), which leaves kinds incomparable: per_layer then rescales each kind to its cost share
    plan = select(model, scores, target, normalize="per_layer")
    plan.meta["scorer"] = scorer
    return plan


def run_apt(cfg: RunConfig, model: nn.Module, train_loader, evaluate, context: RunContext, sample_loader):
    """The `apt` method for the fine-tuning recipe (see recipes.py)."""
    from prunetune.recipes import MethodResult, training_options

    target = target_budget(cfg)
    options = cfg.apt
    dense_cost = layer_cost(model, flops_seq(target))
    extra: dict = {}
    if options.prune_before_training:
        plan = plan_before_training(model, sample_loader, target, options, context.runtime)
        apply_plan(model, plan)
        own_storage(model)  # let the dense checkpoint's mapping go: its pages would stay resident
        extra["plan_before_training"] = plan.to_dict()
        options = replace(options, prune_steps=0)
    peft_model = adapters.apply_lora(model, rank=cfg.lora.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    hook = AptHook(peft_model, options, target, dense_cost)
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
        "teacher_mem_mb": (hook.distiller.memory_bytes() / 2**20) if hook.distiller else 0.0,
    })
    return MethodResult(peft_model, res, trainable, None, extra)
