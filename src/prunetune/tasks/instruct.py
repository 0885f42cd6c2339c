"""Instruction tuning of a causal LM on Alpaca-style records, scored by held-out perplexity.

Records are {"instruction", "input", "output"} (JSON list or JSONL). The prompt is rendered with the
tokenizer's chat template when it has one (instruct models), else with the Alpaca template; only the
response tokens are trained on and scored (prompt positions carry the ignore label -100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunetune import models, tables
from prunetune.errors import PrunetuneError
from prunetune.tasks.base import Task
from prunetune.tasks.batching import IGNORE, causal_collate, seeded_loader
from prunetune.train import progress

ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


TEMPLATES = ("auto", "chat", "alpaca")


@dataclass(frozen=True)
class InstructOptions:
    """How a record becomes a prompt."""

    template: str = field(default="auto", metadata={
        "help": "prompt template: chat (the tokenizer's chat template), alpaca, or auto (chat where the "
                "tokenizer has one)"})

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise PrunetuneError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")


def read_records(path: str | Path) -> list[dict]:
    """Alpaca-style records from a JSON list or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise PrunetuneError(f"instruction data {path} is not a file (give a JSON or JSONL of records)")
    rows = tables.read_json(path)
    if not rows or not isinstance(rows, list):
        raise PrunetuneError(f"{path}: no records (expected a JSON list of records, or one per line)")
    missing = {"instruction", "output"} - set(rows[0]) if isinstance(rows[0], dict) else {"instruction", "output"}
    if missing:
        raise PrunetuneError(f"{path}: records need 'instruction' and 'output' fields (missing {sorted(missing)})")
    return rows


def render_prompt(tokenizer, record: dict, template: str = "auto") -> str:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise PrunetuneError("--template chat: the tokenizer has no chat template (use alpaca)")
    if template == "chat" or (template == "auto" and has_chat):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{ALPACA}### Instruction:\n{user}\n\n### Response:\n"


def encode(tokenizer, record: dict, max_length: int, template: str = "auto") -> dict:
    """input_ids with labels on the response tokens only (truncated to max_length)."""
    prompt = tokenizer(render_prompt(tokenizer, record, template), add_special_tokens=False)["input_ids"]
    answer = tokenizer(record["output"] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


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
    return {"perplexity": ppl, "nll": nll / max(count, 1), "tokens": count}


CAUSAL_FAMILIES = ("llama", "mistral", "qwen2")


class InstructTask(Task):
    """Instruction tuning: causal LM, response-only loss, held-out perplexity (lower is better)."""

    kind = "instruct"
    auto_class = "AutoModelForCausalLM"
    families = CAUSAL_FAMILIES
    options_class = InstructOptions
    metric_names = ("perplexity", "nll", "tokens")
    main_metric = "perplexity"
    maximize = False
    sample_batch_size = 4  # long sequences: the importance sample's batches stay small
    description = "instruction tuning of a causal LM on instruction/input/output records; held-out perplexity"

    def read_source(self, location: str | None, split: str) -> tuple[list[dict], str]:
        if location is None:
            raise PrunetuneError("instruction tuning needs --data (a JSON/JSONL of instruction/input/output records)")
        if Path(location).exists() or not tables.is_hub_name(location):
            return read_records(location), location
        table, name = tables.load_hub(location, None, "train" if split == "train" else "validation",
                                      task=self.name, given=True)
        tables.require_columns(("instruction", "output"), table.columns, name)
        return list(table), name

    def examples(self, records: list[dict], index: np.ndarray, split: str, source: str) -> list[dict]:
        return [records[i] for i in index]

    def load_model(self, location: str) -> nn.Module:
        return models.load_with_head(location, self.auto_class)

    def _loader(self, records: list[dict], tokenizer, max_length: int, batch_size: int, seed: int | None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        enc = [encode(tokenizer, r, max_length, self.options.template) for r in records]
        if not any(label != IGNORE for e in enc for label in e["labels"]):
            # every response cut off: the loss would be NaN and the perplexity of nothing
            longest = max(len(e["input_ids"]) for e in enc)
            raise PrunetuneError(f"no response token fits in --max-length {max_length}: the prompts fill it "
                                 f"(up to {longest} tokens); raise --max-length")
        return seeded_loader(enc, causal_collate(pad), batch_size, seed)

    def train_batches(self, examples, tokenizer, *, max_length: int, batch_size: int, seed: int | None):
        return self._loader(examples, tokenizer, max_length, batch_size, seed)

    def eval_batches(self, examples, tokenizer, *, max_length: int, batch_size: int):
        return self._loader(examples, tokenizer, max_length, batch_size, None)

    def score(self, model: nn.Module, loader) -> dict[str, float]:
        return perplexity(model, loader)
