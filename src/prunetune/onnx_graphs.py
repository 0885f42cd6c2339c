"""What gets traced for ONNX: the head a model directory was saved with, modules that take and return flat
tensors (a head, a causal LM with its past, T5's encoder and decoder), their example inputs and the past layout.

onnx_export.py traces these graphs, checks them in ONNX Runtime and quantises them; this module needs neither
onnx nor onnxruntime.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import AUTO_MAPPINGS, Family, family_of, layer_sites

# Output fields that are not the head's answer: loss needs labels; caches, per-layer states and attentions are
# debugging aids; T5 heads repeat the encoder's states.
_NOT_OUTPUTS = {
    "loss", "cache", "past_key_values", "hidden_states", "attentions", "cross_attentions", "encoder_hidden_states",
    "encoder_attentions", "decoder_hidden_states", "decoder_attentions", "encoder_last_hidden_state",
}
CHOICES = 3  # multiple-choice heads: choices per example in the traced inputs

# ---------------------------------------------------------------------------------------------------------
# Which model, which head
# ---------------------------------------------------------------------------------------------------------


def _architectures(auto_class: str) -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, AUTO_MAPPINGS[auto_class], {})


def auto_class_of(config, family: Family) -> str:
    """The Auto class whose stock class is the one the directory was saved as (``architectures[0]``)."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise PrunetuneError("the model's config names no architecture: pass auto_class (--auto-class)")
    arch = archs[0].removeprefix("Prunetune")  # an export may carry its registered subclass's name
    base_type = getattr(config, "prunetune_base_model_type", None) or config.model_type
    for auto_name in (*family.auto_classes, *AUTO_MAPPINGS):
        if auto_name in AUTO_MAPPINGS and _architectures(auto_name).get(base_type) == arch:
            return auto_name
    raise PrunetuneError(f"no ONNX export for {archs[0]}: pass auto_class (--auto-class), one of "
                         f"{', '.join(family.auto_classes)}")


def load_for_export(model_dir: str | Path, auto_class: str | None = None) -> tuple[nn.Module, str]:
    """The model of MODEL_DIR with the head it was saved with (or `auto_class`), eager attention, eval mode."""
    import transformers

    import prunetune.export  # noqa: F401  (registers the prunetune_<family> model types)

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise PrunetuneError(f"no model at {path} (config.json missing)")
    config = transformers.AutoConfig.from_pretrained(path)
    family = family_of(config)
    if auto_class is None:
        auto_class = auto_class_of(config, family)
    elif auto_class not in AUTO_MAPPINGS:
        raise PrunetuneError(f"unknown auto class {auto_class!r}: one of {', '.join(family.auto_classes)}")
    # Eager attention: plain matmul/softmax ops that every opset and runtime has. sdpa gains nothing once traced
    # (the exporter decomposes it into the same ops) and brings shape-dependent branches into the trace.
    # fp32 whatever the checkpoint holds: ONNX Runtime's CPU kernels for bf16/fp16 are few; int8 is --quantize.
    try:
        model = getattr(transformers, auto_class).from_pretrained(path, attn_implementation="eager",
                                                                  dtype=torch.float32)
    except ValueError as e:  # e.g. an Auto class that has no mapping for this model type
        raise PrunetuneError(f"cannot load {path} with {auto_class}: {str(e).strip().splitlines()[0]}") from None
    return model.eval(), auto_class


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 takes the KV cache as ``cache=``, 5.23 as ``past_key_values=``."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _present(cache) -> list[torch.Tensor]:
    """Keys and values of every layer of a DynamicCache, flat (its public iteration: key, value[, sliding])."""
    return [t for entry in cache for t in entry[:2]]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


# ---------------------------------------------------------------------------------------------------------
# What gets traced: modules taking and returning flat tensors
# ---------------------------------------------------------------------------------------------------------


