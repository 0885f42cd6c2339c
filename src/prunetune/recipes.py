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

The recipe works in stages, as torchtune's do: set up (configuration checked, checkpoints opened and a resumed
run's settings compared, data and model loaded), train (the method, through ``fit``, which writes checkpoints
through the recipe), export and report (the main rank only), clean up (checkpoints removed after a success).
Under ``torchrun`` every rank runs the same stages; only the main rank writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from prunetune import adapters, tasks
from prunetune.checkpoint import CheckpointStore, default_dir
from prunetune.config import (  # noqa: F401 (COMMON_OPTIONS, METHOD_OPTIONS, METHODS: read from here too)
    COMMON_OPTIONS,
    DEFAULT_LR,
    METHOD_OPTIONS,
    METHODS,
    PRUNE_LORA_HEADS_KEEP,
    RunConfig,
    TrainingOptions,
    resume_mismatch,
    target_budget,
    targets_for,
)
from prunetune.data import DataSource, check_max_length, check_tokenizer, file_digest
from prunetune.errors import PrunetuneError, PrunetuneWarning
from prunetune.export import atomic_dir, check_output_dir, save_compact, write_model_card
from prunetune.families import unwrap
from prunetune.importance import Scores, block_importance, compute, heatmap
from prunetune.models import load_tokenizer, resolve
from prunetune.plan import Budget, layer_cost, model_info, select
from prunetune.report import memory_how, memory_meter, precision_record, report_markdown, summary
from prunetune.runtime import Runtime
from prunetune.state import RunState
from prunetune.surgery import LAYOUT_ATTR, apply_plan, current_layout, own_storage
from prunetune.tasks import EVAL_BATCH_SIZE
from prunetune.train import (
    DEFAULT_SEED,
    FitResult,
    RunContext,
    fit,
    pick_device,
    progress_enabled,
    seed_everything,
    set_progress,
    status,
)

FinetuneConfig = RunConfig  # the name library users know


def training_options(cfg: RunConfig, epochs: float | None = None, lr: float | None = None) -> TrainingOptions:
    """The training part as the loop runs it: the method's learning rate resolved (and a phase's own epochs)."""
    return replace(cfg.training, epochs=epochs if epochs is not None else cfg.training.epochs, lr=lr or cfg.lr)


@dataclass
class MethodResult:
    """What a method hands back to the recipe."""

    model: nn.Module  # trained; LoRA still unmerged where there is LoRA
    fit: FitResult
    trainable: int
    scores: Scores | None = None
    extra: dict = field(default_factory=dict)


def _run_full(cfg, model, train_loader, evaluate, context, sample_loader) -> MethodResult:
    adapters.set_trainable(model, norms=True, head=True, all_params=True)
    _, trainable = adapters.count_parameters(model)
    res = fit(model, train_loader, evaluate, training_options(cfg), context=context)
    return MethodResult(model, res, trainable)


