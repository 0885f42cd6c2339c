"""Abstractive summarisation (CNN/DailyMail style): generate a summary of an article, scored with ROUGE.

Rows carry an article and its reference summary (`article` and `highlights` by default: CNN/DailyMail's columns) in
CSV, TSV, JSON, JSONL or Parquet. Two forms, one options class:

- an encoder-decoder (T5, `AutoModelForSeq2SeqLM`) reads `--prefix` + the article (T5's `summarize: `) cut to
  --max-length tokens, and learns the summary (at most --max-target-length tokens) as its target;
- a decoder-only model (LLaMA, Mistral, Qwen2, `AutoModelForCausalLM`) reads a prompt, the instruction task's
  template (the tokenizer's chat template, else Alpaca's) around `--instruction` and the article, and learns the
  summary after it: only the summary's tokens (and the end-of-sequence token) carry loss. --max-length bounds the
  prompt, whose article is cut to fit; the summary comes on top of it.

Evaluation generates (greedy, or beam search with --num-beams) at most --max-new-tokens tokens per article, in
batches (a decoder-only model's padded on the left), and scores ROUGE-1/2/L/Lsum F-measures x100 with stemming
(metrics.rouge_metrics). The main metric is ROUGE-L: unlike Lsum it does not depend on how the generated text is cut
into sentences, and unlike ROUGE-1/2 it rewards the order of what is kept.
Without --data the task reads CNN/DailyMail 3.0.0 (`abisee/cnn_dailymail`) from the hub where it is reachable;
--extra-train adds files of rows to the training split (never to the dev rows).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from prunetune import models, tables
from prunetune.errors import PrunetuneError
from prunetune.metrics import ROUGE_TYPES, rouge_metrics
from prunetune.tasks.base import Task
from prunetune.tasks.batching import IGNORE, Collate, EvalBatches, causal_collate, seeded_loader, seq2seq_collate
from prunetune.tasks.instruct import CAUSAL_FAMILIES, TEMPLATES, render_prompt
from prunetune.train import progress

HUB_NAME, HUB_CONFIG = "abisee/cnn_dailymail", "3.0.0"
_SLOT = "\x00article\x00"  # where the article goes in a rendered prompt (split out before tokenizing)


def _positive(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunetuneError(f"--{name.replace('_', '-')} must be a positive whole number, got {value}")


@dataclass(frozen=True)
class SummarizeOptions:
    """Columns, prompts, lengths and decoding of summarisation."""

    article_column: str = field(default="article", metadata={"help": "the column holding the text to summarise"})
    summary_column: str = field(default="highlights", metadata={"help": "the column holding its reference summary"})
    extra_train: tuple[str, ...] | None = field(default=None, metadata={
        "metavar": "FILE", "help": "more files of training rows (same columns), added to the training split only"})
    prefix: str = field(default="summarize: ", metadata={
        "help": "encoder-decoders: the text put before the article (T5's task prefix)"})
    instruction: str = field(default="Summarize the following news article in a few sentences.", metadata={
        "help": "decoder-only models: the instruction the prompt template puts before the article"})
    template: str = field(default="auto", metadata={
        "help": "prompt template: chat (the tokenizer's chat template), alpaca, or auto (chat where the "
                "tokenizer has one)"})
    max_target_length: int = field(default=128, metadata={"help": "tokens of a reference summary trained on"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "tokens generated per summary at most (default: --max-target-length)"})
    num_beams: int = field(default=1, metadata={"help": "beam search width when generating (1: greedy)"})
    generation_batch_size: int = field(default=8, metadata={
        "help": "articles generated for at once (generation keeps a cache per row: smaller than training batches)"})

    def __post_init__(self) -> None:
        for name in ("article_column", "summary_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise PrunetuneError(f"--{name.replace('_', '-')} must name a column")
        extra = self.extra_train
        if isinstance(extra, str):
            extra = (extra,)
        if extra is not None:  # a JSON record gives a list
            extra = tuple(str(p) for p in extra)
            if not extra:
                raise PrunetuneError("--extra-train needs at least one file")
        object.__setattr__(self, "extra_train", extra)
        if self.template not in TEMPLATES:
            raise PrunetuneError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        for name in ("max_target_length", "num_beams", "generation_batch_size"):
            _positive(name, getattr(self, name))
        _positive("max_new_tokens", self.max_new_tokens, optional=True)

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_target_length


class SummarizeTask(Task):
    """What both forms share: reading rows, ROUGE of generated summaries. A form encodes and generates."""

    options_class = SummarizeOptions
    metric_names = (*ROUGE_TYPES, "gen_length")
    main_metric = "rougeL"
    sample_batch_size = 4  # long sequences: the importance sample's batches stay small
    description = ("abstractive summarisation (article/highlights rows): seq2seq on T5, prompt + causal LM on "
                   "decoders; ROUGE-1/2/L/Lsum")

    # ---- data ---------------------------------------------------------------------------------------------

    def _rows(self, location: str, source: str) -> list[dict]:
        path = Path(location)
        if not path.is_file():
            raise PrunetuneError(f"{source} {location} is not a file")
        table = tables.read_table(path)
        tables.require_columns((self.options.article_column, self.options.summary_column), table.columns, location)
        return list(table)

    def read_source(self, location: str | None, split: str) -> tuple[list[dict], str]:
        if location is not None and (Path(location).exists() or not tables.is_hub_name(location)):
            records, name = self._rows(location, "data file"), location
        else:
            table, name = tables.load_hub(location or HUB_NAME, None if location else HUB_CONFIG,
                                          "train" if split == "train" else "validation", task=self.name,
                                          given=location is not None)
            tables.require_columns((self.options.article_column, self.options.summary_column), table.columns, name)
            records = list(table)
        return records, name

    def more_records(self, split: str) -> tuple[list[dict], tuple[str, ...]]:
        files = self.options.extra_train or () if split == "train" else ()
        return [r for f in files for r in self._rows(f, "--extra-train")], files

    def examples(self, records: list[dict], index: np.ndarray, split: str, source: str) -> list[dict]:
        out = []
        for i in index:
            row = records[i]
            pair = {}
            for key, column in (("article", self.options.article_column), ("summary", self.options.summary_column)):
                value = row.get(column)
                if not isinstance(value, str) or not value.strip():
                    raise PrunetuneError(f"{source}: row {i + 1} has no text in column {column!r}")
                pair[key] = value.strip()
            out.append(pair)
        return out

    def load_model(self, location: str) -> nn.Module:
        return models.load_with_head(location, self.auto_class)

    # ---- batches (a form says how a model reads an article and where its summary starts) -------------------

    @abstractmethod
    def source_ids(self, tokenizer: Any, article: str, max_length: int) -> list[int]:
        """What the model reads of an article: its input when trained and when generating."""

    @abstractmethod
    def generation_collate(self, tokenizer: Any) -> Collate:
        """Batches of `source_ids` rows to generate from."""

    @staticmethod
    @abstractmethod
    def generated(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The new tokens of generate()'s output for a batch of inputs."""

    def eval_batches(self, examples: list[dict], tokenizer: Any, *, max_length: int, batch_size: int) -> Generations:
        rows = [self.source_ids(tokenizer, e["article"], max_length) for e in examples]
        loader = seeded_loader([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows],
                               self.generation_collate(tokenizer), min(batch_size, self.options.generation_batch_size),
                               None)
        return Generations(loader, examples, tokenizer)

    # ---- scoring ------------------------------------------------------------------------------------------

    def end_token(self, tokenizer: Any, model: nn.Module) -> int | list[int] | None:
        """What ends a generated summary: the tokenizer's end-of-sequence token, else the model's."""
        eos = tokenizer.eos_token_id
        return eos if eos is not None else getattr(model.generation_config, "eos_token_id", None)

    @torch.no_grad()
    def summaries(self, model: nn.Module, loader: Generations) -> tuple[list[str], list[int]]:
        """The model's summary of every article of the loader, and how many tokens each took."""
        device = next(model.parameters()).device
        tokenizer = loader.tokenizer
        eos = self.end_token(tokenizer, model)
        ends = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(ends), 0)
        model.eval()
        texts, lengths = [], []
        for batch in progress(loader, desc="generate"):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=self.options.new_tokens, num_beams=self.options.num_beams,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos)
            for row in self.generated(out, batch["input_ids"]).tolist():
                cut = next((i for i, t in enumerate(row) if t in ends), len(row))
                lengths.append(cut)
                texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts, lengths

    def score(self, model: nn.Module, loader: Generations) -> dict[str, float]:
        texts, lengths = self.summaries(model, loader)
        metrics = rouge_metrics(texts, [e["summary"] for e in loader.examples])
        metrics["gen_length"] = float(np.mean(lengths))
        return metrics


