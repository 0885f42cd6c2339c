"""Text the decoder benchmarks score and calibrate on (llm_pruning.py, uniform_cost.py): token batches of
natural text with every token scored, the Alpaca split `prunetune finetune --task instruct` makes, and prompt +
response calibration batches."""

from __future__ import annotations

import json


def token_batches(tokenizer, texts: list[str], length: int, batch_size: int, *,
                  special_tokens: bool = True) -> list[dict]:
    """The first `length` tokens of each text in batches (right-padded), labels on every real token."""
    from prunetune.tasks.batching import causal_collate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=special_tokens)["input_ids"][:length] for t in texts]
    collate = causal_collate(pad)  # pads labels with -100
    feats = [{"input_ids": i, "labels": i} for i in ids]
    return [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]


def first_articles(path: str, n: int) -> list[str]:
    """The first `n` articles of a CNN/DailyMail JSONL file."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line)["article"])
            if len(rows) == n:
                break
    return rows


def article_batches(tokenizer, path: str, n: int, length: int, batch_size: int) -> list[dict]:
    """The first `length` tokens of each of the first `n` articles, every token scored."""
    return token_batches(tokenizer, first_articles(path, n), length, batch_size)


def instruction_split(data: str, eval_limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) Alpaca records exactly as `prunetune finetune --task instruct` splits them, so a
    calibration sample drawn from the train part never saw the hold-out a recovery is scored on."""
    from prunetune import tasks

    task = tasks.get("instruct")
    train = task.read("train", data, seed=seed)
    held_out = task.read("dev", data, limit=eval_limit, seed=seed)
    return list(train.dataset), list(held_out.dataset)


def instruction_batches(tokenizer, records: list[dict], max_length: int, batch_size: int) -> list[dict]:
    """Prompt (chat template when there is one) + response + end token, labels on every real token."""
    from prunetune.tasks.instruct import render_prompt

    texts = [render_prompt(tokenizer, r) + r["output"] + (tokenizer.eos_token or "") for r in records]
    return token_batches(tokenizer, texts, max_length, batch_size, special_tokens=False)