def _run_lora(cfg, model, train_loader, evaluate, context, sample_loader) -> MethodResult:
    peft_model = adapters.apply_lora(model, rank=cfg.lora.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    res = fit(peft_model, train_loader, evaluate, training_options(cfg), context=context)
    return MethodResult(peft_model, res, trainable)


def _run_prune_lora(cfg, model, train_loader, evaluate, context, sample_loader) -> MethodResult:
    # every rank scores the same sample; the main rank's scores decide (GPU kernels need not agree to the bit)
    scores = context.runtime.broadcast(compute(model, sample_loader, "head_grad"))
    heads_keep = cfg.budget.heads_keep if cfg.budget.heads_keep is not None else PRUNE_LORA_HEADS_KEEP
    plan = select(model, scores, Budget(heads_keep=heads_keep, neurons_keep=cfg.budget.neurons_keep,
                                        uniform=cfg.budget.uniform, round_to=cfg.budget.round_to),
                  normalize="per_layer")
    apply_plan(model, plan)
    own_storage(model)  # let the dense checkpoint's mapping go: its pages would stay resident
    blocks = block_importance(scores)  # the layer's summed raw head importance: how much the task needs it
    lo = cfg.lora
    top = lo.top_blocks if lo.top_blocks is not None else max(1, round(len(blocks) / 3))
    ranks = adapters.block_ranks(blocks, top, lo.rank_high, lo.rank_low)
    peft_model = adapters.apply_lora(model, rank=lo.rank_low, block_rank=ranks, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    res = fit(peft_model, train_loader, evaluate, training_options(cfg), context=context)
    return MethodResult(peft_model, res, trainable, scores, {"plan": plan.to_dict(), "block_ranks": ranks})


def _run_lora_prune(cfg, model, train_loader, evaluate, context, sample_loader) -> MethodResult:
    """APT's LoRA+Prune baseline: LoRA training, then Kwon et al.'s post-training pruning of the tuned model under
    the budget (Fisher scores on the sample, the mask chosen by score per cost, mask rearrangement and
    least-squares rescaling of what is kept), then a short LoRA recovery (--recovery-epochs; APT retrains its
    pruned baseline too)."""
    from prunetune.importance import kwon_rearrange, kwon_rescale

    peft_model = adapters.apply_lora(model, rank=cfg.lora.rank, targets=targets_for(cfg))
    _, trainable = adapters.count_parameters(peft_model)
    first = fit(peft_model, train_loader, evaluate, training_options(cfg), context=context)
    t0 = time.perf_counter()
    scores = context.runtime.broadcast(compute(peft_model, sample_loader, "fisher"))  # of the tuned model
    plan = select(peft_model, scores, target_budget(cfg))
    # same counts per layer (so the same cost), chosen for a lower block Fisher; then the kept heads and neurons
    # scaled so each narrowed block restores the tuned model's outputs (folded into the output projections'
    # columns and their LoRA A)
    plan = kwon_rearrange(peft_model, plan, sample_loader)
    scales = kwon_rescale(peft_model, plan, sample_loader)
    apply_plan(peft_model, plan)
    prune_time = time.perf_counter() - t0
    recovery = fit(peft_model, train_loader, evaluate, training_options(cfg, epochs=cfg.training.recovery_epochs),
                   context=context)
    recovery.history = first.history + recovery.history
    recovery.train_time_s += first.train_time_s + prune_time
    recovery.steps += first.steps
    # the scales changed base weights (the output projections' kept columns): the adapter's base is the dense
    # model cut to the layout and scaled by them
    post_training = {"scorer": "fisher", "rearrangement": plan.meta["rearrangement"],
                     "rescale": plan.meta["kwon_rescale"], "scales": scales, "prune_time_s": prune_time}
    return MethodResult(peft_model, recovery, trainable, scores, {"plan": plan.to_dict(),
                                                                  "post_training_pruning": post_training})


def _run_apt(cfg, model, train_loader, evaluate, context, sample_loader) -> MethodResult:
    from prunetune.apt import run_apt

    return run_apt(cfg, model, train_loader, evaluate, context, sample_loader)


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
        "task": task.name,  # the task's model class and example inputs
    }
    res = run_isolated("prunetune.bench:measure_inference", kw, timeout=600)
    return {
        "batch32_latency_s": res["latency_s_median"],
        "batch32_peak_mem_mb": res["peak_mem_mb"],
        "batch32_seq_len": cfg.max_length,
    }


def _benchmarks(cfg: RunConfig, model: nn.Module, tokenizer) -> dict | None:
    """--eval-bench: the multiple-choice benchmarks of the exported model (as `prunetune eval` scores it)."""
    if cfg.eval_bench is None:
        return None
    from prunetune.mceval import evaluate

    status(f"multiple-choice benchmarks: {cfg.eval_bench}")
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, cfg.eval_bench, data=cfg.eval_data, limit=cfg.eval_bench_limit)
    return {**result, "eval_s": time.perf_counter() - t0}


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


def finetune(cfg: RunConfig) -> dict | None:
    """Run one method end to end and write DIR/model, DIR/adapter, DIR/report.{json,md}, logs and scores.

    Returns the report; under torchrun, on the main rank only (the other ranks train and return None).
    """
    cfg.check()  # again: the parts may have been changed since they were made
    shown = progress_enabled()
    runtime = Runtime.from_env()
    set_progress(shown and cfg.runtime.progress and runtime.is_main)
    try:
        return _finetune(cfg, runtime)
    finally:
        set_progress(shown)
        runtime.close()


def _checkpoints(cfg: RunConfig, out: Path, runtime: Runtime) -> tuple[CheckpointStore | None, RunState | None]:
    """The run's checkpoint folder, and the state to resume from. A resumed run's settings are compared with
    the checkpoint's first, before anything loads."""
    rt = cfg.runtime
    if rt.resume is not None:
        store, path = CheckpointStore.for_resume(rt.resume, rt.keep_checkpoints)
        mismatch = resume_mismatch(store.read_config(path), cfg, str(store.directory))
        if mismatch:
            raise PrunetuneError(mismatch)
        state = store.load(path)
        if state.world_size != runtime.world_size:
            raise PrunetuneError(f"--resume: the checkpoint was written by {state.world_size} process(es), this run "
                                 f"has {runtime.world_size}; the data order and batches depend on it")
        status(f"resuming from {path} (step {state.step} of {state.total_steps})")
        return store, state
    if not rt.save_every:
        return None, None
    store = CheckpointStore(rt.checkpoint_dir or default_dir(out), rt.keep_checkpoints)
    if runtime.is_main:
        store.create(overwrite=cfg.overwrite)
    return store, None


