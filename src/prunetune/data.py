"""GLUE task definitions and loading of task data into tokenized, dynamically padded batches."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from prunetune.errors import PrunetuneError

logger = logging.getLogger(__name__)

# Column names tried, in order, when a file does not use the task's GLUE column names.
_SINGLE_TEXT_CANDIDATES: tuple[tuple[str, ...], ...] = (("sentence",), ("text",), ("text_a",))
_PAIR_TEXT_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("text_a", "text_b"),
)

_TEXT_FILE_SUFFIXES = {".tsv": "\t", ".txt": "\t", ".csv": ","}
_JSON_FILE_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is stored on disk and scored."""

    name: str
    glue_name: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    is_regression: bool = False
    train_files: tuple[str, ...] = ("train.tsv",)
    dev_files: tuple[str, ...] = ("dev.tsv",)
    dev_mismatched_files: tuple[str, ...] = ()
    # Column names of GLUE files that ship without a header line (CoLA); None when the file has one.
    headerless_columns: tuple[str, ...] | None = None

    @property
    def num_labels(self) -> int:
        """Width of the model's output head (1 for regression)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs."""
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names accepted by `load_split` for this task."""
        return ("train", "dev", "dev_mismatched") if self.dev_mismatched_files else ("train", "dev")

    def files_for(self, split: str) -> tuple[str, ...]:
        """File names that may hold `split` inside the task's GLUE directory, most preferred first."""
        files = {
            "train": self.train_files,
            "dev": self.dev_files,
            "dev_mismatched": self.dev_mismatched_files,
        }
        return files[_canonical_split(self, split)]


