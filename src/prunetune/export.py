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
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import transformers
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import FAMILIES, family_of, unwrap
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


def _pruned_model_class(stock: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        stock.__init__(self, config, *args, **kwargs)
        layout = getattr(config, LAYOUT_ATTR, None)
        if layout:
            restore_layout(self, PruningPlan.from_dict(layout))

    return type(
        f"Prunetune{stock.__name__}",
        (stock,),
        {"config_class": config_class, "__init__": __init__, "__module__": __name__},
    )


def register_auto_classes() -> None:
    """Teach the stock Auto classes the ``prunetune_<family>`` model types (idempotent)."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    mapping_of = {
        "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
        "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
        "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "AutoModelForSeq2SeqLM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }
    for fam in FAMILIES.values():
        for model_type in fam.model_types:
            if model_type in _REGISTERED:
                continue
            stock_config = transformers.CONFIG_MAPPING[model_type]
            config_cls = _pruned_config_class(stock_config)
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            for auto_name in fam.auto_classes:
                stock_name = mapping_of[auto_name].get(model_type)
                if stock_name is None:
                    continue
                model_cls = _pruned_model_class(getattr(transformers, stock_name), config_cls)
                getattr(transformers, auto_name).register(config_cls, model_cls, exist_ok=True)
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


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty directory without `overwrite`.

    atomic_dir checks again; commands call this first too, so they fail before loading models and data.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunetuneError(f"output path {out} exists and is not a directory")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise PrunetuneError(f"output directory {out} already exists and is not empty (use --overwrite)")
    return out


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False):
    """Write into a temporary sibling directory and move it to `out` only when everything succeeded."""
    out = check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def save_compact(model: nn.Module, out: str | Path, tokenizer=None, *, overwrite: bool = False, extra=None) -> Path:
    """Save a (pruned) model as safetensors + config (+ tokenizer), atomically. `extra`: {name: json-able}."""
    top = unwrap(model)
    family_of(top)  # refuse unsupported models before writing anything
    with atomic_dir(out, overwrite=overwrite) as tmp:
        config = _export_config(top)
        original = top.config
        top.config = config  # save_pretrained writes self.config
        try:
            top.save_pretrained(tmp, safe_serialization=True)
        finally:
            top.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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