def _finetune(cfg: RunConfig, runtime: Runtime) -> dict | None:
    import transformers

    main = runtime.is_main
    location = resolve(cfg.model)
    inputs = [location, cfg.data, cfg.dev_data]  # --out must not replace them
    out = check_output_dir(cfg.out, overwrite=cfg.overwrite, inputs=inputs) if main else Path(cfg.out)
    store, resume = _checkpoints(cfg, out, runtime)
    task = tasks.for_model(cfg.task, location, cfg.task_options)  # GLUE on T5 is text-to-text
    tokenizer = load_tokenizer(location)
    # Everything that can be refused from the config alone is, before data and weights load.
    config = transformers.AutoConfig.from_pretrained(location)
    check_max_length(cfg.max_length, config)
    check_tokenizer(tokenizer, config)
    if cfg.eval_bench is not None:  # the benchmarks run after training: refuse missing files before it
        from prunetune.mceval.sources import data_dir

        data_dir(cfg.eval_data)
    source = DataSource(cfg.data, cfg.dev_data, cfg.dev_fraction)
    loaders = task.loaders(
        tokenizer,
        data=source,
        train_limit=cfg.train_limit,
        eval_limit=cfg.eval_limit,
        samples=cfg.samples,
        max_length=cfg.max_length,
        batch_size=cfg.training.batch_size,
        seed=cfg.training.seed,
    )
    status(f"data: {tasks.data_summary(loaders.data)}")
    _warm_imports(location)
    # The baseline is taken with the data loaded and every library imported, just before the model: what
    # is measured is the model and the method, not the fixed cost of the libraries.
    memory = memory_meter(runtime.device)
    status(f"loading {location}")
    seed_everything(cfg.training.seed)  # the new task head and the adapters start from seeded random weights
    model = task.load_model(location)
    check_tokenizer(tokenizer, model)
    # Budgets and the report refer to the dense original, also when the input was pruned before.
    original = dense_reference(model)
    dense = model_info(original)
    given = model_info(model)
    flops_seq = cfg.seq_len
    dense_layer_flops = layer_cost(original, flops_seq)
    del original
    train_loader, dev_loader, sample_loader = loaders.train, loaders.dev, loaders.sample

    evaluate = task.evaluation(dev_loader)  # training keeps the best evaluation by the task's main metric

    context = RunContext(runtime=runtime, progress=cfg.runtime.progress, save_every=cfg.runtime.save_every,
                         resume=resume)
    if store is not None:
        context.save = lambda state: store.save(state, cfg.to_dict())
    # only the main rank writes: the others train in step with it and leave
    writing = atomic_dir(out, overwrite=cfg.overwrite, inputs=inputs) if main else contextlib.nullcontext()
    with writing as tmp:
        context.log_path = tmp / "metrics.jsonl" if tmp is not None else None
        status(f"{cfg.method}: lr {cfg.lr:g}, {cfg.training.epochs:g} epoch(s) of {len(train_loader)} batches"
               + (f" on {runtime.world_size} processes" if runtime.distributed else ""))
        result = RUNNERS[cfg.method](cfg, model, train_loader, evaluate, context, sample_loader)
        if not main:
            return None
        report = _export(cfg, result, tmp, out, location=location, task=task, tokenizer=tokenizer, loaders=loaders,
                         peak_train=memory.read(), memory=memory, runtime=runtime,
                         sizes=(dense, given, flops_seq, dense_layer_flops))
    if store is not None and not cfg.runtime.retain_checkpoints:
        store.remove()  # the run is complete: its checkpoints would only resume it again
    return report