# Model selection follows the usual PEFT-paper convention (LoRA, AdaLoRA, APT): Matthews correlation for CoLA,
# Pearson for STS-B and accuracy everywhere else.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="sst2",
            glue_name="SST-2",
            text_columns=("sentence",),
            label_column="label",
            label_names=("0", "1"),
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="cola",
            glue_name="CoLA",
            text_columns=("sentence",),
            label_column="label",
            label_names=("0", "1"),
            metrics=("matthews_correlation", "accuracy"),
            main_metric="matthews_correlation",
            headerless_columns=("source", "label", "star", "sentence"),
        ),
        TaskSpec(
            name="mrpc",
            glue_name="MRPC",
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            label_names=("0", "1"),
            metrics=("accuracy", "f1", "combined"),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="qqp",
            glue_name="QQP",
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            label_names=("0", "1"),
            metrics=("accuracy", "f1", "combined"),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="stsb",
            glue_name="STS-B",
            text_columns=("sentence1", "sentence2"),
            label_column="score",
            label_names=(),
            metrics=("pearson", "spearmanr", "combined"),
            main_metric="pearson",
            is_regression=True,
        ),
        TaskSpec(
            name="mnli",
            glue_name="MNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            main_metric="accuracy",
            dev_files=("dev_matched.tsv",),
            dev_mismatched_files=("dev_mismatched.tsv", "dev_mismatched.jiant.jsonl"),
        ),
        TaskSpec(
            name="qnli",
            glue_name="QNLI",
            text_columns=("question", "sentence"),
            label_column="label",
            label_names=("entailment", "not_entailment"),
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="rte",
            glue_name="RTE",
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            label_names=("entailment", "not_entailment"),
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="wnli",
            glue_name="WNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            label_names=("0", "1"),
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """Look up a task by name; GLUE spellings such as "SST-2" or "STS-B" are accepted too."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise PrunetuneError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def bundled_data_dir(task: str) -> Path | None:
    """Directory of the sample data shipped with the package for `task`, or None when there is none."""
    folder = resources.files("prunetune").joinpath("data").joinpath(get_task(task).name)
    if not folder.is_dir():
        return None
    # setuptools installs (and editable-installs) packages as plain directories, so this is a real path.
    return Path(str(folder))


def load_split(
    task: TaskSpec,
    split: str,
    data: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    text_columns: tuple[str, ...] | None = None,
    label_column: str | None = None,
) -> datasets.Dataset:
    """Load one split as a Dataset with columns text_a, (text_b,) label.

    `data` names where that split is: a file holding exactly that split, or a GLUE-format directory. Pairing
    a training set with a dev set (and holding dev rows out of a single file) is `load_task_rows`'s job.
    """
    split = _canonical_split(task, split)
    if text_columns is not None and len(text_columns) != len(task.text_columns):
        raise PrunetuneError(
            f"task {task.name} takes {len(task.text_columns)} text column(s), got {len(text_columns)}: "
            f"{', '.join(text_columns)}"
        )
    ds, _ = _load_whole(task, split, data, text_columns, label_column)
    return _take_subset(ds, limit, seed)


DEFAULT_DEV_FRACTION = 0.1


@dataclass(frozen=True)
class DataSource:
    """Where a task's training and dev rows come from (the CLI's --data, --dev-data and --dev-fraction).

    - `path` a GLUE-format directory: its train and dev files.
    - `path` a single file and no `dev_path`: the file is split into training rows and a seeded, held-out
      `dev_fraction` of dev rows, so a run never scores its model on rows it trained on.
    - `dev_path` given: the dev rows come from it (a file is used whole; a directory gives its dev file).
    - nothing: the sample bundled with prunetune, else the Hugging Face hub.
    """

    path: str | None = None
    dev_path: str | None = None
    dev_fraction: float = DEFAULT_DEV_FRACTION

    @classmethod
    def of(cls, data: str | Path | DataSource | None) -> DataSource:
        """A DataSource for what the tasks accept as `data`: a source, a path, or None."""
        if isinstance(data, DataSource):
            return data
        return cls(path=None if data is None else str(data))

    @property
    def held_out(self) -> bool:
        """Whether dev rows are held out of the single training file."""
        return self.path is not None and self.dev_path is None and Path(self.path).is_file()

    def location(self, split: str) -> str | None:
        """The path a split is read from (None: bundled sample or hub)."""
        return self.dev_path if split != "train" and self.dev_path is not None else self.path


@dataclass
class SplitRows:
    """A loaded split and which rows of its source it took (0-based, in the source's order)."""

    dataset: Any  # a datasets.Dataset (GLUE), or a list of records (instruction data)
    source: str  # the file, or the hub split, the rows were read from
    rows: list[int]
    total: int  # examples in the source
    held_out: bool = False  # the dev rows held out of a single file, or the training rows left after that

    def describe(self) -> dict[str, Any]:
        """For reports: the source, how many of its rows, and their 1-based numbers when not all were used."""
        every = len(self.rows) == self.total
        return {
            "source": self.source,
            "examples": len(self.rows),
            "of": self.total,
            "held_out": self.held_out,
            # 1 = the file's first example (after any header line)
            "rows": None if every else [i + 1 for i in self.rows],
        }


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: recognises a run's training file wherever it was copied to."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def held_out_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the rows held out as dev: a seeded `fraction` of `n`, at least one either side."""
    if not 0 < fraction < 1:
        raise PrunetuneError(f"--dev-fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise PrunetuneError(f"{n} example(s) cannot be split into training and dev rows; pass --dev-data")
    n_dev = min(n - 1, max(1, round(fraction * n)))
    # A generator of its own (seed, 1): the split does not move when a --train-limit subset is drawn with seed.
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:n_dev])


def load_task_rows(
    task: TaskSpec, split: str, data: str | Path | DataSource | None = None, *, limit: int | None = None,
    seed: int = 0,
) -> SplitRows:
    """One split of a task's data source (see DataSource): never a row of the training split in dev."""
    split = _canonical_split(task, split)
    source = DataSource.of(data)
    ds, name = _load_whole(task, split, source.location(split), None, None)
    index = np.arange(len(ds))
    if source.held_out:
        dev = held_out_rows(len(ds), source.dev_fraction, seed)
        index = np.setdiff1d(index, dev) if split == "train" else dev
    chosen = index if limit is None else index[subset_index(len(index), limit, seed)]
    subset = ds if len(chosen) == len(ds) else ds.select(chosen.tolist())
    return SplitRows(subset, name, chosen.tolist(), len(ds), source.held_out)


def _load_whole(
    task: TaskSpec, split: str, data: str | Path | None, text_columns: tuple[str, ...] | None,
    label_column: str | None,
) -> tuple[datasets.Dataset, str]:
    """Every row of the split's source, and the source's name."""
    if data is None:
        bundled = bundled_data_dir(task.name)
        if bundled is not None:
            logger.info(
                "using the %s sample bundled with prunetune (%s); pass --data for the full set",
                task.name,
                bundled,
            )
            data = bundled
    if data is None:
        return _load_from_hub(task, split, text_columns, label_column)
    path = _find_split_file(task, split, Path(data))
    columns, rows = _read_rows(path, task)
    return _build_dataset(task, rows, columns, str(path), text_columns, label_column), str(path)


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
    label_dtype = torch.float32 if _has_float_labels(ds) else torch.long
    collate = _LabelCastingCollator(DataCollatorWithPadding(tokenizer), label_dtype)
    # A dedicated generator keeps the order independent of any other use of the global torch RNG.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


