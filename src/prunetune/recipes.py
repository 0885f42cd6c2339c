"""The fine-tuning recipe: load, (score, prune,) adapt, train, merge, export, report — for every method.

Methods (``--method``):
- ``full``: full fine-tuning.
- ``lora``: LoRA of one rank on q, k, v, o; LoRA, norms and task head train.
- ``prune-lora`` (Pruning-Adapter): head importance (mask gradients) on a small training sample, heads
  (and optionally FFN neurons) removed for real before training, rank-varied LoRA (the k most important
  blocks get a higher rank), then training.
- ``lora-prune`` (APT's "LoRA+Prune" baseline): LoRA training, then Fisher-scored structured pruning to
  the target, then a short LoRA recovery.
- ``apt``: adaptive pruning and tuning during training (apt.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from prunetune import adapters, tasks
from prunetune.data import DEFAULT_DEV_FRACTION, DataSource, check_max_length, check_tokenizer, file_digest
from prunetune.errors import PrunetuneError, PrunetuneWarning
from prunetune.export import atomic_dir, check_output_dir, save_compact
from prunetune.families import unwrap
from prunetune.importance import Scores, block_importance, compute, get_scorer, heatmap
from prunetune.models import load_tokenizer, resolve
from prunetune.plan import Budget, layer_cost, model_info, select
from prunetune.surgery import LAYOUT_ATTR, apply_plan, current_layout, own_storage
from prunetune.tasks import EVAL_BATCH_SIZE
from prunetune.train import (
    DEFAULT_SEED,
    FitResult,
    TrainConfig,
    fit,
    pick_device,
    progress_enabled,
    seed_everything,
    set_progress,
    status,
)

METHODS = ("full", "lora", "prune-lora", "lora-prune", "apt")
# apt: 1e-3, as its adapters also cover the FFN and the pruned model recovers within the second half of the run
# (5e-4 gave 78.2 on the SST-2 benchmark, 1e-3 79.9-80.6); the figures at other rates are in benchmarks/README.md.
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "prune-lora": 5e-4, "lora-prune": 5e-4, "apt": 1e-3}

# Settings every method uses.
COMMON_OPTIONS = frozenset({
    "task", "out", "model", "data", "dev_data", "dev_fraction", "method", "overwrite", "epochs", "lr", "batch_size",
    "grad_accum", "seed", "max_length", "train_limit", "eval_limit", "eval_every", "precision", "progress",
    "seq_len",  # the report states FLOPs at --seq-len for every method
})
# The settings each method reads on top of the common ones; any other one given is refused, not ignored.
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "full": frozenset(),
    "lora": frozenset({"rank", "lora_targets"}),
    "prune-lora": frozenset({"lora_targets", "rank_high", "rank_low", "top_blocks", "heads_keep", "neurons_keep",
                             "samples"}),
    "lora-prune": frozenset({"rank", "lora_targets", "keep_params", "keep_flops", "samples", "recovery_epochs"}),
    "apt": frozenset({"rank", "lora_targets", "keep_params", "keep_flops", "distill", "prune_before_training",
                      "scorer", "samples", "extra"}),
}
# Settings a method only reads together with another one: (method, setting) -> the setting it needs.
REQUIRES: dict[tuple[str, str], str] = {
    ("apt", "scorer"): "prune_before_training",  # the scorer of the one pruning step before training
    ("apt", "samples"): "prune_before_training",  # its calibration sample; APT's own salience needs none
    ("apt", "distill"): "eval_every",  # the teacher is the best evaluation so far: at epoch ends only, too late
}


def _finite(v: float) -> bool:
    return math.isfinite(v)


# Numeric settings (and flags of the other commands of the same name): the test and what it asks for.
NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    **dict.fromkeys(
        ("lr", "epochs", "recovery_epochs"), (lambda v: _finite(v) and v > 0, "a positive, finite number")),
    **dict.fromkeys(
        ("batch_size", "grad_accum", "rank", "rank_high", "rank_low", "top_blocks", "samples", "max_length",
         "seq_len", "train_limit", "eval_limit", "round_to"), (lambda v: v > 0, "positive")),
    "eval_every": (lambda v: v >= 0, "0 (every epoch) or a positive number of steps"),
    **dict.fromkeys(("keep_params", "keep_flops", "hidden_keep"), (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]")),
    **dict.fromkeys(("heads_keep", "neurons_keep"), (
        lambda v: _finite(v) and v > 0 and (v <= 1 or v == int(v)), "in (0, 1] or a whole count")),
    "dev_fraction": (lambda v: _finite(v) and 0 < v < 1, "in (0, 1)"),
}


def flag(name: str) -> str:
    """The command-line spelling of a setting."""
    return "--" + name.replace("_", "-")


def check_numbers(values: dict) -> None:
    """Refuse a numeric setting outside its range (NaN and infinities included), naming the flag."""
    for name, (ok, wanted) in NUMBER_RULES.items():
        v = values.get(name)
        if v is not None and not isinstance(v, bool) and not ok(v):
            raise PrunetuneError(f"{flag(name)} must be {wanted}, got {v}")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the CLI fills it from its flags. The defaults here are the only ones:
    the CLI's flags default to None, meaning "not given"."""

    task: str | None
    out: str
    model: str | None = None  # directory, hub id, or None for the embedded default
    data: str | None = None  # GLUE-format directory or file; None = bundled sample (sst2) / datasets
    dev_data: str | None = None  # dev rows from this file (or GLUE directory) instead of --data's
    dev_fraction: float = DEFAULT_DEV_FRACTION  # a single --data file: the share held out as dev rows
    method: str = "prune-lora"
    overwrite: bool = False
    epochs: float = 1.0
    lr: float | None = None  # default per method
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = DEFAULT_SEED
    max_length: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_every: int = 0
    samples: int = 512  # importance sample (prune-lora, lora-prune, apt before training)
    rank: int = 8  # lora: the rank; apt: the starting rank
    lora_targets: str | None = None  # attention (q/k/v/o) or all (+ FFN); default: all for apt, else attention
    rank_high: int = 8  # prune-lora: rank of the top blocks
    rank_low: int = 4
    top_blocks: int | None = None  # default: a third of the blocks (the paper's 4 of BERT-base's 12)
    heads_keep: float | None = None  # prune-lora: default 100/144, the paper's setting
    neurons_keep: float | None = None
    keep_params: float | None = None  # lora-prune / apt target (default 0.4)
    keep_flops: float | None = None  # lora-prune / apt: or a target fraction of the layers' FLOPs per token
    seq_len: int | None = None  # the sequence length --keep-flops is stated at (default --max-length)
    precision: str = "auto"
    distill: bool = False  # apt: self-distillation (its teacher is the best evaluation: use --eval-every)
    prune_before_training: bool = False
    scorer: str | None = None  # apt --prune-before-training: importance scorer (default salience_kurtosis)
    recovery_epochs: float = 0.25  # lora-prune: LoRA recovery after pruning
    progress: bool = True
    extra: dict = field(default_factory=dict)  # method-specific settings (apt.AptConfig fields)
    # The settings the caller gave (the CLI: flags not left at None); None = those that differ from the defaults.
    given: frozenset[str] | None = None

    @classmethod
    def from_args(cls, args) -> FinetuneConfig:
        names = set(cls.__dataclass_fields__) - {"given"}
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return cls(**{"task": None, **given}, given=frozenset(given))

    def settings_given(self) -> set[str]:
        """Names of the settings the caller chose."""
        if self.given is not None:
            return set(self.given)
        defaults = FinetuneConfig(task=None, out="")
        return {f.name for f in fields(self)
                if f.name != "given" and getattr(self, f.name) != getattr(defaults, f.name)}

    def check(self) -> None:
        if self.task is None:
            raise PrunetuneError("finetune needs --task (a GLUE task such as sst2, or instruct)")
        tasks.get(self.task)
        if self.method not in METHODS:
            raise PrunetuneError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.scorer is not None:
            get_scorer(self.scorer)
        if self.lora_targets is not None and self.lora_targets not in adapters.LORA_TARGETS:
            raise PrunetuneError(f"unknown --lora-targets {self.lora_targets!r}; known: "
                                 f"{', '.join(adapters.LORA_TARGETS)}")
        given = self.settings_given()
        unused = sorted(given - COMMON_OPTIONS - METHOD_OPTIONS[self.method])
        if unused:
            raise PrunetuneError(f"--method {self.method} does not use {', '.join(map(flag, unused))}")
        for (method, name), needed in REQUIRES.items():
            if method == self.method and name in given and getattr(self, name) and not getattr(self, needed):
                raise PrunetuneError(f"{flag(name)} needs {flag(needed)} with --method {method}")
        check_numbers(asdict(self))
        if self.keep_params is not None and self.keep_flops is not None:
            raise PrunetuneError("give either --keep-params or --keep-flops, not both")

    def effective(self) -> dict:
        """The settings as the run uses them: per-method defaults resolved (what the report records)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "given")}
        out["lr"] = self.lr or DEFAULT_LR[self.method]
        out["seq_len"] = self.seq_len or self.max_length
        used = COMMON_OPTIONS | METHOD_OPTIONS[self.method]
        if "lora_targets" in used:
            out["lora_targets"] = targets_for(self)
        if self.method == "prune-lora":
            out["heads_keep"] = self.heads_keep if self.heads_keep is not None else PRUNE_LORA_HEADS_KEEP
        if self.method in ("lora-prune", "apt") and self.keep_flops is None:
            out["keep_params"] = target_budget(self).keep_params
        # what the method does not read is left out, so the record does not suggest it mattered
        return {k: v for k, v in out.items() if k in used}


def _memory_meter():
    """Peak training memory above the level just before the model loads (prunetune.bench.MemoryMeter)."""
    from prunetune.bench import MemoryMeter

    return MemoryMeter(pick_device()).start()


def _memory_how(meter) -> str:
    if meter.cuda:
        return "torch.cuda.max_memory_allocated above the allocation just before the model was loaded"
    how = ("process peak resident memory (VmHWM, restarted just before the model was loaded) above the "
           "resident memory at that moment")
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:  # glibc then maps every larger block on its own and unmaps it on free
        how += f"; glibc mmap threshold {threshold} bytes, so freed activations leave the resident set"
    return how


def _train_config(cfg: FinetuneConfig, log_path: Path, epochs: float | None = None, lr: float | None = None):
    return TrainConfig(
        epochs=epochs if epochs is not None else cfg.epochs,
        lr=lr or cfg.lr or DEFAULT_LR[cfg.method],
        grad_accum=cfg.grad_accum,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        precision=cfg.precision,
        progress=cfg.progress,
        log_path=log_path,
    )


@dataclass
class MethodResult:
    """What a method hands back to the recipe."""

    model: nn.Module  # trained; LoRA still unmerged where there is LoRA
    fit: FitResult
    trainable: int
    scores: Scores | None = None
    extra: dict = field(default_factory=dict)


def _run_full(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    adapters.set_trainable(model, norms=True, head=True, all_params=True)
    _, trainable = adapters.count_parameters(model)
    res = fit(model, train_loader, evaluate, _train_config(cfg, log_path))
    return MethodResult(model, res, trainable)


def targets_for(cfg: FinetuneConfig) -> str:
    """Where the adapters go: APT tunes the FFN too (its neurons are pruned, so they need to recover)."""
    return cfg.lora_targets or ("all" if cfg.method == "apt" else "attention")


def _run_lora(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    peft_model = adapters.apply_lora(model, rank=cfg.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    res = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path))
    return MethodResult(peft_model, res, trainable)


PRUNE_LORA_HEADS_KEEP = 100 / 144  # the Pruning-Adapter paper's setting: 100 of BERT-base's 144 heads


def _run_prune_lora(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    scores = compute(model, sample_loader, "head_grad")
    heads_keep = cfg.heads_keep if cfg.heads_keep is not None else PRUNE_LORA_HEADS_KEEP
    plan = select(model, scores, Budget(heads_keep=heads_keep, neurons_keep=cfg.neurons_keep), normalize="per_layer")
    apply_plan(model, plan)
    own_storage(model)  # let the dense checkpoint's mapping go: its pages would stay resident
    blocks = block_importance(scores)  # the layer's summed raw head importance: how much the task needs it
    top = cfg.top_blocks if cfg.top_blocks is not None else max(1, round(len(blocks) / 3))
    ranks = adapters.block_ranks(blocks, top, cfg.rank_high, cfg.rank_low)
    peft_model = adapters.apply_lora(model, rank=cfg.rank_low, block_rank=ranks, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    res = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path))
    return MethodResult(peft_model, res, trainable, scores, {"plan": plan.to_dict(), "block_ranks": ranks})


def _run_lora_prune(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    """APT's LoRA+Prune baseline: LoRA training, then Kwon et al.'s post-training pruning of the tuned model under
    the budget (Fisher scores on the sample, the mask chosen by score per cost, mask rearrangement and
    least-squares rescaling of what is kept), then a short LoRA recovery (--recovery-epochs; APT retrains its
    pruned baseline too)."""
    from prunetune.importance import kwon_rearrange, kwon_rescale

    peft_model = adapters.apply_lora(model, rank=cfg.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    first = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path))
    t0 = time.perf_counter()
    scores = compute(peft_model, sample_loader, "fisher")  # of the tuned model, adapters included
    plan = select(peft_model, scores, target_budget(cfg))
    # same counts per layer (so the same cost), chosen for a lower block Fisher; then the kept heads and neurons
    # scaled so each narrowed block restores the tuned model's outputs (folded into the output projections'
    # columns and their LoRA A)
    plan = kwon_rearrange(peft_model, plan, sample_loader)
    scales = kwon_rescale(peft_model, plan, sample_loader)
    apply_plan(peft_model, plan)
    prune_time = time.perf_counter() - t0
    recovery = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path, epochs=cfg.recovery_epochs))
    recovery.history = first.history + recovery.history
    recovery.train_time_s += first.train_time_s + prune_time
    recovery.steps += first.steps
    # the scales changed base weights (the output projections' kept columns): the adapter's base is the dense
    # model cut to the layout and scaled by them
    post_training = {"scorer": "fisher", "rearrangement": plan.meta["rearrangement"],
                     "rescale": plan.meta["kwon_rescale"], "scales": scales, "prune_time_s": prune_time}
    return MethodResult(peft_model, recovery, trainable, scores, {"plan": plan.to_dict(),
                                                                  "post_training_pruning": post_training})


def target_budget(cfg: FinetuneConfig) -> Budget:
    """The target of lora-prune and apt: --keep-flops at --seq-len, else --keep-params (default 0.4)."""
    if cfg.keep_flops is not None:
        return Budget(keep_flops=cfg.keep_flops, seq_len=cfg.seq_len or cfg.max_length)
    return Budget(keep_params=cfg.keep_params or 0.4)


def _run_apt(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    from prunetune.apt import run_apt

    return run_apt(cfg, model, train_loader, evaluate, _train_config(cfg, log_path), sample_loader)


RUNNERS = {
    "full": _run_full,
    "lora": _run_lora,
    "prune-lora": _run_prune_lora,
    "lora-prune": _run_lora_prune,
    "apt": _run_apt,
}


def _timed_evaluation(task, model: nn.Module, loader) -> tuple[dict, dict]:
    """The metrics of one pass over the dev set, and how long it took (one pass serves both)."""
    t0 = time.perf_counter()
    metrics = task.evaluate(model, loader)
    dt = time.perf_counter() - t0
    n = len(loader.dataset)
    return metrics, {"dev_inference_s": dt, "dev_examples": n, "ms_per_example": 1000 * dt / max(1, n)}


def _isolated_inference(task, model_dir: Path, cfg: FinetuneConfig) -> dict:
    """Latency and peak memory at a fixed batch in a fresh process (only there is a CPU peak honest)."""
    from prunetune.bench import run_isolated

    kw = {
        "model_dir": str(model_dir),
        "batch_size": 32,
        "seq_len": cfg.max_length,
        "repeats": 3,
        "auto_class": task.auto_class,
    }
    res = run_isolated("prunetune.bench:measure_inference", kw, timeout=600)
    return {
        "batch32_latency_s": res["latency_s_median"],
        "batch32_peak_mem_mb": res["peak_mem_mb"],
        "batch32_seq_len": cfg.max_length,
    }


def _warm_imports(location: str) -> None:
    """Import what the run will import anyway (model code, PEFT, metrics, plotting) before the baseline."""
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import transformers

    config = transformers.AutoConfig.from_pretrained(location)
    for arch in config.architectures or []:
        getattr(transformers, arch.removeprefix("Prunetune"), None)  # imports the modeling module


def dense_reference(model: nn.Module) -> nn.Module:
    """The model before any pruning: itself when dense; else the dense shapes, built on the meta device (no
    memory, no weights) from its config, which keeps the dense numbers next to the layout pruned so far."""
    top = unwrap(model)
    if current_layout(top) is None:
        return top
    config = copy.deepcopy(top.config)
    setattr(config, LAYOUT_ATTR, None)
    with torch.device("meta"):
        return type(top)(config)


def _precision(cfg: FinetuneConfig, used: str) -> dict:
    device = pick_device().type
    out = {"requested": cfg.precision, "used": used, "device": device}
    if cfg.precision not in ("auto", used):
        out["note"] = "mixed precision runs on GPUs only" if device != "cuda" else "not supported here"
    return out


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one method end to end and write DIR/model, DIR/adapter, DIR/report.{json,md}, logs and scores."""
    cfg.check()
    shown = progress_enabled()
    set_progress(shown and cfg.progress)
    try:
        return _finetune(cfg)
    finally:
        set_progress(shown)


