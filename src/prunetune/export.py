"""Compact models on disk: safetensors + a config carrying the per-layer layout, loadable by stock Auto classes.

A stock config derives every layer's shape from a few global numbers, which a model with different heads
per layer (or a pruned hidden size) breaks. An export therefore keeps the dense config's numbers, adds
the layout (the plan, relative to the dense model, that gives each layer its shape) and gets its own
``model_type`` (``prunetune_<family>``). Importing prunetune registers, for each family, a config class
and model classes that build the dense modules and shrink them to the layout before the weights load,
so ``AutoModelFor...from_pretrained(dir)`` just works. A transformers process that has not imported
prunetune does not know the model type and stops before touching a weight. A model with nothing pruned (no
layout) is written with its stock config, which transformers loads on its own.

Every export carries a model card (README.md, the Hugging Face layout): YAML metadata, whether it needs
prunetune and how to load it, what was pruned per layer against the dense model, and the method, settings, data
and metrics its caller gives.
"""

from __future__ import annotations

import copy
import json
import os
import re
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

import torch
import transformers
import yaml
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import (
    FAMILIES,
    PIPELINE_TAGS,
    auto_class_names,
    auto_class_of,
    family_of,
    stock_tokenizer_class,
    unwrap,
)
from prunetune.plan import PruningPlan, model_info
from prunetune.stock import stock_form, stock_reason
from prunetune.surgery import BASE_TYPE_ATTR, LAYOUT_ATTR, current_layout, restore_layout

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
    from transformers import AutoConfig, AutoTokenizer

    for fam in FAMILIES.values():
        for model_type in fam.model_types:
            if model_type in _REGISTERED:
                continue
            stock_config = transformers.CONFIG_MAPPING[model_type]
            config_cls = _pruned_config_class(stock_config)
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            # When the tokenizer files name no tokenizer class (a checkpoint with only vocab.txt, which `prune`
            # copies as it is), AutoTokenizer picks the class registered for the config's class: none for the
            # prunetune config, so it failed on the export where it worked on the checkpoint.
            tokenizer = stock_tokenizer_class(model_type)
            if tokenizer is not None:
                AutoTokenizer.register(config_cls, tokenizer_class=tokenizer, exist_ok=True)
            for auto_name in fam.auto_classes:
                stock_name = auto_class_names(auto_name).get(model_type)
                stock = getattr(transformers, stock_name, None) if stock_name else None
                if stock is None:
                    continue
                if stock not in _MODEL_CLASSES:  # e.g. RoBERTa's masked LM serves two Auto classes
                    _MODEL_CLASSES[stock] = _pruned_model_class(stock, config_cls)
                getattr(transformers, auto_name).register(config_cls, _MODEL_CLASSES[stock], exist_ok=True)
            _REGISTERED[model_type] = config_cls


def needs_prunetune(config) -> bool:
    """Whether a model with this config loads only after `import prunetune` (a ``prunetune_<family>`` model type)."""
    return str(getattr(config, "model_type", "")).startswith(MODEL_TYPE_PREFIX)


def _export_config(model: nn.Module):
    """The config to write and the weights (None: the model's own): the dense numbers, the layout and the prunetune
    model type.

    A model with no layout (nothing pruned: a LoRA or full fine-tune) has the stock shapes, so it gets the stock
    config and model type: transformers alone loads it, and the hub, other libraries and older prunetune versions
    read it as the stock architecture. So does a pruned model whose layers all have one shape that a stock config
    states (see stock.py).
    """
    top = unwrap(model)
    cfg = top.config
    base_type = getattr(cfg, BASE_TYPE_ATTR, None) or cfg.model_type
    if base_type.startswith(MODEL_TYPE_PREFIX):
        base_type = base_type[len(MODEL_TYPE_PREFIX) :]
    layout = getattr(cfg, LAYOUT_ATTR, None)
    d = cfg.to_dict()
    for k in ("model_type", "transformers_version", LAYOUT_ATTR, BASE_TYPE_ATTR):
        d.pop(k, None)
    if not layout:
        return transformers.CONFIG_MAPPING[base_type](**d), None
    form = stock_form(top)
    if not isinstance(form, str):
        return form.config, form.state_dict
    new = _REGISTERED[base_type](prunetune_layout=layout, prunetune_base_model_type=base_type, **d)
    new.architectures = [f"Prunetune{type(top).__name__.removeprefix('Prunetune')}"]
    return new, None


