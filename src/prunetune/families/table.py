"""The families table: what each architecture calls its attention, FFN, stacks, norms and config fields,
keyed by ``model_type``, and which Auto classes and hub tasks its heads belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from prunetune.errors import PrunetuneError


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
    # Whether a causal LM takes the position ids generate() makes from the attention mask (rotary decoders).
    # BERT-like models embed learned absolute positions that their own forward counts (RoBERTa from
    # padding_idx + 1 over non-pad ids): an exported graph must let the model count them, or its logits differ.
    positions_from_mask: bool = True
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
    positions_from_mask=False,
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