def _export(cfg: RunConfig, result: MethodResult, tmp: Path, out: Path, *, location, task, tokenizer, loaders,
            peak_train, memory, runtime, sizes) -> dict:
    """Merge, export, re-load and score the export, measure inference and write the report (main rank)."""
    dense, given, flops_seq, dense_layer_flops = sizes
    dev_loader = loaders.dev
    status(f"exporting to {out}")
    adapter_dir = None
    if adapters.lora_layers(result.model):
        adapter_dir = tmp / "adapter"
        adapters.save_adapter(result.model, adapter_dir, base_model=location)
    merged = adapters.merge(result.model)
    # the export says which task its head was trained for, and on which rows (prunetune evaluate reads it)
    tasks.tag_model(merged, task, trained=True, held_out=loaders.data.get("held_out"))
    card = {"method": cfg.method, "task": task.name, "data": tasks.data_summary(loaders.data), "settings": {
        k: v for k, v in cfg.effective().items() if k not in ("task", "method", "out", "overwrite", "progress")}}
    save_compact(merged, tmp / "model", tokenizer, card=card)
    # the report's metric comes from the exported model as `prunetune evaluate` will load it
    status("evaluating the exported model")
    reloaded = task.load_model(str(tmp / "model"))
    metrics, timing = _timed_evaluation(task, reloaded, dev_loader)
    write_model_card(tmp / "model", reloaded, {**card, "metrics": metrics})  # the export's own metrics
    info = model_info(reloaded)
    benchmarks = _benchmarks(cfg, reloaded, tokenizer)
    if "timeline" in result.extra:
        from prunetune.apt import plot_timeline

        plot_timeline(result.extra["timeline"], result.extra.get("eval_history", []), tmp / "timeline.png",
                      metric=task.main_metric)
    if result.scores is not None:
        result.scores.save(tmp / "importance.json")
        heatmap([result.scores], [f"{task.name} head importance"], tmp / "importance.png")
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
        "task": task.name,
        "task_kind": task.kind,
        "task_options": task.record_options(),
        "main_metric": task.main_metric,
        "maximize": task.maximize,
        "model": location,
        "config": cfg.effective(),
        "precision": precision_record(cfg.training.precision, result.fit.precision, runtime.device),
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
        "processes": runtime.world_size,
        "peak_train_mem_mb": peak_train,
        "peak_train_mem_how": memory_how(memory),
        "inference": {**timing, **isolated},
        "outputs": outputs,
        **({"benchmarks": benchmarks} if benchmarks is not None else {}),
        **result.extra,
    }
    if given["layer_params"] != dense["layer_params"]:  # the input model was already pruned
        report["input_layer_params_kept"] = given["layer_params"] / dense["layer_params"]
    report["summary"] = summary(report)
    (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (tmp / "report.md").write_text(report_markdown(report))
    return report


def _evaluation_source(data: str | None, record: dict | None, seed: int) -> tuple[DataSource, int]:
    """What `evaluate --data` scores: a GLUE directory's dev file; a single file whole, unless it is the file
    the export trained on, whose held-out rows (the run's seed and fraction) are then the only ones scored."""
    if data is None or Path(data).is_dir():
        return DataSource(data), seed
    held = (record or {}).get("held_out")
    # the same path, or the same bytes elsewhere: scoring a copy of the training file whole would score
    # training rows
    if held and (Path(held["file"]).resolve() == Path(data).resolve() or held.get("sha256") == file_digest(data)):
        status(f"{data} is the file the model trained on: scoring only the {held.get('by', 'row')}s the run held "
               f"out of it (--dev-fraction {held['dev_fraction']:g}, --seed {held['seed']})")
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
    task_options: dict | None = None,
) -> dict:
    """Re-score an exported model on a task's dev set (the same data and metric as the run's report).

    The task's options default to those the export records for this task (the run's columns, QA windows).
    """
    import transformers

    location = resolve(path)
    name = tasks.canonical(task)
    config = transformers.AutoConfig.from_pretrained(location)
    record = getattr(config, tasks.TASK_ATTR, None)
    own = record is None or record.get("name") == name  # a record of another task is refused below
    if task_options is None and record is not None and own:
        known = {f.name for f in dataclasses.fields(tasks.options_class(name))}
        task_options = {k: v for k, v in (record.get("options") or {}).items() if k in known}
    the_task = tasks.for_model(name, location, task_options)
    check_max_length(max_length, config)
    tokenizer = load_tokenizer(location)
    check_tokenizer(tokenizer, config)
    if own:
        the_task.adopt(record, config)  # a classifier of the user's labels: which output is which label
    caution = check_task_record(record, the_task, path)
    source, seed = _evaluation_source(data, record, seed)
    model = the_task.load_model(location).to(pick_device())  # refuses a head of another width
    check_tokenizer(tokenizer, model)
    loader = the_task.eval_loader(tokenizer, data=source, eval_limit=eval_limit, max_length=max_length, seed=seed,
                                  batch_size=batch_size)
    if caution:  # after every refusal: a refused run says one thing
        warnings.warn(caution, PrunetuneWarning, stacklevel=2)
    return the_task.evaluate(model, loader)