class HeadGraph(nn.Module):
    """input_ids, attention_mask[, token_type_ids] -> the head's output tensors."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}

    def _run(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types, **self.kwargs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._run(*inputs)
        return tuple(out[name] for name in self.outputs)

    def output_names(self, *inputs: torch.Tensor) -> tuple[str, ...]:
        with torch.no_grad():
            out = self._run(*inputs)
        return tuple(k for k, v in out.items() if k not in _NOT_OUTPUTS and isinstance(v, torch.Tensor))


def causal_positions(attention_mask: torch.Tensor, new_tokens: int | torch.Tensor) -> torch.Tensor:
    """Position ids of the last `new_tokens` tokens as ``generate()`` makes them: real tokens before each."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -new_tokens:]


class CausalLMGraph(nn.Module):
    """input_ids, attention_mask[, past keys and values per layer] -> logits, present keys and values."""

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        self.cache_kw = cache_keyword(model)
        self.positions = family_of(model).positions_from_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        # Plain layers for every layer, sliding-window ones included (no config): a sliding layer decides in Python
        # whether it is full yet, which a trace would fix at the traced length, so a graph traced past the window
        # went wrong before it (and the reverse). A plain layer keeps the whole past and the sliding-window mask,
        # which the model builds from its config, hides what lies outside the window: the same attention.
        cache = DynamicCache(_pairs(past)) if self.with_past else DynamicCache()
        kw = {"position_ids": causal_positions(attention_mask, input_ids.shape[1])} if self.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_kw: cache}, **kw)
        # the cache is updated in place: read it back rather than the output field that 5.24 renamed
        return (out["logits"], *_present(cache))


class KeepInputs(nn.Module):
    """The same graph, with inputs the traced ops never read tied into its first output (times zero).

    The exporter leaves out inputs no op reads: a model whose every attention block was emptied never reads its
    attention mask. Every export of a head keeps the same inputs, so an application feeds a pruned model as it
    fed the dense one.
    """

    def __init__(self, module: nn.Module, unused: list[int]):
        super().__init__()
        self.inner = module
        self.unused = unused

    def forward(self, *inputs: torch.Tensor):
        out = self.inner(*inputs)
        first, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        for i in self.unused:
            first = first + inputs[i].sum().to(first.dtype) * 0
        return (first, *rest) if isinstance(out, tuple) else first


