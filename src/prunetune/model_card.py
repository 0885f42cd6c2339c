"""The model card an export carries: README.md in the Hugging Face layout (YAML metadata, whether it needs
prunetune and how to load it, what was pruned per layer against the dense model, the method and its data).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import (
    PIPELINE_TAGS,
    auto_class_of,
    family_of,
    unwrap,
)
from prunetune.plan import model_info
from prunetune.stock import stock_reason
from prunetune.surgery import LAYOUT_ATTR, MODEL_TYPE_PREFIX, current_layout

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
