"""Instruction tuning of a causal LM on Alpaca-style records, scored by held-out perplexity.

Records are {"instruction", "input", "output"} (JSON list or JSONL). The prompt is rendered with the
tokenizer's chat template when it has one (instruct models), else with the Alpaca template; only the
response tokens are trained on and scored (prompt positions carry the ignore label -100).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from prunetune.errors import PrunetuneError
from prunetune.models import load_for_task
from prunetune.tasks import Loaders

IGNORE = -100
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


def read_records(path: str | Path) -> list[dict]:
    """Alpaca-style records from a JSON list or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise PrunetuneError(f"instruction data {path} is not a file (give a JSON or JSONL of records)")
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    except json.JSONDecodeError as e:
        raise PrunetuneError(f"{path}: not JSON/JSONL ({e})") from e
    if not rows:
        raise PrunetuneError(f"{path}: no records")
    missing = {"instruction", "output"} - set(rows[0])
    if missing:
        raise PrunetuneError(f"{path}: records need 'instruction' and 'output' fields (missing {sorted(missing)})")
    return rows


def render_prompt(tokenizer, record: dict) -> str:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{ALPACA}### Instruction:\n{user}\n\n### Response:\n"


def encode(tokenizer, record: dict, max_length: int) -> dict:
    """input_ids with labels on the response tokens only (truncated to max_length)."""
    prompt = tokenizer(render_prompt(tokenizer, record), add_special_tokens=False)["input_ids"]
    answer = tokenizer(record["output"] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(pad_id: int):
    def fn(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn


@torch.no_grad()
def perplexity(model: nn.Module, loader) -> dict:
    """exp(mean negative log-likelihood of the response tokens)."""
    device = next(model.parameters()).device
    model.eval()
    nll, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll += float(F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                     ignore_index=IGNORE, reduction="sum"))
        count += int((shift_labels != IGNORE).sum())
    ppl = math.exp(nll / max(count, 1))
    return {"perplexity": ppl, "nll": nll / max(count, 1), "tokens": count, "main": -ppl}


class InstructTask:
    """Instruction tuning: causal LM, response-only loss, held-out perplexity (lower is better)."""

    main_metric = "main"  # -perplexity, so that higher is better like every other task
    maximize = True
    auto_class = "AutoModelForCausalLM"

    def __init__(self, name: str = "instruct", held_out: float = 0.1):
        self.name = name
        self.held_out = held_out

    def load_model(self, location: str) -> nn.Module:
        return load_for_task(location, "causal")

    def _split(self, tokenizer, data, eval_limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
        """(train, held-out) records: a seeded shuffle, the first `eval_limit` (default 10%) held out."""
        if data is None:
            raise PrunetuneError("instruction tuning needs --data (a JSON/JSONL of instruction/input/output records)")
        rows = read_records(data)
        random.Random(seed).shuffle(rows)
        n_eval = eval_limit or max(1, int(self.held_out * len(rows)))
        if len(rows) <= n_eval:
            raise PrunetuneError("no training records left after holding out the evaluation set")
        return rows[n_eval:], rows[:n_eval]

    def _loader(self, tokenizer, rows: list[dict], max_length: int, batch_size: int, seed: int | None = None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        enc = [encode(tokenizer, r, max_length) for r in rows]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return DataLoader(enc, batch_size=batch_size, shuffle=seed is not None, collate_fn=collate(pad), generator=gen)

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 4):
        train, _ = self._split(tokenizer, data, None, seed)
        return self._loader(tokenizer, train[:samples], max_length, batch_size)

    def loaders(self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed) -> Loaders:
        train, dev = self._split(tokenizer, data, eval_limit, seed)
        return Loaders(
            train=self._loader(tokenizer, train[:train_limit] if train_limit else train, max_length, batch_size, seed),
            dev=self._loader(tokenizer, dev, max_length, batch_size),
            sample=self._loader(tokenizer, train[:samples], max_length, max(1, batch_size // 2)),
        )

    def evaluate(self, model: nn.Module, loader) -> dict:
        return perplexity(model, loader)
