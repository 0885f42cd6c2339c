"""Extractive question answering (SQuAD v1/v2): a start/end head over the context's tokens.

Long contexts are split into windows of --max-length tokens that overlap by --stride (the fast tokenizer's
overflowing tokens and offset mapping). Training marks each window's answer span, or the [CLS] token when the
answer is not inside the window (or the question has none). Evaluation takes, over every window of a question,
the n-best start and end logits, the best valid span (within the context, end after start, at most
--max-answer-length tokens), and answers "" when the [CLS] score beats it by more than --null-threshold (SQuAD
v2's no-answer rule); exact match and F1 are the official SQuAD v2 script's (metrics.py).

Data: SQuAD JSON ({"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}) or rows with `question`,
`context` and `answers` ({"text": [...], "answer_start": [...]}, or a list of {"text", "answer_start"}). A single
file's dev share is held out by article (title; the context where there is none): no article is both trained on
and scored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from prunetune import models, tables
from prunetune.data import held_out_groups
from prunetune.errors import PrunetuneError
from prunetune.metrics import squad_v2_metrics
from prunetune.tasks.base import Task
from prunetune.tasks.batching import EvalBatches
from prunetune.train import predict

QA_COLUMNS = ("question", "context", "answers")


@dataclass(frozen=True)
class QAOptions:
    """Windows over long contexts and the post-processing of start/end logits into answers."""

    stride: int | None = field(default=None, metadata={
        "help": "tokens consecutive windows of a long context share (default: a quarter of --max-length)"})
    max_answer_length: int = field(default=30, metadata={"help": "longest answer, in tokens"})
    n_best: int = field(default=20, metadata={"help": "start and end positions tried per window (the top logits)"})
    null_threshold: float = field(default=0.0, metadata={
        "help": "answer nothing when the no-answer score beats the best span's by more than this (SQuAD v2); "
                "a large value never answers nothing"})

    def __post_init__(self) -> None:
        for name in ("stride", "max_answer_length", "n_best"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PrunetuneError(f"--{name.replace('_', '-')} must be a positive whole number, got {value}")
        if isinstance(self.null_threshold, bool) or not math.isfinite(float(self.null_threshold)):
            raise PrunetuneError(f"--null-threshold must be a finite number, got {self.null_threshold}")

    def window_stride(self, max_length: int) -> int:
        return self.stride if self.stride is not None else max(1, max_length // 4)


@dataclass(frozen=True)
class QAPreset:
    """A named QA data set: its hub name and file names."""

    name: str
    hub: str
    train_files: tuple[str, ...]
    dev_files: tuple[str, ...]


SQUAD_V2 = QAPreset("squad_v2", hub="rajpurkar/squad_v2", train_files=("train-v2.0.json",),
                    dev_files=("dev-v2.0.json",))


class QATask(Task):
    """Extractive QA: AutoModelForQuestionAnswering, SQuAD v2 exact match and F1 (overall, HasAns, NoAns)."""

    kind = "qa"
    auto_class = "AutoModelForQuestionAnswering"
    families = ("bert", "roberta")
    options_class = QAOptions
    metric_names = ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
                    "NoAns_total")
    main_metric = "f1"
    held_out_by = "article"
    description = ("extractive question answering: SQuAD JSON or question/context/answers rows; exact match and F1 "
                   "as SQuAD v2's script")

    # ---- data ---------------------------------------------------------------------------------------------

    def find_split_file(self, directory: Path, split: str) -> Path | None:
        names = (self.preset.train_files if split == "train" else self.preset.dev_files) if self.preset else ()
        found = tables.split_file(directory, split, names)
        if found is None:  # SQuAD's own naming: train-v2.0.json, dev-v1.1.json, ...
            stems = tables.SPLIT_STEMS[split]
            found = next((p for stem in stems for p in sorted(directory.glob(f"{stem}-*.json"))), None)
        return found

    def read_source(self, location: str | None, split: str) -> tuple[list[dict], str]:
        if location is None:
            if self.preset is None:
                raise PrunetuneError(f"task {self.name} needs --data: SQuAD JSON, or rows with question, context "
                                     "and answers columns")
        elif Path(location).exists():
            return _read_file(Path(location)), location
        elif not tables.is_hub_name(location):
            raise PrunetuneError(f"data path does not exist: {location}")
        table, name = tables.load_hub(location or self.preset.hub, None, "train" if split == "train" else "validation",
                                      task=self.name, given=location is not None)
        return _column_records(table, name), name

    def held_out_index(self, records: list[dict], fraction: float, seed: int) -> np.ndarray:
        return held_out_groups([r["title"] or r["context"] for r in records], fraction, seed)

    def examples(self, records: list[dict], index: np.ndarray, split: str, source: str) -> list[dict]:
        return [_checked(records[i], i + 1, source) for i in index]

    def load_model(self, location: str) -> nn.Module:
        return models.load_with_head(location, self.auto_class)

    # ---- batches ------------------------------------------------------------------------------------------

    def train_batches(self, examples: list[dict], tokenizer: Any, *, max_length: int, batch_size: int,
                      seed: int | None) -> DataLoader:
        windows = encode_windows(tokenizer, examples, max_length=max_length,
                                 stride=self.options.window_stride(max_length))
        features = [{**inputs, "start_positions": s, "end_positions": e}
                    for inputs, (s, e) in zip(windows.inputs, windows.answer_positions(examples), strict=True)]
        return _loader(features, tokenizer, batch_size, seed)

    def eval_batches(self, examples: list[dict], tokenizer: Any, *, max_length: int, batch_size: int) -> QABatches:
        windows = encode_windows(tokenizer, examples, max_length=max_length,
                                 stride=self.options.window_stride(max_length))
        return QABatches(examples, windows, _loader(windows.inputs, tokenizer, batch_size, None))

    # ---- scoring ------------------------------------------------------------------------------------------

    def answers(self, model: nn.Module, loader: QABatches) -> dict[str, str]:
        """The model's answer to every question of the loader ("" = no answer)."""
        logits, _ = predict(model, loader, outputs=("start_logits", "end_logits"), targets=())
        return best_answers(loader.examples, loader.windows, logits["start_logits"], logits["end_logits"],
                            n_best=self.options.n_best, max_answer_length=self.options.max_answer_length,
                            null_threshold=self.options.null_threshold)

    def score(self, model: nn.Module, loader: QABatches) -> dict[str, float]:
        predictions = self.answers(model, loader)
        return squad_v2_metrics(predictions, {e["id"]: e["answers"]["text"] for e in loader.examples})