def _finetune(cfg: FinetuneConfig) -> dict:
    import transformers

    location = resolve(cfg.model)
    inputs = [location, cfg.data, cfg.dev_data]  # --out must not replace them
    out = check_output_dir(cfg.out, overwrite=cfg.overwrite, inputs=inputs)
    task = tasks.for_model(cfg.task, location)  # GLUE on T5 is text-to-text
    tokenizer = load_tokenizer(location)
    # Everything that can be refused from the config alone is, before data and weights load.
    config = transformers.AutoConfig.from_pretrained(location)
    check_max_length(cfg.max_length, config)
    check_tokenizer(tokenizer, config)
    source = DataSource(cfg.data, cfg.dev_data, cfg.dev_fraction)
    loaders = task.loaders(
        tokenizer,
        data=source,
        train_limit=cfg.train_limit,
        eval_limit=cfg.eval_limit,
        samples=cfg.samples,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    status(f"data: {tasks.data_summary(loaders.data)}")
    _warm_imports(location)
    # The baseline is taken with the data loaded and every library imported, just before the model: what
    # is measured is the model and the method, not the fixed cost of the libraries.
    memory = _memory_meter()
    status(f"loading {location}")
    seed_everything(cfg.seed)  # the new task head and the adapters start from seeded random weights
    model = task.load_model(location)
    check_tokenizer(tokenizer, model)
    # Budgets and the report refer to the dense original, also when the input was pruned before.
    original = dense_reference(model)
    dense = model_info(original)
    given = model_info(model)
    flops_seq = cfg.seq_len or cfg.max_length
    dense_layer_flops = layer_cost(original, flops_seq)
    del original
    train_loader, dev_loader, sample_loader = loaders.train, loaders.dev, loaders.sample

    def evaluate(m: nn.Module) -> dict:
        return task.evaluate(m, dev_loader)

    with atomic_dir(out, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        log_path = tmp / "metrics.jsonl"
        status(f"{cfg.method}: lr {cfg.effective()['lr']:g}, {cfg.epochs:g} epoch(s) of {len(train_loader)} batches")
        result = RUNNERS[cfg.method](cfg, model, train_loader, evaluate, log_path, sample_loader)
        peak_train = memory.read()
        status(f"exporting to {out}")
        adapter_dir = None
        if adapters.lora_layers(result.model):
            adapter_dir = tmp / "adapter"
            adapters.save_adapter(result.model, adapter_dir, base_model=location)
        merged = adapters.merge(result.model)
        # the export says which task its head was trained for, and on which rows (prunetune evaluate reads it)
        tasks.tag_model(merged, task, trained=True, held_out=loaders.data.get("held_out"))
        save_compact(merged, tmp / "model", tokenizer)
        # the report's metric comes from the exported model as `prunetune evaluate` will load it
        status("evaluating the exported model")
        reloaded = task.load_model(str(tmp / "model"))
        metrics, timing = _timed_evaluation(task, reloaded, dev_loader)
        info = model_info(reloaded)
        if "timeline" in result.extra:
            from prunetune.apt import plot_timeline

            plot_timeline(result.extra["timeline"], result.extra.get("eval_history", []), tmp / "timeline.png")
        if result.scores is not None:
            result.scores.save(tmp / "importance.json")
            heatmap([result.scores], [f"{cfg.task} head importance"], tmp / "importance.png")
        (tmp / "data_split.json").write_text(json.dumps(loaders.data, indent=1))
        status("measuring inference in a fresh process (batch 32, sequence length "
               f"{cfg.max_length}, 3 repeats; about 10-30 s)")
        t0 = time.perf_counter()
        isolated = _isolated_inference(task, tmp / "model", cfg)
        status(f"inference measured in {time.perf_counter() - t0:.0f} s")
        outputs = {
            "model": str(out / "model"),
            **({"adapter": str(out / "adapter")} if adapter_dir is not None else {}),
            "report": [str(out / "report.md"), str(out / "report.json")],
            "data_split": str(out / "data_split.json"),
        }
        report = {
            "method": cfg.method,
            "task": cfg.task,
            "model": location,
            "config": cfg.effective(),
            "precision": _precision(cfg, result.fit.precision),
            "data": {k: ({**v, "rows": "see data_split.json"} if isinstance(v, dict) and v.get("rows") else v)
                     for k, v in loaders.data.items()},
            "metrics": metrics,
            "best_eval_step": result.fit.best_step,
            "params_total": info["params"],
            "params_dense": dense["params"],
            "layer_params": info["layer_params"],
            # relative to the dense original model, whatever was pruned before this run
            "layer_params_kept": info["layer_params"] / dense["layer_params"],
            "layer_flops_kept": layer_cost(reloaded, flops_seq) / dense_layer_flops,
            "flops_seq_len": flops_seq,
            "trainable_params": result.trainable,
            "heads": f"{info['heads']}/{dense['heads']}",
            "neurons": f"{info['ffn']}/{dense['ffn']}",
            "hidden": f"{info['hidden']}/{dense['hidden']}",
            "train_time_s": result.fit.train_time_s,
            "train_steps": result.fit.steps,
            "peak_train_mem_mb": peak_train,
            "peak_train_mem_how": _memory_how(memory),
            "inference": {**timing, **isolated},
            "outputs": outputs,
            **result.extra,
        }
        if given["layer_params"] != dense["layer_params"]:  # the input model was already pruned
            report["input_layer_params_kept"] = given["layer_params"] / dense["layer_params"]
        report["summary"] = _summary(report)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "report.md").write_text(report_markdown(report))
    return report


def _summary(r: dict) -> str:
    m = r["metrics"]
    others = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "main")
    return (
        f"{r['method']} on {r['task']}: {m['main']:.4f} ({others})"
        f" | params {r['params_total']:,} ({r['layer_params_kept']:.0%} of layer params) | trainable "
        f"{r['trainable_params']:,} | train {r['train_time_s']:.1f}s | peak train mem {r['peak_train_mem_mb']:.0f} MB"
    )


