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
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from prunetune.errors import PrunetuneError
from prunetune.families import family_of, token_types
from prunetune.onnx_graphs import (  # the public names are re-exported: callers import them from here
    AUTO_MAPPINGS,
    CHOICES,
    Graph,
    Inputs,
    KeepInputs,
    Shapes,
    auto_class_of,
    cache_keyword,
    causal_graphs,
    causal_positions,
    head_graphs,
    load_for_export,
    seq2seq_graphs,
)

TOLERANCE = 1e-4
# Relative part of the check: fp32 sums in another order differ by ~1e-7 of their size per op; through 30 layers
# into logits of size 20-30 (SmolLM2) that is 2e-4 absolute, fine by any standard but over 1e-4.
RTOL = 1e-5
QUANTIZE_CHOICES = ("int8",)
# 12: the lowest at which every family's graphs were checked (T5's do not load in ONNX Runtime at 11);
# 20: the newest the TorchScript exporter writes (and its default)
MIN_OPSET, MAX_OPSET = 12, 20
INSTALL_HINT = "pip install prunetune[onnx]"



def _require_runtime():
    """onnx and onnxruntime, or one line telling how to install them."""
    try:
        onnx = importlib.import_module("onnx")
        ort = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise PrunetuneError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): {INSTALL_HINT}") from None
    return onnx, ort


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
    choices = CHOICES if auto_class == "AutoModelForMultipleChoice" else 0
    # segment ids are an input where they change the answer (BERT's 2 types; RoBERTa embeds 1, all zeros)
    data = Inputs.for_model(model, seed, choices, segments=token_types(model) > 1)
    shapes = Shapes(batch_size, seq_len, dynamic)
    layout: list[dict] = []
    if auto_class == "AutoModelForCausalLM":
        kind = "causal-lm"
        graphs, layout = causal_graphs(model, data, shapes)
    elif encoder_decoder and auto_class in ("AutoModel", "AutoModelForSeq2SeqLM"):
        kind = "encoder-decoder"
        output = "logits" if auto_class == "AutoModelForSeq2SeqLM" else "last_hidden_state"
        graphs, layout = seq2seq_graphs(model, output, data, shapes)
    else:
        kind = "single"
        graphs = head_graphs(model, data, shapes, eos)

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
