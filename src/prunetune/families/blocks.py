"""What replaces an attention block once none of its heads is left, head counts after surgery, and T5's shared
relative position bias for attentions that keep a subset of heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from prunetune.families.sites import AttentionSite, DroppedNorm, LayerSites, get, input_norms, set_module

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


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


def drop_dead_norms(lay: LayerSites) -> None:
    """Replace the input norm of every empty sublayer of a pre-norm layer by a :class:`DroppedNorm`. `lay` must be
    read after the surgery that emptied them (head counts are live)."""
    empty = {s.key for s in lay.attentions.values() if not s.num_heads}
    if not lay.ffn.width:
        empty.add(f"{lay.key}/ffn")
    for key, (path, norm) in input_norms(lay).items():
        if key in empty and not isinstance(norm, DroppedNorm):
            set_module(lay.module, path, DroppedNorm())


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