class Seq2SeqSummarizeTask(SummarizeTask):
    """Summarisation by an encoder-decoder: prefix + article in, the summary as the target."""

    kind = "summarize_seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    families = ("t5",)

    def source_ids(self, tokenizer: Any, article: str, max_length: int) -> list[int]:
        return tokenizer(self.options.prefix + article, truncation=True, max_length=max_length)["input_ids"]

    def target_ids(self, tokenizer: Any, summary: str) -> list[int]:
        # the tokenizer adds T5's end-of-sequence token, which the cut keeps
        return tokenizer(summary, truncation=True, max_length=self.options.max_target_length)["input_ids"]

    def train_batches(self, examples: list[dict], tokenizer: Any, *, max_length: int, batch_size: int,
                      seed: int | None) -> DataLoader:
        rows = []
        for e in examples:
            ids = self.source_ids(tokenizer, e["article"], max_length)
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": self.target_ids(tokenizer, e["summary"])})
        return seeded_loader(rows, seq2seq_collate(tokenizer.pad_token_id), batch_size, seed)

    def generation_collate(self, tokenizer: Any) -> Collate:
        return seq2seq_collate(tokenizer.pad_token_id)

    @staticmethod
    def generated(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return out[:, 1:]  # after the decoder's start token

    def example_inputs(self, config, batch_size: int, seq_len: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(config, batch_size, seq_len, seed=seed)
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :self.options.max_target_length]
        return inputs


class CausalSummarizeTask(SummarizeTask):
    """Summarisation by a decoder-only model: a prompt with the article, the summary after it (its loss only)."""

    kind = "summarize_causal"
    auto_class = "AutoModelForCausalLM"
    families = CAUSAL_FAMILIES

    def source_ids(self, tokenizer: Any, article: str, max_length: int) -> list[int]:
        """The prompt's tokens, its article cut so that the whole prompt fits in `max_length`."""
        rendered = render_prompt(tokenizer, {"instruction": self.options.instruction, "input": _SLOT},
                                 self.options.template)
        head, tail = rendered.split(_SLOT)
        ids = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (head, article, tail)]
        room = max_length - len(ids[0]) - len(ids[2])
        if room < 1:
            raise PrunetuneError(f"the prompt template takes {len(ids[0]) + len(ids[2])} tokens: no room for the "
                                 f"article in --max-length {max_length}; raise --max-length")
        return ids[0] + ids[1][:room] + ids[2]

    def target_ids(self, tokenizer: Any, summary: str) -> list[int]:
        ids = tokenizer(summary, add_special_tokens=False)["input_ids"][:self.options.max_target_length - 1]
        return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])

    def train_batches(self, examples: list[dict], tokenizer: Any, *, max_length: int, batch_size: int,
                      seed: int | None) -> DataLoader:
        rows = []
        for e in examples:
            prompt, target = self.source_ids(tokenizer, e["article"], max_length), self.target_ids(tokenizer,
                                                                                                   e["summary"])
            rows.append({"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target})
        return seeded_loader(rows, causal_collate(_pad_id(tokenizer)), batch_size, seed)

    def generation_collate(self, tokenizer: Any) -> Collate:
        return causal_collate(_pad_id(tokenizer), left=True)  # new tokens follow every row's last prompt token

    @staticmethod
    def generated(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return out[:, inputs.shape[1]:]


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class Generations(EvalBatches):
    """Evaluation batches of articles to summarise, with their rows (the references) and the tokenizer that
    reads the generated tokens."""

    def __init__(self, loader: DataLoader, examples: list[dict], tokenizer: Any):
        super().__init__(loader, examples)
        self.tokenizer = tokenizer
