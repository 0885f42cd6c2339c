"""All architecture knowledge, one table keyed by ``model_type``.

This is the only module that spells transformers attribute names. Every other module walks a
model through :func:`layer_sites`, :func:`hidden_sites` and the :class:`Family` entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunetune.errors import PrunetuneError

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


@dataclass(frozen=True)
class AttentionSpec:
    """One attention block of a layer: where its projections live and which attributes hold its shape."""

    name: str  # "self" or "cross": the key of this site inside a layer
    module: str  # the attention module whose attributes are rewritten, relative to the layer
    q: str
    k: str
    v: str
    o: str
    heads_attrs: tuple[str, ...]  # attributes equal to the number of query heads
    width_attrs: tuple[str, ...] = ()  # attributes equal to heads * head_dim
    head_dim_attr: str = "head_dim"
    kv_groups_attr: str | None = None  # grouped-query attention: query heads per KV head, per module
    position_bias: bool = False  # T5: takes and passes on the relative bias that layer 0 computes for all
    empty: str = "module"  # what replaces the block once no head is left: "module" or "core"
    core: str | None = None  # BERT: the sub-module computing the heads ("attention.self")


@dataclass(frozen=True)
class FFNSpec:
    """The feed-forward block: one or two input projections (gated MLPs) and one output projection."""

    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class StackSpec:
    """A stack of identical layers (an encoder or a decoder)."""

    name: str
    layers: str  # the ModuleList, relative to the base model
    attentions: tuple[AttentionSpec, ...]
    ffn: FFNSpec
    # norms of width `hidden` inside each layer, one per sublayer (attention blocks, then the FFN): its input
    # norm (pre-norm stacks) or the norm of its residual sum (post-norm, `post_norm`)
    norms: tuple[str, ...]
    final_norm: str | None = None  # relative to the base model
    post_norm: bool = False  # BERT: norm(residual + sublayer); LLaMA, T5: residual + sublayer(norm(residual))
    token_mask: str = "attention_mask"  # the batch entry marking this stack's real (unpadded) tokens


@dataclass(frozen=True)
class ConfigFields:
    """Names of the config fields that describe the dense shapes."""

    hidden: str
    heads: str
    ffn: str
    kv_heads: str | None = None
    head_dim: str | None = None
    # Flags that make a stock model build biases (LLaMA: q/k/v/o and gate/up/down). A bias added to a
    # bias-free output projection (FLAP's compensation) only survives export and reload through these.
    attention_bias: str | None = None
    ffn_bias: str | None = None


@dataclass(frozen=True)
class Family:
    """Everything prunetune needs to know about one architecture."""

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[StackSpec, ...]
    config: ConfigFields
    norm: str  # "layer" (mean and variance) or "rms"
    norm_eps_attr: str
    embeddings: tuple[str, ...]  # base-relative embeddings whose last dim is `hidden`
    global_norms: tuple[str, ...] = ()  # base-relative norms outside the layers
    hidden_readers: tuple[str, ...] = ()  # top-level linears that read the hidden stream (input side)
    # Top-level linears that write the hidden stream again, and norms of width `hidden` in a head: a masked-LM
    # head maps the stream through dense + norm before its decoder, which is tied to the word embeddings.
    hidden_writers: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()
    # Readers that only read the hidden stream in some head classes, keyed by the class name's suffix: BERT's
    # `classifier` reads every token's hidden state in ...ForTokenClassification but the pooler's dense
    # output (whose width a hidden plan leaves alone) in ...ForSequenceClassification.
    class_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    position_bias_source: str | None = None  # T5: the attribute of the attention holding the bias table
    # transformers Auto* classes this family is exported for, in the order a checkpoint's declared
    # architecture is looked up (the first whose mapping names that architecture loads it)
    auto_classes: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def gqa(self) -> bool:
        return any(a.kv_groups_attr for s in self.stacks for a in s.attentions)


_BERT_ATTN = AttentionSpec(
    name="self",
    module="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    heads_attrs=("num_attention_heads",),
    width_attrs=("all_head_size",),
    head_dim_attr="attention_head_size",
    empty="core",
    core="attention.self",
)

_BERT_STACK = StackSpec(
    name="encoder",
    layers="encoder.layer",
    attentions=(_BERT_ATTN,),
    ffn=FFNSpec(inputs=("intermediate.dense",), output="output.dense"),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    post_norm=True,
)

_BERT_LIKE = dict(
    stacks=(_BERT_STACK,),
    config=ConfigFields(hidden="hidden_size", heads="num_attention_heads", ffn="intermediate_size"),
    norm="layer",
    norm_eps_attr="eps",
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    global_norms=("embeddings.LayerNorm",),
    # The pooler, the RoBERTa classification head, the QA head and the masked-LM heads (BERT's `cls`, RoBERTa's
    # `lm_head`) read the hidden stream. The pooler's and the classification head's outputs keep their width
    # (the next classifier reads them, not the stream); the masked-LM transform writes the stream again.
    hidden_readers=(
        "bert.pooler.dense", "roberta.pooler.dense", "pooler.dense", "classifier.dense", "qa_outputs",
        "cls.predictions.transform.dense", "cls.predictions.decoder", "lm_head.dense", "lm_head.decoder",
    ),
    hidden_writers=("cls.predictions.transform.dense", "lm_head.dense"),
    head_norms=("cls.predictions.transform.LayerNorm", "lm_head.layer_norm"),
    class_readers={"ForTokenClassification": ("classifier",)},
    auto_classes=(
        "AutoModel", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering", "AutoModelForMaskedLM", "AutoModelForCausalLM",
        "AutoModelForMultipleChoice", "AutoModelForPreTraining", "AutoModelForNextSentencePrediction",
    ),
)


def _t5_attention(name: str, path: str) -> AttentionSpec:
    return AttentionSpec(
        name=name,
        module=path,
        q=f"{path}.q",
        k=f"{path}.k",
        v=f"{path}.v",
        o=f"{path}.o",
        heads_attrs=("n_heads",),
        width_attrs=("inner_dim",),
        head_dim_attr="key_value_proj_dim",
        position_bias=True,
    )


_T5_FFN = FFNSpec(inputs=("DenseReluDense.wi",), output="DenseReluDense.wo")
_T5_GATED_FFN = FFNSpec(inputs=("DenseReluDense.wi_0", "DenseReluDense.wi_1"), output="DenseReluDense.wo")


def _t5_stacks(ffn: FFNSpec) -> tuple[StackSpec, ...]:
    enc_ffn = FFNSpec(inputs=tuple(f"layer.1.{p}" for p in ffn.inputs), output=f"layer.1.{ffn.output}")
    dec_ffn = FFNSpec(inputs=tuple(f"layer.2.{p}" for p in ffn.inputs), output=f"layer.2.{ffn.output}")
    return (
        StackSpec(
            name="encoder",
            layers="encoder.block",
            attentions=(_t5_attention("self", "layer.0.SelfAttention"),),
            ffn=enc_ffn,
            norms=("layer.0.layer_norm", "layer.1.layer_norm"),
            final_norm="encoder.final_layer_norm",
        ),
        StackSpec(
            name="decoder",
            layers="decoder.block",
            attentions=(
                _t5_attention("self", "layer.0.SelfAttention"),
                _t5_attention("cross", "layer.1.EncDecAttention"),
            ),
            ffn=dec_ffn,
            norms=("layer.0.layer_norm", "layer.1.layer_norm", "layer.2.layer_norm"),
            final_norm="decoder.final_layer_norm",
            token_mask="decoder_attention_mask",
        ),
    )


_LLAMA_ATTN = AttentionSpec(
    name="self",
    module="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    heads_attrs=(),  # LLaMA derives its head count from the projection widths (view with -1)
    head_dim_attr="head_dim",
    kv_groups_attr="num_key_value_groups",
)

_LLAMA_LIKE = dict(
    stacks=(
        StackSpec(
            name="decoder",
            layers="layers",
            attentions=(_LLAMA_ATTN,),
            ffn=FFNSpec(inputs=("mlp.gate_proj", "mlp.up_proj"), output="mlp.down_proj"),
            norms=("input_layernorm", "post_attention_layernorm"),
            final_norm="norm",
        ),
    ),
    config=ConfigFields(
        hidden="hidden_size",
        heads="num_attention_heads",
        ffn="intermediate_size",
        kv_heads="num_key_value_heads",
        head_dim="head_dim",
    ),
    norm="rms",
    norm_eps_attr="variance_epsilon",
    embeddings=("embed_tokens",),
    hidden_readers=("lm_head", "score", "qa_outputs"),
    auto_classes=(
        "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering",
    ),
)

FAMILIES: dict[str, Family] = {
    "bert": Family(name="bert", model_types=("bert",), **_BERT_LIKE),
    "roberta": Family(name="roberta", model_types=("roberta", "xlm-roberta"), **_BERT_LIKE),
    "t5": Family(
        name="t5",
        model_types=("t5", "mt5"),
        stacks=_t5_stacks(_T5_FFN),
        config=ConfigFields(hidden="d_model", heads="num_heads", ffn="d_ff", head_dim="d_kv"),
        norm="rms",
        norm_eps_attr="variance_epsilon",
        embeddings=("shared", "encoder.embed_tokens", "decoder.embed_tokens"),
        # `classifier` is only T5ForTokenClassification's, which reads the encoder's stream
        hidden_readers=("lm_head", "classification_head.dense", "qa_outputs", "classifier"),
        position_bias_source="relative_attention_bias",
        auto_classes=(
            "AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification",
            "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForTextEncoding",
        ),
        extra={"gated_stacks": _t5_stacks(_T5_GATED_FFN)},
    ),
    "llama": Family(name="llama", model_types=("llama",), **{
        **_LLAMA_LIKE,
        "config": replace(_LLAMA_LIKE["config"], attention_bias="attention_bias", ffn_bias="mlp_bias"),
    }),
    "mistral": Family(name="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    "qwen2": Family(name="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
}


# transformers' table of architectures for each Auto class (modeling_auto.<name>: {model_type: class name})
AUTO_MAPPINGS: dict[str, str] = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "AutoModelForPreTraining": "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    "AutoModelForNextSentencePrediction": "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES",
    "AutoModelForTextEncoding": "MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES",
}


# The Hugging Face hub task (a model card's ``pipeline_tag``) of the heads each Auto class builds; the heads of the
# other Auto classes (multiple choice, pre-training, next sentence) have none.
PIPELINE_TAGS: dict[str, str] = {
    "AutoModel": "feature-extraction",
    "AutoModelForTextEncoding": "feature-extraction",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSeq2SeqLM": "text2text-generation",
}


def auto_class_names(auto_class: str) -> dict[str, str]:
    """{model_type: architecture class name} that the named stock Auto class builds."""
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, AUTO_MAPPINGS[auto_class])


def stock_tokenizer_class(model_type: str) -> type | None:
    """The tokenizer class AutoTokenizer picks for a stock model type when the checkpoint's files name none."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    return TOKENIZER_MAPPING.get(CONFIG_MAPPING[model_type], None)


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