def _stock_architectures(directory: Path) -> None:
    """Name the stock class in a stock export's config.json: save_pretrained writes the class of the instance,
    which is prunetune's registered subclass when the model was itself loaded from a prunetune export."""
    path = directory / "config.json"
    d = json.loads(path.read_text())
    archs = d.get("architectures") or []
    if any(a.startswith("Prunetune") for a in archs):
        d["architectures"] = [a.removeprefix("Prunetune") for a in archs]
        path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


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
    copy_files: Iterable[str | Path] = (), inputs: Iterable = (), card: dict | None = None,
) -> Path:
    """Save a (pruned) model as safetensors + config (+ tokenizer) with a model card (README.md), atomically.

    `extra`: {file name: json-able}; `copy_files`: files copied in as they are (a tokenizer's files, when no
    tokenizer was loaded); `inputs`: paths the output must not replace (see check_output_dir); `card`: what the
    model card says beyond the model itself (see write_model_card).
    """
    top = unwrap(model)
    family_of(top)  # refuse unsupported models before writing anything
    check_card(card)
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        config, state = _export_config(top)
        original = top.config
        top.config = config  # save_pretrained writes self.config
        try:
            top.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state} if state else {}))
        finally:
            top.config = original
        if not needs_prunetune(config):
            _stock_architectures(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in copy_files:
            shutil.copy2(f, tmp / Path(f).name)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=1))
        write_model_card(tmp, top, card)
    return Path(out)


# ---------------------------------------------------------------------------------------------------------
# The model card: README.md in the Hugging Face layout (YAML metadata, then what was pruned and how to load it)
# ---------------------------------------------------------------------------------------------------------

CARD = "README.md"
# What a caller may tell the card (the rest comes from the model and its config): the method, its settings, the
# task, a description of the data, the metrics, and metadata the model cannot know.
CARD_KEYS = frozenset({"method", "settings", "task", "data", "metrics", "base_model", "license", "datasets",
                       "pipeline_tag"})
GLUE_DATASET = "nyu-mll/glue"  # the hub dataset of the GLUE tasks (prunetune's bundled samples come from it)
PATH_PLACEHOLDER = "path/to/this/directory"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HUB_CACHE_DIR = re.compile(r"models--([\w.-]+)")  # huggingface_hub's cache: models--org--name, models--name


def check_card(card: dict | None) -> None:
    """Refuse keys the card does not know (before any work is done): a typo would silently leave a section out."""
    unknown = sorted(set(card or {}) - CARD_KEYS)
    if unknown:
        raise PrunetuneError(f"unknown model card field(s) {', '.join(unknown)}; known: {', '.join(sorted(CARD_KEYS))}")


def card_metadata(directory: str | Path) -> dict:
    """The YAML front matter of DIRECTORY/README.md ({} when there is none or it does not parse)."""
    path = Path(directory) / CARD
    try:
        text = path.read_text()
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        meta = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _provenance(top: nn.Module) -> dict:
    """base_model and license as far as the source tells them.

    The source is where the model was loaded from. A hub id (or a directory of the hub's cache) is the base model;
    a prunetune export pruned again passes on the base model its own card names; a local checkpoint's card gives
    its license only (its base_model, if any, is the base of the checkpoint, not the checkpoint).
    """
    source = str(getattr(top.config, "name_or_path", "") or "")
    if not source:
        return {}
    out: dict = {}
    local = Path(source).expanduser()
    if local.is_dir():
        meta = card_metadata(local)
        if meta.get("license"):
            out["license"] = meta["license"]
        cached = next((m for part in local.parts if (m := _HUB_CACHE_DIR.fullmatch(part))), None)
        if "prunetune" in (meta.get("tags") or []) and meta.get("base_model"):
            out["base_model"] = meta["base_model"]
        elif cached:  # hub repository names never hold "--", which the cache puts for "/"
            out["base_model"] = cached.group(1).replace("--", "/")
    elif _HUB_ID.fullmatch(source):
        out["base_model"] = source
    return out