# A model's embedding table may be padded past its tokenizer (to a multiple of 64 or 128 for fast matmuls:
# Qwen2 151,936 rows for 151,665 tokens, Pythia 50,304 for 50,277, T5 32,128 for 32,100: under 2% in every
# case known). A tokenizer with fewer than this share of the model's vocabulary is another model's.
MIN_VOCAB_SHARE = 0.9


def check_tokenizer(tokenizer: Any, model_or_config: Any) -> None:
    """Refuse a tokenizer that does not belong to the model.

    Two rules, both robust to the padding of embedding tables (see MIN_VOCAB_SHARE):
    - more tokens than the model has embedding rows: the tokenizer emits ids the model cannot look up;
    - fewer than MIN_VOCAB_SHARE of the model's vocabulary: it is another (smaller) model's tokenizer, whose
      ids mean other words to this model; nothing would fail, the numbers would just be meaningless.
    `model_or_config`: a model (its embedding rows are checked) or a config (its vocab_size).
    """
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(config, "vocab_size", None)
    rows = vocab_size
    embeddings = getattr(model_or_config, "get_input_embeddings", None)
    if callable(embeddings) and embeddings() is not None:
        rows = embeddings().weight.shape[0]
    if rows is None:
        return
    size = len(tokenizer)
    special = {t: i for t, i in zip(getattr(tokenizer, "all_special_tokens", []),
                                    getattr(tokenizer, "all_special_ids", []), strict=False)}
    outside = {t: i for t, i in special.items() if i is not None and i >= rows}
    if outside:  # a tokenizer whose special tokens were added past a smaller model's table
        token, index = next(iter(outside.items()))
        raise PrunetuneError(f"the tokenizer's special token {token} has id {index}, but the model has {rows} "
                             "embedding rows: the tokenizer does not belong to this model")
    if size > rows:
        raise PrunetuneError(
            f"tokenizer has {size} tokens but the model's vocabulary has {rows}: "
            "the tokenizer does not belong to this model"
        )
    if vocab_size and size < MIN_VOCAB_SHARE * vocab_size:
        raise PrunetuneError(
            f"tokenizer has {size} tokens, the model's vocabulary {vocab_size}: the tokenizer does not belong "
            "to this model (save the model's own tokenizer next to it)"
        )


# Learned position tables that do not start at 0: RoBERTa's positions begin after its padding index.
POSITION_OFFSET: dict[str, Callable[[Any], int]] = {
    "roberta": lambda config: (config.pad_token_id or 0) + 1,
    "xlm-roberta": lambda config: (config.pad_token_id or 0) + 1,
}


def max_positions(config: Any) -> int | None:
    """The longest input the model has positions for; None when unbounded (T5's relative positions)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    model_type = getattr(config, "prunetune_base_model_type", None) or getattr(config, "model_type", "")
    offset = POSITION_OFFSET.get(model_type)
    return positions - (offset(config) if offset else 0)


def check_max_length(max_length: int, config: Any) -> None:
    """Refuse a --max-length the model has no positions for (it would fail or read garbage mid-run)."""
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise PrunetuneError(f"--max-length {max_length} is longer than the model's {limit} positions")


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


def _has_float_labels(ds: datasets.Dataset) -> bool:
    """Whether the dataset's labels are regression targets."""
    feature = ds.features.get("labels")
    return isinstance(feature, datasets.Value) and feature.dtype.startswith("float")


def _canonical_split(task: TaskSpec, split: str) -> str:
    """Map split aliases ("validation", "dev_matched") onto train / dev / dev_mismatched."""
    aliases = {
        "validation": "dev",
        "dev_matched": "dev",
        "validation_matched": "dev",
        "validation_mismatched": "dev_mismatched",
    }
    name = aliases.get(split, split)
    if name not in task.splits:
        raise PrunetuneError(
            f"unknown split {split!r} for task {task.name}; choose from {', '.join(task.splits)}"
        )
    return name


