"""ONNX export of a model directory (a prunetune export or a stock checkpoint), checked in ONNX Runtime.

    report = export_onnx("pruned/", "model.onnx", quantize="int8")

The head is the one the directory was saved with (``config.architectures``), or ``auto_class``:

* a causal LM gives two graphs: ``model.onnx`` (no past: input_ids, attention_mask -> logits and the
  presents) and ``model.with_past.onnx`` (also past_key_values.* -> logits and the presents);
* a T5 model (``AutoModel``, ``AutoModelForSeq2SeqLM``) gives ``model.encoder.onnx``, ``model.decoder.onnx``
  (decoder_input_ids, encoder_hidden_states, encoder_attention_mask -> logits or last_hidden_state, presents)
  and ``model.decoder_with_past.onnx``;
* every other head gives one graph at ``out`` (input_ids, attention_mask -> the head's tensors: logits,
  start/end logits, last_hidden_state and pooler_output, ...).

``<stem>[.<graph>].int8.onnx`` are the int8 copies. Past key values are per layer: ``past_key_values.<i>.key``
/ ``.value`` in, ``present.<i>.key`` / ``.value`` out, of shape (batch, kv_heads_i, length, head_dim_i) with
each layer's own kv heads as the pruned model has them (the report's ``past`` lists them). A layer whose
attention has no head left keeps a placeholder entry (``past_shape`` [1, 1]) that only carries the length;
sliding-window layers (Mistral, Qwen2) keep their whole past, masked to the window.
``model.with_past.onnx`` also runs the prefill, from a past of length 0 (one session, one copy of the weights,
for a whole generation). The causal LM's position ids are computed inside the graph from the attention mask,
as ``generate()`` does, so left padding works; the attention mask covers the past and the new tokens. The T5
decoder takes the encoder's output and recomputes the cross-attention keys and values at each step (only
self-attention is cached).

Every graph is run in ONNX Runtime on inputs of other shapes than the traced ones (when the axes are dynamic)
and compared with the PyTorch model; causal LMs and T5 run a prefill and two decode steps, each side feeding
its own outputs back. Nothing is written unless every output is within the tolerance; every file lands by rename.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import AUTO_MAPPINGS, Family, family_of, layer_sites, token_types

TOLERANCE = 1e-4
# Relative part of the check: fp32 sums in another order differ by ~1e-7 of their size per op; through 30 layers
# into logits of size 20-30 (SmolLM2) that is 2e-4 absolute, fine by any standard but over 1e-4.
RTOL = 1e-5
QUANTIZE_CHOICES = ("int8",)
# 12: the lowest at which every family's graphs were checked (T5's do not load in ONNX Runtime at 11);
# 20: the newest the TorchScript exporter writes (and its default)
MIN_OPSET, MAX_OPSET = 12, 20
INSTALL_HINT = "pip install prunetune[onnx]"

# Output fields that are not the head's answer: loss needs labels; caches, per-layer states and attentions are
# debugging aids; T5 heads repeat the encoder's states.
_NOT_OUTPUTS = {
    "loss", "cache", "past_key_values", "hidden_states", "attentions", "cross_attentions", "encoder_hidden_states",
    "encoder_attentions", "decoder_hidden_states", "decoder_attentions", "encoder_last_hidden_state",
}
_CHOICES = 3  # multiple-choice heads: choices per example in the traced inputs


def _require_runtime():
    """onnx and onnxruntime, or one line telling how to install them."""
    try:
        onnx = importlib.import_module("onnx")
        ort = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise PrunetuneError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): {INSTALL_HINT}") from None
    return onnx, ort


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        # Plain layers for every layer, sliding-window ones included (no config): a sliding layer decides in Python
        # whether it is full yet, which a trace would fix at the traced length, so a graph traced past the window
        # went wrong before it (and the reverse). A plain layer keeps the whole past and the sliding-window mask,
        # which the model builds from its config, hides what lies outside the window: the same attention.
        cache = DynamicCache(_pairs(past)) if self.with_past else DynamicCache()
        positions = causal_positions(attention_mask, input_ids.shape[1])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=True, **{self.cache_kw: cache})
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


def _head_graphs(model, data: Inputs, shapes: Shapes, eos: bool) -> list[Graph]:
    example = data.head(shapes.batch, shapes.seq, eos=eos)
    names = ["input_ids", "attention_mask", "token_type_ids"][: len(example)]
    module = HeadGraph(model)
    module.outputs = module.output_names(*example)
    in_axes = {0: "batch", 1: "choices", 2: "sequence"} if data.choices else {0: "batch", 1: "sequence"}
    axes = {**{n: in_axes for n in names}, **_output_axes(module, data, eos)}
    return [Graph("model", module, names, list(module.outputs), axes, example)]


def _causal_graphs(model, data: Inputs, shapes: Shapes) -> tuple[list[Graph], list[dict]]:
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


def _seq2seq_graphs(model, output: str, data: Inputs, shapes: Shapes) -> tuple[list[Graph], list[dict]]:
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


# ---------------------------------------------------------------------------------------------------------
# Export, check, quantise
# ---------------------------------------------------------------------------------------------------------


def _trace(graph: Graph, path: Path, opset: int | None, dynamic: bool) -> None:
    """torch.onnx.export with the TorchScript tracer (``dynamo=False``).

    Why not torch 2.13's default, the torch.export-based exporter (dynamo=True): on these models it gives the
    same numbers but takes 10-25x longer (6-10 s against 0.4 s for a 3-layer test model on 2 busy cores),
    needs onnxscript, and must prove every shape guard symbolically, which transformers' data-dependent heads
    (T5's pooling at the eos tokens, LLaMA's at the last non-pad token) and prunetune's forward hooks (T5's
    shared position bias, the placeholder cache entries of empty attention blocks) make fragile. The tracer
    records the ops one forward pass runs; what it could bake in as constants (a length, a branch) is what
    the verification catches, since it runs every graph on other shapes than the traced ones.
    """
    # The exporter switches the module to eval mode and, after, back to the mode it found, recursively: a
    # wrapper left in training mode (nn.Module's default) would switch the model's dropout on for good.
    graph.module.eval()
    kwargs = {"dynamic_axes": graph.axes} if dynamic else {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer's warnings (legacy exporter; python values recorded as constants) are what the check covers
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module, graph.example, str(path), input_names=graph.inputs,
                          output_names=graph.outputs, dynamo=False, do_constant_folding=True, **kwargs)


def _session(ort, path: Path, threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # fatal only: ORT warns about the unused initialisers of emptied blocks, and its errors reach us as exceptions
    opts.log_severity_level = 4
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(graph: Graph, tensors: tuple) -> dict[str, np.ndarray]:
    return {n: (t.numpy() if isinstance(t, torch.Tensor) else t) for n, t in zip(graph.inputs, tensors, strict=True)}


def _diffs(names: list[str], ref: tuple[torch.Tensor, ...], got: list[np.ndarray], rtol: float) -> dict:
    """Per output: the largest absolute difference, and the largest part of one beyond `rtol` x |PyTorch's|
    (what the check holds to `atol`, as numpy.allclose does)."""
    out = {}
    for name, r, g in zip(names, ref, got, strict=True):
        r = r.detach().float().numpy()
        if r.shape != g.shape:
            raise PrunetuneError(f"ONNX output {name} has shape {g.shape}, PyTorch's {r.shape}")
        diff = np.abs(r - g)
        out[name] = (float(diff.max()), float((diff - rtol * np.abs(r)).max())) if r.size else (0.0, 0.0)
    return out


def _torch_run(graph: Graph, tensors: tuple) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = graph.module(*[torch.as_tensor(t) for t in tensors])
    return out if isinstance(out, tuple) else (out,)


Runner = Callable[[Graph, tuple], list[np.ndarray]]


def check_graphs(graphs: list[Graph], data: Inputs, shapes: Shapes, runner: Runner, eos: bool,
                 rtol: float = 0.0) -> dict:
    """Run the graphs as an application would and compare every output with PyTorch's.

    One graph: a batch of the check shape. Causal LM: a left-padded prefill, then decode steps of one new token
    each. T5: encoder, decoder, then decode steps. ONNX Runtime continues from its own outputs (encoder states,
    presents) and PyTorch from its own, so errors that compound over the steps show up. With static axes the
    shapes are the traced ones, so only one decode step fits. Returns {graph: {output: max abs diff}},
    "_steps": {step: max abs diff} and "_excess": {(graph, output): largest difference beyond rtol x |ref|}.
    """
    batch, seq = shapes.check()
    steps = 2 if shapes.dynamic else 1
    by = {g.name: g for g in graphs}
    diffs: dict = {"_steps": {}, "_excess": {}}

    def run(graph: Graph, ref_in: tuple, got_in: tuple, tag: str) -> tuple[tuple, list[np.ndarray]]:
        ref, got = _torch_run(graph, ref_in), runner(graph, got_in)
        d = _diffs(graph.outputs, ref, got, rtol)
        mine = diffs.setdefault(graph.name, {})
        for k, (absolute, excess) in d.items():
            mine[k] = max(absolute, mine.get(k, 0.0))
            diffs["_excess"][graph.name, k] = max(excess, diffs["_excess"].get((graph.name, k), -np.inf))
        diffs["_steps"][tag] = max(a for a, _ in d.values())
        return ref, got

    if "with_past" in by:
        ids, mask = data.batch(batch, seq, left=True)
        ref, got = run(by["model"], (ids, mask), (ids, mask), "prefill")
        for s in range(steps):
            step = data.tokens(batch, 1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            ref, got = run(by["with_past"], (step, mask, *ref[1:]), (step, mask, *got[1:]), f"step {s + 1}")
    elif "encoder" in by:
        ids, mask = data.batch(batch, seq, eos=True)
        (ref_states,), (got_states,) = run(by["encoder"], (ids, mask), (ids, mask), "encoder")
        dec = data.tokens(batch, 3 if shapes.dynamic else by["decoder"].example[0].shape[1])
        ref, got = run(by["decoder"], (dec, ref_states, mask), (dec, got_states, mask), "decoder")
        for s in range(steps):
            step = data.tokens(batch, 1)
            ref, got = run(by["decoder_with_past"], (step, ref_states, mask, *ref[1:]),
                           (step, got_states, mask, *got[1:]), f"step {s + 1}")
    else:
        inputs = data.head(batch, seq, eos=eos)
        run(by["model"], inputs, inputs, "model")
    return diffs


def _quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights (activations quantised at run time, per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing (shape inference) on the root logger: for static quant
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _graph_path(out: Path, graph: str, suffix: str = "") -> Path:
    name = out.stem if graph == "model" else f"{out.stem}.{graph}"
    return out.with_name(f"{name}{suffix}{out.suffix}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def export_onnx(
    model_dir: str | Path,
    out: str | Path,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    quantize: str | None = None,
    verify: bool = True,
    auto_class: str | None = None,
    atol: float = TOLERANCE,
    rtol: float = RTOL,
    batch_size: int = 2,
    seq_len: int = 16,
    overwrite: bool = False,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Export the model in MODEL_DIR to ONNX at OUT (and sibling files, see the module doc); check it in ORT.

    `dynamic`: batch, sequence and past lengths are dynamic axes; else the graph is fixed to `batch_size` x
    `seq_len` (the trace shape; a decode step takes one token). `quantize="int8"`: also write int8 copies
    (dynamic quantisation), whose difference from PyTorch is reported, not held to the tolerance. `verify`: run
    every graph in ONNX Runtime and write nothing unless |ORT - PyTorch| <= `atol` + `rtol` x |PyTorch| for every
    element of every output (numpy.allclose's rule; the report's ``max_abs_diff`` is the plain largest
    difference).
    `auto_class`: load with this Auto class instead of the saved architecture's. Returns the report: files,
    per graph its inputs, outputs and largest differences, and the per-layer layout of the past key values.
    """
    onnx, ort = _require_runtime()
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".onnx":
        raise PrunetuneError(f"the output file must end in .onnx (got {out})")
    if out.is_dir():
        raise PrunetuneError(f"output path {out} is a directory")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise PrunetuneError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (got {quantize!r})")
    if batch_size < 1 or seq_len < 4:
        raise PrunetuneError("batch_size must be >= 1 and seq_len >= 4")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise PrunetuneError(f"opset must be between {MIN_OPSET} and {MAX_OPSET} (got {opset})")

    model, auto_class = load_for_export(model_dir, auto_class)
    family = family_of(model)
    encoder_decoder = [s.name for s in family.stacks] == ["encoder", "decoder"]
    eos = encoder_decoder  # T5 inputs end in eos (its sequence classifier pools there)
    choices = _CHOICES if auto_class == "AutoModelForMultipleChoice" else 0
    # segment ids are an input where they change the answer (BERT's 2 types; RoBERTa embeds 1, all zeros)
    data = Inputs.for_model(model, seed, choices, segments=token_types(model) > 1)
    shapes = Shapes(batch_size, seq_len, dynamic)
    layout: list[dict] = []
    if auto_class == "AutoModelForCausalLM":
        kind = "causal-lm"
        graphs, layout = _causal_graphs(model, data, shapes)
    elif encoder_decoder and auto_class in ("AutoModel", "AutoModelForSeq2SeqLM"):
        kind = "encoder-decoder"
        output = "logits" if auto_class == "AutoModelForSeq2SeqLM" else "last_hidden_state"
        graphs, layout = _seq2seq_graphs(model, output, data, shapes)
    else:
        kind = "single"
        graphs = _head_graphs(model, data, shapes, eos)

    targets = {g.name: _graph_path(out, g.name) for g in graphs}
    if quantize:
        targets.update({f"{g.name}.int8": _graph_path(out, g.name, ".int8") for g in graphs})
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise PrunetuneError(f"{existing[0]} already exists (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)

    threads = threads or torch.get_num_threads()
    sessions: dict[Path, object] = {}

    def ort_runner(graph: Graph, tensors: tuple) -> list[np.ndarray]:
        if graph.file not in sessions:
            sessions[graph.file] = _session(ort, graph.file, threads)
        return sessions[graph.file].run(graph.outputs, _feed(graph, tensors))

    report: dict = {
        "model_dir": str(model_dir), "family": family.name, "auto_class": auto_class,
        "architecture": type(model).__name__.removeprefix("Prunetune"), "kind": kind,
        "exporter": "torch.onnx.export, TorchScript tracer (dynamo=False)", "dynamic": dynamic,
        "trace_shape": [batch_size, seq_len], "past": layout, "atol": atol, "rtol": rtol, "verified": verify,
    }
    # Everything is written in a hidden directory beside OUT (same file system) and moved into place by rename,
    # once every graph has passed: an interrupted or failed export leaves no file behind, half-written or not.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for g in graphs:
            (staging / g.name).mkdir()
            g.file = staging / g.name / "fp32.onnx"
            try:
                _trace(g, g.file, opset, dynamic)
            except Exception as e:  # the tracer's messages run to pages: one line, the cause chained
                raise PrunetuneError(f"ONNX export of the {g.name} graph failed: {_one_line(e)}") from e
            if len(list(g.file.parent.iterdir())) > 1:  # tensors written beside the graph: over protobuf's 2 GB
                raise PrunetuneError(f"the {g.name} graph is over 2 GB (ONNX external data), which is not supported")
            proto = onnx.load(str(g.file), load_external_data=False)
            declared = {i.name for i in proto.graph.input}
            if unused := [i for i, name in enumerate(g.inputs) if name not in declared]:
                g.module = KeepInputs(g.module, unused)
                _trace(g, g.file, opset, dynamic)
                proto = onnx.load(str(g.file), load_external_data=False)
            g.report.update(file=str(targets[g.name]), bytes=g.file.stat().st_size, inputs=g.inputs,
                            outputs=g.outputs,
                            opset=max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))

        check_state = data.generator.get_state()  # the int8 copies are checked on the same inputs
        if verify:
            try:
                diffs = check_graphs(graphs, data, shapes, ort_runner, eos, rtol)
            except PrunetuneError:
                raise
            except Exception as e:  # ORT refusing a graph (a shape baked in by the trace) is an export failure
                raise PrunetuneError(f"ONNX Runtime could not run the exported graph: {_one_line(e)}") from e
            report["steps"] = diffs.pop("_steps")
            excess = diffs.pop("_excess")
            report["max_abs_diff"] = max(v for d in diffs.values() for v in d.values())
            for g in graphs:
                g.report["max_abs_diff"] = diffs[g.name]
            (graph, output), worst = max(excess.items(), key=lambda x: x[1])
            if worst > atol:
                raise PrunetuneError(
                    f"ONNX Runtime differs from PyTorch by {diffs[graph][output]:.3g} (more than {atol:g} + {rtol:g} x "
                    f"|value|) in output {output} of the {graph} graph: nothing written (see --atol, --no-verify)")

        staged = {g.file: targets[g.name] for g in graphs}
        if quantize:
            int8 = [Graph(g.name, g.module, g.inputs, g.outputs, g.axes, g.example, g.file.with_name("int8.onnx"))
                    for g in graphs]
            for q in int8:
                _quantize_int8(q.file.with_name("fp32.onnx"), q.file)
                staged[q.file] = targets[f"{q.name}.int8"]
            quantized: dict = {"type": quantize, "files": [str(targets[f"{q.name}.int8"]) for q in int8],
                               "bytes": {q.name: q.file.stat().st_size for q in int8}}
            if verify:
                data.generator.set_state(check_state)
                qd = check_graphs(int8, data, shapes, ort_runner, eos)
                quantized["steps"] = qd.pop("_steps")
                qd.pop("_excess")
                quantized["graphs"] = qd
                quantized["max_abs_diff"] = max(v for d in qd.values() for v in d.values())
            report["quantized"] = quantized
        sessions.clear()  # ORT keeps the files open (memory-mapped)
        for src, dst in staged.items():
            os.replace(src, dst)
    finally:
        sessions.clear()
        shutil.rmtree(staging, ignore_errors=True)

    report["graphs"] = {g.name: g.report for g in graphs}
    report["files"] = [str(p) for p in targets.values()]
    report["opset"] = graphs[0].report["opset"]
    report["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


__all__ = [
    "AUTO_MAPPINGS", "RTOL", "TOLERANCE", "auto_class_of", "cache_keyword", "causal_positions", "export_onnx",
    "load_for_export",
]