def _task_datasets(task: str | None) -> list[str]:
    """The hub datasets of a known task: the GLUE tasks' (the only ones prunetune can name)."""
    if not task:
        return []
    from prunetune.tasks.glue import get_task

    try:
        get_task(task)
    except PrunetuneError:
        return []
    return [GLUE_DATASET]


def _dense_info(top: nn.Module) -> dict:
    """model_info of the dense original: the same class built on the meta device (no memory, no weights) from the
    config without its layout, which keeps the dense numbers."""
    if current_layout(top) is None:
        return model_info(top)
    config = copy.deepcopy(top.config)
    setattr(config, LAYOUT_ATTR, None)
    with torch.device("meta"):
        return model_info(type(top)(config))


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _kept(part: int, whole: int) -> str:
    return f"{part:,} / {whole:,}"


def _table(header: tuple[str, ...], rows: list[tuple], align: str = "") -> str:
    align = align or "-" * len(header)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _layer_cell(now: dict[str, int], dense: dict[str, int]) -> str:
    """Heads of a layer: "2/4", or per attention site ("self 1/4, cross 2/4") where there are several."""
    cells = [f"{now[k]}/{dense[k]}" for k in dense]
    if len(dense) == 1:
        return cells[0]
    return ", ".join(f"{k} {c}" for k, c in zip(dense, cells, strict=True))


def _pruning_section(info: dict, dense: dict, gqa: bool) -> str:
    def kv(i: dict) -> int:
        return sum(sum(lay["kv_heads"].values()) for lay in i["layers"])

    summary = [
        ("attention heads", _kept(info["heads"], dense["heads"]), _pct(info["heads"], dense["heads"])),
        *([("KV heads", _kept(kv(info), kv(dense)), _pct(kv(info), kv(dense)))] if gqa else []),
        ("FFN neurons", _kept(info["ffn"], dense["ffn"]), _pct(info["ffn"], dense["ffn"])),
        ("hidden size", _kept(info["hidden"], dense["hidden"]), _pct(info["hidden"], dense["hidden"])),
        ("layer parameters", _kept(info["layer_params"], dense["layer_params"]),
         _pct(info["layer_params"], dense["layer_params"])),
        ("all parameters", _kept(info["params"], dense["params"]), _pct(info["params"], dense["params"])),
    ]
    rows = []
    for lay, ref in zip(info["layers"], dense["layers"], strict=True):
        row = [lay["layer"], _layer_cell(lay["heads"], ref["heads"])]
        if gqa:
            row.append(_layer_cell(lay["kv_heads"], ref["kv_heads"]))
        row += [f"{lay['ffn']}/{ref['ffn']}", f"{lay['params']:,}", _pct(lay["params"], ref["params"])]
        rows.append(tuple(row))
    header = ("layer", "heads", *(("KV heads",) if gqa else ()), "FFN neurons", "parameters", "of dense")
    emptied = [lay["layer"] if len(lay["heads"]) == 1 else f"{lay['layer']}/{site}"
               for lay in info["layers"] for site, n in lay["heads"].items() if n == 0]
    no_ffn = [lay["layer"] for lay in info["layers"] if lay["ffn"] == 0]
    notes = []
    if emptied:
        notes.append(f"No attention head is left in {', '.join(emptied)}: each of those attention blocks adds its "
                     "output projection's bias only (nothing where it has none).")
    if no_ffn:
        notes.append(f"No FFN neuron is left in {', '.join(no_ffn)}: each of those FFN blocks adds its output "
                     "projection's bias only (nothing where it has none).")
    return "\n\n".join([
        "## What was pruned",
        "Kept / dense original, for the whole model and per layer (heads: kept/dense per attention block; "
        "parameters: the layer's own, relative to the same dense layer).",
        _table(("", "kept / dense", "kept"), summary, "-rr"),
        _table(header, rows, "--" + ("-" if gqa else "") + "-rr"),
        *notes,
    ])