def _find_split_file(task: TaskSpec, split: str, data: Path) -> Path:
    """Resolve `data` (a split file, a task directory or a GLUE root) to the file holding `split`."""
    if not data.exists():
        raise PrunetuneError(f"data path does not exist: {data}")
    if data.is_file():
        return data
    names = task.files_for(split)
    # Also accept a data root that keeps the GLUE tasks under glue/<TASK>/ next to other corpora.
    folders = [data, data / task.glue_name, data / task.name, data / "glue" / task.glue_name]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    # List the task's own folder when there is one: it shows which splits the user does have.
    shown = next((folder for folder in folders[1:] if folder.is_dir()), data)
    present = sorted(p.name for p in shown.iterdir())
    raise PrunetuneError(
        f"no {split} file for task {task.name}: looked for {' or '.join(names)} in {data} and "
        f"{data / task.glue_name}; {shown} holds: {', '.join(present) or 'nothing'}"
    )


def _read_rows(path: Path, task: TaskSpec) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Read a TSV/CSV/JSONL file into its column names and row mappings."""
    suffix = path.suffix.lower()
    try:
        if suffix in _JSON_FILE_SUFFIXES:
            return _read_json_rows(path)
        if suffix in _TEXT_FILE_SUFFIXES:
            return _read_delimited_rows(path, _TEXT_FILE_SUFFIXES[suffix], task)
    except UnicodeDecodeError as exc:
        raise PrunetuneError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    supported = ", ".join([*_TEXT_FILE_SUFFIXES, *_JSON_FILE_SUFFIXES])
    raise PrunetuneError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {supported}")


def _read_delimited_rows(
    path: Path, delimiter: str, task: TaskSpec
) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Read a CSV or TSV file; headerless GLUE files get the task's column names."""
    # GLUE TSVs contain unbalanced quote characters (QNLI, MRPC) that are part of the text, not CSV quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # utf-8-sig drops the byte-order mark that starts MRPC's header.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        try:
            records = list(csv.reader(handle, delimiter=delimiter, quoting=quoting))
        except csv.Error as exc:
            raise PrunetuneError(f"{path}: malformed {delimiter!r}-separated file: {exc}") from exc
    records = [r for r in records if r]
    if not records:
        raise PrunetuneError(f"{path}: the file is empty")
    if _is_headerless(records[0], task):
        columns = list(task.headerless_columns or ())
    else:
        columns, records = records[0], records[1:]
    return columns, [dict(zip(columns, record, strict=False)) for record in records]


def _is_headerless(first: Sequence[str], task: TaskSpec) -> bool:
    """Whether `first` is already a data row of a GLUE file that ships without a header (CoLA)."""
    columns = task.headerless_columns
    if columns is None or len(first) != len(columns):
        return False
    return first[columns.index(task.label_column)].strip() in task.label_names


def _read_json_rows(path: Path) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Read JSON Lines (or a JSON array of objects)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PrunetuneError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not rows:
        raise PrunetuneError(f"{path}: the file is empty")
    if not all(isinstance(row, dict) for row in rows):
        raise PrunetuneError(f"{path}: expected one JSON object per line")
    # Keep first-seen order so error messages list columns as they appear in the file.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, rows


def _load_from_hub(
    task: TaskSpec, split: str, text_columns: tuple[str, ...] | None, label_column: str | None
) -> tuple[datasets.Dataset, str]:
    """Download the split from the Hugging Face hub's GLUE dataset; the dataset and its name."""
    hub_split = {"train": "train", "dev": "validation", "dev_mismatched": "validation_mismatched"}[split]
    if task.name == "mnli" and split == "dev":
        hub_split = "validation_matched"
    try:
        hub = datasets.load_dataset("glue", task.name, split=hub_split)
    except Exception as exc:  # offline, blocked or unknown to the hub: all mean "bring your own files"
        raise PrunetuneError(
            f"no local data for task {task.name} and the GLUE download failed ({type(exc).__name__}); "
            "pass --data with a GLUE directory or a TSV/CSV/JSONL file"
        ) from exc
    name = f"glue/{task.name}:{hub_split}"
    return _build_dataset(task, hub, hub.column_names, name, text_columns, label_column), name