def family_of(model_or_config) -> Family:
    """The family entry of a model or config; a clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "prunetune_base_model_type", None) or getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            if fam.name == "t5" and getattr(config, "is_gated_act", False):
                return Family(**{**fam.__dict__, "stacks": fam.extra["gated_stacks"]})
            return fam
    supported = ", ".join(sorted(FAMILIES))
    raise PrunetuneError(f"unsupported model type {model_type!r}: prunetune supports {supported}")


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


def out_width(linear: nn.Module) -> int:
    return linear.weight.shape[0] if hasattr(linear, "weight") else linear.base_layer.weight.shape[0]


def in_width(linear: nn.Module) -> int:
    return linear.weight.shape[1] if hasattr(linear, "weight") else linear.base_layer.weight.shape[1]


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
    return [n for n in norms if n is not None]


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


# ---------------------------------------------------------------------------------------------------------
# What replaces an attention block once none of its heads is left
# ---------------------------------------------------------------------------------------------------------


def cache_argument(kwargs: dict) -> Cache | None:
    """The KV cache handed to an attention block's forward, or None.

    transformers 5.24 renamed the argument from ``past_key_values`` to ``cache`` (the old name is still
    accepted from callers, but the models now pass ``cache=``); both names are read so 5.23 works too.
    """
    from transformers.cache_utils import Cache

    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if isinstance(value, Cache):
            return value
    return None


class EmptyAttention(nn.Module):
    """Attention with no head whose output projection lives inside it (LLaMA, T5).

    The projection keeps zero input columns, so the block returns its bias (or zeros) at full width.
    T5 blocks also hand the shared relative position bias on, which the position-bias hooks provide.
    """

    def __init__(self, original: nn.Module, o_name: str, keep: tuple[str, ...] = (), *, self_attention: bool = True):
        super().__init__()
        self.o_name = o_name
        setattr(self, o_name, getattr(original, o_name))
        # T5: the bias table of layer 0 and what computing it needs stay here (see position_bias_hooks)
        for name in keep:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.returns_position_bias = bool(keep)
        self.layer_idx = getattr(original, "layer_idx", None)
        self.self_attention = self_attention

    def _track_cache(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Keep this layer's KV-cache entry in step with the sequence, with zero placeholder keys and values.

        transformers reads the cached length of a layer from that layer's cache entry: layer 0's (or the first
        sliding layer's) for the causal mask, its query offset and the position ids, and each T5 layer's for its
        relative position bias. A block that never wrote to its entry made cached generation go wrong (masks and
        position bias computed for a zero-length past) once such a layer had no head.

        The placeholder goes through the cache's own ``update``, so every cache class (dynamic, static, sliding
        window) advances its length and sizes its mask its own way. It is one head of width one unless the entry
        already holds tensors of another shape (a static cache initialised ahead of time), which an update must
        match.
        """
        cache = cache_argument(kwargs)
        if cache is None or not self.self_attention or self.layer_idx is None:
            return
        if kwargs.get("key_value_states") is not None:
            return  # cross-attention: its cache holds the encoder states and is never read for lengths
        cache = getattr(cache, "self_attention_cache", cache)  # T5: EncoderDecoderCache
        batch, length = hidden_states.shape[:2]
        heads, width, dtype = 1, 1, hidden_states.dtype
        layers = getattr(cache, "layers", [])
        held = getattr(layers[self.layer_idx], "keys", None) if self.layer_idx < len(layers) else None
        if isinstance(held, torch.Tensor) and held.dim() == 4:
            heads, width, dtype = held.shape[1], held.shape[-1], held.dtype
        stub = hidden_states.new_zeros(batch, heads, length, width, dtype=dtype)
        cache.update(stub, stub, self.layer_idx)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._track_cache(hidden_states, kwargs)
        out = getattr(self, self.o_name)(hidden_states[..., :0])
        if self.returns_position_bias:
            return out, kwargs.get("position_bias"), None
        return out, None


