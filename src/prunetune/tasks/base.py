"""The contract every task meets, and what exports record about their task.

A task says how to read its data (files, or a `datasets` name where the hub is reachable), which model class
and head it needs, how to batch its examples for training, for the importance sample and for evaluation, how to
score a model (a metrics dict with a declared main metric and direction), and what example inputs look like for
latency/memory benchmarks and export. Its settings are a typed options dataclass. The recipes, the training loop,
the benchmarks and the reports use nothing else, so a new task is one module and one registry line.

Subclasses set the class attributes and implement the abstract methods; the split logic (a directory's files, a
single file's seeded held-out share, seeded --train-limit/--eval-limit subsets) is shared here.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from prunetune import tables
from prunetune.data import DataSource, SplitRows, file_digest, held_out_rows, locate, max_positions, subset_index
from prunetune.errors import PrunetuneError

EVAL_BATCH_SIZE = 64  # evaluation batches: no gradients are kept, so they can be larger than training ones


@dataclass
class Loaders:
    """Training batches, evaluation batches, and the small sample importance is scored on."""

    train: Any
    dev: Any
    sample: Any
    data: dict = field(default_factory=dict)  # which rows of which source went where (reports)


class Task(ABC):
    """One task as every command sees it (see the module docstring)."""

    kind: ClassVar[str]  # what kind of task: the registry groups presets of one kind
    auto_class: ClassVar[str]  # the stock Auto class that builds the model and head it needs
    families: ClassVar[tuple[str, ...]]  # the model families (families.FAMILIES) it runs on
    options_class: ClassVar[type]  # its typed options (a frozen dataclass with help metadata, checked on creation)
    metric_names: tuple[str, ...]  # what evaluate returns (besides "main")
    main_metric: str  # the metric that picks the best evaluation; "main" repeats its value
    maximize: bool = True  # its direction
    sample_batch_size: ClassVar[int] = 16  # importance-sample batches
    held_out_by: ClassVar[str] = "row"  # what a single file's dev share holds out whole (QA: articles)
    description: ClassVar[str] = ""  # one line for `prunetune tasks`

    def __init__(self, name: str, options: Any = None, preset: Any = None):
        self.name = name
        self.preset = preset  # the named preset's data (GLUE's files and labels, SQuAD's hub name), if any
        self.options = self.options_class() if options is None else options
        if not isinstance(self.options, self.options_class):
            raise TypeError(f"task {name} takes {self.options_class.__name__}, got {type(options).__name__}")

    # ---- data ---------------------------------------------------------------------------------------------

    def find_split_file(self, directory: Path, split: str) -> Path | None:
        """A directory's file for `split` ("train" or "dev"), None when it has none."""
        return tables.split_file(directory, split)

    @abstractmethod
    def read_source(self, location: str | None, split: str) -> tuple[list, str]:
        """Every raw record of the file (or `datasets` name) `location`, and the name the report gives it.
        None: the task's own default source (a bundled sample, its data set on the hub), or a clear error."""

    def more_records(self, split: str) -> tuple[list, tuple[str, ...]]:
        """Records the split takes on top of its source's, whole (never held out, never dev rows of a training
        file), and the files they came from: none by default (summarisation's --extra-train)."""
        return [], ()

    def held_out_index(self, records: list, fraction: float, seed: int) -> np.ndarray:
        """Positions of the records a single file holds out as dev rows (seeded)."""
        return held_out_rows(len(records), fraction, seed)

    def learn(self, records: list, index: np.ndarray) -> None:
        """Take what the model's head depends on from the whole training split (a classifier: its label set)."""
        return None  # most tasks' heads depend on no data

    @abstractmethod
    def examples(self, records: list, index: np.ndarray, split: str, source: str) -> Any:
        """The chosen records as the task's validated examples (one clear error for a bad row)."""

    def canonical_split(self, split: str) -> str:
        """"train" or "dev" ("validation" is accepted for dev)."""
        name = {"validation": "dev"}.get(split, split)
        if name not in ("train", "dev"):
            raise PrunetuneError(f"unknown split {split!r} for task {self.name}; choose from train, dev")
        return name

    def _select(self, split: str, source: DataSource, seed: int) -> tuple[list, str, np.ndarray, bool, tuple]:
        """The split's source records, their name, the positions that belong to the split, whether those are (or
        exclude) a held-out share of a training source, and the files of the records added to it."""
        where = locate(source, split, self.find_split_file)
        # a held-out dev split is read from the training source (a hub name's train split, not its validation)
        records, name = self.read_source(where.path, "train" if where.held_out else split)
        index = np.arange(len(records))
        if where.held_out:
            dev = self.held_out_index(records, source.dev_fraction, seed)
            index = np.setdiff1d(index, dev) if split == "train" else dev
        more, files = self.more_records(split)
        if more:
            index = np.concatenate([index, np.arange(len(records), len(records) + len(more))])
            records = [*records, *more]
        if len(index) == 0:
            raise PrunetuneError(f"the {split} split of {self.name} ({name}) is empty")
        return records, name, index, where.held_out, files

    def read(self, split: str, data: Any, *, limit: int | None = None, seed: int = 0) -> SplitRows:
        """One split ("train" or "dev") of a data source (see DataSource): never a training row in dev."""
        split = self.canonical_split(split)
        records, name, index, held_out, files = self._select(split, DataSource.of(data), seed)
        if split == "train":
            self.learn(records, index)
        chosen = index if limit is None else index[subset_index(len(index), limit, seed)]
        return SplitRows(self.examples(records, chosen, split, name), name, chosen.tolist(), len(records), held_out,
                         self.held_out_by, files)

    def learn_from(self, data: Any, *, seed: int) -> None:
        """`learn` from a source's whole training split, without building its examples."""
        records, _, index, _, _ = self._select("train", DataSource.of(data), seed)
        self.learn(records, index)

    # ---- the head -----------------------------------------------------------------------------------------

    def labels(self) -> list[str]:
        """The label set the head is made for (what an export records); empty when the task has none."""
        return []

    def prepare(self, data: Any, *, seed: int) -> None:
        """Read what the head depends on before the model loads (importance, prune); nothing by default."""
        return None

    def adopt(self, record: dict | None, config: Any) -> None:
        """Take what the head depends on from an export (its task record, its config) to score it."""
        return None

    @abstractmethod
    def load_model(self, location: str) -> nn.Module:
        """The checkpoint with the head this task needs (a new, seeded head when it has none)."""

    # ---- batches ------------------------------------------------------------------------------------------

    @abstractmethod
    def train_batches(self, examples: Any, tokenizer: Any, *, max_length: int, batch_size: int,
                      seed: int | None) -> Iterable[dict]:
        """Batches of tensors the model's forward returns a loss for; shuffled by `seed` (None: in order)."""

    @abstractmethod
    def eval_batches(self, examples: Any, tokenizer: Any, *, max_length: int, batch_size: int) -> Any:
        """What `evaluate` scores: iterable batches of tensors, plus whatever scoring needs; `len()` is the
        number of batches and `.dataset` the examples scored."""

    def loaders(self, tokenizer: Any, *, data: Any, train_limit: int | None, eval_limit: int | None, samples: int,
                max_length: int, batch_size: int, seed: int, eval_batch_size: int = EVAL_BATCH_SIZE) -> Loaders:
        source = DataSource.of(data)
        train = self.read("train", source, limit=train_limit, seed=seed)
        dev = self.read("dev", source, limit=eval_limit, seed=seed)
        return Loaders(
            train=self.train_batches(train.dataset, tokenizer, max_length=max_length, batch_size=batch_size,
                                     seed=seed),
            dev=self.eval_batches(dev.dataset, tokenizer, max_length=max_length, batch_size=eval_batch_size),
            sample=self.sample_loader(tokenizer, data=source, samples=samples, max_length=max_length, seed=seed),
            data=describe_data(source, train, dev, seed),
        )

    def sample_loader(self, tokenizer: Any, *, data: Any, samples: int, max_length: int, seed: int,
                      batch_size: int | None = None) -> Iterable[dict]:
        """A seeded sample of labelled training batches (what importance is scored on)."""
        rows = self.read("train", data, limit=samples, seed=seed)
        return self.train_batches(rows.dataset, tokenizer, max_length=max_length,
                                  batch_size=batch_size or self.sample_batch_size, seed=None)

    def eval_loader(self, tokenizer: Any, *, data: Any, eval_limit: int | None, max_length: int, seed: int,
                    batch_size: int = EVAL_BATCH_SIZE) -> Any:
        """Dev batches only (what `prunetune evaluate` scores)."""
        rows = self.read("dev", data, limit=eval_limit, seed=seed)
        return self.eval_batches(rows.dataset, tokenizer, max_length=max_length, batch_size=batch_size)

    # ---- evaluation ---------------------------------------------------------------------------------------

    @abstractmethod
    def score(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """The task's metrics (`metric_names`) of the model on the evaluation batches."""

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        """The metrics, with "main" repeating the main metric's value (in its own direction)."""
        metrics = self.score(model, loader)
        metrics["main"] = metrics[self.main_metric]
        return metrics

    def improves(self, metrics: dict, best: dict) -> bool:
        """Whether an evaluation is at least as good as the best so far, in the main metric's direction."""
        new, old = metrics[self.main_metric], best[self.main_metric]
        return new >= old if self.maximize else new <= old

    def evaluation(self, loader: Any) -> Evaluation:
        """The evaluation training runs (train.fit picks its best state with `improves`)."""
        return Evaluation(self, loader)

    # ---- benchmarks and export ----------------------------------------------------------------------------

    def example_inputs(self, config: Any, batch_size: int, seq_len: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random token ids of the shape the task feeds the model (latency and memory benchmarks, export)."""
        limit = max_positions(config)
        if limit is not None and seq_len > limit:
            raise PrunetuneError(f"sequence length {seq_len} is longer than the model's {limit} positions")
        g = torch.Generator().manual_seed(seed)
        vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def record_options(self) -> dict:
        """The options as an export records them (JSON)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.options).items()}