def _build_dataset(
    task: TaskSpec,
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    source: str,
    text_columns: tuple[str, ...] | None,
    label_column: str | None,
) -> datasets.Dataset:
    """Turn raw rows into the standard text_a/text_b/label Dataset, validating columns and labels."""
    text_cols = _resolve_text_columns(task, columns, source, text_columns)
    label_col = _resolve_label_column(task, columns, source, label_column)
    parse_label = _label_parser(task)
    text_names = ("text_a", "text_b")[: len(text_cols)]
    out: dict[str, list[Any]] = {name: [] for name in (*text_names, "label")}
    for number, row in enumerate(rows, start=1):
        for name, column in zip(text_names, text_cols, strict=True):
            value = row.get(column)
            if value is None:
                raise PrunetuneError(f"{source}: row {number} has no value for column {column!r}")
            out[name].append(str(value))
        value = row.get(label_col)
        try:
            out["label"].append(parse_label(value))
        except ValueError as exc:
            raise PrunetuneError(f"{source}: row {number}, column {label_col!r}: {exc}") from exc
    if not out["label"]:
        raise PrunetuneError(f"{source}: no examples")
    label_feature = (
        datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    )
    features = datasets.Features(
        {**{name: datasets.Value("string") for name in text_names}, "label": label_feature}
    )
    return datasets.Dataset.from_dict(out, features=features)


def _resolve_text_columns(
    task: TaskSpec, columns: Sequence[str], source: str, requested: tuple[str, ...] | None
) -> tuple[str, ...]:
    """Pick the text columns: the caller's, else the task's GLUE names, else common names."""
    if requested is not None:
        _require_columns(requested, columns, source)
        return requested
    candidates = _PAIR_TEXT_CANDIDATES if task.is_pair else _SINGLE_TEXT_CANDIDATES
    for candidate in (task.text_columns, *candidates):
        if all(c in columns for c in candidate):
            return candidate
    # Name the task's own column in the error: that is what the GLUE-format file should have had.
    _require_columns(task.text_columns, columns, source)
    raise AssertionError("unreachable")


def _resolve_label_column(task: TaskSpec, columns: Sequence[str], source: str, requested: str | None) -> str:
    """Pick the label column: the caller's, else "label", else the task's GLUE name."""
    if requested is not None:
        _require_columns((requested,), columns, source)
        return requested
    for candidate in ("label", task.label_column):
        if candidate in columns:
            return candidate
    _require_columns((task.label_column,), columns, source)
    raise AssertionError("unreachable")


def _require_columns(wanted: Iterable[str], columns: Sequence[str], source: str) -> None:
    """Raise naming the first wanted column that the file lacks."""
    for column in wanted:
        if column not in columns:
            raise PrunetuneError(
                f"{source}: missing column {column!r} (columns found: {', '.join(map(repr, columns))})"
            )


def _label_parser(task: TaskSpec) -> Callable[[Any], int | float]:
    """Function mapping a raw label value to a class id (or a float score for regression)."""
    if task.is_regression:
        return _parse_score
    ids = {name: i for i, name in enumerate(task.label_names)}
    expected = f"expected one of {', '.join(task.label_names)} or a class id below {len(ids)}"

    def parse(value: Any) -> int:
        key = value.strip() if isinstance(value, str) else value
        if isinstance(key, str) and key in ids:
            return ids[key]
        # Class ids are accepted too (Hugging Face's GLUE and some RTE/QNLI copies use 0/1 instead of names).
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(ids):
            return key
        raise ValueError(f"unknown label {value!r} ({expected})")

    return parse


def _parse_score(value: Any) -> float:
    """Parse a regression target, rejecting blanks and non-finite numbers."""
    try:
        score = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"unknown label {value!r} (expected a number)") from None
    if not np.isfinite(score):
        raise ValueError(f"unknown label {value!r} (expected a finite number)")
    return score


def subset_index(n: int, limit: int, seed: int) -> np.ndarray:
    """Positions of a seeded random subset of `limit` of `n` rows, in their original order."""
    if limit < 1:
        raise PrunetuneError(f"limit must be positive, got {limit}")
    if limit >= n:
        return np.arange(n)
    # Shuffle with the seed and keep the first `limit`; sorting keeps the chosen rows in their file order.
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _take_subset(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """Seeded random subset of `limit` rows, kept in file order; the whole set when it is small enough."""
    if limit is None:
        return ds
    index = subset_index(len(ds), limit, seed)
    return ds if len(index) == len(ds) else ds.select(index.tolist())
