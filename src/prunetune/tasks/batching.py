"""Batching shared by the generative tasks: padding of token rows, loss masks and seeded loaders.

A decoder-only model is trained on prompt + target with the prompt's positions labelled IGNORE (no loss); an
encoder-decoder on its source with the target as labels. Generation batches of a decoder-only model are padded on
the left, so every row's last position is its last prompt token and new tokens follow it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader

IGNORE = -100  # the label cross-entropy skips: prompt and padding positions carry no loss

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


def padded(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    """Rows of token ids as one tensor, filled with `value` on the right (or the left) to the longest row."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, slice(width - len(r), width) if left else slice(0, len(r))] = torch.tensor(r, dtype=torch.long)
    return out


def causal_collate(pad_id: int, *, left: bool = False) -> Collate:
    """input_ids, attention_mask and (where the rows have them) labels of decoder-only rows; `left` pads on the
    left (generation)."""

    def fn(features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": padded(ids, pad_id, left=left),
                 "attention_mask": padded([[1] * len(r) for r in ids], 0, left=left)}
        if "labels" in features[0]:
            batch["labels"] = padded([f["labels"] for f in features], IGNORE, left=left)
        return batch

    return fn


def seq2seq_collate(pad_id: int) -> Collate:
    """input_ids and attention_mask of encoder-decoder rows padded on the right, and their targets as labels
    (padded target positions carry no loss); rows without labels give none."""

    def fn(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": padded([f["input_ids"] for f in features], pad_id),
                 "attention_mask": padded([f["attention_mask"] for f in features], 0)}
        if "labels" in features[0]:
            batch["labels"] = padded([f["labels"] for f in features], IGNORE)
        return batch

    return fn


def seeded_loader(rows: list, collate: Collate, batch_size: int, seed: int | None) -> DataLoader:
    """Batches of `rows`, shuffled by `seed` (None: in order); the loader's generator carries the seed, which
    the training loop reads to order the data the same way on every rank and after a resume."""
    generator = torch.Generator().manual_seed(seed or 0)
    return DataLoader(rows, batch_size=batch_size, shuffle=seed is not None, collate_fn=collate, generator=generator)


class EvalBatches:
    """Evaluation batches with the rows they were made from (the contract's eval_batches: iterable batches,
    `len()` batches, `.dataset` the examples scored); tasks add what their scoring reads besides the batches."""

    def __init__(self, loader: DataLoader, examples: list):
        self.loader, self.examples = loader, examples

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> list:
        return self.examples
