"""Sequence classification and regression of the user's own data, with GLUE as named presets (glue.py).

A classifier's label set is read from its training split: strings or integers, any number of classes, sorted
(numerically when every label is an integer), and written into the exported config as id2label/label2id, so a
stock `pipeline("text-classification")` names the classes. A GLUE preset fixes its label names, files and metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from prunetune import models, tables
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.tasks.base import Task
from prunetune.tasks.glue import TaskSpec, bundled_data_dir
from prunetune.train import predict

logger = logging.getLogger(__name__)

# Column names tried, in order, when the options and the preset name none the file has. Pairs first: a file with
# sentence1 and sentence2 is a pair task.
PAIR_TEXT_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("text_a", "text_b"),
)
SINGLE_TEXT_CANDIDATES: tuple[tuple[str, ...], ...] = (("text",), ("sentence",), ("text_a",))
DEFAULT_LABEL_COLUMN = "label"
CLASSIFIER_FAMILIES = ("bert", "roberta", "llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ClassifyOptions:
    """Which columns of the user's rows hold the text(s) and the label."""

    text_columns: tuple[str, ...] | None = field(default=None, metadata={
        "flag": "--text-column",
        "help": "one or two text columns (a pair), e.g. `review` or `sentence1,sentence2` (default: the preset's, "
                "else sentence1+sentence2, premise+hypothesis, text, sentence, whichever the file has)"})
    label_column: str | None = field(default=None, metadata={
        "help": f"the label column (default: {DEFAULT_LABEL_COLUMN!r}, else the preset's)"})

    def __post_init__(self) -> None:
        columns = self.text_columns
        if isinstance(columns, str):
            columns = (columns,)
        if columns is not None:  # `--text-column a b`, `--text-column a,b` and ("a", "b") alike
            columns = tuple(c.strip() for part in columns for c in str(part).split(","))
            if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
                raise PrunetuneError(f"--text-column takes one or two column names, got {', '.join(columns) or '()'}")
        object.__setattr__(self, "text_columns", columns)
        if self.label_column is not None and not (isinstance(self.label_column, str) and self.label_column.strip()):
            raise PrunetuneError("--label-column must name a column")