# ---- reading -------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> list[dict]:
    """The records of SQuAD JSON (a document with a `data` list of articles) or of a table of rows."""
    if path.suffix.lower() == ".json":
        doc = tables.read_json(path)
        if isinstance(doc, dict):
            return squad_records(doc, str(path))
    return _column_records(tables.read_table(path), str(path))


def squad_records(doc: dict, source: str) -> list[dict]:
    """Every question of a SQuAD JSON document as {id, title, context, question, answers{text, answer_start}}."""
    articles = doc.get("data")
    if not isinstance(articles, list):
        raise PrunetuneError(f"{source}: not SQuAD JSON (no 'data' list of articles)")
    out = []
    try:
        for a, article in enumerate(articles):
            title = article.get("title") or f"article {a + 1}"
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    given = [] if qa.get("is_impossible") else qa.get("answers") or []
                    out.append({"id": str(qa["id"]), "title": title, "context": paragraph["context"],
                                "question": qa["question"],
                                "answers": {"text": [x["text"] for x in given],
                                            "answer_start": [int(x["answer_start"]) for x in given]}})
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PrunetuneError(f"{source}: not SQuAD JSON ({type(exc).__name__}: {exc} in article {a + 1})") from exc
    if not out:
        raise PrunetuneError(f"{source}: no questions")
    return out


def _column_records(table: tables.Table, source: str) -> list[dict]:
    """Rows with question, context and answers columns (id and title optional) as records."""
    tables.require_columns(QA_COLUMNS, table.columns, source)
    out = []
    for number, row in enumerate(table, start=1):
        answers = row.get("answers")
        try:
            if isinstance(answers, str):  # a CSV/TSV cell holding JSON
                answers = json.loads(answers) if answers.strip() else []
            if isinstance(answers, dict):
                texts, starts = list(answers.get("text") or []), list(answers.get("answer_start") or [])
            elif isinstance(answers, list):
                texts, starts = [x["text"] for x in answers], [x["answer_start"] for x in answers]
            elif answers is None:
                texts, starts = [], []
            else:
                raise TypeError(f"got {type(answers).__name__}")
            starts = [int(s) for s in starts]
        except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise PrunetuneError(f"{source}: row {number}, column 'answers': expected {{'text': [...], "
                                 f"'answer_start': [...]}} or a list of {{'text', 'answer_start'}} ({exc})") from exc
        out.append({"id": str(row["id"]) if row.get("id") is not None else str(number), "title": row.get("title"),
                    "context": row.get("context"), "question": row.get("question"),
                    "answers": {"text": texts, "answer_start": starts}})
    return out


