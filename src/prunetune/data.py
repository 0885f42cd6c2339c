"""Where a task's rows come from: data sources, training/dev splits, held-out rows, seeded subsets; and the
checks of a tokenizer and a sequence length against a model.

Reading files is tables.py's job, turning rows into batches each task's (prunetune.tasks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunetune.errors import PrunetuneError

DEFAULT_DEV_FRACTION = 0.1


@dataclass(frozen=True)
class DataSource:
    """Where a task's training and dev rows come from (the CLI's --data, --dev-data and --dev-fraction).

    - `path` a directory: its train and dev files (no dev file: dev rows are held out of the train file).
    - `path` a single file and no `dev_path`: the file is split into training rows and a seeded, held-out
      `dev_fraction` of dev rows (or of articles, for question answering), so a run never scores its model
      on rows it trained on.
    - `path` neither a file nor a directory: a `datasets` name, loaded where the hub is reachable.
    - `dev_path` given: the dev rows come from it (a file is used whole; a directory gives its dev file).
    - nothing: the sample bundled with prunetune, else the task's `datasets` name on the hub.
    """

    path: str | None = None
    dev_path: str | None = None
    dev_fraction: float = DEFAULT_DEV_FRACTION

    @classmethod
    def of(cls, data: str | Path | DataSource | None) -> DataSource:
        """A DataSource for what the tasks accept as `data`: a source, a path, or None."""
        if isinstance(data, DataSource):
            return data
        return cls(path=None if data is None else str(data))

    @property
    def held_out(self) -> bool:
        """Whether dev rows are held out of a single training file."""
        return self.path is not None and self.dev_path is None and Path(self.path).is_file()


@dataclass(frozen=True)
class Located:
    """The file (or hub/bundled source, `path` None or not on disk) one split is read from."""

    path: str | None
    held_out: bool  # the split is (dev) or excludes (train) a seeded held-out share of this training file


SplitFinder = Callable[[Path, str], "Path | None"]


def locate(source: DataSource, split: str, find: SplitFinder) -> Located:
    """Which file holds `split` ("train" or "dev") of a source; `find(directory, split)` names a directory's file.

    A directory without a dev file gives its dev rows the way a single file does: held out of its train file.
    """
    if split != "train" and source.dev_path is not None:
        dev = Path(source.dev_path)
        if not dev.exists():
            raise PrunetuneError(f"--dev-data {dev} does not exist")
        return Located(str(_need(find, dev, "dev") if dev.is_dir() else dev), False)
    if source.path is None:
        return Located(None, False)
    path = Path(source.path)
    if not path.exists():
        # a `datasets` name (the task's reader says whether it is one): like a file, its dev rows are held out of
        # its train split (many data sets have no validation split)
        return Located(source.path, source.dev_path is None)
    if path.is_file():
        return Located(str(path), source.dev_path is None)
    own_dev = find(path, "dev" if split == "train" else split)  # (a preset may have more dev splits: MNLI's)
    if split == "train" or own_dev is None:
        return Located(str(_need(find, path, "train")), own_dev is None and source.dev_path is None)
    return Located(str(own_dev), False)


def _need(find: SplitFinder, directory: Path, split: str) -> Path:
    found = find(directory, split)
    if found is None:
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise PrunetuneError(f"no {split} file in {directory} (it holds: {present})")
    return found


@dataclass
class SplitRows:
    """A loaded split and which rows of its source it took (0-based, in the source's order)."""

    dataset: Any  # the task's examples: a datasets.Dataset (classification) or a list of records
    source: str  # the file, or the hub split, the rows were read from
    rows: list[int]
    total: int  # examples in the source
    held_out: bool = False  # the dev rows held out of a single file, or the training rows left after that
    held_out_by: str = "row"  # what was held out whole: rows, or groups of rows (QA: articles)
    also: tuple[str, ...] = ()  # more files whose rows follow the source's (summarisation's --extra-train)

    def describe(self) -> dict[str, Any]:
        """For reports: the source, how many of its rows, and their 1-based numbers when not all were used (the
        rows of `also` files numbered on after the source's)."""
        every = len(self.rows) == self.total
        return {
            "source": self.source,
            "examples": len(self.rows),
            "of": self.total,
            "held_out": self.held_out,
            # 1 = the file's first example (after any header line)
            "rows": None if every else [i + 1 for i in self.rows],
            **({"also": list(self.also)} if self.also else {}),
        }


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: recognises a run's training file wherever it was copied to."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _held_out_count(n: int, fraction: float, what: str) -> int:
    if not 0 < fraction < 1:
        raise PrunetuneError(f"--dev-fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise PrunetuneError(f"{n} {what} cannot be split into training and dev {what}; pass --dev-data")
    return min(n - 1, max(1, round(fraction * n)))


def held_out_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the rows held out as dev: a seeded `fraction` of `n`, at least one either side."""
    n_dev = _held_out_count(n, fraction, "example(s)")
    # A generator of its own (seed, 1): the split does not move when a --train-limit subset is drawn with seed.
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:n_dev])


def held_out_groups(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the rows whose group (an article) is held out: a seeded `fraction` of the groups.

    Every row of a group goes to the same side, so no article is both trained on and scored.
    """
    names = list(dict.fromkeys(groups))  # first-seen order: the same for the same file
    n_dev = _held_out_count(len(names), fraction, "group(s) (articles)")
    held = {names[i] for i in np.random.default_rng([seed, 1]).permutation(len(names))[:n_dev]}
    return np.array([i for i, g in enumerate(groups) if g in held], dtype=np.int64)


def subset_index(n: int, limit: int, seed: int) -> np.ndarray:
    """Positions of a seeded random subset of `limit` of `n` rows, in their original order."""
    if limit < 1:
        raise PrunetuneError(f"limit must be positive, got {limit}")
    if limit >= n:
        return np.arange(n)
    # Shuffle with the seed and keep the first `limit`; sorting keeps the chosen rows in their file order.
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


# A model's embedding table may be padded past its tokenizer (to a multiple of 64 or 128 for fast matmuls:
# Qwen2 151,936 rows for 151,665 tokens, Pythia 50,304 for 50,277, T5 32,128 for 32,100: under 2% in every
# case known). A tokenizer with fewer than this share of the model's vocabulary is another model's.
MIN_VOCAB_SHARE = 0.9


def check_tokenizer(tokenizer: Any, model_or_config: Any) -> None:
    """Refuse a tokenizer that does not belong to the model.

    Two rules, both robust to the padding of embedding tables (see MIN_VOCAB_SHARE):
    - more tokens than the model has embedding rows: the tokenizer emits ids the model cannot look up;
    - fewer than MIN_VOCAB_SHARE of the model's vocabulary: it is another (smaller) model's tokenizer, whose
      ids mean other words to this model; nothing would fail, the numbers would just be meaningless.
    `model_or_config`: a model (its embedding rows are checked) or a config (its vocab_size).
    """
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(config, "vocab_size", None)
    rows = vocab_size
    embeddings = getattr(model_or_config, "get_input_embeddings", None)
    if callable(embeddings) and embeddings() is not None:
        rows = embeddings().weight.shape[0]
    if rows is None:
        return
    size = len(tokenizer)
    special = {t: i for t, i in zip(getattr(tokenizer, "all_special_tokens", []),
                                    getattr(tokenizer, "all_special_ids", []), strict=False)}
    outside = {t: i for t, i in special.items() if i is not None and i >= rows}
    if outside:  # a tokenizer whose special tokens were added past a smaller model's table
        token, index = next(iter(outside.items()))
        raise PrunetuneError(f"the tokenizer's special token {token} has id {index}, but the model has {rows} "
                             "embedding rows: the tokenizer does not belong to this model")
    if size > rows:
        raise PrunetuneError(
            f"tokenizer has {size} tokens but the model's vocabulary has {rows}: "
            "the tokenizer does not belong to this model"
        )
    if vocab_size and size < MIN_VOCAB_SHARE * vocab_size:
        raise PrunetuneError(
            f"tokenizer has {size} tokens, the model's vocabulary {vocab_size}: the tokenizer does not belong "
            "to this model (save the model's own tokenizer next to it)"
        )


# Learned position tables that do not start at 0: RoBERTa's positions begin after its padding index.
POSITION_OFFSET: dict[str, Callable[[Any], int]] = {
    "roberta": lambda config: (config.pad_token_id or 0) + 1,
    "xlm-roberta": lambda config: (config.pad_token_id or 0) + 1,
}


def max_positions(config: Any) -> int | None:
    """The longest input the model has positions for; None when unbounded (T5's relative positions)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    model_type = getattr(config, "prunetune_base_model_type", None) or getattr(config, "model_type", "")
    offset = POSITION_OFFSET.get(model_type)
    return positions - (offset(config) if offset else 0)


def check_max_length(max_length: int, config: Any) -> None:
    """Refuse a --max-length the model has no positions for (it would fail or read garbage mid-run)."""
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise PrunetuneError(f"--max-length {max_length} is longer than the model's {limit} positions")

