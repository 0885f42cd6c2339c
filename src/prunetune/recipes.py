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

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from prunetune import adapters, tasks
from prunetune.data import check_tokenizer
from prunetune.errors import PrunetuneError
from prunetune.export import atomic_dir, check_output_dir, save_compact
from prunetune.importance import Scores, compute, heatmap
from prunetune.models import load_tokenizer, resolve
from prunetune.plan import Budget, layer_cost, layer_param_count, model_info, select
from prunetune.surgery import apply_plan, own_storage
from prunetune.train import FitResult, TrainConfig, fit, pick_device, seed_everything

METHODS = ("full", "lora", "prune-lora", "lora-prune", "apt")
# apt: 1e-3, as its adapters also cover the FFN and the pruned model recovers within the second half of the run
# (5e-4 gave 78.2 on the SST-2 benchmark, 1e-3 79.9-80.6); the figures at other rates are in benchmarks/README.md.
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "prune-lora": 5e-4, "lora-prune": 5e-4, "apt": 1e-3}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the CLI fills it from its flags."""

    task: str
    out: str
    model: str | None = None  # directory, hub id, or None for the embedded default
    data: str | None = None  # GLUE-format directory or file; None = bundled sample (sst2) / datasets
    method: str = "prune-lora"
    overwrite: bool = False
    epochs: float = 1.0
    lr: float | None = None  # default per method
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 42
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

    @classmethod
    def from_args(cls, args) -> FinetuneConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def check(self) -> None:
        tasks.get(self.task)
        if self.method not in METHODS:
            raise PrunetuneError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.lora_targets is not None and self.lora_targets not in adapters.LORA_TARGETS:
            raise PrunetuneError(f"unknown --lora-targets {self.lora_targets!r}; known: "
                                 f"{', '.join(adapters.LORA_TARGETS)}")
        for name in ("rank", "rank_high", "rank_low", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise PrunetuneError(f"--{name.replace('_', '-')} must be positive")
        if self.epochs <= 0:
            raise PrunetuneError("--epochs must be positive")
        for name in ("heads_keep", "neurons_keep", "keep_params", "keep_flops"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= (1 if name.startswith("keep_") else max(v, 1)):
                raise PrunetuneError(f"--{name.replace('_', '-')} must be in (0, 1] (or a count), got {v}")
        if self.keep_params is not None and self.keep_flops is not None:
            raise PrunetuneError("give either --keep-params or --keep-flops, not both")
        if self.seq_len is not None and self.seq_len <= 0:
            raise PrunetuneError("--seq-len must be positive")


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


def block_scores(scores: Scores) -> dict[str, float]:
    """Importance of a block (layer) = the sum of its heads' scores."""
    out: dict[str, float] = {}
    for key, vals in scores.heads.items():
        layer = key.split("/")[0]
        out[layer] = out.get(layer, 0.0) + float(sum(vals))
    return out


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


def _run_prune_lora(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    scores = compute(model, sample_loader, "head_grad")
    heads_keep = cfg.heads_keep if cfg.heads_keep is not None else 100 / 144
    plan = select(model, scores, Budget(heads_keep=heads_keep, neurons_keep=cfg.neurons_keep), normalize="per_layer")
    apply_plan(model, plan)
    own_storage(model)  # let the dense checkpoint's mapping go: its pages would stay resident
    blocks = block_scores(scores)
    top = cfg.top_blocks if cfg.top_blocks is not None else max(1, round(len(blocks) / 3))
    ranks = adapters.block_ranks(blocks, top, cfg.rank_high, cfg.rank_low)
    peft_model = adapters.apply_lora(model, rank=cfg.rank_low, block_rank=ranks, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    res = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path))
    return MethodResult(peft_model, res, trainable, scores, {"plan": plan.to_dict(), "block_ranks": ranks})


def _run_lora_prune(cfg, model, train_loader, evaluate, log_path, sample_loader) -> MethodResult:
    peft_model = adapters.apply_lora(model, rank=cfg.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    first = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path))
    t0 = time.perf_counter()
    scores = compute(peft_model, sample_loader, "fisher")
    plan = select(peft_model, scores, target_budget(cfg))
    apply_plan(peft_model, plan)
    prune_time = time.perf_counter() - t0
    recovery = fit(peft_model, train_loader, evaluate, _train_config(cfg, log_path, epochs=cfg.recovery_epochs))
    recovery.history = first.history + recovery.history
    recovery.train_time_s += first.train_time_s + prune_time
    recovery.steps += first.steps
    return MethodResult(peft_model, recovery, trainable, scores, {"plan": plan.to_dict()})


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