def _checked(record: dict, number: int, source: str) -> dict:
    """A record whose question and context are text and whose answers sit in the context (a start that is off,
    as in some SQuAD copies, moves to the nearest occurrence of the answer's text)."""
    for key in ("question", "context"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise PrunetuneError(f"{source}: question {number} ({record['id']}) has an empty {key}")
    texts, starts = record["answers"]["text"], record["answers"]["answer_start"]
    if len(texts) != len(starts):
        raise PrunetuneError(f"{source}: question {number} ({record['id']}) has {len(texts)} answer texts but "
                             f"{len(starts)} answer starts")
    context, fixed = record["context"], []
    for text, start in zip(texts, starts, strict=True):
        if context[start:start + len(text)] != text:
            found = [i for i in range(len(context)) if context.startswith(text, i)] if text else []
            if not found:
                raise PrunetuneError(f"{source}: question {number} ({record['id']}): the answer {text!r} is not in "
                                     "its context")
            start = min(found, key=lambda i: abs(i - start))
        fixed.append(start)
    return {**record, "answers": {"text": list(texts), "answer_start": fixed}}


# ---- windows and answers -------------------------------------------------------------------------------------


@dataclass
class Windows:
    """The tokenized windows of a list of questions: model inputs, and what maps them back to the text."""

    inputs: list[dict]  # input_ids, attention_mask (and token_type_ids where the tokenizer makes them)
    example: list[int]  # the question each window belongs to
    offsets: list[list[tuple[int, int] | None]]  # character span of each context token; None elsewhere
    cls: list[int]  # the position whose start and end logits score "no answer"

    def answer_positions(self, examples: Sequence[dict]) -> list[tuple[int, int]]:
        """Each window's (start, end) token of its question's first answer; (cls, cls) where the window does not
        hold the whole answer or there is none."""
        out = []
        for w, offsets in enumerate(self.offsets):
            answers = examples[self.example[w]]["answers"]
            span = (self.cls[w], self.cls[w])
            if answers["text"]:
                first, last = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
                inside = [i for i, o in enumerate(offsets) if o is not None]
                if inside and offsets[inside[0]][0] <= first and offsets[inside[-1]][1] >= last:
                    start = max(i for i in inside if offsets[i][0] <= first)
                    end = min(i for i in inside if offsets[i][1] >= last)
                    span = (start, end)
            out.append(span)
        return out


def encode_windows(tokenizer: Any, examples: Sequence[dict], *, max_length: int, stride: int) -> Windows:
    """Question + context windows of at most `max_length` tokens overlapping by `stride` (context only is cut)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PrunetuneError("extractive QA needs a fast tokenizer (it maps tokens back to characters)")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise PrunetuneError("extractive QA expects a tokenizer that pads on the right (question first)")
    questions = [e["question"].lstrip() for e in examples]  # leading spaces only waste window room
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - stride
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = int(np.argmax(lengths)) if lengths else 0
    if lengths and lengths[longest] >= room:
        raise PrunetuneError(
            f"question {examples[longest]['id']!r} has {lengths[longest]} tokens: windows of --max-length "
            f"{max_length} sharing --stride {stride} tokens leave its context no room; raise --max-length above "
            f"{max_length - room + lengths[longest]} or lower --stride")
    enc = tokenizer(questions, [e["context"] for e in examples], truncation="only_second", max_length=max_length,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    windows = Windows([], list(enc["overflow_to_sample_mapping"]), [], [])
    for w in range(len(enc["input_ids"])):
        windows.inputs.append({k: enc[k][w] for k in keys})
        sequence = enc.sequence_ids(w)
        windows.offsets.append([tuple(o) if sequence[i] == 1 else None for i, o in enumerate(enc["offset_mapping"][w])])
        ids = enc["input_ids"][w]
        windows.cls.append(ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0)
    return windows


def window_spans(start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence, *, n_best: int,
                 max_answer_length: int) -> list[tuple[float, int, int]]:
    """(start + end logit, start, end) of every valid span among the window's n-best starts and ends: both in the
    context, end not before start, at most `max_answer_length` tokens."""
    n = len(offsets)
    starts = np.argsort(start_logits[:n])[::-1][:n_best]
    ends = np.argsort(end_logits[:n])[::-1][:n_best]
    return [(float(start_logits[s] + end_logits[e]), int(s), int(e)) for s in starts for e in ends
            if offsets[s] is not None and offsets[e] is not None and s <= e < s + max_answer_length]


def best_answers(examples: Sequence[dict], windows: Windows, start_logits: np.ndarray, end_logits: np.ndarray, *,
                 n_best: int, max_answer_length: int, null_threshold: float) -> dict[str, str]:
    """Each question's answer: its best span over all its windows, or "" when the lowest no-answer score of its
    windows exceeds that span's score by more than `null_threshold` (or no span is valid)."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for w, offsets in enumerate(windows.offsets):
        q = windows.example[w]
        cls = windows.cls[w]
        null[q] = min(null.get(q, math.inf), float(start_logits[w][cls] + end_logits[w][cls]))
        for score, s, e in window_spans(start_logits[w], end_logits[w], offsets, n_best=n_best,
                                        max_answer_length=max_answer_length):
            if q not in best or score > best[q][0]:
                best[q] = (score, examples[q]["context"][offsets[s][0]:offsets[e][1]])
    out = {}
    for q, example in enumerate(examples):
        score, text = best.get(q, (-math.inf, ""))
        out[example["id"]] = "" if null.get(q, math.inf) - score > null_threshold else text
    return out


class QABatches(EvalBatches):
    """Evaluation batches of question windows, with the questions and windows answers are read from."""

    def __init__(self, examples: list[dict], windows: Windows, loader: DataLoader):
        super().__init__(loader, examples)
        self.windows = windows


def _loader(features: list[dict], tokenizer: Any, batch_size: int, seed: int | None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed or 0)
    return DataLoader(features, batch_size=batch_size, shuffle=seed is not None,
                      collate_fn=DataCollatorWithPadding(tokenizer), generator=generator)
