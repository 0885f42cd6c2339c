"""Checkpoints on disk: one folder per run, one sub-folder per checkpoint, written atomically; never pickle.

A run's output directory is written atomically at the end (export.atomic_dir), so checkpoints, which must
survive a killed run, live in a folder of their own: ``OUT.checkpoints`` next to ``--out`` by default. The
folder carries prunetune's marker (only such a folder is ever written into or removed) and holds::

    step-00000012/   tensors.safetensors  every tensor of the run state (weights, optimizer moments, RNG, ...)
                     state.json           the rest of the run state, tensors replaced by references
                     config.json          the run's configuration (config.RunConfig.to_dict)

A checkpoint is written into a hidden temporary sibling (``.step-00000012.tmp``), its files flushed to disk,
then renamed into place: a folder named ``step-*`` is complete, a kill leaves at most a temporary, which the
next run removes. The newest K are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prunetune.errors import PrunetuneError
from prunetune.state import RunState

MARKER = "prunetune_checkpoints.json"
PREFIX = "step-"
TENSORS, STATE, CONFIG = "tensors.safetensors", "state.json", "config.json"


def default_dir(out: str | Path) -> Path:
    """Where a run's checkpoints go by default: OUT.checkpoints, next to OUT."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}.checkpoints"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The checkpoints of one run."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    # -- the folder ------------------------------------------------------------------------------------

    def is_ours(self) -> bool:
        return (self.directory / MARKER).is_file()

    def create(self, *, overwrite: bool = False) -> None:
        """Make the folder for a new run. Refused: a folder prunetune did not make, and (without `overwrite`) one
        that still holds another run's checkpoints, which --resume would continue."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise PrunetuneError(f"checkpoint path {d} exists and is not a directory")
        if d.is_dir() and any(d.iterdir()):
            if not self.is_ours():
                raise PrunetuneError(f"checkpoint directory {d} was not made by prunetune (no {MARKER}); choose "
                                     "another --checkpoint-dir")
            if self.checkpoints() and not overwrite:
                raise PrunetuneError(f"checkpoint directory {d} holds the checkpoints of an earlier run: continue it "
                                     f"with --resume {d}, or start again with --overwrite")
            self.remove()
        d.mkdir(parents=True, exist_ok=True)
        (d / MARKER).write_text(json.dumps({"prunetune": "checkpoints", "layout": STATE}))
        self._clean()

    def open(self) -> None:
        """Use an existing folder (--resume): it must be prunetune's."""
        if not self.directory.is_dir():
            raise PrunetuneError(f"--resume: {self.directory} is not a directory")
        if not self.is_ours():
            raise PrunetuneError(f"--resume: {self.directory} is not a prunetune checkpoint directory (no {MARKER})")
        self._clean()

    @classmethod
    def for_resume(cls, path: str | Path, keep: int = 2) -> tuple[CheckpointStore, Path]:
        """The store and the checkpoint --resume PATH names: a checkpoint folder (its newest complete checkpoint),
        or one checkpoint in it."""
        path = Path(path)
        if path.name.startswith(PREFIX) and (path / STATE).is_file():
            store = cls(path.parent, keep)
            store.open()
            return store, path
        store = cls(path, keep)
        store.open()
        return store, store.latest()

    def remove(self) -> None:
        """Delete the folder (only ever prunetune's own)."""
        if self.is_ours():
            shutil.rmtree(self.directory)

    def _clean(self) -> None:
        """Remove the temporaries of a checkpoint a kill interrupted."""
        for path in self.directory.glob(f".{PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    # -- checkpoints -----------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        found = [p for p in self.directory.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path:
        found = self.checkpoints()
        if not found:
            raise PrunetuneError(f"--resume: no complete checkpoint in {self.directory}")
        return found[-1]

    def save(self, state: RunState, config: dict) -> Path:
        """Write `state` and the run's configuration as a new checkpoint; keep the newest `keep`."""
        from safetensors.torch import save_file

        meta, tensors = state.to_payload()
        name = f"{PREFIX}{state.step:08d}"
        tmp = self.directory / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(meta))
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        for f in (TENSORS, STATE, CONFIG):
            _fsync(tmp / f)
        final = self.directory / name
        if final.exists():  # a step of an abandoned future (resumed from an older checkpoint)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(self.directory)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_config(path: Path) -> dict:
        try:
            return json.loads((path / CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise PrunetuneError(f"--resume: cannot read {path / CONFIG}: {e}") from e

    @staticmethod
    def load(path: Path) -> RunState:
        from safetensors.torch import load_file

        try:
            meta = json.loads((path / STATE).read_text())
            tensors = load_file(str(path / TENSORS))
        except (OSError, ValueError) as e:
            raise PrunetuneError(f"--resume: cannot read the checkpoint {path}: {e}") from e
        return RunState.from_payload(meta, tensors)
