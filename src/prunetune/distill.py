"""APT's self-distillation (a teacher that shares every frozen weight with the student), and distillation from
the model before pruning.

APT's teachers keep a private copy of the trainable tensors only (adapters, norms, head) and run through the
student's own modules (``functional_call`` swaps its tensors in for one forward, without gradients), so they
always have the student's pruned structure and cost no second backbone. Three teachers (``TEACHERS``):

- ``momentum`` (APT's self-momentum distillation, the default): created as a copy of the student at the first
  pruning decision and moved after every later optimizer step by teacher = m teacher + (1 - m) student. Before
  pruning starts there is no teacher (and no distillation); its tensors never take a gradient or an optimizer
  step: they only follow the student's values.
- ``best``: the student at its best evaluation so far (needs evaluations during training).
- ``dense``: the model as training starts, before anything is pruned: a frozen copy of its own (a second
  backbone in memory), from the first step on. It is what pruning takes away, so it is the target a model
  pruned before training recovers towards (as Minitron and Sheared-LLaMA distil from the unpruned model); only
  a pretrained head makes it meaningful (language models: a new task head predicts noise). Its layer states are
  matched only where the student still has as many layers of the same width.

The loss (``Distiller.loss``): (1 - w) task + w (prediction KL + layer loss), w ramped from 0 at the first
pruning decision to ``distill_weight`` at the last pruning step, as APT's code does. The prediction KL is one
per distribution: per example for a classifier or QA head, and for per-token logits (LMs, T5) averaged over the
tokens that carry the task loss (labels != -100), never summed over every position, so prompt and padding tokens
change nothing. The layer loss is APT's "one sampled layer per block": the layers are cut into
``distill_layers`` contiguous blocks and one layer of each is drawn per step, so every depth is matched every
step at a quarter (4 blocks) of the cost of matching all; the student's states pass through a learned map
(a hidden x hidden linear, identity at the start) trained with its own Adam at the run's learning rate.
"""

from __future__ import annotations

import copy
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.config import AptOptions
from prunetune.families import hidden_size, inputs_without_targets, predicts_next_token
from prunetune.optim import _transform
from prunetune.runtime import Runtime
from prunetune.surgery import SliceLog
from prunetune.train import TrainHook

IGNORE = -100  # the label of a token without loss (transformers' convention)


def layer_states(outputs) -> tuple:
    """Hidden states for the layer loss, aligned with the batch's attention mask (T5: the encoder's)."""
    states = getattr(outputs, "hidden_states", None)
    return states if states is not None else outputs.encoder_hidden_states


def loss_token_mask(model: nn.Module, batch: dict, logits: torch.Tensor) -> torch.Tensor | None:
    """For per-token logits (batch, tokens, vocab): which positions predict a token the task loss scores.

    A decoder-only model's position t predicts label t + 1; an encoder-decoder's decoder position t predicts
    label t. None when the logits are one distribution per example or the batch has no matching labels."""
    labels = batch.get("labels")
    if logits.dim() != 3 or labels is None or labels.shape != logits.shape[:2]:
        return None
    carry = labels != IGNORE
    if predicts_next_token(model):
        carry = torch.cat([carry[:, 1:], torch.zeros_like(carry[:, :1])], 1)
    return carry


