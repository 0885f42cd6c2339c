"""GLUE classification as text-to-text, T5's own form: "sst2 sentence: ..." -> "positive".

An encoder-decoder trains on the label word as its target (the ordinary seq2seq loss) and is scored by
which label word it finds most likely: the summed log-probability of each class's target tokens, teacher
forced. Ranking whole label words (not generating) makes the prediction always one of the classes and
the metric exactly GLUE's, with no string matching.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from prunetune.data import SplitRows, load_task_rows
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.models import load_for_task
from prunetune.tasks import EVAL_BATCH_SIZE, GlueTask, Loaders, describe_data
from prunetune.train import progress

# T5's GLUE label words (its preprocessors), in the order of each task's label ids.
LABEL_WORDS = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
}


class Text2TextGlueTask(GlueTask):
    """A GLUE classification task for an encoder-decoder, with label words as targets."""

    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(self, name: str):
        super().__init__(name)
        if self.name not in LABEL_WORDS:
            raise PrunetuneError(f"task {self.name} has no text-to-text form here (regression): use a classifier")
        self.words = LABEL_WORDS[self.name]
        self._targets: list[list[int]] | None = None

    def load_model(self, location: str) -> nn.Module:
        return load_for_task(location, "seq2seq")

    def _sources(self, ds) -> list[str]:
        names = ("sentence",) if "text_b" not in ds.column_names else ("sentence1", "sentence2")
        cols = [ds["text_a"]] + ([ds["text_b"]] if "text_b" in ds.column_names else [])
        return [f"{self.name} " + " ".join(f"{n}: {t}" for n, t in zip(names, texts, strict=True))
                for texts in zip(*cols, strict=True)]

    def targets(self, tokenizer) -> list[list[int]]:
        """Token ids of each class's label word (with the end-of-sequence token the tokenizer adds)."""
        if self._targets is None:
            self._targets = [tokenizer(w).input_ids for w in self.words]
            if len({tuple(t) for t in self._targets}) < len(self.words):
                raise PrunetuneError(f"the tokenizer cannot tell the label words {self.words} apart")
        return self._targets

    def labels(self) -> list[str]:
        """The label words the model generates (what an export records)."""
        return list(self.words)

    def _dataset(self, tokenizer, split: str, data, limit, max_length: int, seed: int
                 ) -> tuple[list[dict], SplitRows]:
        rows = load_task_rows(self.spec, split, data, limit=limit, seed=seed)
        ds = rows.dataset
        if len(ds) == 0:
            raise PrunetuneError(f"the {split} split of {self.name} is empty")
        enc = tokenizer(self._sources(ds), truncation=True, max_length=max_length)
        targets = self.targets(tokenizer)
        examples = [{"input_ids": ids, "attention_mask": mask, "class": int(label), "labels": targets[int(label)]}
                    for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], ds["label"], strict=True)]
        return examples, rows

    @staticmethod
    def _loader(rows: list[dict], tokenizer, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
        pad = tokenizer.pad_token_id

        def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
            def padded(key: str, value: int) -> torch.Tensor:
                width = max(len(b[key]) for b in batch)
                return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch])

            return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                    "labels": padded("labels", -100)}  # -100: padded target positions carry no loss

        generator = torch.Generator().manual_seed(seed)
        return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)

    def sample_loader(self, tokenizer, *, data, samples: int, max_length: int, seed: int, batch_size: int = 16):
        rows, _ = self._dataset(tokenizer, "train", data, samples, max_length, seed)
        return self._loader(rows, tokenizer, batch_size, shuffle=False)

    def eval_loader(self, tokenizer, *, data, eval_limit, max_length, seed, batch_size: int = EVAL_BATCH_SIZE):
        dev, _ = self._dataset(tokenizer, "dev", data, eval_limit, max_length, seed)
        # the dev loader carries every class's target and the true classes, so scoring needs no tokenizer
        return _ScoringLoader(self._loader(dev, tokenizer, batch_size, shuffle=False), dev, self.targets(tokenizer))

    def loaders(self, tokenizer, *, data, train_limit, eval_limit, samples, max_length, batch_size, seed,
                eval_batch_size: int = EVAL_BATCH_SIZE) -> Loaders:
        train, train_rows = self._dataset(tokenizer, "train", data, train_limit, max_length, seed)
        dev, dev_rows = self._dataset(tokenizer, "dev", data, eval_limit, max_length, seed)
        targets = self.targets(tokenizer)
        return Loaders(
            train=self._loader(train, tokenizer, batch_size, shuffle=True, seed=seed),
            dev=_ScoringLoader(self._loader(dev, tokenizer, eval_batch_size, shuffle=False), dev, targets),
            sample=self.sample_loader(tokenizer, data=data, samples=samples, max_length=max_length, seed=seed),
            data=describe_data(data, train_rows, dev_rows, seed),
        )

    def evaluate(self, model: nn.Module, loader: _ScoringLoader) -> dict:
        scores = class_scores(model, loader, loader.targets)
        return compute_metrics(self.spec, scores, np.array(loader.classes))


class _ScoringLoader:
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