def _loading_section(arch: str, auto_class: str | None, pipeline_tag: str | None, model_type: str, stock: bool,
                     generates: bool, tokenizer: bool, pruned: bool = False, reason: str | None = None) -> str:
    from transformers.pipelines import get_supported_tasks

    if stock and pruned:
        intro = ("This export is **stock**: every layer keeps the same numbers of heads and FFN neurons, which its "
                 "config states, so transformers (and tools that read stock checkpoints) load it on its own; "
                 "prunetune is not needed.")
    elif stock:
        intro = ("This export is **stock**: nothing was pruned (its config records no layout), so transformers "
                 "loads it on its own; prunetune is not needed.")
    else:
        intro = (f"This export **needs prunetune** because {reason}: its layers' shapes are recorded in config.json "
                 f"(`prunetune_layout`, model type `{model_type.split()[0]}`). `import prunetune` first: it "
                 "registers that model type with the transformers Auto classes, which then build the dense "
                 "modules and shrink them to the layout before loading the weights. Without it transformers "
                 "stops at the unknown model type.")
    auto = auto_class or "AutoModel"
    names = [auto, *(["AutoTokenizer"] if tokenizer else [])]
    lines = [] if stock else ["import prunetune  # first: registers the pruned model type with the Auto classes"]
    use = [f"model = {auto}.from_pretrained(path)"]
    if tokenizer:
        use.append("tokenizer = AutoTokenizer.from_pretrained(path)")
        if pipeline_tag in get_supported_tasks():
            names.append("pipeline")
            use.append(f'pipe = pipeline("{pipeline_tag}", model=path)')
        elif generates:  # a generator whose pipeline this transformers does not have (text2text-generation)
            use.append('output = model.generate(**tokenizer("...", return_tensors="pt"), max_new_tokens=32)')
    lines += [f"from transformers import {', '.join(names)}", "", f'path = "{PATH_PLACEHOLDER}"  # or its hub id',
              *use]
    code = "```python\n" + "\n".join(lines) + "\n```"
    where = ("Its tokenizer is saved with it." if tokenizer else
             "No tokenizer was saved with it: use the tokenizer of the model it was pruned from.")
    return "\n\n".join(["## How to load", intro, code, f"The architecture is `{arch}`. {where}"])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _method_section(card: dict, record: dict | None) -> str:
    parts = []
    task = card.get("task") or (record or {}).get("name")
    facts = []
    if card.get("method"):
        facts.append(("method", f"`{card['method']}`"))
    if task:
        facts.append(("task", f"`{task}`"))
    if record and record.get("labels"):
        facts.append(("labels", ", ".join(map(str, record["labels"]))))
    if record is not None:
        facts.append(("task head", "trained" if record.get("trained") else
                      "never trained (a `prunetune prune` output): fine-tune it before use"))
    if facts:
        parts.append(_table(("", ""), facts))
    settings = [(k, _fmt(v)) for k, v in (card.get("settings") or {}).items() if v is not None]  # None: not set
    if settings:
        parts += ["### Settings", _table(("setting", "value"), settings)]
    data = card.get("data")
    if data:
        text = data if isinstance(data, str) else "\n".join(f"- {k}: {_fmt(v)}" for k, v in data.items())
        parts += ["### Data", text]
    metrics = card.get("metrics")
    if metrics:
        order = sorted(metrics, key=lambda k: k != "main")  # the task's main metric first
        parts += ["### Metrics", "As reported by the run that wrote this export.",
                  _table(("metric", "value"), [(k, _fmt(metrics[k])) for k in order], "-r")]
    return "\n\n".join(["## Method and results", *parts]) if parts else ""