def prediction_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                  tokens: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) at a temperature (x t^2), one per distribution over the last dim, averaged over the
    examples, or over the `tokens` marked (per-token logits)."""
    t = temperature
    per = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                   reduction="none", log_target=True).sum(-1)
    if tokens is not None:
        w = tokens.to(per.dtype)
        return (per * w).sum() / w.sum().clamp_min(1.0) * t * t
    return per.mean() * t * t


def sampled_layers(count: int, blocks: int) -> list[int]:
    """One layer index (1..count; 0 is the embeddings) drawn from each of `blocks` contiguous blocks."""
    blocks = max(1, min(blocks, count))
    edges = [1 + round(i * count / blocks) for i in range(blocks + 1)]
    return [random.randrange(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def dense_copy(model: nn.Module, cfg: AptOptions) -> nn.Module | None:
    """What the dense teacher needs, taken before anything is pruned: a copy of `model` (None for the other
    teachers, or without distillation)."""
    return copy.deepcopy(model) if cfg.distill and cfg.distill_teacher == "dense" else None


class LayerMap:
    """A learned hidden x hidden linear map of the student's states, identity at the start, with its own Adam.

    It lives outside the model (nothing of it is exported) and so outside the loop's optimizer: it steps in
    ``before_optimizer_step`` at the optimizer's current learning rate. Its gradient is averaged over the ranks."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, width: int, device: torch.device):
        self.weight = torch.eye(width, device=device).requires_grad_(True)
        self.bias = torch.zeros(width, device=device).requires_grad_(True)
        self.moments = {f"{m}_{k}": torch.zeros_like(v) for k, v in self.tensors().items() for m in ("m", "v")}
        self.t = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias)

    @torch.no_grad()
    def step(self, lr: float, runtime, scale: float = 1.0) -> None:
        grads = {k: v.grad for k, v in self.tensors().items() if v.grad is not None}
        if not grads:
            return
        grads = runtime.mean({k: g / scale for k, g in grads.items()})
        if all(bool(torch.isfinite(g).all()) for g in grads.values()):  # an fp16 overflow step is skipped
            self.t += 1
            b1, b2 = self.BETAS
            for k, g in grads.items():
                m, v = self.moments[f"m_{k}"], self.moments[f"v_{k}"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**self.t)).sqrt_().add_(self.EPS)
                self.tensors()[k].addcdiv_(m, denom, value=-lr / (1 - b1**self.t))
        for v in self.tensors().values():
            v.grad = None

    def keep(self, index: list[int]) -> None:
        """Hidden dims were pruned: keep the map (and its moments) on the kept dims."""
        idx = torch.tensor(index, dtype=torch.long, device=self.weight.device)
        self.weight = self.weight.detach()[idx][:, idx].clone().requires_grad_(True)
        self.bias = self.bias.detach()[idx].clone().requires_grad_(True)
        self.moments = {k: (v[idx][:, idx] if v.dim() == 2 else v[idx]).clone() for k, v in self.moments.items()}

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (*self.tensors().values(), *self.moments.values()))

    def state_dict(self) -> dict:
        return {**{k: v.detach() for k, v in self.tensors().items()}, **self.moments, "t": self.t}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.weight = state["weight"].to(device).clone().requires_grad_(True)
        self.bias = state["bias"].to(device).clone().requires_grad_(True)
        self.moments = {k: state[k].to(device) for k in self.moments}
        self.t = int(state["t"])


