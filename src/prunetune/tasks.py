"""Tasks as the recipes see them: which head to load, which batches to train on, how to score.

Three kinds today: GLUE classification/regression (data.py, metrics.py), the same tasks as text-to-text
for encoder-decoders (text2text.py), and instruction tuning of a causal LM scored by held-out perplexity
(instruct.py). Extractive QA and seq2seq summarisation plug in here
the same way: a class with `load_model`, `loaders` and `evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from prunetune.data import DataSource, SplitRows, file_digest, get_task, load_task_rows, make_loader, tokenize
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.models import load_for_task, model_kind
from prunetune.train import predict


@dataclass
class Loaders:
    """Training batches, evaluation batches, and the small sample importance is scored on."""

    train: object
    dev: object
    sample: object
    data: dict = field(default_factory=dict)  # which rows of which source went where (reports)


EVAL_BATCH_SIZE = 64  # evaluation batches: no gradients are kept, so they can be larger than training ones


class Task(Protocol):
    name: str
    main_metric: str
    maximize: bool
    auto_class: str  # the stock Auto class an export of this task loads with

    def load_model(self, location: str) -> nn.Module: ...

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 16): ...

    def loaders(
        self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed,
        eval_batch_size: int = EVAL_BATCH_SIZE,
    ) -> Loaders: ...

    def eval_loader(self, tokenizer, *, data, eval_limit, max_length, seed, batch_size: int = EVAL_BATCH_SIZE): ...

    def labels(self) -> list[str]: ...

    def evaluate(self, model: nn.Module, loader) -> dict: ...


class GlueTask:
    """A GLUE task: sequence classification (or regression for STS-B), scored with GLUE's metrics."""

    main_metric = "main"
    maximize = True
    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, name: str):
        self.spec = get_task(name)
        self.name = self.spec.name

    def load_model(self, location: str) -> nn.Module:
        return load_for_task(location, "classify", self.spec.num_labels, self.spec.is_regression)

    def labels(self) -> list[str]:
        """The label set an export records (empty for regression)."""
        return list(self.spec.label_names)

    def _split(self, tokenizer, name: str, data, limit: int | None, max_length: int, seed: int
               ) -> tuple[Any, SplitRows]:
        rows = load_task_rows(self.spec, name, data, limit=limit, seed=seed)
        ds = tokenize(rows.dataset, tokenizer, max_length)
        if len(ds) == 0:
            raise PrunetuneError(f"the {name} split of {self.name} is empty")
        return ds, rows

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 16):
        """A seeded sample of labelled training batches (what importance is scored on)."""
        ds, _ = self._split(tokenizer, "train", data, samples, max_length, seed)
        return make_loader(ds, tokenizer, batch_size, shuffle=False)

    def eval_loader(self, tokenizer, *, data, eval_limit, max_length, seed, batch_size: int = EVAL_BATCH_SIZE):
        """Dev batches only (what `prunetune evaluate` scores)."""
        ds, _ = self._split(tokenizer, "dev", data, eval_limit, max_length, seed)
        return make_loader(ds, tokenizer, batch_size, shuffle=False)

    def loaders(self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed,
                eval_batch_size: int = EVAL_BATCH_SIZE) -> Loaders:
        train, train_rows = self._split(tokenizer, "train", data, train_limit, max_length, seed)
        dev, dev_rows = self._split(tokenizer, "dev", data, eval_limit, max_length, seed)
        return Loaders(
            train=make_loader(train, tokenizer, batch_size, shuffle=True, seed=seed),
            dev=make_loader(dev, tokenizer, eval_batch_size, shuffle=False),
            sample=self.sample_loader(tokenizer, data=data, samples=samples, max_length=max_length, seed=seed),
            data=describe_data(data, train_rows, dev_rows, seed),
        )

    def evaluate(self, model: nn.Module, loader) -> dict:
        return compute_metrics(self.spec, *predict(model, loader))


def describe_data(data, train: SplitRows, dev: SplitRows, seed: int) -> dict:
    """Which rows trained and which scored the model, for the report (and a one-line summary)."""
    source = DataSource.of(data)
    out = {"train": train.describe(), "dev": dev.describe()}
    if source.held_out:
        out["held_out"] = {"file": str(Path(source.path).resolve()), "sha256": file_digest(source.path),
                           "dev_fraction": source.dev_fraction, "seed": seed}
    return out


def data_summary(data: dict) -> str:
    """One line: where the training and dev rows came from."""
    def part(d: dict) -> str:
        share = f"{d['examples']} of {d['of']}" if d["examples"] != d["of"] else f"all {d['of']}"
        return f"{share} rows of {d['source']}"

    line = f"train on {part(data['train'])}; evaluate on {part(data['dev'])}"
    held = data.get("held_out")
    if held:
        line += (f" (held out of the training file: --dev-fraction {held['dev_fraction']}, --seed {held['seed']}; "
                 "no training row is evaluated)")
    return line


INSTRUCT_NAMES = ("instruct", "alpaca")


def get(name: str) -> Task:
    """The task object for a task name (GLUE names, or 'instruct' for instruction tuning)."""
    if name in INSTRUCT_NAMES:
        from prunetune.instruct import InstructTask

        return InstructTask(name)
    return GlueTask(name)


def for_model(name: str, location: str) -> Task:
    """The task for a checkpoint: GLUE on an encoder-decoder LM (T5) is text-to-text, its native form."""
    if name not in INSTRUCT_NAMES and model_kind(location) == "seq2seq":
        from prunetune.text2text import Text2TextGlueTask

        return Text2TextGlueTask(name)
    return get(name)


TASK_ATTR = "prunetune_task"  # config attribute: the task an export's head was made for


def task_record(task: Task, *, trained: bool, held_out: dict | None = None) -> dict:
    """What an export records about its task: name, label set, whether its head was trained, held-out rows."""
    record = {"name": task.name, "labels": task.labels(), "trained": trained}
    if held_out:
        record["held_out"] = held_out
    return record


def tag_model(model: nn.Module, task: Task, *, trained: bool, held_out: dict | None = None) -> None:
    """Record the task on the model's config, which save_pretrained writes into config.json.

    A head already trained for this very task keeps its record when the model is tagged untrained (pruning a
    fine-tuned export for its own task does not untrain its head).
    """
    config = model.config
    previous = getattr(config, TASK_ATTR, None) or {}
    if not trained and previous.get("name") == task.name and previous.get("trained"):
        return
    setattr(config, TASK_ATTR, task_record(task, trained=trained, held_out=held_out))