def model_card(directory: str | Path, model: nn.Module, card: dict | None = None) -> str:
    """The text of the model card for `model`, exported to DIRECTORY (whose config.json says how it loads)."""
    from prunetune import __version__
    from prunetune.models import TOKENIZER_FILES
    from prunetune.tasks import TASK_ATTR

    check_card(card)
    card = dict(card or {})
    top = unwrap(model)
    fam = family_of(top)
    config = json.loads((Path(directory) / "config.json").read_text())
    stock = not str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX)
    record = config.get(TASK_ATTR)
    task = card.get("task") or (record or {}).get("name")
    info, dense = model_info(top), _dense_info(top)
    pruned = current_layout(top) is not None
    auto_class = auto_class_of(top)
    arch = type(top).__name__.removeprefix("Prunetune")

    meta: dict = {"library_name": "transformers"}
    tags = ["prunetune", *(["pruned", "structured-pruning"] if pruned else []), fam.name]
    if card.get("method"):
        tags.append(str(card["method"]))
    meta["tags"] = list(dict.fromkeys(tags))
    meta.update(_provenance(top))
    meta.update({k: card[k] for k in ("base_model", "license") if card.get(k)})  # the caller knows better
    pipeline_tag = card.get("pipeline_tag") or PIPELINE_TAGS.get(auto_class or "")
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    datasets = card.get("datasets") or _task_datasets(task)
    if datasets:
        meta["datasets"] = list(datasets)
    # a stable key order (hub cards put the library and tags first); yaml quotes what needs quoting
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)

    base = meta.get("base_model")
    if pruned:
        what = (f"A structurally pruned {fam.name} model: {info['heads']} of {dense['heads']} attention heads, "
                f"{info['ffn']} of {dense['ffn']} FFN neurons and {info['hidden']} of {dense['hidden']} hidden "
                f"dimensions are left, {_pct(info['layer_params'], dense['layer_params'])} of the dense model's "
                f"layer parameters.")
    else:
        what = f"A {fam.name} model with the dense shapes (nothing was pruned)."
    if base:
        what += f" Base model: [{base}](https://huggingface.co/{base})."
    sections = [
        f"# {arch} ({'pruned, ' if pruned else ''}prunetune {__version__})",
        what,
        _loading_section(arch, auto_class, pipeline_tag, str(config.get("model_type", "")), stock,
                         generates=pipeline_tag in ("text-generation", "text2text-generation"),
                         tokenizer=any((Path(directory) / n).is_file() for n in TOKENIZER_FILES), pruned=pruned,
                         reason=None if stock else (stock_reason(top) or "its layers have their own shapes")),
        _pruning_section(info, dense, fam.gqa) if pruned else "",
        _method_section(card, record),
    ]
    return f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(directory: str | Path, model: nn.Module, card: dict | None = None) -> Path:
    """Write DIRECTORY/README.md for `model`, exported there; `card` (CARD_KEYS) adds what the model cannot tell:
    the method and its settings, the task, the data, the metrics, and base_model / license / datasets /
    pipeline_tag when they are to differ from what the model and its source say."""
    path = Path(directory) / CARD
    path.write_text(model_card(directory, model, card))
    return path


def load_compact(path: str | Path, auto_class: str = "AutoModel", **kwargs) -> nn.Module:
    """Load an export (or any supported checkpoint) with the named stock Auto class."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise PrunetuneError(f"no model at {path} (config.json missing)")
    return getattr(transformers, auto_class).from_pretrained(path, **kwargs)


register_auto_classes()
