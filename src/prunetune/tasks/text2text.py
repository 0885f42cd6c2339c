"""Classification as text-to-text, T5's own form: "sst2 sentence: ..." -> "positive".

An encoder-decoder trains on the label word as its target (the ordinary seq2seq loss) and is scored by which
label word it finds most likely: the summed log-probability of each class's target tokens, teacher forced.
Ranking whole label words (not generating) makes the prediction always one of the classes and the metric exactly
the classifier's, with no string matching. GLUE presets use T5's own label words; the user's data its label names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from prunetune import models
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.tasks.batching import seeded_loader, seq2seq_collate
from prunetune.tasks.classify import ClassifyTask
from prunetune.tasks.glue import LABEL_WORDS
from prunetune.train import progress

DECODER_STEPS = 2  # what a benchmark decodes per example: a one-token label word and its end-of-sequence token


class Text2TextTask(ClassifyTask):
    """A classification task for an encoder-decoder, with label words as targets."""

    kind = "text2text"
    auto_class = "AutoModelForSeq2SeqLM"
    families = ("t5",)
    description = "classification as text-to-text for encoder-decoders (label words as targets)"

    def __init__(self, name: str, options=None, preset=None):
        super().__init__(name, options, preset)
        if preset is not None and preset.name not in LABEL_WORDS:
            raise PrunetuneError(f"task {name} has no text-to-text form here: use a classifier")
        self._targets: list[list[int]] | None = None

    def words(self) -> list[str]:
        """The label word of each class: T5's for a GLUE preset, else the class names themselves."""
        return list(LABEL_WORDS[self.preset.name]) if self.preset is not None else self.classes()

    def labels(self) -> list[str]:
        """The label words the model generates (what an export records)."""
        return self.words()

    def adopt(self, record: dict | None, config: Any) -> None:
        if self.preset is None:  # the recorded label words are the class names
            names = list((record or {}).get("labels") or [])
            if not names:
                raise PrunetuneError(f"the model records no label words: task {self.name} cannot score it")
            self._labels = names

    def load_model(self, location: str) -> nn.Module:
        return models.load_with_head(location, self.auto_class)

    def targets(self, tokenizer) -> list[list[int]]:
        """Token ids of each class's label word (with the end-of-sequence token the tokenizer adds)."""
        if self._targets is None:
            words = self.words()
            self._targets = [tokenizer(w).input_ids for w in words]
            if len({tuple(t) for t in self._targets}) < len(words):
                raise PrunetuneError(f"the tokenizer cannot tell the label words {words} apart")
        return self._targets

    def _sources(self, ds: datasets.Dataset) -> list[str]:
        names = ("sentence",) if "text_b" not in ds.column_names else ("sentence1", "sentence2")
        cols = [ds["text_a"]] + ([ds["text_b"]] if "text_b" in ds.column_names else [])
        return [f"{self.name} " + " ".join(f"{n}: {t}" for n, t in zip(names, texts, strict=True))
                for texts in zip(*cols, strict=True)]

    def _encode(self, ds: datasets.Dataset, tokenizer, max_length: int) -> list[dict]:
        enc = tokenizer(self._sources(ds), truncation=True, max_length=max_length)
        targets = self.targets(tokenizer)
        return [{"input_ids": ids, "attention_mask": mask, "class": int(label), "labels": targets[int(label)]}
                for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], ds["label"], strict=True)]

    @staticmethod
    def _loader(rows: list[dict], tokenizer, batch_size: int, *, seed: int | None) -> DataLoader:
        return seeded_loader(rows, seq2seq_collate(tokenizer.pad_token_id), batch_size, seed)

    def train_batches(self, examples, tokenizer, *, max_length: int, batch_size: int, seed: int | None):
        return self._loader(self._encode(examples, tokenizer, max_length), tokenizer, batch_size, seed=seed)

    def eval_batches(self, examples, tokenizer, *, max_length: int, batch_size: int) -> ScoringLoader:
        rows = self._encode(examples, tokenizer, max_length)
        # the dev loader carries every class's target and the true classes, so scoring needs no tokenizer
        return ScoringLoader(self._loader(rows, tokenizer, batch_size, seed=None), rows, self.targets(tokenizer))

    def score(self, model: nn.Module, loader: ScoringLoader) -> dict[str, float]:
        scores = class_scores(model, loader, loader.targets)
        return compute_metrics(self.metric_names, scores, np.array(loader.classes))

    def example_inputs(self, config, batch_size: int, seq_len: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(config, batch_size, seq_len, seed=seed)
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :DECODER_STEPS]
        return inputs


class ScoringLoader:
    """Dev batches plus what scoring them needs: each class's target tokens and the true classes."""

    def __init__(self, loader: DataLoader, rows: list[dict], targets: list[list[int]]):
        self.loader, self.targets, self.classes = loader, targets, [r["class"] for r in rows]

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset


@torch.no_grad()
def class_scores(model: nn.Module, batches: Iterable[dict], targets: list[list[int]]) -> np.ndarray:
    """(examples, classes): the summed log-probability of each class's target, teacher forced."""
    device = next(model.parameters()).device
    model.eval()
    out: list[np.ndarray] = []
    for batch in progress(batches, desc="evaluate"):
        enc = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        n = enc["input_ids"].shape[0]
        per_class = []
        for target in targets:
            labels = torch.tensor([target] * n, device=device)
            logp = model(**enc, labels=labels).logits.float().log_softmax(-1)
            per_class.append(logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1))
        out.append(torch.stack(per_class, -1).cpu().numpy())
    return np.concatenate(out)