def label_key(value: Any) -> str:
    """A raw label as the label set spells it: integers (also 1.0 from JSON) and strings alike, stripped."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"no usable label {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    key = str(value).strip()
    if not key:
        raise ValueError("empty label")
    return key


_INTEGER = re.compile(r"-?\d+")


def sorted_labels(keys: Sequence[str]) -> list[str]:
    """The label set in a stable order: numerically when every label is an integer, else as strings."""
    unique = set(keys)
    if all(_INTEGER.fullmatch(k) for k in unique):
        return sorted(unique, key=int)
    return sorted(unique)


_GENERIC_LABEL = re.compile(r"LABEL_\d+")


class ClassifyTask(Task):
    """Sequence classification: a classification head over the (pair of) text(s), accuracy and macro-F1."""

    kind = "classify"
    auto_class = "AutoModelForSequenceClassification"
    families = CLASSIFIER_FAMILIES
    options_class = ClassifyOptions
    regression = False
    default_metrics: tuple[str, ...] = ("accuracy", "macro_f1")
    default_main = "accuracy"
    description = "sequence classification of your rows (--data, --text-column, --label-column), any label set"

    def __init__(self, name: str, options: ClassifyOptions | None = None, preset: TaskSpec | None = None):
        super().__init__(name, options, preset)
        self.metric_names = preset.metrics if preset else self.default_metrics
        self.main_metric = preset.main_metric if preset else self.default_main
        # a preset fixes its classes; otherwise the training split (or an export's record) decides them
        self._labels: list[str] | None = list(preset.label_names) if preset and not self.regression else None

    # ---- data ---------------------------------------------------------------------------------------------

    def canonical_split(self, split: str) -> str:
        if self.preset is None:
            return super().canonical_split(split)
        aliases = {"validation": "dev", "dev_matched": "dev", "validation_matched": "dev",
                   "validation_mismatched": "dev_mismatched"}
        name = aliases.get(split, split)
        if name not in self.preset.splits:
            raise PrunetuneError(f"unknown split {split!r} for task {self.name}; choose from "
                                 f"{', '.join(self.preset.splits)}")
        return name

    def find_split_file(self, directory: Path, split: str) -> Path | None:
        if self.preset is not None:
            # a GLUE directory, or a data root keeping the task under <root>/<SST-2>, <root>/glue/<SST-2>, ...
            names = self.preset.files_for(split)
            for folder in (directory, *(directory / f for f in self.preset.folders)):
                found = next((folder / n for n in names if (folder / n).is_file()), None)
                if found is not None:
                    return found
            own = next((directory / f for f in self.preset.folders if (directory / f).is_dir()), None)
            if own is not None and split == "train":  # name the task's own folder: it shows what the user has
                present = ", ".join(sorted(p.name for p in own.iterdir())) or "nothing"
                raise PrunetuneError(f"no train file for task {self.name}: looked for {' or '.join(names)} in "
                                     f"{own}; it holds: {present}")
        return tables.split_file(directory, split) if split in ("train", "dev") else None

    def read_source(self, location: str | None, split: str) -> tuple[tables.Table, str]:
        headerless = self.preset.headerless if self.preset else None
        if location is None:
            bundled = bundled_data_dir(self.preset.name) if self.preset else None
            if bundled is not None:
                logger.info("using the %s sample bundled with prunetune (%s); pass --data for the full set",
                            self.name, bundled)
                path = self.find_split_file(bundled, split)
                return tables.read_table(path, headerless), str(path)
            if self.preset is None:
                raise PrunetuneError(f"task {self.name} needs --data: a CSV/TSV/JSON/JSONL/Parquet file, or a "
                                     "directory with train and dev files")
            return tables.load_hub("glue", self.preset.name, self.preset.hub_split(split), task=self.name,
                                   given=False)
        if Path(location).exists():
            return tables.read_table(location, headerless), location
        if not tables.is_hub_name(location):
            raise PrunetuneError(f"data path does not exist: {location}")
        return tables.load_hub(location, None, {"train": "train"}.get(split, "validation"), task=self.name,
                               given=True)

    def text_columns(self, columns: Sequence[str], source: str) -> tuple[str, ...]:
        """The text column(s): the options', else the preset's, else the first common names the rows have."""
        if self.options.text_columns is not None:
            tables.require_columns(self.options.text_columns, columns, source)
            if self.preset is not None and len(self.options.text_columns) != len(self.preset.text_columns):
                raise PrunetuneError(f"task {self.name} takes {len(self.preset.text_columns)} text column(s), got "
                                     f"{len(self.options.text_columns)}: {', '.join(self.options.text_columns)}")
            return self.options.text_columns
        if self.preset is not None:
            candidates = (self.preset.text_columns,
                          *(PAIR_TEXT_CANDIDATES if self.preset.is_pair else SINGLE_TEXT_CANDIDATES))
        else:
            candidates = (*PAIR_TEXT_CANDIDATES, *SINGLE_TEXT_CANDIDATES)
        for candidate in candidates:
            if all(c in columns for c in candidate):
                return candidate
        if self.preset is not None:  # name the preset's own column: what a GLUE-format file should have had
            tables.require_columns(self.preset.text_columns, columns, source)
        raise PrunetuneError(f"{source}: no text column found (columns: {', '.join(map(repr, columns))}); name it "
                             "with --text-column")

    def label_column(self, columns: Sequence[str], source: str) -> str:
        """The label column: the options', else "label", else the preset's."""
        wanted = self.options.label_column
        if wanted is None:
            preset = (self.preset.label_column,) if self.preset else ()
            wanted = next((c for c in (DEFAULT_LABEL_COLUMN, *preset) if c in columns), preset[0] if preset else
                          DEFAULT_LABEL_COLUMN)
        tables.require_columns((wanted,), columns, source)
        return wanted

    def learn(self, records: tables.Table, index: np.ndarray) -> None:
        if self.preset is not None or self.regression:
            return
        column = self.label_column(records.columns, records.source)
        keys = []
        for i in index:
            try:
                keys.append(label_key(records[i].get(column)))
            except ValueError as exc:
                raise PrunetuneError(f"{records.source}: row {i + 1}, column {column!r}: {exc}") from exc
        self._labels = sorted_labels(keys)
        if len(self._labels) < 2:
            raise PrunetuneError(f"the training split has a single label ({self._labels[0]!r}): nothing to classify")

    def examples(self, records: tables.Table, index: np.ndarray, split: str, source: str) -> datasets.Dataset:
        text_cols = self.text_columns(records.columns, source)
        label_col = self.label_column(records.columns, source)
        parse = self._label_parser(split)
        names = ("text_a", "text_b")[: len(text_cols)]
        out: dict[str, list[Any]] = {name: [] for name in (*names, "label")}
        for i in index:
            row, number = records[i], i + 1
            for name, column in zip(names, text_cols, strict=True):
                value = row.get(column)
                if value is None or not str(value).strip():
                    raise PrunetuneError(f"{source}: row {number} has an empty text in column {column!r}")
                out[name].append(str(value))
            try:
                out["label"].append(parse(row.get(label_col)))
            except ValueError as exc:
                raise PrunetuneError(f"{source}: row {number}, column {label_col!r}: {exc}") from exc
        label = datasets.Value("float32") if self.regression else datasets.ClassLabel(names=self.classes())
        features = datasets.Features({**{n: datasets.Value("string") for n in names}, "label": label})
        return datasets.Dataset.from_dict(out, features=features)

    def _label_parser(self, split: str):
        if self.regression:
            return _parse_score
        labels = self.classes()
        ids = {name: i for i, name in enumerate(labels)}

        def parse(value: Any) -> int:
            key = label_key(value)
            if key in ids:
                return ids[key]
            # A preset accepts class ids too (Hugging Face's GLUE and some RTE/QNLI copies use 0/1, not names).
            if self.preset is not None and key.isdigit() and int(key) < len(ids):
                return int(key)
            if self.preset is None and split != "train":
                raise ValueError(f"label {key!r} never appears in the training split (its labels: "
                                 f"{', '.join(labels)})")
            raise ValueError(f"unknown label {value!r} (expected one of {', '.join(labels)}"
                             + (f" or a class id below {len(ids)})" if self.preset is not None else ")"))

        return parse

    # ---- the head -----------------------------------------------------------------------------------------

    def classes(self) -> list[str]:
        """The class names, in the order of the head's outputs (empty for regression)."""
        if self.regression:
            return []
        if self._labels is None:
            raise PrunetuneError(f"the label set of task {self.name} comes from its training split: give --data")
        return list(self._labels)

    def labels(self) -> list[str]:
        return self.classes()

    def prepare(self, data: Any, *, seed: int) -> None:
        if self._labels is None and not self.regression:
            self.learn_from(data, seed=seed)

    def adopt(self, record: dict | None, config: Any) -> None:
        if self.preset is not None or self.regression:
            return
        names = list((record or {}).get("labels") or [])
        if not names:
            id2label = getattr(config, "id2label", None) or {}
            names = [id2label[i] for i in sorted(id2label)]
            if not names or any(_GENERIC_LABEL.fullmatch(str(n)) for n in names):
                raise PrunetuneError(f"the model names no classes (no task record, no id2label): task {self.name} "
                                     "cannot tell which output is which label")
        self._labels = [str(n) for n in names]

    def head_size(self) -> int:
        return 1 if self.regression else len(self.classes())

    def load_model(self, location: str) -> nn.Module:
        labels = self.classes()
        have = models.head_labels(location)
        if have is not None:
            if len(have) != self.head_size():
                raise PrunetuneError(f"the model's classification head has {len(have)} labels but task {self.name} "
                                     f"needs {self.head_size()}" + (f" ({', '.join(labels)})" if labels else ""))
            named = [h for h in have if not _GENERIC_LABEL.fullmatch(h)]
            if labels and len(named) == len(have) and have != labels:
                raise PrunetuneError(f"the model's classification head was made for the labels {', '.join(have)}; "
                                     f"task {self.name} has {', '.join(labels)}")
        overrides: dict[str, Any] = {"num_labels": self.head_size()}
        if self.regression:
            overrides["problem_type"] = "regression"
        else:
            overrides["id2label"] = dict(enumerate(labels))
            overrides["label2id"] = {name: i for i, name in enumerate(labels)}
        model = models.load_with_head(location, self.auto_class, **overrides)
        if getattr(model.config, "pad_token_id", None) is None:
            # a decoder's classifier (LLaMA) pools the last non-pad token and must know which token pads
            model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
        return model

    # ---- batches and scoring ------------------------------------------------------------------------------

    def train_batches(self, examples: datasets.Dataset, tokenizer: Any, *, max_length: int, batch_size: int,
                      seed: int | None) -> DataLoader:
        return make_loader(tokenize(examples, tokenizer, max_length), tokenizer, batch_size, shuffle=seed is not None,
                           seed=seed or 0)

    def eval_batches(self, examples: datasets.Dataset, tokenizer: Any, *, max_length: int,
                     batch_size: int) -> DataLoader:
        return make_loader(tokenize(examples, tokenizer, max_length), tokenizer, batch_size, shuffle=False)

    def score(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        outputs, targets = predict(model, loader)
        return compute_metrics(self.metric_names, outputs["logits"], targets["labels"], regression=self.regression)


class RegressionTask(ClassifyTask):
    """Sequence regression: a one-output head trained with the squared error; Pearson, Spearman and MSE."""

    kind = "regression"
    regression = True
    default_metrics = ("pearson", "spearmanr", "mse")
    default_main = "pearson"
    description = "sequence regression of your rows (a numeric --label-column): Pearson, Spearman, MSE"


def _parse_score(value: Any) -> float:
    """Parse a regression target, rejecting blanks and non-finite numbers."""
    try:
        score = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"unknown label {value!r} (expected a number)") from None
    if not np.isfinite(score):
        raise ValueError(f"unknown label {value!r} (expected a finite number)")
    return score