@dataclass
class Evaluation:
    """A task scoring its dev batches: what train.fit calls, and how it tells a better evaluation."""

    task: Task
    loader: Any

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return self.task.evaluate(model, self.loader)

    def improves(self, metrics: dict, best: dict) -> bool:
        return self.task.improves(metrics, best)


def describe_data(source: DataSource, train: SplitRows, dev: SplitRows, seed: int) -> dict:
    """Which rows trained and which scored the model, for the report (and a one-line summary)."""
    out = {"train": train.describe(), "dev": dev.describe()}
    if train.held_out:
        local = Path(train.source).is_file()  # else a `datasets` split
        out["held_out"] = {"file": str(Path(train.source).resolve()) if local else train.source,
                           "sha256": file_digest(train.source) if local else None,
                           "dev_fraction": source.dev_fraction, "seed": seed, "by": train.held_out_by}
    return out


def data_summary(data: dict) -> str:
    """One line: where the training and dev rows came from."""
    def part(d: dict) -> str:
        share = f"{d['examples']} of {d['of']}" if d["examples"] != d["of"] else f"all {d['of']}"
        return f"{share} rows of {' + '.join((d['source'], *d.get('also', ())))}"

    line = f"train on {part(data['train'])}; evaluate on {part(data['dev'])}"
    held = data.get("held_out")
    if held:
        unit = held.get("by", "row")
        line += (f" (held out of the training file: --dev-fraction {held['dev_fraction']} of its {unit}s, "
                 f"--seed {held['seed']}; no training {unit} is evaluated)")
    return line


TASK_ATTR = "prunetune_task"  # config attribute: the task an export's head was made for


def task_record(task: Task, *, trained: bool, held_out: dict | None = None) -> dict:
    """What an export records about its task: name, label set, options, whether its head was trained,
    held-out rows."""
    record = {"name": task.name, "labels": task.labels(), "options": task.record_options(), "trained": trained}
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
