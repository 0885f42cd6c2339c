"""Scoring a causal LM on the multiple-choice benchmarks with lm-evaluation-harness itself, offline.

The model object goes to the harness's ``HFLM``; the tasks are YAMLs written into a temporary directory
(``dataset_path: json`` with the local rows as ``data_files``, the stock prompts; ``--include_path``'s
``TaskManager(include_path=...)`` without the stock tasks, so nothing is looked up on the hub) and the
harness computes the log-likelihoods (batched, with its progress bar), ``acc``, ``acc_norm``, MMLU's group
mean and TruthfulQA MC2 exactly as it does for any model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.mceval.benchmarks import BENCHMARKS, Benchmark, TaskSpec, parse
from prunetune.mceval.sources import data_dir

# The harness's own MC2 (imported by the generated utils.py, so the YAML's !function resolves to it).
UTILS = "from lm_eval.tasks.truthfulqa.utils import process_results_mc2  # noqa: F401\n"


def _yaml(spec: TaskSpec, files: dict[str, str], cache: Path) -> str:
    """A task YAML: every value as JSON (YAML reads JSON scalars, lists and maps as they are)."""
    head = {"task": spec.name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": files, "cache_dir": str(cache)}, **spec.config}
    lines = [f"{k}: {json.dumps(v)}" for k, v in head.items()]
    lines += [f"{k}: !function utils.{fn}" for k, fn in spec.functions.items()]
    return "\n".join(lines) + "\n"


def write_tasks(directory: Path, names: list[str], root: Path) -> dict[str, list[dict]]:
    """Write the benchmarks' rows and YAMLs into `directory`; returns each harness task's scored rows."""
    (directory / "utils.py").write_text(UTILS)
    scored: dict[str, list[dict]] = {}
    for name in names:
        bench = BENCHMARKS[name]
        specs = bench.tasks(root)
        for spec in specs:
            files = {}
            for split, rows in spec.splits.items():
                path = directory / "data" / f"{spec.name}.{split}.jsonl"
                path.parent.mkdir(exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
                files[split] = str(path)
            (directory / f"{spec.name}.yaml").write_text(_yaml(spec, files, directory / "hf_cache"))
            split = next(spec.config[k] for k in ("test_split", "validation_split") if k in spec.config)
            scored[spec.name] = spec.splits[split]
        if bench.group:  # weighted by the subjects' sizes, as the harness's own mmlu group does
            group = {"group": name, "task": [s.name for s in specs],
                     "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
            (directory / f"_{name}.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in group.items()))
    return scored


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PrunetuneError(f"multiple-choice evaluation needs lm-evaluation-harness (pip install "
                             f"'prunetune[eval]'): {e}") from e
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def _kept_state(model: nn.Module) -> Iterator[None]:
    """The harness seeds the global generators and the model must be in eval mode: put both back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    training = model.training
    quiet = {n: logging.getLogger(n).level for n in ("lm_eval", "lm-eval")}
    for n in quiet:
        logging.getLogger(n).setLevel(logging.ERROR)  # per-task notes on every run
    offline = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # the local JSON files only; nothing is fetched
    model.eval()
    try:
        yield
    finally:
        model.train(training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for n, level in quiet.items():
            logging.getLogger(n).setLevel(level)
        if offline is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = offline


def _item(task: str, s: dict, bench: Benchmark) -> dict:
    item = {"task": task, "doc_id": s["doc_id"], "target": s["target"], "chance": bench.chance(s["doc"]),
            "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
            "choices": [a[1] for a in s["arguments"]], "context": s["arguments"][0][0]}
    item.update({m: float(s[m]) for m in bench.metrics})
    return item


def evaluate(model: nn.Module, tokenizer, benches: str | list[str], *, data: str | None = None,
             limit: int | None = None, shots: int = 0, batch_size: int = 16, items: bool = False) -> dict:
    """Score `model` (any causal LM, pruned or not) on the named benchmarks as lm-evaluation-harness does.

    `limit`: the first N items of each task (of each MMLU subject: the harness's --limit). `shots`: few-shot
    examples per prompt (TruthfulQA stays zero-shot, as its stock config fixes). Returns, per benchmark, its
    metrics, the items scored and the chance level on them (mean over the items of the score of equally
    likely choices), the headline score (acc_norm where reported, else acc) above chance, and the average
    headline; with `items`, every item's log-likelihoods and scores as the harness logged them.
    """
    names = parse(benches)
    root = data_dir(data)
    if limit is not None and limit <= 0:
        raise PrunetuneError(f"--limit must be positive, got {limit}")
    if shots < 0:
        raise PrunetuneError(f"--shots must be 0 or more, got {shots}")
    lm_eval, HFLM, TaskManager = _lm_eval()
    with tempfile.TemporaryDirectory(prefix="prunetune-mc-") as tmp, _kept_state(model):
        write_tasks(Path(tmp), names, root)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=shots, limit=limit,
                                      bootstrap_iters=0, log_samples=True)
    return _collect(out, names, shots, limit, items)


def _collect(out: dict, names: list[str], shots: int, limit: int | None, items: bool) -> dict:
    results: dict[str, dict] = {}
    for name in names:
        bench = BENCHMARKS[name]
        tasks = [t for t in out["samples"] if t == name or (bench.group and t.startswith(f"{name}_"))]
        logged = [_item(t, s, bench) for t in sorted(tasks) for s in out["samples"][t]]
        metrics = {m: float(out["results"][name][f"{m},none"]) for m in bench.metrics}
        headline = "acc_norm" if "acc_norm" in metrics else "acc"
        chance = float(np.mean([i["chance"] for i in logged]))
        results[name] = {"metrics": metrics, "items": len(logged), "chance": chance, "headline": headline,
                         "score": metrics[headline], "above_chance": metrics[headline] - chance,
                         **({"tasks": len(tasks)} if bench.group else {})}
        if items:
            results[name]["per_item"] = logged
    scores = [r["score"] for r in results.values()]
    return {"benchmarks": results, "average": float(np.mean(scores)),
            "average_above_chance": float(np.mean([r["above_chance"] for r in results.values()])),
            "shots": shots, "limit": limit, "harness": _version()}


def _version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm_eval')}"