class Distiller:
    """The teacher, the layer map, the weight schedule and the loss (see the module docstring)."""

    def __init__(self, cfg: AptOptions, dense: nn.Module | None = None):
        """`dense`: for ``distill_teacher="dense"``, a copy of the model made before any pruning (``dense_copy``);
        it is frozen here and never shared with the student."""
        self.cfg = cfg
        self.teacher: dict[str, torch.Tensor] | None = None
        self.dense: nn.Module | None = None
        if cfg.distill_teacher == "dense":
            if dense is None:
                raise ValueError("distill_teacher='dense' needs a copy of the model before pruning (dense_copy)")
            self.dense = dense.eval().requires_grad_(False)
        self.layer_map: LayerMap | None = None
        self.window: tuple[int, int] | None = None  # (first pruning decision, last pruning step)
        self.steps_done = 0
        self.time_s = 0.0  # spent in the teacher's forward and the distillation loss
        self.scale = 1.0  # fp16: the gradient scaler's factor of this step's gradients

    # -- the teacher -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether there is a teacher to distil from at this step."""
        return self.teacher is not None or self.dense is not None

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        self.teacher = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if self.layer_map is None:
            self.layer_map = LayerMap(hidden_size(model), next(model.parameters()).device)

    @torch.no_grad()
    def follow_student(self, model: nn.Module, momentum: float) -> None:
        """teacher = m teacher + (1 - m) student (values only: no gradient reaches the teacher)."""
        for n, p in model.named_parameters():
            t = self.teacher.get(n) if self.teacher is not None else None
            if t is not None and t.shape == p.shape:
                t.mul_(momentum).add_(p.detach().to(t.dtype), alpha=1 - momentum)

    def after_step(self, step: int, model: nn.Module) -> None:
        """The momentum teacher: born at the first pruning decision, then averaged after every step."""
        self.steps_done = step
        if self.cfg.distill_teacher != "momentum" or self.window is None or step < self.window[0]:
            return
        if self.teacher is None:
            self.snapshot(model)
        else:
            self.follow_student(model, self.cfg.teacher_momentum)

    def after_eval(self, model: nn.Module, is_best: bool) -> None:
        if self.cfg.distill_teacher == "best" and is_best:
            self.snapshot(model)

    def memory_bytes(self) -> int:
        """The teacher's private tensors, the layer map and its moments (the teacher's activations excluded)."""
        own = sum(v.numel() * v.element_size() for v in (self.teacher or {}).values())
        if self.dense is not None:
            own += sum(t.numel() * t.element_size() for t in (*self.dense.parameters(), *self.dense.buffers()))
        return own + (self.layer_map.memory_bytes() if self.layer_map is not None else 0)

    def follow_surgery(self, model: nn.Module, before: dict[str, nn.Parameter], log: SliceLog, hidden) -> None:
        """Slice (or grow) the teacher's tensors exactly as the student's were; drop removed ones."""
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
        if hidden is not None and self.layer_map is not None:
            self.layer_map.keep(hidden)

    # -- the loss ----------------------------------------------------------------------------------------

    def weight(self) -> float:
        """The distillation weight of the step being computed (ramped over the pruning window)."""
        if not self.cfg.distill_ramp or self.window is None:
            return self.cfg.distill_weight
        start, end = self.window
        k = self.steps_done + 1
        frac = 1.0 if end <= start else min(1.0, max(0.0, (k - start) / (end - start)))
        return self.cfg.distill_weight * frac

    @torch.no_grad()
    def teacher_outputs(self, model: nn.Module, batch: dict):
        from torch.func import functional_call

        batch = inputs_without_targets(model, batch)  # the teacher's own loss would be computed for nothing
        if self.dense is not None:
            device = next(model.parameters()).device
            if next(self.dense.parameters()).device != device:  # the run moved the student after the copy
                self.dense.to(device)
            return self.dense(**batch, output_hidden_states=True)
        was_training = model.training
        model.eval()  # the teacher's targets carry no dropout noise
        try:
            return functional_call(model, self.teacher, args=(), kwargs={**batch, "output_hidden_states": True},
                                   strict=False)
        finally:
            model.train(was_training)

    def loss(self, model: nn.Module, batch: dict, student, task_loss: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            return task_loss
        started = time.perf_counter()
        teacher = self.teacher_outputs(model, batch)
        heads = [k for k in student if k.endswith("logits")]  # a classifier's, an LM's, a QA head's start/end
        pred = sum(prediction_kl(student[k], teacher[k], self.cfg.temperature,
                                 loss_token_mask(model, batch, student[k])) for k in heads) / len(heads)
        hs_s, hs_t = layer_states(student), layer_states(teacher)
        # the dense teacher: no layer term once layers or hidden dims are gone (states no longer line up)
        comparable = len(hs_s) == len(hs_t) and hs_s[-1].shape[-1] == hs_t[-1].shape[-1]
        layers = sampled_layers(len(hs_s) - 1, self.cfg.distill_layers) if comparable and self.cfg.distill_layers \
            else []
        if layers and self.layer_map is None:  # the dense teacher's map: on the student's device, at its width
            self.layer_map = LayerMap(hidden_size(model), hs_s[0].device)
        mask = batch.get("attention_mask")
        layer_loss = 0.0
        for i in layers:
            diff = (self.layer_map(hs_s[i]) - hs_t[i].float()).pow(2).mean(-1)
            layer_loss = layer_loss + ((diff * mask).sum() / mask.sum() if mask is not None else diff.mean())
        w = self.weight()
        out = (1 - w) * task_loss + w * (pred + layer_loss / max(1, len(layers)))
        self.time_s += time.perf_counter() - started
        return out

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, runtime) -> None:
        if self.layer_map is not None:
            self.layer_map.step(float(optimizer.param_groups[0]["lr"]), runtime, self.scale)

    # -- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"teacher": self.teacher, "map": self.layer_map.state_dict() if self.layer_map else None,
                "steps_done": self.steps_done, "time_s": self.time_s}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.teacher = ({k: v.to(device) for k, v in state["teacher"].items()} if state["teacher"] is not None
                        else None)
        if state["map"] is not None:
            self.layer_map = LayerMap(state["map"]["weight"].shape[0], device)
            self.layer_map.load_state_dict(state["map"], device)
        self.steps_done, self.time_s = int(state["steps_done"]), float(state["time_s"])


class DistillHook(TrainHook):
    """Distillation from a dense copy in any `fit`, with no pruning of its own: the recovery of a model pruned
    before (benchmarks/llm_pruning.py --recover-teacher dense). `teacher`: distill.dense_copy's copy."""

    # layers=0: on SmolLM2 the squared error of the hidden states outweighed the task loss (README, LLM table)
    def __init__(self, teacher: nn.Module, *, weight: float = 0.5, temperature: float = 2.0, layers: int = 0):
        options = AptOptions(distill=True, distill_teacher="dense", distill_weight=weight, distill_ramp=False,
                             temperature=temperature, distill_layers=layers)
        self.distiller = Distiller(options, teacher)
        self.runtime = Runtime.single()

    def start(self, total: int, runtime: Runtime) -> None:
        self.runtime = runtime

    def gradient_scale(self, scale: float) -> None:
        self.distiller.scale = scale

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.distiller.before_optimizer_step(optimizer, self.runtime)

    def after_step(self, step: int, model: nn.Module) -> None:
        self.distiller.steps_done = step

    def forward_kwargs(self) -> dict:
        return {"output_hidden_states": True}

    def loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor:
        return self.distiller.loss(model, batch, outputs, outputs.loss)

    def state_dict(self) -> dict:
        return {"distiller": self.distiller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"], self.runtime.device)


# config.DISTILL_TEACHERS: Distiller.after_step / after_eval move the first two; the dense one never moves
TEACHERS = ("momentum", "best", "dense")
