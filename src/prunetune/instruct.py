"""Instruction tuning of a causal LM on Alpaca-style records, scored by held-out perplexity.

Records are {"instruction", "input", "output"} (JSON list or JSONL). The prompt is rendered with the
tokenizer's chat template when it has one (instruct models), else with the Alpaca template; only the
response tokens are trained on and scored (prompt positions carry the ignore label -100).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from prunetune.data import DataSource, SplitRows, held_out_rows, subset_index
from prunetune.errors import PrunetuneError
from prunetune.models import load_for_task
from prunetune.tasks import EVAL_BATCH_SIZE, Loaders, describe_data
from prunetune.train import progress

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
    for batch in progress(loader, desc="evaluate"):
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

    def __init__(self, name: str = "instruct"):
        self.name = name

    def load_model(self, location: str) -> nn.Module:
        return load_for_task(location, "causal")

    def labels(self) -> list[str]:
        return []

    @staticmethod
    def _rows(records: list[dict], index, source: str, total: int, held_out: bool, limit: int | None, seed: int
              ) -> SplitRows:
        index = np.asarray(index, dtype=np.int64)
        if limit is not None:
            index = index[subset_index(len(index), limit, seed)]
        return SplitRows([records[i] for i in index], source, index.tolist(), total, held_out)

    def _split(self, data, seed: int, train_limit: int | None = None, eval_limit: int | None = None
               ) -> tuple[SplitRows, SplitRows]:
        """(train, held-out) records: --dev-data, else a seeded --dev-fraction held out of the one file."""
        source = DataSource.of(data)
        if source.path is None:
            raise PrunetuneError("instruction tuning needs --data (a JSON/JSONL of instruction/input/output records)")
        rows = read_records(source.path)
        if source.dev_path is not None:
            dev_rows = read_records(source.dev_path)
            return (self._rows(rows, range(len(rows)), source.path, len(rows), False, train_limit, seed),
                    self._rows(dev_rows, range(len(dev_rows)), source.dev_path, len(dev_rows), False, eval_limit,
                               seed))
        dev = held_out_rows(len(rows), source.dev_fraction, seed)
        train = np.setdiff1d(np.arange(len(rows)), dev)
        return (self._rows(rows, train, source.path, len(rows), True, train_limit, seed),
                self._rows(rows, dev, source.path, len(rows), True, eval_limit, seed))

    def _loader(self, tokenizer, rows: list[dict], max_length: int, batch_size: int, seed: int | None = None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        enc = [encode(tokenizer, r, max_length) for r in rows]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return DataLoader(enc, batch_size=batch_size, shuffle=seed is not None, collate_fn=collate(pad), generator=gen)

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 4):
        train, _ = self._split(data, seed, train_limit=samples)
        return self._loader(tokenizer, train.dataset, max_length, batch_size)

    def eval_loader(self, tokenizer, *, data, eval_limit, max_length, seed, batch_size: int = EVAL_BATCH_SIZE):
        source = DataSource.of(data)
        if source.path is None and source.dev_path is not None:  # records to score, all of them (evaluate)
            records = read_records(source.dev_path)
            dev = self._rows(records, range(len(records)), source.dev_path, len(records), False, eval_limit, seed)
        else:
            _, dev = self._split(data, seed, eval_limit=eval_limit)
        return self._loader(tokenizer, dev.dataset, max_length, batch_size)

    def loaders(self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed,
                eval_batch_size: int = EVAL_BATCH_SIZE) -> Loaders:
        train, dev = self._split(data, seed, train_limit, eval_limit)
        return Loaders(
            train=self._loader(tokenizer, train.dataset, max_length, batch_size, seed),
            dev=self._loader(tokenizer, dev.dataset, max_length, eval_batch_size),
            sample=self.sample_loader(tokenizer, data=data, samples=samples, max_length=max_length, seed=seed,
                                      batch_size=max(1, batch_size // 2)),
            data=describe_data(data, train, dev, seed),
        )

    def evaluate(self, model: nn.Module, loader) -> dict:
        return perplexity(model, loader)
