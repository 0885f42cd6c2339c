"""GLUE as named presets of the classification and regression tasks: file layout, columns, label names, metrics,
hub names, and T5's label words for the text-to-text form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from prunetune.errors import PrunetuneError


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
        return {"train": self.train_files, "dev": self.dev_files, "dev_mismatched": self.dev_mismatched_files}[split]

    @property
    def folders(self) -> tuple[str, ...]:
        """Where a data root keeps this task's files: <root>/<SST-2>, <root>/sst2, <root>/glue/<SST-2>."""
        return (self.glue_name, self.name, f"glue/{self.glue_name}")

    def hub_split(self, split: str) -> str:
        """The split's name in the hub's `glue` data set."""
        if self.name == "mnli":
            return {"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched"}[split]
        return {"train": "train", "dev": "validation"}[split]

    def headerless(self, first: Sequence[str]) -> tuple[str, ...] | None:
        """The column names of a file without a header line (CoLA) when `first` is already a data row."""
        columns = self.headerless_columns
        if columns is None or len(first) != len(columns):
            return None
        return columns if first[columns.index(self.label_column)].strip() in self.label_names else None


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
    """A GLUE preset by name; GLUE spellings such as "SST-2" or "STS-B" are accepted too."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise PrunetuneError(f"unknown GLUE task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


def bundled_data_dir(task: str) -> Path | None:
    """Directory of the sample data shipped with the package for `task`, or None when there is none."""
    folder = resources.files("prunetune").joinpath("data").joinpath(task)
    if not folder.is_dir():
        return None
    # setuptools installs (and editable-installs) packages as plain directories, so this is a real path.
    return Path(str(folder))


# T5's GLUE label words (its preprocessors), in the order of each task's label ids.
LABEL_WORDS = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}