class EmptyCore(nn.Module):
    """BERT-style attention core with no head: a zero-width output, so the output projection adds its bias.

    As a decoder (BERT/RoBERTa causal LM) its layer's KV-cache entry is kept in step with placeholders, as
    :class:`EmptyAttention` does: without it the entry stayed empty and an exported graph had no present for it.
    """

    _track_cache = EmptyAttention._track_cache

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attention = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._track_cache(hidden_states, kwargs)
        return hidden_states[..., :0], None


_T5_BIAS_ATTRS = (
    "relative_attention_bias",
    "has_relative_attention_bias",
    "is_decoder",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_idx",
    # compute_bias calls self._relative_position_bucket (a staticmethod of T5Attention): without it an
    # EmptyAttention in layer 0 (every head of the bias owner removed) raised AttributeError on forward.
    "_relative_position_bucket",
)


def make_empty_attention(site: AttentionSite) -> tuple[str, nn.Module]:
    """The path (relative to the layer) and module that replace an attention block with no head left."""
    spec = site.spec
    if spec.empty == "core":
        return spec.core, EmptyCore(getattr(get(site.layer, spec.core), "layer_idx", None))
    o_name = spec.o.rpartition(".")[2]
    keep = _T5_BIAS_ATTRS if spec.position_bias else ()
    return spec.module, EmptyAttention(site.module, o_name, keep, self_attention=spec.name == "self")