def _rows_line(d: dict) -> str:
    share = f"{d['examples']:,} of {d['of']:,}" if d["examples"] != d["of"] else f"all {d['of']:,}"
    return f"{share} rows of {d['source']}" + (" (held out)" if d.get("held_out") else "")


def report_markdown(r: dict) -> str:
    held = r["data"].get("held_out")
    rows = [
        ("task metric (main)", f"{r['metrics']['main']:.4f}"),
        *[(k, f"{v:.4f}") for k, v in r["metrics"].items() if k != "main"],
        ("training rows", _rows_line(r["data"]["train"])),
        ("dev rows (scored)", _rows_line(r["data"]["dev"]) + (
            f", a seeded {held['dev_fraction']:g} of the training file (seed {held['seed']}); row numbers in "
            "data_split.json" if held else "")),
        ("learning rate", f"{r['config']['lr']:g}"),
        ("precision", f"{r['precision']['used']} on {r['precision']['device']}"
                      + (f" ({r['precision']['requested']} requested: {r['precision']['note']})"
                         if "note" in r["precision"] else "")),
        ("total parameters", f"{r['params_total']:,} (dense {r['params_dense']:,})"),
        ("layer parameters kept", f"{r['layer_params_kept']:.1%} of the dense original"
                                  + (f" (the input model had {r['input_layer_params_kept']:.1%})"
                                     if "input_layer_params_kept" in r else "")),
        ("layer FLOPs kept", f"{r['layer_flops_kept']:.1%} (per token, sequence length {r['flops_seq_len']})"),
        ("trainable parameters", f"{r['trainable_params']:,}"),
        ("heads kept", r["heads"]),
        ("FFN neurons kept", r["neurons"]),
        ("hidden size", r["hidden"]),
        ("training time", f"{r['train_time_s']:.1f} s ({r['train_steps']} steps)"),
        ("peak training memory", f"{r['peak_train_mem_mb']:.0f} MB — {r['peak_train_mem_how']}"),
        ("dev inference", f"{r['inference']['ms_per_example']:.2f} ms/example"),
        (
            "inference, batch 32",
            f"{1000 * r['inference']['batch32_latency_s']:.0f} ms, peak "
            f"{r['inference']['batch32_peak_mem_mb']:.0f} MB (fresh process)",
        ),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# prunetune {r['method']} on {r['task']}\n\n| | |\n|---|---|\n{body}\n"


def _evaluation_source(data: str | None, record: dict | None, seed: int) -> tuple[DataSource, int]:
    """What `evaluate --data` scores: a GLUE directory's dev file; a single file whole, unless it is the file
    the export trained on, whose held-out rows (the run's seed and fraction) are then the only ones scored."""
    if data is None or Path(data).is_dir():
        return DataSource(data), seed
    held = (record or {}).get("held_out")
    # the same path, or the same bytes elsewhere: scoring a copy of the training file whole would score
    # training rows
    if held and (Path(held["file"]).resolve() == Path(data).resolve() or held.get("sha256") == file_digest(data)):
        status(f"{data} is the file the model trained on: scoring only the rows the run held out of it "
               f"(--dev-fraction {held['dev_fraction']:g}, --seed {held['seed']})")
        return DataSource(data, dev_fraction=held["dev_fraction"]), held["seed"]
    return DataSource(None, dev_path=data), seed


def check_task_record(record: dict | None, task: tasks.Task, path: str) -> str | None:
    """Refuse an export made for another task; the warning to give when its head was never trained or its task
    is unknown (None: the record matches)."""
    if record is None:
        return (f"{path} does not record its task (not a `prunetune finetune` export): the scores mean something "
                f"only if its head was trained for {task.name}")
    if record.get("name") != task.name:
        raise PrunetuneError(f"{path} was fine-tuned for {record.get('name')}, not {task.name}: its head's outputs "
                             f"are {record.get('name')}'s classes")
    if list(record.get("labels", [])) != task.labels():
        raise PrunetuneError(f"{path} was made for the labels {record.get('labels')} of {task.name}, "
                             f"this task has {task.labels()}")
    if not record.get("trained"):
        return (f"the {task.name} head of {path} was never trained (a `prunetune prune` output): expect "
                "chance-level scores; fine-tune it first")
    return None


def evaluate_export(
    path: str,
    task: str,
    *,
    data: str | None = None,
    max_length: int = 128,
    batch_size: int = EVAL_BATCH_SIZE,
    eval_limit: int | None = None,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Re-score an exported model on a task's dev set (the same data and metric as the run's report)."""
    import transformers

    location = resolve(path)
    the_task = tasks.for_model(task, location)
    config = transformers.AutoConfig.from_pretrained(location)
    check_max_length(max_length, config)
    tokenizer = load_tokenizer(location)
    check_tokenizer(tokenizer, config)
    record = getattr(config, tasks.TASK_ATTR, None)
    caution = check_task_record(record, the_task, path)
    source, seed = _evaluation_source(data, record, seed)
    model = the_task.load_model(location).to(pick_device())  # refuses a head of another width
    check_tokenizer(tokenizer, model)
    loader = the_task.eval_loader(tokenizer, data=source, eval_limit=eval_limit, max_length=max_length, seed=seed,
                                  batch_size=batch_size)
    if caution:  # after every refusal: a refused run says one thing
        warnings.warn(caution, PrunetuneWarning, stacklevel=2)
    return the_task.evaluate(model, loader)
