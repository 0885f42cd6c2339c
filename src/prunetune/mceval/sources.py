"""The local evaluation files, read into the rows the harness's stock task configs read from the hub.

The shared files are not the hub datasets (../shared/data/README.md, "Evaluation sets"); each reader turns its
file into the fields the stock prompt templates use, so the prompts are the stock ones:

- ARC-Challenge test: the official JSONL, as the hub's ``allenai/ai2_arc`` rows (``question`` = the stem,
  ``choices`` = ``{"text", "label"}``, ``answerKey``); its five-choice and numeric-label items are kept.
- ARC-Easy test, and the ARC training rows few-shot prompts draw from: only the derived 4-option CSV exists
  (options padded with spaces, stripped here, and the empty fourth option of three-choice questions dropped;
  a fifth option was dropped and numeric labels mapped to A-D by whoever made the CSV).
- HellaSwag validation: already preprocessed (``query`` = ``activity_label: ctx``, markup stripped), except that
  ``ctx_b`` is not capitalised as the harness's ``process_docs`` does; there is no training split, so few-shot
  examples come from the validation rows (the harness leaves the scored item out of its own prompt).
- MMLU: the hendrycks CSVs per subject (no header), as ``cais/mmlu`` rows (``question``, ``subject``,
  ``choices``, ``answer`` as an index); few-shot examples are the subject's dev rows, as in the harness.
- TruthfulQA: ``mc_task.json``, whose ``{choice: label}`` maps become ``{"choices", "labels"}`` in file order,
  which is how the hub's ``truthful_qa/multiple_choice`` was built from it (the true MC1 answer comes first).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

from prunetune.errors import PrunetuneError

ENV = "PRUNETUNE_EVAL_DATA"
LETTERS = ("A", "B", "C", "D")


def data_dir(given: str | None = None) -> Path:
    """Where the evaluation files are: --eval-data, else $PRUNETUNE_EVAL_DATA, else ../shared/data/eval beside the
    current directory or beside the source checkout."""
    if given is not None:
        candidates = [Path(given)]
    elif os.environ.get(ENV):
        candidates = [Path(os.environ[ENV])]
    else:
        candidates = [Path.cwd().parent / "shared/data/eval", Path(__file__).resolve().parents[4] / "shared/data/eval"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise PrunetuneError(f"no evaluation data at {candidates[0]} (give --eval-data DIR or set {ENV}; the files are "
                         "described in ../shared/data/README.md, 'Evaluation sets')")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise PrunetuneError(f"evaluation file {path} is missing")
    return path


def _jsonl(path: Path) -> list[dict]:
    with open(_need(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _arc_csv(root: Path, category: str, sets: str) -> list[dict]:
    rows = []
    with open(_need(root / "arc/ARC-all-splits_4options.csv"), encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["category"] == category and r["sets"] == sets:
                # three-choice questions carry an empty fourth option: dropped, as the official rows have none
                kept = [k for k in LETTERS if r[k].strip()]
                rows.append({"id": r["questionID"], "question": r["question"].strip(),
                             "choices": {"text": [r[k].strip() for k in kept], "label": kept},
                             "answerKey": r["AnswerKey"].strip()})
    return rows


def arc_challenge(root: Path) -> dict[str, list[dict]]:
    test = [{"id": r["id"], "question": r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in _jsonl(root / "arc/ARC-Challenge-Test.jsonl")]
    return {"test": test, "train": _arc_csv(root, "Train", "chal")}


def arc_easy(root: Path) -> dict[str, list[dict]]:
    return {"test": _arc_csv(root, "Test", "easy"), "train": _arc_csv(root, "Train", "easy")}


def hellaswag(root: Path) -> dict[str, list[dict]]:
    rows = [{"ind": r["ind"], "query": r["query"], "choices": r["endings"], "label": int(r["label"])}
            for r in _jsonl(root / "hellaswag/hellaswag_val.jsonl")]
    return {"validation": rows}


def mmlu_subjects(root: Path) -> list[str]:
    found = sorted(p.name.removesuffix("_test.csv") for p in (root / "mmlu/test").glob("*_test.csv"))
    if not found:
        raise PrunetuneError(f"no MMLU test files in {root / 'mmlu/test'}")
    return found


def _mmlu_csv(path: Path, subject: str) -> list[dict]:
    with open(_need(path), encoding="utf-8", newline="") as f:
        return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": LETTERS.index(r[5].strip())}
                for r in csv.reader(f)]


def mmlu(root: Path, subject: str) -> dict[str, list[dict]]:
    return {"test": _mmlu_csv(root / f"mmlu/test/{subject}_test.csv", subject),
            "dev": _mmlu_csv(root / f"mmlu/dev/{subject}_dev.csv", subject)}


def truthfulqa(root: Path) -> dict[str, list[dict]]:
    with open(_need(root / "truthfulqa/mc_task.json"), encoding="utf-8") as f:
        items = json.load(f)
    rows = [{"question": it["question"],
             **{k: {"choices": list(it[k]), "labels": [int(v) for v in it[k].values()]}
                for k in ("mc1_targets", "mc2_targets")}} for it in items]
    return {"validation": rows}


Reader = Callable[[Path], dict[str, list[dict]]]