def set_head_count(site: AttentionSite, heads: int, kv_heads: int) -> None:
    """Rewrite the per-module attributes that hold the head count after slicing."""
    mod = site.module
    for attr in site.spec.heads_attrs:
        if hasattr(mod, attr):
            setattr(mod, attr, heads)
    for attr in site.spec.width_attrs:
        if hasattr(mod, attr):
            setattr(mod, attr, heads * site.head_dim)
    if site.spec.kv_groups_attr and kv_heads:
        setattr(mod, site.spec.kv_groups_attr, heads // kv_heads)


# ---------------------------------------------------------------------------------------------------------
# T5's shared relative position bias
# ---------------------------------------------------------------------------------------------------------


def _full_position_bias(attn: nn.Module, args: tuple, kwargs: dict, full_heads: int) -> torch.Tensor:
    """The bias for every original head, as layer 0 of the unpruned stack would compute it.

    Runs before the block's own forward, so the cache still holds the past only. The key length is the one
    the attention will see once it has written this step: past + query for a dynamic cache, the whole
    preallocated length for a static one; the cache's ``get_mask_sizes`` states it for either, as it does for
    the mask.
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    kv = kwargs.get("key_value_states")
    cache = cache_argument(kwargs)
    q_len = hidden.shape[1]
    past = 0
    if kv is not None:
        k_len = kv.shape[1]  # cross-attention: the encoder states, cached or not
    elif cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # T5: EncoderDecoderCache
        past = cache.get_seq_length(attn.layer_idx)
        # a static cache returns its length counter itself, which the block's update advances in place
        past = past.clone() if isinstance(past, torch.Tensor) else past
        k_len = cache.get_mask_sizes(q_len, attn.layer_idx)[0]
        # Under torch.jit.trace (ONNX export) sizes are traced values: int() would bake the traced key length
        # into the graph, and a decoder step with another past length would get a bias of the wrong width.
        k_len = k_len if torch.jit.is_tracing() else int(k_len)
    else:
        k_len = q_len
    if getattr(attn, "has_relative_attention_bias", False):
        from transformers.models.t5.modeling_t5 import T5Attention

        return T5Attention.compute_bias(attn, q_len, k_len, device=hidden.device, past_seen_tokens=past)
    return torch.zeros((1, full_heads, q_len, k_len), device=hidden.device, dtype=hidden.dtype)


def install_position_bias_hooks(site: AttentionSite, kept: list[int], full_heads: int) -> None:
    """Make a T5 attention with a subset of heads take its own rows of the full shared bias.

    The bias that leaves every layer is the full one, so later layers can pick their own heads from it
    (transformers' own T5 head pruning broke here: issues 19625 and 32917).
    """
    mod = site.module
    for h in getattr(mod, "_prunetune_bias_hooks", []):
        h.remove()
    index = torch.tensor(kept, dtype=torch.long, device="cpu")

    def pre(module, args, kwargs):
        full = kwargs.get("position_bias")
        if full is None:
            full = _full_position_bias(module, args, kwargs, full_heads)
        module._prunetune_full_bias = full
        kwargs["position_bias"] = full.index_select(1, index.to(full.device))
        return args, kwargs

    def post(module, args, output):
        full = module._prunetune_full_bias
        module._prunetune_full_bias = None
        return (output[0], full, *output[2:])

    mod._prunetune_bias_hooks = [
        mod.register_forward_pre_hook(pre, with_kwargs=True),
        mod.register_forward_hook(post),
    ]


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