class EncoderGraph(nn.Module):
    """Encoder of an encoder-decoder: input_ids, attention_mask -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)["last_hidden_state"]


class DecoderGraph(nn.Module):
    """Decoder of an encoder-decoder: decoder_input_ids, encoder_hidden_states, encoder_attention_mask[, past
    self-attention keys and values] -> logits (last_hidden_state for the base model), present keys and values."""

    def __init__(self, model: nn.Module, with_past: bool, output: str):
        super().__init__()
        self.model = model
        self.with_past = with_past
        self.output = output
        self.cache_kw = cache_keyword(model)

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, *past: torch.Tensor):
        from transformers import DynamicCache, EncoderDecoderCache

        self_cache = DynamicCache(_pairs(past)) if self.with_past else DynamicCache()
        # cross-attention starts empty, so every step computes it from the encoder's states (it is not cached)
        cache = EncoderDecoderCache(self_cache, DynamicCache())
        out = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=decoder_input_ids, use_cache=True, **{self.cache_kw: cache})
        return (out[self.output], *_present(self_cache))


# ---------------------------------------------------------------------------------------------------------
# Graphs, inputs, past layout
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Graph:
    """One ONNX file: the module to trace, its tensor names, dynamic axes and trace inputs."""

    name: str  # "model", "with_past", "encoder", "decoder", "decoder_with_past"
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]
    example: tuple[torch.Tensor, ...] = ()
    file: Path | None = None
    report: dict = field(default_factory=dict)


@dataclass
class Inputs:
    """Token batches for tracing and checking: ids above the special tokens; row 0 is padded."""

    vocab: int
    pad: int
    eos: int | None
    generator: torch.Generator
    choices: int = 0  # multiple choice: (batch, choices, sequence)
    segments: bool = False  # heads that take token_type_ids (BERT: sentence pairs)

    @classmethod
    def for_model(cls, model: nn.Module, seed: int, choices: int = 0, segments: bool = False) -> Inputs:
        cfg = model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None
        return cls(cfg.vocab_size, pad, eos, torch.Generator().manual_seed(seed), choices, segments)

    def like(self, seed: int, choices: int | None = None) -> Inputs:
        """The same kind of inputs from a fresh generator."""
        choices = self.choices if choices is None else choices
        return Inputs(self.vocab, self.pad, self.eos, torch.Generator().manual_seed(seed), choices, self.segments)

    def head(self, batch: int, length: int, eos: bool = False) -> tuple[torch.Tensor, ...]:
        """A single-graph head's inputs: ids, mask and, where the head takes them, segment ids (the second
        half of each row's real tokens is segment 1, as a tokenised sentence pair)."""
        ids, mask = self.batch(batch, length, eos=eos)
        if not self.segments:
            return ids, mask
        real = mask.sum(-1, keepdim=True)
        types = (torch.arange(length) >= real // 2).long() * mask
        return ids, mask, types

    def tokens(self, batch: int, length: int) -> torch.Tensor:
        low = min(8, self.vocab // 2)  # above the usual special ids (pad, eos, bos, unk, cls, sep, mask)
        return torch.randint(low, self.vocab, (batch, length), generator=self.generator)

    def batch(self, batch: int, length: int, *, left: bool = False, eos: bool = False) -> tuple:
        rows = batch * self.choices if self.choices else batch
        ids = self.tokens(rows, length)
        mask = torch.ones_like(ids)
        pad = min(3, length - 2) if rows > 1 else 0  # row 0 shorter, so masking is exercised
        if eos and self.eos is not None:  # T5 ends every sequence with eos (its classifier reads it there)
            ids[:, -1] = self.eos
            if pad and not left:
                ids[0, length - 1 - pad] = self.eos
        if pad:
            cols = slice(0, pad) if left else slice(length - pad, length)
            mask[0, cols] = 0
            ids[0, cols] = self.pad
        if self.choices:
            return ids.view(batch, self.choices, length), mask.view(batch, self.choices, length)
        return ids, mask


def cache_stack(family: Family) -> str:
    """The stack whose self-attention is cached: the decoder where there is one, else the only stack."""
    names = [s.name for s in family.stacks]
    return "decoder" if "decoder" in names else names[0]


def past_layout(model: nn.Module, live: tuple[torch.Tensor, ...]) -> list[dict]:
    """Per cached layer: kv heads and head dim from the live weights (families.layer_sites), checked against
    the cache entries a forward pass filled (`live`, flat), whose shapes also give an empty layer's placeholder."""
    stack = cache_stack(family_of(model))
    layers = [lay for lay in layer_sites(model) if lay.stack.name == stack]
    pairs = _pairs(live)
    if len(layers) != len(pairs):
        raise PrunetuneError(f"the cache holds {len(pairs)} layers, the {stack} has {len(layers)}")
    out = []
    for lay, (key, value) in zip(layers, pairs, strict=True):
        site = lay.attentions["self"]
        shape = [int(key.shape[1]), int(key.shape[-1])]
        if site.num_heads and shape != [site.num_kv_heads, site.head_dim]:
            raise PrunetuneError(f"{lay.key}: cache entries of {shape[0]} heads x {shape[1]}, the weights hold "
                                 f"{site.num_kv_heads} x {site.head_dim}")
        if value.shape != key.shape:
            raise PrunetuneError(f"{lay.key}: cached keys {tuple(key.shape)} and values {tuple(value.shape)} differ")
        out.append({"layer": lay.key, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
                    "past_shape": shape, "empty": site.num_heads == 0})
    return out


def _kv_names(n: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n) for kv in ("key", "value")]


def _kv_axes(names: list[str], length: str) -> dict[str, dict[int, str]]:
    return {name: {0: "batch", 2: length} for name in names}


@dataclass
class Shapes:
    """Trace shapes (fixed in the graph when the axes are static) and check shapes (others, when dynamic)."""

    batch: int
    seq: int
    dynamic: bool

    def check(self) -> tuple[int, int]:
        return (self.batch + 1, self.seq + 3) if self.dynamic else (self.batch, self.seq)


def _output_axes(module: HeadGraph, data: Inputs, eos: bool) -> dict[str, dict[int, str]]:
    """Which output dims follow the batch, the sequence (or the choices): from two PyTorch runs of other shapes."""
    probes = [(2, 11, 4), (3, 12, 5)]  # (batch, sequence, choices): all distinct, so each dim is told apart
    shapes = []
    for batch, seq, choices in probes:
        probe = data.like(0, choices * bool(data.choices))
        with torch.no_grad():
            shapes.append([tuple(t.shape) for t in module(*probe.head(batch, seq, eos=eos))])
    known = dict(zip(probes[0], ("batch", "sequence", "choices"), strict=True))
    axes = {}
    for name, a, b in zip(module.outputs, *shapes, strict=True):
        axes[name] = {i: known.get(x, f"{name}_{i}") for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}
    return axes


def head_graphs(model, data: Inputs, shapes: Shapes, eos: bool) -> list[Graph]:
    example = data.head(shapes.batch, shapes.seq, eos=eos)
    names = ["input_ids", "attention_mask", "token_type_ids"][: len(example)]
    module = HeadGraph(model)
    module.outputs = module.output_names(*example)
    in_axes = {0: "batch", 1: "choices", 2: "sequence"} if data.choices else {0: "batch", 1: "sequence"}
    axes = {**{n: in_axes for n in names}, **_output_axes(module, data, eos)}
    return [Graph("model", module, names, list(module.outputs), axes, example)]


def causal_graphs(model, data: Inputs, shapes: Shapes) -> tuple[list[Graph], list[dict]]:
    ids, mask = data.batch(shapes.batch, shapes.seq, left=True)
    first_module = CausalLMGraph(model, with_past=False)
    with torch.no_grad():
        live = first_module(ids, mask)[1:]
    layout = past_layout(model, live)
    past, present = _kv_names(len(layout), "past_key_values"), _kv_names(len(layout), "present")
    io = ["input_ids", "attention_mask"]
    first = Graph("model", first_module, io, ["logits", *present],
                  {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                   "logits": {0: "batch", 1: "sequence"}, **_kv_axes(present, "sequence")},
                  (ids, mask))
    step = data.tokens(shapes.batch, 1)
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    second = Graph("with_past", CausalLMGraph(model, with_past=True), [*io, *past], ["logits", *present],
                   {"input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "past_sequence+sequence"},
                    "logits": {0: "batch", 1: "sequence"}, **_kv_axes(past, "past_sequence"),
                    **_kv_axes(present, "past_sequence+sequence")},
                   (step, step_mask, *live))
    return [first, second], layout


def seq2seq_graphs(model, output: str, data: Inputs, shapes: Shapes) -> tuple[list[Graph], list[dict]]:
    ids, mask = data.batch(shapes.batch, shapes.seq, eos=True)
    dec = data.tokens(shapes.batch, max(2, shapes.seq // 2))
    encoder, decoder = EncoderGraph(model), DecoderGraph(model, with_past=False, output=output)
    with torch.no_grad():
        states = encoder(ids, mask)
        live = decoder(dec, states, mask)[1:]
    layout = past_layout(model, live)
    past, present = _kv_names(len(layout), "past_key_values"), _kv_names(len(layout), "present")
    enc = {"encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
           "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"}}
    dec_io = ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    dec_axes = {"decoder_input_ids": {0: "batch", 1: "decoder_sequence"}, output: {0: "batch", 1: "decoder_sequence"}}
    graphs = [
        Graph("encoder", encoder, ["input_ids", "attention_mask"], ["last_hidden_state"],
              {"input_ids": {0: "batch", 1: "encoder_sequence"}, "attention_mask": {0: "batch", 1: "encoder_sequence"},
               "last_hidden_state": {0: "batch", 1: "encoder_sequence"}}, (ids, mask)),
        Graph("decoder", decoder, dec_io, [output, *present],
              {**dec_axes, **enc, **_kv_axes(present, "decoder_sequence")}, (dec, states, mask)),
        Graph("decoder_with_past", DecoderGraph(model, with_past=True, output=output), [*dec_io, *past],
              [output, *present],
              {**dec_axes, **enc, **_kv_axes(past, "past_decoder_sequence"),
               **_kv_axes(present, "past_decoder_sequence+decoder_sequence")},
              (data.tokens(shapes.batch, 1), states, mask, *live)),
    ]
    return graphs, layout
