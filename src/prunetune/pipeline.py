"""Recipes for the engine's commands: they do the I/O (models, data, files); the components stay pure."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from prunetune import models, tasks
from prunetune.data import check_max_length, check_tokenizer
from prunetune.errors import PrunetuneError
from prunetune.export import atomic_dir, check_output_dir, needs_prunetune, save_compact
from prunetune.importance import Scores, compute, heatmap, rank_correlation
from prunetune.plan import Budget, PruningPlan, layer_param_count, model_info, select
from prunetune.surgery import apply_plan
from prunetune.train import DEFAULT_SEED


def load_task_model(model: str | None, task: str | None, *, seed: int = DEFAULT_SEED, data: str | None = None,
                    task_options: dict | None = None) -> tuple[nn.Module, object, str, tasks.Task | None]:
    """The model (with the task's head when a task is given), its tokenizer, its location and the task.

    A new task head starts from random weights and its gradients decide the scores: seeding before the load
    makes importance and pruning reproducible (two runs of `prunetune prune` pruned different heads), and with
    finetune's seed (42 by default), the scores equal those `finetune` computes.
    Without a task the checkpoint keeps its own head, whatever its size (an MNLI classifier's 3 labels, a
    QA or token-classification head), and no tokenizer is needed: the tokenizer returned is then None.
    A head that depends on the data (a classifier of the user's labels) reads it from `data`'s training split.
    """
    location = models.resolve(model)
    if not task:
        torch.manual_seed(seed)
        return models.load_native(location).eval(), None, location, None
    the_task = tasks.for_model(task, location, task_options)
    tokenizer = models.load_tokenizer(location)
    the_task.prepare(data, seed=seed)
    torch.manual_seed(seed)
    net = the_task.load_model(location)
    check_tokenizer(tokenizer, net.config)
    return net.eval(), tokenizer, location, the_task


def run_importance(
    model: str | None, tasks: list[str], out: str, *, data: list[str] | None = None, samples: int = 512,
    scorer: str = "head_grad", max_length: int = 128, hidden: bool = False,
    overwrite: bool = False, seed: int = DEFAULT_SEED, task_options: dict | None = None,
) -> dict:
    """Score heads/neurons for one or more tasks; write scores JSON, heat map PNG and (two tasks) the correlation."""
    if not tasks:
        raise PrunetuneError("importance needs --task")
    data = list(data or [])
    if data and len(data) != len(tasks):
        raise PrunetuneError("give one --data per --task, in the same order")
    all_scores: list[Scores] = []
    with atomic_dir(out, overwrite=overwrite, inputs=[models.resolve(model), *data]) as tmp:
        for i, task in enumerate(tasks):
            source = data[i] if data else None
            net, tok, location, the_task = load_task_model(model, task, seed=seed, data=source,
                                                           task_options=task_options)
            check_max_length(max_length, net.config)
            batches = the_task.sample_loader(tok, data=source, samples=samples, max_length=max_length, seed=seed)
            scores = compute(net, batches, scorer, hidden=hidden)
            scores.meta.update({"task": the_task.name, "samples": samples})
            scores.save(tmp / f"importance_{the_task.name}.json")
            all_scores.append(scores)
        heatmap(all_scores, [f"{t} ({scorer})" for t in tasks], tmp / "heads.png")
        summary = {"tasks": tasks, "scorer": scorer}
        if len(all_scores) == 2:
            summary["spearman_heads"] = rank_correlation(*all_scores)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_prune(
    model: str | None, out: str, *, plan: str | None = None, budget: Budget | None = None,
    task: str | None = None, data: str | None = None, samples: int = 512, scorer: str | None = None,
    max_length: int = 128, overwrite: bool = False, seed: int = DEFAULT_SEED, task_options: dict | None = None,
) -> dict:
    """Prune MODEL by a plan file or a budget (scored on task data, or by weight magnitude) and export it."""
    if plan is None and budget is None:
        raise PrunetuneError("give --plan or a budget (--keep-params, --heads-keep, --neurons-keep, --hidden-keep)")
    if budget is not None:
        budget.check()
    location = models.resolve(model)
    inputs = [location, data, plan]  # --out must not replace any of them
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    net, tok, location, the_task = load_task_model(location, task, seed=seed, data=data, task_options=task_options)
    if tok is None and not Path(location).is_dir():
        # a hub model has no files to copy: its tokenizer goes with the export when it has one
        with contextlib.suppress(PrunetuneError):
            tok = models.load_tokenizer(location)
    if task:  # the export records the task its (untrained) head was made for: `evaluate` warns about it
        check_max_length(max_length, net.config)
        tasks.tag_model(net, the_task, trained=False)
    before = model_info(net)
    notes = []
    if plan is not None:
        the_plan = PruningPlan.load(plan)
    else:
        hidden = budget.hidden_keep is not None and budget.hidden_keep < 1
        if task:
            scorer = scorer or "head_grad"
            batches = the_task.sample_loader(tok, data=data, samples=samples, max_length=max_length, seed=seed)
            scores = compute(net, batches, scorer, hidden=hidden)
        else:
            scorer = "magnitude"
            notes.append("no --task: scored with the data-free weight-magnitude criterion")
            scores = compute(net, None, scorer, hidden=hidden)
        # weight norms of a head and of a neuron are not on one scale; task scorers say so themselves (Scores.meta)
        the_plan = select(net, scores, budget, normalize="per_kind" if scorer == "magnitude" else None)
        the_plan.meta["scorer"] = scorer
    reference = layer_param_count(net)
    apply_plan(net, the_plan)
    after = model_info(net)
    report = {
        "params_before": before["params"],
        "params_after": after["params"],
        "layer_params_before": reference,
        "layer_params_after": after["layer_params"],
        "layer_params_kept": after["layer_params"] / reference,
        "heads": f"{after['heads']}/{before['heads']}",
        "ffn": f"{after['ffn']}/{before['ffn']}",
        "hidden": f"{after['hidden']}/{before['hidden']}",
        "notes": notes,
    }
    # without a task no tokenizer was loaded: its files are copied as they are (a model may have none)
    settings = {"plan": plan} if plan else {"scorer": scorer, **{k: v for k, v in vars(budget).items() if v}}
    save_compact(net, out, tok, overwrite=overwrite, extra={"plan.json": the_plan.to_dict(), "prune.json": report},
                 copy_files=[] if tok is not None else models.tokenizer_files(location), inputs=inputs,
                 card={"method": "prune", "task": task, "settings": settings})
    return report


def run_info(path: str) -> dict:
    """Shapes and parameter counts of a model (or export) as it is, with its own head; whether it is stock."""
    from prunetune.stock import stock_reason

    net = models.load_native(models.resolve(path))
    needs = needs_prunetune(net.config)
    # a stock checkpoint has no layout left to judge; a prunetune one says why it could not be stock
    return {**model_info(net), "needs_prunetune": needs,
            **({"needs_prunetune_because": stock_reason(net) or "its layers have their own shapes"} if needs else {})}
