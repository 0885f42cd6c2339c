"""Walking a model with the table: its layers' attention and FFN sites, hidden-size readers, norms, config
counts and stock configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunetune.families.table import (
    AttentionSpec,
    Family,
    FFNSpec,
    StackSpec,
    auto_class_names,
    family_of,
)

# ---------------------------------------------------------------------------------------------------------
# Walking a model
# ---------------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside a PEFT or DDP wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module  # DistributedDataParallel
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # peft.PeftModel
        else:
            return model


def auto_class_of(model: nn.Module) -> str | None:
    """The first of the family's Auto classes that builds this model's architecture (head included), or None."""
    top = unwrap(model)
    fam = family_of(top)
    base_type = getattr(top.config, "prunetune_base_model_type", None) or top.config.model_type
    name = type(top).__name__.removeprefix("Prunetune")  # an export reloaded: the registered subclass
    for auto_name in fam.auto_classes:
        built = auto_class_names(auto_name).get(base_type)
        if name == built or (isinstance(built, tuple) and name in built):
            return auto_name
    return None


def base_model(model: nn.Module) -> nn.Module:
    """The backbone (``model.bert``, ``model.model``, or the T5 model itself)."""
    model = unwrap(model)
    return getattr(model, "base_model", model)


def get(root: nn.Module, path: str) -> nn.Module | None:
    """The sub-module at a dotted path, or None when it does not exist."""
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None) if not part.isdigit() else (mod[int(part)] if mod is not None else None)
        if mod is None:
            return None
    return mod


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get(root, parent_path) if parent_path else root
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


@dataclass
class AttentionSite:
    """A resolved attention block of one layer."""

    key: str  # "encoder.3/self"
    spec: AttentionSpec
    layer: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def module(self) -> nn.Module:
        return get(self.layer, self.spec.module)

    def proj(self, which: str) -> nn.Module:
        return get(self.layer, getattr(self.spec, which))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1


@dataclass
class FFNSite:
    """A resolved feed-forward block of one layer."""

    key: str  # "encoder.3"
    spec: FFNSpec
    layer: nn.Module
    width: int

    @property
    def inputs(self) -> list[nn.Module]:
        return [get(self.layer, p) for p in self.spec.inputs]

    @property
    def output(self) -> nn.Module:
        return get(self.layer, self.spec.output)


@dataclass
class LayerSites:
    """The prunable sites of one layer."""

    key: str
    stack: StackSpec
    index: int
    module: nn.Module
    attentions: dict[str, AttentionSite]
    ffn: FFNSite
    norms: list[nn.Module]


class DroppedNorm(nn.Module):
    """What stands where a pre-norm sublayer's input norm was, once the sublayer is empty (no head or no FFN
    neuron left): that sublayer returns its bias or zeros whatever it reads, so the norm computed nothing that
    was used. Parameterless, so a layer emptied whole costs nothing at all (ShortGPT's layer dropping, to the
    parameter); it still passes its input on, so hooks on it (the rescaling's residual points) keep working."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def input_norms(lay: LayerSites) -> dict[str, tuple[str, nn.Module]]:
    """Pre-norm stacks (LLaMA, T5): the norm each sublayer reads the residual stream through, by block key (an
    attention site's key, or "<layer>/ffn"), as (its path in the layer, the module). Post-norm stacks (BERT)
    give none: their norms sit on the residual sum and stay whatever the sublayer holds."""
    if lay.stack.post_norm:
        return {}
    keys = [s.key for s in lay.attentions.values()] + [f"{lay.key}/ffn"]
    return {k: (path, norm) for k, path, norm in zip(keys, lay.stack.norms, lay.norms, strict=True)
            if norm is not None}


def out_width(linear: nn.Module) -> int:
    # a LoRA-wrapped linear (PEFT's tuner layers) answers .weight with its base layer's: one path for both
    return linear.weight.shape[0]


def in_width(linear: nn.Module) -> int:
    return linear.weight.shape[1]


def config_head_dim(cfg, fam: Family) -> int:
    """The head size a stock model builds from this config: its own field (LLaMA's head_dim, T5's d_kv), else
    hidden / heads (BERT and RoBERTa have no such field)."""
    if fam.config.head_dim and getattr(cfg, fam.config.head_dim, None):
        return int(getattr(cfg, fam.config.head_dim))
    return getattr(cfg, fam.config.hidden) // getattr(cfg, fam.config.heads)


def _head_dim(model: nn.Module, fam: Family) -> int:
    return config_head_dim(unwrap(model).config, fam)


def layer_sites(model: nn.Module) -> list[LayerSites]:
    """Every layer of every stack with its attention and FFN sites, shapes read from the live weights."""
    fam = family_of(unwrap(model))
    base = base_model(model)
    hd = _head_dim(model, fam)
    out: list[LayerSites] = []
    for stack in fam.stacks:
        layers = get(base, stack.layers)
        if layers is None:
            continue  # e.g. a T5EncoderModel has no decoder
        for i, layer in enumerate(layers):
            key = f"{stack.name}.{i}"
            attns = {}
            for spec in stack.attentions:
                q = get(layer, spec.q)
                k = get(layer, spec.k)
                nh = out_width(q) // hd if q is not None else 0
                nkv = out_width(k) // hd if k is not None else 0
                attns[spec.name] = AttentionSite(f"{key}/{spec.name}", spec, layer, nh, nkv, hd)
            ffn = FFNSite(key, stack.ffn, layer, in_width(get(layer, stack.ffn.output)))
            norms = [get(layer, n) for n in stack.norms]
            out.append(LayerSites(key, stack, i, layer, attns, ffn, norms))
    return out


def predicts_next_token(model: nn.Module) -> bool:
    """A decoder-only family: per-token logits at position t score the token at t + 1 (labels are not shifted)."""
    stacks = family_of(unwrap(model)).stacks
    return len(stacks) == 1 and stacks[0].name == "decoder"


# the arguments from which a transformers model computes its own loss (classification/LM, extractive QA)
TARGET_KEYS = ("labels", "start_positions", "end_positions")


def inputs_without_targets(model: nn.Module, batch: dict) -> dict:
    """`batch` as a model runs on it when only its outputs are wanted (a distillation teacher): the targets are
    dropped, so no loss is computed for nothing. A generating encoder-decoder builds its decoder inputs from the
    labels, so those are built here first, as the model itself would (shifted right, the start token first); T5's
    classification and QA heads build theirs from the input ids, labels or not."""
    out = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    labels = batch.get("labels")
    from_labels = getattr(unwrap(model), "prepare_decoder_input_ids_from_labels", None)
    if labels is not None and from_labels is not None and "decoder_input_ids" not in out:
        out["decoder_input_ids"] = from_labels(labels=labels)
    return out


def hidden_size(model: nn.Module) -> int:
    """The live width of the hidden stream (the first embedding's last dim)."""
    fam = family_of(unwrap(model))
    emb = get(base_model(model), fam.embeddings[0])
    return emb.weight.shape[1]


def token_types(model: nn.Module) -> int:
    """How many token types (segments) the model embeds: 2 for BERT, 1 for RoBERTa, 0 without such a table."""
    emb = get(base_model(model), "embeddings.token_type_embeddings")
    return int(emb.num_embeddings) if emb is not None else 0


def all_norms(model: nn.Module) -> list[nn.Module]:
    """Every norm of width `hidden`: in the layers, after the embeddings, at the end of each stack and in a head."""
    fam = family_of(unwrap(model))
    base = base_model(model)
    norms = [get(base, p) for p in fam.global_norms]
    for stack in fam.stacks:
        if stack.final_norm:
            norms.append(get(base, stack.final_norm))
    for layer in layer_sites(model):
        norms.extend(layer.norms)
    norms.extend(get(unwrap(model), p) for p in fam.head_norms)
    return [n for n in norms if n is not None and not isinstance(n, DroppedNorm)]


def _head_class_readers(fam: Family, top: nn.Module) -> tuple[str, ...]:
    name = type(top).__name__
    return tuple(p for suffix, paths in fam.class_readers.items() if name.endswith(suffix) for p in paths)


def hidden_sites(model: nn.Module) -> dict[str, list[tuple[nn.Module, int]]]:
    """Everything of width `hidden`: modules with the dim to slice (0 = rows / out side, 1 = columns / in side).

    Keys: "embedding" (Embedding weights, dim 1), "norm" (weight/bias, dim 0), "linear_in" (dim 1),
    "linear_out" (dim 0). Shared weights (tied embeddings, T5's shared table) appear once per module; the
    surgery slices each distinct tensor once.
    """
    fam = family_of(unwrap(model))
    top = unwrap(model)
    base = base_model(model)
    sites: dict[str, list[tuple[nn.Module, int]]] = {"embedding": [], "norm": [], "linear_in": [], "linear_out": []}
    for p in fam.embeddings:
        if (m := get(base, p)) is not None:
            sites["embedding"].append((m, 1))
    sites["norm"] = [(n, 0) for n in all_norms(model)]
    for layer in layer_sites(model):
        for att in layer.attentions.values():
            for which in ("q", "k", "v"):
                if (m := att.proj(which)) is not None:
                    sites["linear_in"].append((m, 1))
            if (m := att.proj("o")) is not None:
                sites["linear_out"].append((m, 0))
        sites["linear_in"].extend((m, 1) for m in layer.ffn.inputs)
        sites["linear_out"].append((layer.ffn.output, 0))
    seen = set()
    for p in (*fam.hidden_readers, *_head_class_readers(fam, top)):
        m = get(top, p)
        if m is not None and id(m) not in seen:
            seen.add(id(m))
            sites["linear_in"].append((m, 1))
    for p in fam.hidden_writers:
        if (m := get(top, p)) is not None:
            sites["linear_out"].append((m, 0))
    return sites


def config_counts(config) -> dict[str, int]:
    """Dense (unpruned) shapes as the stock config states them."""
    fam = family_of(config)
    f = fam.config
    heads = int(getattr(config, f.heads))
    hidden = int(getattr(config, f.hidden))
    kv = int(getattr(config, f.kv_heads) or heads) if f.kv_heads else heads
    return {"hidden": hidden, "heads": heads, "kv_heads": kv, "ffn": int(getattr(config, f.ffn))}


def stock_config(config, counts: dict[str, int]):
    """The stock config of the same model with uniform shapes `counts` ("hidden", "heads", "kv_heads",
    "head_dim", "ffn"), or the reason, in words, that no stock config builds them.

    transformers itself validates the config (LLaMA's wants the hidden size a multiple of the heads); a family
    that derives the head size from hidden / heads (BERT, RoBERTa) builds another head size once either changes.
    """
    from transformers import CONFIG_MAPPING

    fam = family_of(config)
    f = fam.config
    base_type = getattr(config, "prunetune_base_model_type", None) or config.model_type
    d = config.to_dict()
    for k in ("model_type", "transformers_version", "prunetune_layout", "prunetune_base_model_type"):
        d.pop(k, None)
    d.update({f.hidden: counts["hidden"], f.heads: counts["heads"], f.ffn: counts["ffn"]})
    if f.kv_heads:
        d[f.kv_heads] = counts["kv_heads"]
    if f.head_dim:
        d[f.head_dim] = counts["head_dim"]
    elif counts["kv_heads"] != counts["heads"]:
        return f"{fam.name} configs have no separate KV head count"
    try:
        new = CONFIG_MAPPING[base_type](**d)
    except (ValueError, TypeError) as e:
        return f"transformers refuses the {fam.name} config ({str(e).splitlines()[0]})"
    built = config_head_dim(new, fam)
    if built != counts["head_dim"]:
        return (f"{fam.name} derives the head size from {f.hidden} / {f.heads} ({counts['hidden']} / "
                f"{counts['heads']} = {built}, the heads have {counts['head_dim']})")
    return new



def norm_eps(fam: Family, norm: nn.Module) -> float:
    return float(getattr(norm, fam.norm_eps_attr))


def norm_weight_bias(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return norm.weight, getattr(norm, "bias", None)



def layer_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden states a layer module was called with (positionally or as ``hidden_states=``)."""
    return args[0] if args else kwargs.get("hidden_states")


def layer_output(output) -> torch.Tensor:
    """The hidden states a layer module returns (LLaMA: a tensor; BERT and T5: the first of a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output