def tokenize(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenize text_a/text_b into input_ids etc. (truncated, unpadded) with the target in `labels`."""
    if max_length < 1:
        raise PrunetuneError(f"max_length must be a positive number of tokens, got {max_length}")
    has_pair = "text_b" in ds.column_names

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        second = batch["text_b"] if has_pair else None
        # Padding is left to the collator so each batch is only as wide as its longest example.
        return tokenizer(batch["text_a"], second, truncation=True, max_length=max_length)

    text = [c for c in ("text_a", "text_b") if c in ds.column_names]
    out = ds.map(encode, batched=True, remove_columns=text, desc="Tokenizing")
    return out.rename_column("label", "labels") if "label" in out.column_names else out


def make_loader(
    ds: datasets.Dataset, tokenizer: Any, batch_size: int, *, shuffle: bool, seed: int = 0
) -> DataLoader:
    """DataLoader over a tokenized dataset with per-batch padding and a seeded shuffle order."""
    if "input_ids" not in ds.column_names:
        raise ValueError("make_loader expects a tokenized dataset; call tokenize() first")
    if batch_size < 1:
        raise PrunetuneError(f"batch size must be positive, got {batch_size}")
    if tokenizer.pad_token is None:
        raise PrunetuneError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token before batching"
        )
    feature = ds.features.get("labels")
    floats = isinstance(feature, datasets.Value) and feature.dtype.startswith("float")
    collate = _LabelCastingCollator(DataCollatorWithPadding(tokenizer), torch.float32 if floats else torch.long)
    # A dedicated generator keeps the order independent of any other use of the global torch RNG.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


class _LabelCastingCollator:
    """DataCollatorWithPadding followed by a cast of `labels` to the dtype the loss expects."""

    def __init__(self, pad: DataCollatorWithPadding, label_dtype: torch.dtype) -> None:
        self.pad = pad
        self.label_dtype = label_dtype

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(features)
        if "labels" in batch:
            batch["labels"] = batch["labels"].to(self.label_dtype)
        return batch
