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

import json
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import transformers
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import (
    FAMILIES,
    auto_class_names,
    family_of,
    stock_tokenizer_class,
    unwrap,
)
from prunetune.model_card import card_metadata, check_card, model_card, write_model_card  # noqa: F401 (re-exported)
from prunetune.outputs import (  # noqa: F401 (re-exported: callers import them from here)
    MARKER,
    OWNER,
    atomic_dir,
    check_output_dir,
    remove_stale_temporaries,
)
from prunetune.plan import PruningPlan
from prunetune.stock import stock_form
from prunetune.surgery import BASE_TYPE_ATTR, LAYOUT_ATTR, MODEL_TYPE_PREFIX, restore_layout

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


def load_compact(path: str | Path, auto_class: str = "AutoModel", **kwargs) -> nn.Module:
    """Load an export (or any supported checkpoint) with the named stock Auto class."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise PrunetuneError(f"no model at {path} (config.json missing)")
    return getattr(transformers, auto_class).from_pretrained(path, **kwargs)


register_auto_classes()
