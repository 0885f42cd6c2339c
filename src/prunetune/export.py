"""Compact models on disk: safetensors + a config carrying the per-layer layout, loadable by stock Auto classes.

A stock config derives every layer's shape from a few global numbers, which a model with different heads
per layer (or a pruned hidden size) breaks. An export therefore keeps the dense config's numbers, adds
the layout (the plan, relative to the dense model, that gives each layer its shape) and gets its own
``model_type`` (``prunetune_<family>``). Importing prunetune registers, for each family, a config class
and model classes that build the dense modules and shrink them to the layout before the weights load,
so ``AutoModelFor...from_pretrained(dir)`` just works. A transformers process that has not imported
prunetune does not know the model type and stops before touching a weight.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import transformers
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import FAMILIES, auto_class_names, family_of, unwrap
from prunetune.plan import PruningPlan
from prunetune.surgery import BASE_TYPE_ATTR, LAYOUT_ATTR, restore_layout

MODEL_TYPE_PREFIX = "prunetune_"
MODEL_TYPE_SUFFIX = " (pruned: run `import prunetune` before loading)"
_REGISTERED: dict[str, type] = {}


def _pruned_config_class(stock: type) -> type:
    model_type = MODEL_TYPE_PREFIX + stock.model_type + MODEL_TYPE_SUFFIX

    def __init__(self, prunetune_layout: dict | None = None, prunetune_base_model_type: str | None = None, **kw):
        stock.__init__(self, **kw)
        self.prunetune_layout = prunetune_layout
        self.prunetune_base_model_type = prunetune_base_model_type or stock.model_type

    cls = type(
        f"Prunetune{stock.__name__}",
        (stock,),
        {"model_type": model_type, "__init__": __init__, "__module__": __name__},
    )
    return cls


# How deep the construction of prunetune model classes is nested in this thread (see _pruned_model_class).
_building = threading.local()
_MODEL_CLASSES: dict[type, type] = {}  # stock model class -> its prunetune class (one per stock class)


def _pruned_model_class(stock: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        # LLaMA's task classes build their backbone with AutoModel.from_config(config), which picks the
        # registered prunetune base class: restoring the layout there too applied it twice (a pruned LLaMA
        # classifier could not be loaded again). Only the outermost prunetune class restores, and for the
        # whole model: its head reads the hidden stream, which a hidden plan shrinks.
        depth = getattr(_building, "depth", 0)
        _building.depth = depth + 1
        try:
            stock.__init__(self, config, *args, **kwargs)
        finally:
            _building.depth = depth
        layout = getattr(config, LAYOUT_ATTR, None)
        if layout and depth == 0:
            restore_layout(self, PruningPlan.from_dict(layout))

    return type(
        f"Prunetune{stock.__name__}",
        (stock,),
        {"config_class": config_class, "__init__": __init__, "__module__": __name__},
    )


def register_auto_classes() -> None:
    """Teach the stock Auto classes (those each family lists) the ``prunetune_<family>`` model types (idempotent)."""
    from transformers import AutoConfig

    for fam in FAMILIES.values():
        for model_type in fam.model_types:
            if model_type in _REGISTERED:
                continue
            stock_config = transformers.CONFIG_MAPPING[model_type]
            config_cls = _pruned_config_class(stock_config)
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            for auto_name in fam.auto_classes:
                stock_name = auto_class_names(auto_name).get(model_type)
                stock = getattr(transformers, stock_name, None) if stock_name else None
                if stock is None:
                    continue
                if stock not in _MODEL_CLASSES:  # e.g. RoBERTa's masked LM serves two Auto classes
                    _MODEL_CLASSES[stock] = _pruned_model_class(stock, config_cls)
                getattr(transformers, auto_name).register(config_cls, _MODEL_CLASSES[stock], exist_ok=True)
            _REGISTERED[model_type] = config_cls


def _export_config(model: nn.Module):
    """The config to write: the dense numbers, the layout and the prunetune model type."""
    top = unwrap(model)
    cfg = top.config
    base_type = getattr(cfg, BASE_TYPE_ATTR, None) or cfg.model_type
    if base_type.startswith(MODEL_TYPE_PREFIX):
        base_type = base_type[len(MODEL_TYPE_PREFIX) :]
    config_cls = _REGISTERED[base_type]
    d = cfg.to_dict()
    for k in ("model_type", "transformers_version", LAYOUT_ATTR, BASE_TYPE_ATTR):
        d.pop(k, None)
    new = config_cls(prunetune_layout=getattr(cfg, LAYOUT_ATTR, None), prunetune_base_model_type=base_type, **d)
    new.architectures = [f"Prunetune{type(top).__name__.removeprefix('Prunetune')}"]
    return new


# ---------------------------------------------------------------------------------------------------------
# Output directories: written aside, marked as prunetune's, swapped in only when complete
# ---------------------------------------------------------------------------------------------------------

MARKER = ".prunetune-output.json"  # in every directory prunetune writes: what wrote it; --overwrite needs it
OWNER = ".prunetune-owner.json"  # in a temporary directory while it is written: the process writing it


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_writable(directory: Path, shown: Path) -> None:
    """Fail now, in one line, when the output cannot be created: not after minutes of loading and pruning."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PrunetuneError(f"cannot write {shown}: {existing} is not a directory")
    try:  # a real attempt: permission bits say nothing on a read-only file system, or to root
        os.rmdir(tempfile.mkdtemp(prefix=".prunetune-probe.", dir=existing))
    except OSError as e:
        raise PrunetuneError(f"cannot write {shown}: {existing} is not writable ({e.strerror or e})") from e


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Refuse an output path prunetune must not write or replace, before any work is done.

    Refused: a file; the current directory or one of its parents; a directory that is or holds one of the
    `inputs` (model directory, data, plan file); a non-empty directory without `overwrite`, or, with it, one
    that prunetune did not write (no marker); a place that cannot be written. atomic_dir checks again.
    Temporaries that killed runs left next to `out` are removed first (a killed swap puts the previous result
    back, which is then what is checked).
    """
    out = Path(out)
    target = out.resolve()
    if target.parent.is_dir():
        remove_stale_temporaries(target.parent)
    if out.exists() and not out.is_dir():
        raise PrunetuneError(f"output path {out} exists and is not a directory")
    if _within(Path.cwd().resolve(), target):
        raise PrunetuneError(f"output directory {out} is the current directory or contains it; choose a new one")
    for given in inputs:
        if given is not None and Path(given).exists() and _within(Path(given).resolve(), target):
            raise PrunetuneError(f"output directory {out} is or contains the input {given}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrunetuneError(f"output directory {out} already exists and is not empty (use --overwrite)")
        if not (out / MARKER).is_file():
            raise PrunetuneError(
                f"output directory {out} was not written by prunetune (no {MARKER}): --overwrite only replaces "
                "prunetune's own results; remove it yourself or choose another --out"
            )
    _check_writable(target.parent, out)
    return out


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot, Linux): tells a reused process id from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_record(target: Path, role: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "host": socket.gethostname(), "out": target.name, "role": role}


def _owner_alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True  # another machine's (a shared file system): there is no telling, so it stays
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _start_time(record["pid"])
    return not (record.get("start") and now and now != record["start"])


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary directories in `directory` whose writing process is gone (a killed run).

    Only directories holding prunetune's owner record are touched. A killed swap (the previous result moved
    aside, the new one not yet in place) puts the previous result back first.
    """
    removed = []
    directory = Path(directory)
    for path in directory.iterdir() if directory.is_dir() else ():
        if not path.name.startswith(".") or path.is_symlink() or not (path / OWNER).is_file():
            continue
        try:
            record = json.loads((path / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if _owner_alive(record):
            continue
        old, original = path / "old", directory / str(record.get("out", ""))
        if record.get("role") == "old" and old.is_dir() and record.get("out") and not original.exists():
            old.rename(original)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_temporary(target: Path, role: str) -> Path:
    """A hidden sibling of `target` (``.NAME.xxxx``) owned by this process, with the permissions umask gives."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700: an output others cannot read
    (tmp / OWNER).write_text(json.dumps(_owner_record(target, role)))
    return tmp


def _normal_permissions(root: Path) -> None:
    """Files and directories as umask would make them: safetensors writes its files 0600 (via a temporary)."""
    mask = _umask()
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666 | (path.stat().st_mode & 0o111)) & ~mask)


def _write_marker(directory: Path) -> None:
    from prunetune import __version__

    record = {
        "prunetune": __version__,
        "command": shlex.join(sys.argv),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (directory / MARKER).write_text(json.dumps(record, indent=1))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`; a previous result there is deleted only once the new one is in place."""
    if not target.exists():
        tmp.rename(target)
        return
    holder = _new_temporary(target, "old")  # if killed mid-swap, the next run puts the old result back
    try:
        target.rename(holder / "old")
        try:
            tmp.rename(target)
        except BaseException:
            (holder / "old").rename(target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(holder, ignore_errors=True)
        raise
    shutil.rmtree(holder, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Write into a temporary sibling directory and move it to `out` only when everything succeeded.

    The result carries prunetune's marker (what wrote it; only such a directory may be overwritten). A
    previous result at `out` survives any failure before the swap; temporaries of killed runs are removed.
    """
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    target = Path(out).resolve()  # a symlinked --out keeps pointing at the new result
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(target, "new")
    try:
        yield tmp
        _write_marker(tmp)
        (tmp / OWNER).unlink()
        _normal_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)


def save_compact(
    model: nn.Module, out: str | Path, tokenizer=None, *, overwrite: bool = False, extra: dict | None = None,
    copy_files: Iterable[str | Path] = (), inputs: Iterable = (),
) -> Path:
    """Save a (pruned) model as safetensors + config (+ tokenizer), atomically.

    `extra`: {file name: json-able}; `copy_files`: files copied in as they are (a tokenizer's files, when no
    tokenizer was loaded); `inputs`: paths the output must not replace (see check_output_dir).
    """
    top = unwrap(model)
    family_of(top)  # refuse unsupported models before writing anything
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        config = _export_config(top)
        original = top.config
        top.config = config  # save_pretrained writes self.config
        try:
            top.save_pretrained(tmp, safe_serialization=True)
        finally:
            top.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in copy_files:
            shutil.copy2(f, tmp / Path(f).name)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=1))
    return Path(out)


def load_compact(path: str | Path, auto_class: str = "AutoModel", **kwargs) -> nn.Module:
    """Load an export (or any supported checkpoint) with the named stock Auto class."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise PrunetuneError(f"no model at {path} (config.json missing)")
    return getattr(transformers, auto_class).from_pretrained(path, **kwargs)


register_auto_classes()
