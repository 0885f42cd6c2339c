"""The fine-tuning run's configuration: nested, typed parts with one source of defaults, help and validation.

Each part is a dataclass whose fields carry their help text and the methods that read them in
``field(metadata=...)``; ``__post_init__`` refuses values out of range. :class:`RunConfig` holds the parts,
refuses settings its method would not read, and resolves the per-method defaults (learning rate, LoRA
targets, keep budget). The ``finetune`` command's flags are generated from these fields (prunetune.arguments), so
no flag is declared twice, and a checkpoint stores the configuration as JSON (to_dict) that ``--resume``
compares field by field (resume_mismatch).

Task options: ``RunConfig.task_options`` is a dict the task validates (``tasks.get(name, options)`` builds the
task's own options dataclass, ``tasks.options_class``; a task refuses another task's option), so typed per-task options
plug in without a change here.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields

from prunetune.data import DEFAULT_DEV_FRACTION
from prunetune.errors import PrunetuneError

DEFAULT_SEED = 42  # every command's default seed: importance, prune and finetune pick the same sample and head

METHODS = ("full", "lora", "prune-lora", "lora-prune", "apt")
# apt: 1e-3, as its adapters also cover the FFN and the pruned model recovers within the second half of the run
# (5e-4 gave 78.2 on the SST-2 benchmark, 1e-3 79.9-80.6); the figures at other rates are in benchmarks/README.md.
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "prune-lora": 5e-4, "lora-prune": 5e-4, "apt": 1e-3}
DEFAULT_KEEP_PARAMS = 0.4  # lora-prune and apt without a budget
PRUNE_LORA_HEADS_KEEP = 100 / 144  # the Pruning-Adapter paper's setting: 100 of BERT-base's 144 heads
LORA_TARGETS = ("attention", "ffn-in", "all")  # adapters.LORA_TARGETS (kept here so the CLI needs no torch import)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SIGNALS = ("salience", "apt", "fisher")  # importance.ActivationStats.SIGNALS
DISTILL_TEACHERS = ("momentum", "best", "dense")  # distill.TEACHERS
# the model classes whose head comes pretrained (the LM head), so that the model as loaded is a teacher
PRETRAINED_HEADS = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")
GROWTHS = ("adapter", "layer")  # growth.GROWTH
# lora-prune trains twice with a pruning step between, outside the loop: its checkpoints could not resume the
# second phase, so it refuses checkpointing (see RuntimeOptions)
NO_CHECKPOINTS = ("lora-prune",)
# mceval.BENCHMARKS (kept here so the CLI needs no lm_eval import)
EVAL_DATA_HELP = "the evaluation files (default $PRUNETUNE_EVAL_DATA, else ../shared/data/eval)"
BENCHES = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")


def _finite(v: float) -> bool:
    return math.isfinite(v)


# Numeric settings (and flags of the other commands of the same name): the test and what it asks for.
NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(
        ("lr", "epochs", "recovery_epochs", "temperature"),
        (lambda v: _finite(v) and v > 0, "a positive, finite number")),
    **dict.fromkeys(
        ("batch_size", "grad_accum", "rank", "rank_high", "rank_low", "top_blocks", "samples", "max_length",
         "seq_len", "train_limit", "eval_limit", "round_to", "max_rank_mult", "keep_checkpoints",
         "limit", "eval_bench_limit"), (lambda v: v > 0, "positive")),
    **dict.fromkeys(("eval_every", "save_every"), (lambda v: v >= 0, "0 (every epoch) or a positive number of steps")),
    "shots": (lambda v: v >= 0, "0 or more"),
    "distill_layers": (lambda v: v >= 0, "0 (predictions only) or a positive number of blocks"),
    "prune_steps": (lambda v: v >= 0, "0 (no pruning during training) or a positive count"),
    **dict.fromkeys(("keep_params", "keep_flops", "hidden_keep"), (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]")),
    **dict.fromkeys(("heads_keep", "neurons_keep"), (
        lambda v: _finite(v) and v > 0 and (v <= 1 or v == int(v)), "in (0, 1] or a whole count")),
    "dev_fraction": (lambda v: _finite(v) and 0 < v < 1, "in (0, 1)"),
    **dict.fromkeys(("prune_start", "prune_end", "grow_fraction", "distill_weight", "warmup_ratio",
                     "salience_warmup"),
                    (lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]")),
    **dict.fromkeys(("ema", "mask_decay", "teacher_momentum"), (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)")),
    "tuning_budget": (lambda v: _finite(v) and v >= 1, "a finite number >= 1"),
    **dict.fromkeys(("weight_decay", "max_grad_norm"), (lambda v: _finite(v) and v >= 0, "a finite number >= 0")),
}
NUMBER_RULES["save_every"] = (lambda v: v >= 0, "0 (no checkpoints) or a positive number of steps")


def flag(name: str) -> str:
    """The command-line spelling of a setting."""
    return "--" + name.replace("_", "-")


def check_numbers(values: dict) -> None:
    """Refuse a numeric setting outside its range (NaN and infinities included), naming the flag."""
    for name, (ok, wanted) in NUMBER_RULES.items():
        v = values.get(name)
        if v is not None and not isinstance(v, bool) and not ok(v):
            raise PrunetuneError(f"{flag(name)} must be {wanted}, got {v}")


def _opt(default, help: str, *, methods: tuple[str, ...] | None = None, not_for: tuple[str, ...] = (),
         choices: tuple | None = None, results: bool = True, negatable: bool = False, cli: bool = True, factory=None):
    """A field with its help, the methods that read it (None: every method but those `not_for`), whether it
    changes results (what --resume compares) and how the CLI spells it."""
    meta = {"help": help, "methods": methods, "not_for": not_for, "choices": choices, "results": results,
            "negatable": negatable, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Part:
    """A part of the configuration: its numbers are checked when it is made."""

    def __post_init__(self) -> None:
        check_numbers(asdict(self))


# ---------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------

_SAMPLED = ("prune-lora", "lora-prune", "apt")  # the methods that score importance on a sample
_LORA = ("lora", "lora-prune", "apt")


@dataclass
class TrainingOptions(_Part):
    """Optimisation: AdamW with linear warm-up and linear decay, accumulation, evaluation."""

    epochs: float = _opt(1.0, "passes over the training rows (may be fractional)")
    lr: float | None = _opt(None, "learning rate (default per method: "
                                  + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    batch_size: int = _opt(32, "examples per micro-batch (per process under torchrun)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    seed: int = _opt(DEFAULT_SEED, "seeds the data order, a new task head, the adapters and dropout")
    eval_every: int = _opt(0, "evaluate every N steps (0: every epoch)")
    precision: str = _opt("auto", "autocast on GPUs (auto: bf16 where supported, else fp16 with a gradient "
                                  "scaler); CPUs run fp32", choices=PRECISIONS)
    warmup_ratio: float = _opt(0.06, "fraction of the steps with a linear warm-up")
    weight_decay: float = _opt(0.0, "AdamW's decoupled weight decay")
    max_grad_norm: float = _opt(1.0, "gradients are clipped to this norm (0: not clipped)")
    recovery_epochs: float = _opt(0.25, "LoRA recovery after pruning, in epochs", methods=("lora-prune",))


@dataclass
class BudgetOptions(_Part):
    """How much of the model to keep."""

    keep_params: float | None = _opt(None, f"fraction of the prunable layer parameters to keep (default "
                                           f"{DEFAULT_KEEP_PARAMS})", methods=("lora-prune", "apt"))
    keep_flops: float | None = _opt(None, "or the fraction of the layers' FLOPs per token to keep, at --seq-len",
                                    methods=("lora-prune", "apt"))
    seq_len: int | None = _opt(None, "the sequence length FLOPs are stated at (default --max-length)")
    heads_keep: float | None = _opt(None, "fraction (or count) of heads kept (default 100/144)",
                                    methods=("prune-lora",))
    neurons_keep: float | None = _opt(None, "fraction (or count) of FFN neurons kept", methods=("prune-lora",))
    uniform: bool = _opt(False, "keep the same numbers of query heads, KV heads and FFN neurons in every layer, so "
                                "that the export is a stock config where the family allows (LLaMA, Mistral, Qwen2, "
                                "T5; BERT/RoBERTa only with every head kept)", methods=_SAMPLED)
    round_to: int = _opt(1, "FFN widths (and pruned hidden sizes) in multiples of this, where the budget allows",
                         methods=_SAMPLED)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_params is not None and self.keep_flops is not None:
            raise PrunetuneError("give either --keep-params or --keep-flops, not both")


@dataclass
class LoraOptions(_Part):
    """Adapters: where, and of which rank."""

    rank: int = _opt(8, "LoRA rank (apt: the starting rank)", methods=_LORA)
    lora_targets: str | None = _opt(None, "linears with adapters: q/k/v/o; also the FFN's input projection(s); or "
                                          "all of the FFN's (default: all for apt, else attention)",
                                    methods=("lora", "prune-lora", "lora-prune", "apt"), choices=LORA_TARGETS)
    rank_high: int = _opt(8, "rank of the top blocks", methods=("prune-lora",))
    rank_low: int = _opt(4, "rank of the other blocks", methods=("prune-lora",))
    top_blocks: int | None = _opt(None, "blocks given --rank-high (default a third of them: 4 of BERT-base's 12)",
                                  methods=("prune-lora",))


_APT = ("apt",)


@dataclass
class AptOptions(_Part):
    """APT: salience-driven pruning during training on a cubic schedule, rank growth, self-distillation."""

    # APT as its authors run it (each piece measured in benchmarks/README.md; see README "APT's pieces")
    # APT's code distils by default; measured here (README "APT as its authors run it") it cost accuracy in
    # one-epoch runs (MiniLM/SST-2, seed 42: 60.1 with weight 1, 80.5 with 0.5, 81.8 without), so it is opt-in
    distill: bool = _opt(False, "self-distillation during pruning (teacher: --distill-teacher; on in APT's code, "
                                "off here: measured worse in short runs)", methods=_APT, negatable=True)
    distill_teacher: str = _opt("momentum", "momentum: the student's own weights, averaged (--teacher-momentum) from "
                                            "the first pruning step on; best: the student at its best evaluation "
                                            "(needs --eval-every); dense: a frozen copy of the model before "
                                            "pruning, from the first step (a second model in memory; needs a "
                                            "task whose head is pretrained: instruct, summarize)",
                                methods=_APT, choices=DISTILL_TEACHERS)
    teacher_momentum: float = _opt(0.99, "the momentum teacher's average: teacher = m teacher + (1 - m) student "
                                         "after every step once pruning started", methods=_APT)
    prune_before_training: bool = _opt(False, "prune once on a calibration sample, then tune", methods=_APT)
    scorer: str | None = _opt(None, "the importance scorer of --prune-before-training (default fisher, chosen by "
                                    "benchmarks/llm_pruning.py; APT's own: salience_kurtosis)",
                              methods=_APT)
    prune_steps: int = _opt(10, "pruning steps, spread over the early part of training", methods=_APT)
    # Salience needs some tuning to mean anything: pruning from 5% to 50% of a one-epoch SST-2 run gave 79.9,
    # from 20% to 60% 80.6 (benchmarks/README.md); the memory peak is the first steps' either way.
    prune_start: float = _opt(0.2, "fraction of training before the first pruning step", methods=_APT)
    prune_end: float = _opt(0.6, "fraction of training by which the target is reached", methods=_APT)
    salience_warmup: float = _opt(0.1, "fraction of training before salience is collected (the adapters' first "
                                       "steps say little about what matters); ends a step before the first plan "
                                       "at the latest", methods=_APT)
    mask_decay: float = _opt(0.5, "share of the steps before each pruning step over which the structures it removes "
                                  "fade out (masks 1 -> 0; 0: removed at once)", methods=_APT)
    ema: float = _opt(0.85, "smoothing of the salience across steps", methods=_APT)
    # APT's code multiplies per-channel sums ("apt"); |a x g| per unit measured 4 points better on MiniLM/SST-2
    signal: str = _opt("salience", "salience (|a x g|), apt (APT's code: per channel (sum |a|) x (sum |dL/da|)) or "
                              "fisher (squared per-example mask gradient, Kwon et al.)", methods=_APT, choices=SIGNALS)
    growth: str = _opt("adapter", "which adapters grow: adapter (by their own salience |sum A x dL/dA| per rank row, "
                                  "the total rank paced linearly to --tuning-budget by the last pruning step) or layer "
                                  "(by their layer's head salience, --grow-fraction of them, --tuning-budget caps LoRA "
                                  "parameters)", methods=_APT, choices=GROWTHS)
    grow_fraction: float = _opt(0.5, "growth=layer: share of the adapters (the most salient) that grow at each "
                                     "pruning step", methods=_APT)
    tuning_budget: float = _opt(4.0, "growth=adapter: the total LoRA rank reaches this multiple of the start by the "
                                     "last pruning step; growth=layer: LoRA parameters may grow to this multiple",
                                methods=_APT)
    max_rank_mult: int = _opt(8, "an adapter's rank is capped at this multiple of its start", methods=_APT)
    prune_hidden: bool = _opt(False, "also prune hidden dims, ranked with heads and neurons", methods=_APT)
    # APT's code ramps w to 1, which leaves the task loss out after pruning: 0.5 measured 18 points better
    distill_weight: float = _opt(0.5, "loss = (1 - w) task + w distillation, w ramped from 0 at the first pruning "
                                      "step to this at the last (see --distill-ramp; APT's code: 1)", methods=_APT)
    distill_ramp: bool = _opt(True, "ramp the distillation weight over the pruning window (off: w from the start)",
                              methods=_APT, negatable=True)
    distill_layers: int = _opt(4, "layer blocks of the layer-mapping loss: one layer sampled per block and step (0: "
                                  "no layer loss, the predictions' KL only)",
                               methods=_APT)
    temperature: float = _opt(2.0, "distillation temperature", methods=_APT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_end < self.prune_start:
            raise PrunetuneError(f"--prune-end ({self.prune_end}) must not come before --prune-start "
                                 f"({self.prune_start})")


@dataclass
class RuntimeOptions(_Part):
    """Checkpoints and resuming; none of it changes the results (--resume does not compare it)."""

    save_every: int = _opt(0, "write a checkpoint every N optimizer steps (0: none)", not_for=NO_CHECKPOINTS,
                           results=False)
    keep_checkpoints: int = _opt(2, "checkpoints kept (the newest)", not_for=NO_CHECKPOINTS, results=False)
    checkpoint_dir: str | None = _opt(None, "where checkpoints go (default OUT.checkpoints, next to --out)",
                                      not_for=NO_CHECKPOINTS, results=False)
    resume: str | None = _opt(None, "continue the run whose checkpoints are in DIR (its newest complete one); "
                                    "give the same settings as the run that wrote it", not_for=NO_CHECKPOINTS,
                              results=False)
    retain_checkpoints: bool = _opt(False, "keep the checkpoints after the run succeeds (default: removed)",
                                    not_for=NO_CHECKPOINTS, results=False)
    progress: bool = _opt(True, "progress bars and stage lines", results=False, cli=False)


PARTS = {"training": TrainingOptions, "budget": BudgetOptions, "lora": LoraOptions,
         "apt": AptOptions, "runtime": RuntimeOptions}


@dataclass
class RunConfig:
    """One fine-tuning run. Settings not given keep the defaults above; the CLI records which were given."""

    task: str | None = _opt(None, "a registered task: a GLUE preset, classify, regression, squad_v2, qa, instruct "
                                  "(`prunetune tasks` lists them)")
    out: str = _opt("", "output directory", results=False)
    model: str | None = _opt(None, "model directory, hub id, or nothing for the embedded MiniLM")
    method: str = _opt("prune-lora", "the method", choices=METHODS)
    overwrite: bool = _opt(False, "replace an earlier prunetune result at --out", results=False)
    # what the run trains on and is scored on: the task's rows (the task options are its own, see below)
    data: str | None = _opt(None, "a directory with train and dev files, or one data file (CSV, TSV, JSON, JSONL, "
                                  "Parquet) split into training rows and seeded held-out dev rows (see --dev-fraction; "
                                  "QA holds out whole articles), or a `datasets` name where the hub is reachable")
    dev_data: str | None = _opt(None, "dev rows from this file (used whole) or GLUE directory instead")
    dev_fraction: float = _opt(DEFAULT_DEV_FRACTION, "a single --data file: the share held out as dev rows, by --seed")
    train_limit: int | None = _opt(None, "train on a seeded subset of this many examples")
    eval_limit: int | None = _opt(None, "evaluate on a seeded subset of this many examples")
    max_length: int = _opt(128, "tokens per example")
    # multiple-choice benchmarks of the merged model after training (causal LM tasks); they read the export, not
    # the training, so --resume does not compare them
    eval_bench: str | None = _opt(None, "after training, score the merged model on these multiple-choice benchmarks "
                                        "with lm-evaluation-harness (comma-separated: " + ", ".join(BENCHES) + ")",
                                  results=False)
    eval_bench_limit: int | None = _opt(None, "the first N items of each benchmark (of each MMLU subject)",
                                        results=False)
    eval_data: str | None = _opt(None, EVAL_DATA_HELP, results=False)
    samples: int = _opt(512, "examples importance is scored on", methods=_SAMPLED)
    training: TrainingOptions = _opt(None, "", factory=TrainingOptions)
    budget: BudgetOptions = _opt(None, "", factory=BudgetOptions)
    lora: LoraOptions = _opt(None, "", factory=LoraOptions)
    apt: AptOptions = _opt(None, "", factory=AptOptions)
    runtime: RuntimeOptions = _opt(None, "", factory=RuntimeOptions)
    # options of the task, validated by it (see the module docstring); not a flag
    task_options: dict = _opt(None, "task options", factory=dict, cli=False)
    # the settings the caller gave (the CLI: flags not left at None); None = those that differ from the defaults
    given: frozenset[str] | None = _opt(None, "", cli=False, results=False)

    def __post_init__(self) -> None:
        for name, part in PARTS.items():  # a dict (from JSON) becomes its part
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, part(**value))
        self.check()

    # -- building --------------------------------------------------------------------------------------

    @classmethod
    def from_flags(cls, values: dict) -> RunConfig:
        """From flat settings (the CLI's namespace: None = not given), routed to their parts."""
        top, parts, given = {}, {name: {} for name in PARTS}, set()
        for name, value in values.items():
            where = LEAVES.get(name)
            if where is None or value is None:
                continue
            given.add(name)
            (parts[where[0]] if where[0] else top)[name] = value
        return cls(**top, **{name: PARTS[name](**kw) for name, kw in parts.items()}, given=frozenset(given))

    def to_dict(self) -> dict:
        """JSON-able, nested as the parts are (what a checkpoint stores)."""
        out = asdict(self)
        out["given"] = sorted(self.given) if self.given is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        if d.get("given") is not None:
            d["given"] = frozenset(d["given"])
        return cls(**d)

    # -- reading ---------------------------------------------------------------------------------------

    def flat(self) -> dict:
        """Every leaf setting by name (names are unique across the parts)."""
        out = {}
        for name, (part, _) in LEAVES.items():
            out[name] = getattr(getattr(self, part), name) if part else getattr(self, name)
        return out

    def settings_given(self) -> set[str]:
        """Names of the settings the caller chose."""
        if self.given is not None:
            return set(self.given)
        values = self.flat()
        return {n for n, (_, f) in LEAVES.items() if values[n] != field_default(f)}

    def used(self) -> frozenset[str]:
        """The settings this run's method reads."""
        return options_for(self.method)

    @property
    def lr(self) -> float:
        """The learning rate the run uses (the method's default unless given)."""
        return self.training.lr or DEFAULT_LR[self.method]

    @property
    def seq_len(self) -> int:
        """The sequence length FLOPs are stated at."""
        return self.budget.seq_len or self.max_length

    def effective(self) -> dict:
        """The settings as the run uses them, per-method defaults resolved, flat (what the report records); what
        the method does not read is left out, so the record does not suggest it mattered."""
        out = self.flat()
        out["lr"] = self.lr
        out["seq_len"] = self.seq_len
        used = self.used()
        if "lora_targets" in used:
            out["lora_targets"] = targets_for(self)
        if self.method == "prune-lora":
            out["heads_keep"] = self.budget.heads_keep if self.budget.heads_keep is not None else PRUNE_LORA_HEADS_KEEP
        if self.method in ("lora-prune", "apt") and self.budget.keep_flops is None:
            out["keep_params"] = self.budget.keep_params or DEFAULT_KEEP_PARAMS
        return {k: v for k, v in out.items() if k in used}

    def result_settings(self) -> dict:
        """The effective settings that change a run's results (what --resume compares)."""
        return {k: v for k, v in self.effective().items() if LEAVES[k][1].metadata["results"]}

    # -- validation ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse what the run cannot do, in one line: an unknown task, method, scorer or choice; a setting the method
        does not read; one that needs another; numbers out of range; options the task does not take."""
        from prunetune import tasks

        if self.task is None:
            raise PrunetuneError("finetune needs --task (a GLUE task such as sst2, or instruct)")
        tasks.get(self.task, self.task_options)  # an unknown task or a bad task option is refused here
        if self.method not in METHODS:
            raise PrunetuneError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.apt.scorer is not None:
            from prunetune.importance import get_scorer

            get_scorer(self.apt.scorer)
        values = self.flat()
        for name, (_, f) in LEAVES.items():
            choices, value = f.metadata["choices"], values[name]
            if choices and value is not None and value not in choices:
                raise PrunetuneError(f"unknown {flag(name)} {value!r}; known: {', '.join(map(str, choices))}")
        given = self.settings_given()
        unused = sorted(given - self.used())
        if unused:
            raise PrunetuneError(f"--method {self.method} does not use {', '.join(map(flag, unused))}")
        for (method, name), needed in REQUIRES.items():
            if method in (self.method, "*") and name in given and values[name] and not values[needed]:
                raise PrunetuneError(f"{flag(name)} needs {flag(needed)}" + (
                    f" with --method {method}" if method != "*" else ""))
        check_numbers({n: values[n] for n, (part, _) in LEAVES.items() if part is None})
        if (self.method == "apt" and self.apt.distill and self.apt.distill_teacher == "best"
                and not self.training.eval_every):  # evaluations at epoch ends only: the teacher comes too late
            raise PrunetuneError("--distill-teacher best needs --eval-every")
        if (self.method == "apt" and self.apt.distill and self.apt.distill_teacher == "dense"
                and tasks.get(self.task, self.task_options).auto_class not in PRETRAINED_HEADS):
            raise PrunetuneError(f"--distill-teacher dense distils from the model as loaded: --task {self.task} "
                                 "gives it a new, untrained head (use momentum or best)")
        if self.eval_bench is not None:
            from prunetune.mceval.benchmarks import parse

            parse(self.eval_bench)
            if tasks.get(self.task, self.task_options).auto_class != "AutoModelForCausalLM":
                raise PrunetuneError(f"--eval-bench scores a causal LM: --task {self.task} does not train one "
                                     "(use --task instruct)")
        if self.runtime.resume is not None and self.runtime.checkpoint_dir is not None:
            raise PrunetuneError("--resume DIR is where the run's checkpoints are and go on: drop --checkpoint-dir")



def targets_for(cfg: RunConfig) -> str:
    """Where the adapters go: APT tunes the FFN too (its neurons are pruned, so they need to recover)."""
    return cfg.lora.lora_targets or ("all" if cfg.method == "apt" else "attention")


def target_budget(cfg: RunConfig):
    """The target of lora-prune and apt: --keep-flops at --seq-len, else --keep-params (default 0.4)."""
    from prunetune.plan import Budget

    shape = {"uniform": cfg.budget.uniform, "round_to": cfg.budget.round_to,
             "prune_hidden": cfg.apt.prune_hidden and cfg.method == "apt"}
    if cfg.budget.keep_flops is not None:
        return Budget(keep_flops=cfg.budget.keep_flops, seq_len=cfg.seq_len, **shape)
    return Budget(keep_params=cfg.budget.keep_params or DEFAULT_KEEP_PARAMS, **shape)


def resume_mismatch(saved: dict, now: RunConfig, where: str) -> str | None:
    """The one line refusing a resume whose settings differ from the checkpoint's in anything that changes
    results; None when they agree."""
    before = RunConfig.from_dict(saved).result_settings()
    after = now.result_settings()
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            return (f"--resume: the checkpoint in {where} was made with {flag(name)} {_show(before.get(name))}, "
                    f"this run has {_show(after.get(name))}; resume with the settings that made it")
    return None


def _show(value) -> str:
    return "(not set)" if value is None else str(value)


# ---------------------------------------------------------------------------------------------------------
# Tables derived from the fields
# ---------------------------------------------------------------------------------------------------------


def field_default(f):
    return f.default_factory() if f.default is MISSING else f.default


def _leaves() -> dict[str, tuple[str | None, typing.Any]]:
    out: dict = {}
    for f in fields(RunConfig):
        if f.name in PARTS:
            for g in fields(PARTS[f.name]):
                assert g.name not in out, f"setting {g.name} declared twice"
                out[g.name] = (f.name, g)
        elif f.name != "given":
            out[f.name] = (None, f)
    return out


LEAVES = _leaves()  # setting name -> (its part, None at the top; its field)
COMMON_OPTIONS = frozenset(n for n, (_, f) in LEAVES.items() if f.metadata["methods"] is None)
# The settings each method reads on top of the common ones; any other one given is refused, not ignored.
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    m: frozenset(n for n, (_, f) in LEAVES.items() if m in (f.metadata["methods"] or ())) for m in METHODS
}


def options_for(method: str) -> frozenset[str]:
    """Every setting `method` reads: the common ones (but those it cannot honour) and its own."""
    common = frozenset(n for n in COMMON_OPTIONS if method not in LEAVES[n][1].metadata["not_for"])
    return common | METHOD_OPTIONS[method]

# Settings a method only reads together with another one: (method or "*" for every method, setting) -> the setting
# it needs.
REQUIRES: dict[tuple[str, str], str] = {
    ("apt", "scorer"): "prune_before_training",  # the scorer of the one pruning step before training
    ("apt", "samples"): "prune_before_training",  # its calibration sample; APT's own salience needs none
    ("*", "keep_checkpoints"): "save_every",
    ("*", "eval_bench_limit"): "eval_bench",
    ("*", "eval_data"): "eval_bench",
    ("*", "checkpoint_dir"): "save_every",
}


# ---------------------------------------------------------------------------------------------------------
# prunetune eval
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """`prunetune eval`: the multiple-choice benchmarks, scored by lm-evaluation-harness on the local files."""

    model: str | None = _opt(None, "model directory (a prunetune export or a stock causal LM), hub id, or smollm2")
    bench: str = _opt(",".join(BENCHES), "benchmarks, comma-separated")
    limit: int | None = _opt(None, "the first N items of each benchmark (of each MMLU subject, as the harness's "
                                   "--limit)")
    shots: int = _opt(0, "few-shot examples per prompt (TruthfulQA stays zero-shot, as in the harness)")
    batch_size: int = _opt(16, "requests per forward pass")
    eval_data: str | None = _opt(None, EVAL_DATA_HELP)
    out: str | None = _opt(None, "also write the results (and every item's log-likelihoods) as JSON here")

    def __post_init__(self) -> None:
        from prunetune.mceval.benchmarks import parse

        check_numbers(asdict(self))
        parse(self.bench)
