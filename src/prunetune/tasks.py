"""Tasks as the recipes see them: which head to load, which batches to train on, how to score.

Three kinds today: GLUE classification/regression (data.py, metrics.py), the same tasks as text-to-text
for encoder-decoders (text2text.py), and instruction tuning of a causal LM scored by held-out perplexity
(instruct.py). Extractive QA and seq2seq summarisation plug in here
the same way: a class with `load_model`, `loaders` and `evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from prunetune.data import get_task, load_split, make_loader, tokenize
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.models import load_for_task, model_kind
from prunetune.train import predict


@dataclass
class Loaders:
    """Training batches, evaluation batches, and the small sample importance is scored on."""

    train: object
    dev: object
    sample: object


class Task(Protocol):
    name: str
    main_metric: str
    maximize: bool
    auto_class: str  # the stock Auto class an export of this task loads with

    def load_model(self, location: str) -> nn.Module: ...

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 16): ...

    def loaders(
        self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed
    ) -> Loaders: ...

    def evaluate(self, model: nn.Module, loader) -> dict: ...


class GlueTask:
    """A GLUE task: sequence classification (or regression for STS-B), scored with GLUE's metrics."""

    main_metric = "main"
    maximize = True
    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, name: str):
        self.spec = get_task(name)
        self.name = self.spec.name

    def load_model(self, location: str) -> nn.Module:
        return load_for_task(location, "classify", self.spec.num_labels, self.spec.is_regression)

    def _split(self, tokenizer, name: str, data, limit: int | None, max_length: int, seed: int):
        ds = tokenize(load_split(self.spec, name, data, limit=limit, seed=seed), tokenizer, max_length)
        if len(ds) == 0:
            raise PrunetuneError(f"the {name} split of {self.name} is empty")
        return ds

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 16):
        """A seeded sample of labelled training batches (what importance is scored on)."""
        ds = self._split(tokenizer, "train", data, samples, max_length, seed)
        return make_loader(ds, tokenizer, batch_size, shuffle=False)

    def loaders(self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed) -> Loaders:
        train = self._split(tokenizer, "train", data, train_limit, max_length, seed)
        dev = self._split(tokenizer, "dev", data, eval_limit, max_length, seed)
        return Loaders(
            train=make_loader(train, tokenizer, batch_size, shuffle=True, seed=seed),
            dev=make_loader(dev, tokenizer, 64, shuffle=False),
            sample=self.sample_loader(tokenizer, data=data, samples=samples, max_length=max_length, seed=seed),
        )

    def evaluate(self, model: nn.Module, loader) -> dict:
        return compute_metrics(self.spec, *predict(model, loader))


INSTRUCT_NAMES = ("instruct", "alpaca")


def get(name: str) -> Task:
    """The task object for a task name (GLUE names, or 'instruct' for instruction tuning)."""
    if name in INSTRUCT_NAMES:
        from prunetune.instruct import InstructTask

        return InstructTask(name)
    return GlueTask(name)


def for_model(name: str, location: str) -> Task:
    """The task for a checkpoint: GLUE on an encoder-decoder LM (T5) is text-to-text, its native form."""
    if name not in INSTRUCT_NAMES and model_kind(location) == "seq2seq":
        from prunetune.text2text import Text2TextGlueTask

        return Text2TextGlueTask(name)
    return get(name)