def _inference_timing(task, model: nn.Module, loader) -> dict:
    t0 = time.perf_counter()
    task.evaluate(model, loader)
    dt = time.perf_counter() - t0
    n = len(loader.dataset)
    return {"dev_inference_s": dt, "dev_examples": n, "ms_per_example": 1000 * dt / max(1, n)}


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


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one method end to end and write DIR/model, DIR/adapter, DIR/report.{json,md}, logs and scores."""
    cfg.check()
    out = check_output_dir(cfg.out, overwrite=cfg.overwrite)
    location = resolve(cfg.model)
    task = tasks.for_model(cfg.task, location)  # GLUE on T5 is text-to-text
    tokenizer = load_tokenizer(location)
    loaders = task.loaders(
        tokenizer,
        data=cfg.data,
        train_limit=cfg.train_limit,
        eval_limit=cfg.eval_limit,
        samples=cfg.samples,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    _warm_imports(location)
    # The baseline is taken with the data loaded and every library imported, just before the model: what
    # is measured is the model and the method, not the fixed cost of the libraries.
    memory = _memory_meter()
    seed_everything(cfg.seed)  # the new task head and the adapters start from seeded random weights
    model = task.load_model(location)
    check_tokenizer(tokenizer, model.config)
    dense = model_info(model)
    dense_layer_params = layer_param_count(model)
    flops_seq = cfg.seq_len or cfg.max_length
    dense_layer_flops = layer_cost(model, flops_seq)
    train_loader, dev_loader, sample_loader = loaders.train, loaders.dev, loaders.sample

    def evaluate(m: nn.Module) -> dict:
        return task.evaluate(m, dev_loader)

    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        log_path = tmp / "metrics.jsonl"
        result = RUNNERS[cfg.method](cfg, model, train_loader, evaluate, log_path, sample_loader)
        peak_train = memory.read()
        adapter_dir = None
        if adapters.lora_layers(result.model):
            adapter_dir = tmp / "adapter"
            adapters.save_adapter(result.model, adapter_dir)
        merged = adapters.merge(result.model)
        save_compact(merged, tmp / "model", tokenizer)
        # the report's metric comes from the exported model as `prunetune evaluate` will load it
        reloaded = task.load_model(str(tmp / "model"))
        metrics = evaluate(reloaded)
        info = model_info(reloaded)
        if "timeline" in result.extra:
            from prunetune.apt import plot_timeline

            plot_timeline(result.extra["timeline"], result.extra.get("eval_history", []), tmp / "timeline.png")
        if result.scores is not None:
            result.scores.save(tmp / "importance.json")
            heatmap([result.scores], [f"{cfg.task} head importance"], tmp / "importance.png")
        report = {
            "method": cfg.method,
            "task": cfg.task,
            "model": location,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
            "metrics": metrics,
            "best_eval_step": result.fit.best_step,
            "params_total": info["params"],
            "params_dense": dense["params"],
            "layer_params": info["layer_params"],
            "layer_params_kept": info["layer_params"] / dense_layer_params,
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
            "inference": {
                **_inference_timing(task, reloaded, dev_loader),
                **_isolated_inference(task, tmp / "model", cfg),
            },
            **result.extra,
        }
        report["summary"] = _summary(report)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "report.md").write_text(report_markdown(report))
        if adapter_dir is not None:
            (adapter_dir / "README.md").write_text(
                "PEFT LoRA adapter, unmerged. It only fits the pruned base it was trained on: load with "
                "prunetune.adapters.load_adapter(base, dir), which checks prunetune_base.json.\n"
            )
    return report


def _summary(r: dict) -> str:
    m = r["metrics"]
    others = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "main")
    return (
        f"{r['method']} on {r['task']}: {m['main']:.4f} ({others})"
        f" | params {r['params_total']:,} ({r['layer_params_kept']:.0%} of layer params) | trainable "
        f"{r['trainable_params']:,} | train {r['train_time_s']:.1f}s | peak train mem {r['peak_train_mem_mb']:.0f} MB"
    )


def report_markdown(r: dict) -> str:
    rows = [
        ("task metric (main)", f"{r['metrics']['main']:.4f}"),
        *[(k, f"{v:.4f}") for k, v in r["metrics"].items() if k != "main"],
        ("total parameters", f"{r['params_total']:,} (dense {r['params_dense']:,})"),
        ("layer parameters kept", f"{r['layer_params_kept']:.1%}"),
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


def evaluate_export(
    path: str,
    task: str,
    *,
    data: str | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    eval_limit: int | None = None,
    seed: int = 42,
) -> dict:
    """Re-score an exported model on a task's dev set (the same data and metric as the run's report)."""
    location = resolve(path)
    the_task = tasks.for_model(task, location)
    tokenizer = load_tokenizer(location)
    model = the_task.load_model(location).to(pick_device())
    loaders = the_task.loaders(
        tokenizer,
        data=data,
        train_limit=None,
        eval_limit=eval_limit,
        samples=1,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
    )
    return the_task.evaluate(model, loaders.dev)
