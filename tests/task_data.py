"""Tiny data sets in each task kind's formats, and the words a tokenizer needs to read them (task tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prunetune import tasks
from prunetune.tasks.glue import LABEL_WORDS

NOUNS = ["cat", "dog", "bird", "fish"]
PLACES = ["paris", "london", "rome", "oslo"]
COLOURS = ["red", "blue", "green"]
FILLER = ["the", "a", "sat", "on", "mat", "in", "big", "small", "ran", "to", "park", "and", "very", "good", "bad",
          "what", "who", "where", "is", "was", "did", "?", ".", ","]
USER_LABELS = ["neg", "neu", "pos"]
TASK_WORDS = sorted({w for words in LABEL_WORDS.values() for word in words for w in word.split("_")}
                    | {"_", ":", "sentence", "sentence1", "sentence2", "response", "instruction", "below", "#"}
                    | set(tasks.names()))
WORDS = sorted(set(NOUNS + PLACES + COLOURS + FILLER + USER_LABELS + TASK_WORDS))


def sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(NOUNS + COLOURS + FILLER[:15]) for _ in range(n))


def write_glue(folder: Path, spec, n_train: int = 16, n_dev: int = 8, seed: int = 0) -> Path:
    """A GLUE-format directory for a preset: its own file names, columns and label names."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in ((spec.train_files[0], n_train), (spec.dev_files[0], n_dev)):
        lines = ["\t".join((*spec.text_columns, spec.label_column))]
        for i in range(n):
            label = f"{rng.uniform(0, 5):.2f}" if spec.is_regression else spec.label_names[i % len(spec.label_names)]
            lines.append("\t".join((*(sentence(rng) for _ in spec.text_columns), label)))
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def write_classify(path: Path, n: int = 24, seed: int = 0, labels=USER_LABELS) -> Path:
    """A CSV of the user's own rows: a `text` column and string labels (the colour decides the class)."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(n):
        label = labels[i % len(labels)]
        rows.append(f"{sentence(rng, 4)} {COLOURS[labels.index(label) % len(COLOURS)]},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_regression(path: Path, n: int = 24, seed: int = 0) -> Path:
    """A JSONL of sentence pairs with a numeric label."""
    rng = random.Random(seed)
    rows = [{"sentence1": sentence(rng), "sentence2": sentence(rng), "label": round(rng.uniform(0, 5), 2)}
            for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_instruct(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [{"instruction": f"where is the {rng.choice(NOUNS)} ?", "input": "", "output": f"in {rng.choice(PLACES)}"}
            for _ in range(n)]
    path.write_text(json.dumps(rows))
    return path


def summarize_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Articles of a few sentences whose summary is their first sentence (a learnable rule), CNN/DM's columns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first = f"the {rng.choice(COLOURS)} {rng.choice(NOUNS)} ran to {rng.choice(PLACES)} ."
        rows.append({"article": " ".join([first, sentence(rng) + " .", sentence(rng) + " ."]), "highlights": first})
    return rows


def write_summarize(path: Path, n: int = 24, seed: int = 0) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in summarize_rows(n, seed)) + "\n")
    return path


def squad_articles(n_articles: int = 6, seed: int = 0) -> list[dict]:
    """SQuAD v2 articles: per paragraph an answerable "where" question, and a "who" question that is answerable
    or not (is_impossible, no answers) depending on the animal."""
    rng = random.Random(seed)
    articles = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(2):
            noun, place, colour = rng.choice(NOUNS), rng.choice(PLACES), rng.choice(COLOURS)
            context = f"the {colour} {noun} sat on the mat in {place} . the big dog ran to the park ."
            where = {"id": f"a{a}p{p}w", "question": f"where is the {noun} ?", "is_impossible": False,
                     "answers": [{"text": place, "answer_start": context.index(place)}]}
            possible = noun in ("cat", "bird")
            who = {"id": f"a{a}p{p}c", "question": "what cat sat on the mat ?", "is_impossible": not possible,
                   "answers": [{"text": f"{colour} {noun}", "answer_start": context.index(colour)}] if possible
                   else []}
            paragraphs.append({"context": context, "qas": [where, who]})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    return articles


def write_squad(path: Path, n_articles: int = 6, seed: int = 0) -> Path:
    path.write_text(json.dumps({"version": "v2.0", "data": squad_articles(n_articles, seed)}))
    return path


def task_data(root: Path, name: str) -> tuple[str, float]:
    """Data for a registered task in its kind's format: (the --data path, the --dev-fraction it needs)."""
    entry = tasks.entry(name)
    kind = entry.forms[0].kind
    root.mkdir(parents=True, exist_ok=True)
    if entry.preset is not None and kind in ("classify", "regression"):
        return str(write_glue(root / name, entry.preset)), 0.1
    writers = {"classify": (write_classify, "rows.csv", 0.25), "regression": (write_regression, "rows.jsonl", 0.25),
               "instruct": (write_instruct, "records.json", 0.25), "qa": (write_squad, "squad.json", 0.34),
               "summarize_seq2seq": (write_summarize, "cnn.jsonl", 0.25)}
    write, file_name, fraction = writers[kind]
    return str(write(root / file_name)), fraction
