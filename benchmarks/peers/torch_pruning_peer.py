"""Torch-Pruning 1.6 (`pip install torch-pruning`, github.com/VainF/Torch-Pruning) as its users run it on
LLMs: a peer baseline, not prunetune code.

Variant "example" follows `examples/LLMs/prune_llm.py` of the Torch-Pruning repository (v1.6.1):
`BasePruner` with `GroupMagnitudeImportance(p=2, group_reduction="mean")`, local (uniform) pruning
(`global_pruning=False`), one `pruning_ratio` for the hidden size and the FFN width, `head_pruning_ratio` equal
to it with `prune_num_heads=True` and `prune_head_dims=False` (RoPE stays intact), GQA through `num_heads`
(query heads on q_proj, KV heads on k_proj/v_proj; Torch-Pruning then removes query heads evenly per KV group and
leaves K/V alone), `ignored_layers=[lm_head]`, `round_to=4`, the example's one-sentence tracing input, and its
attribute updates after pruning. The example's ratio is a width ratio; the ratio that keeps a given fraction of
the layer parameters is found from the pruned shapes Torch-Pruning's rules produce (see `example_ratio`).

Variant "ffn" is the workaround left when the attention groups cannot be built (see below): every attention
projection goes into `ignored_layers`, which also freezes the hidden size (its group contains o_proj), so only
FFN neurons are pruned, by the same importance, uniformly per layer.

`importance="taylor"` swaps in `GroupTaylorImportance` with weight gradients summed over the calibration
batches (the way Torch-Pruning's Taylor examples feed it), for a data-aware run.

On transformers 5 / torch 2.13 the "example" variant does not finish: building the pruning group of any
q/k/v projection (every `BasePruner` does this in its constructor, in `DependencyGraph.get_all_groups`) loops
without end. Torch-Pruning gives a 4-D slice on its last dim (the `x[..., :d/2]` of RoPE's `rotate_half`) no
index mapping, while the `torch.cat` after it shifts indices by d/2, so the search around that cycle keeps
finding "new" indices (Torch-Pruning issue 527 reports the same on Qwen3). A watchdog turns this into a
`PeerFailure` after `timeout_s`.
"""

from __future__ import annotations

import math
import signal
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .common import PeerFailure, attn_shape, decoder_layers, layer_costs, layer_params

TESTED = "1.6"  # the example's settings are those of Torch-Pruning 1.6.x
EXAMPLE_TEXT = "Hello world."  # prune_llm.py traces the model on this sentence
ROUND_TO = 4


class _Timeout(BaseException):
    """Raised by the watchdog inside Torch-Pruning's code (BaseException: its own `except Exception` cannot eat it)."""


@contextmanager
def watchdog(seconds: float, progress: dict) -> Iterator[None]:
    """Interrupt the body after `seconds` (SIGALRM, main thread only), recording how far it got in `progress`."""
    if seconds <= 0:
        yield
        return

    def fire(signum, frame):
        progress["where"] = _innermost_torch_pruning_frame(frame)
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _innermost_torch_pruning_frame(frame) -> str:
    """The calls inside torch_pruning at the moment of interruption, outermost first (where it hung)."""
    names = [fs.name for fs in traceback.extract_stack(frame) if "/torch_pruning/" in fs.filename.replace("\\", "/")]
    return " > ".join(dict.fromkeys(names)) or "outside torch_pruning"


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise PeerFailure("torch-pruning is not installed (pip install 'prunetune[bench]')", stage="import",
                          ratio_independent=True) from e
    return tp


def _version() -> str:
    """The installed distribution's version (torch_pruning.__version__ said 1.6.0 in the 1.6.1 wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "?"


def example_num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """prune_llm.py's `num_heads`: query heads on q_proj, KV heads on k_proj and v_proj (its GQA handling)."""
    out = {}
    for layer in decoder_layers(model):
        attn = layer.self_attn
        shape = attn_shape(attn)
        out[attn.q_proj] = shape.heads
        out[attn.k_proj] = shape.kv_heads
        out[attn.v_proj] = shape.kv_heads
    return out


def _kept_channels(n: int, ratio: float) -> int:
    """Torch-Pruning's local rule: n - (n - int(n * (1 - ratio))) channels, rounded down to `round_to`."""
    kept = int(n * (1 - ratio))
    return max(kept - kept % ROUND_TO, 0)


def _example_layer_params(model: nn.Module, ratio: float) -> int:
    """Layer parameters after the example's pruning at `ratio` (hidden, FFN and query heads; K/V heads stay)."""
    total = 0
    for layer in decoder_layers(model):
        shape = attn_shape(layer.self_attn)
        hidden = layer.mlp.down_proj.weight.shape[0]
        ffn = layer.mlp.down_proj.weight.shape[1]
        h, f = _kept_channels(hidden, ratio), _kept_channels(ffn, ratio)
        # base_pruner: ceil(ratio * heads) removed, spread as ceil(n / kv) per KV group
        per_group = math.ceil(math.ceil(ratio * shape.heads) / shape.kv_heads)
        q = shape.heads - per_group * shape.kv_heads
        hd = shape.head_dim
        total += 2 * h * q * hd + 2 * h * shape.kv_heads * hd + 3 * h * f + 2 * h
    return total


def example_ratio(model: nn.Module, keep: float) -> float:
    """The smallest width ratio whose pruned shapes keep at most `keep` of the layer parameters (bisection)."""
    target = keep * layer_params(model)
    lo, hi = 0.0, 0.95
    if _example_layer_params(model, hi) > target:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if _example_layer_params(model, mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def ffn_ratio(model: nn.Module, keep: float) -> float:
    """The FFN width ratio that keeps at most `keep` of the layer parameters when only neurons go."""
    layers = decoder_layers(model)
    widths = {layer.mlp.down_proj.weight.shape[1] for layer in layers}
    if len(widths) != 1:
        raise PeerFailure("the ffn variant assumes layers of equal FFN width", stage="budget")
    width = widths.pop()
    costs = [layer_costs(layer) for layer in layers]
    fixed = sum(c.total - c.per_neuron * width for c in costs)  # attention and norms stay
    room = keep * sum(c.total for c in costs) - fixed
    per_layer = math.floor(room / costs[0].per_neuron / len(layers))
    kept = max(ROUND_TO, per_layer - per_layer % ROUND_TO)
    # Torch-Pruning keeps int(width * (1 - ratio)) channels: aim half a channel above `kept`
    return 1 - (kept + 0.5) / width


def _accumulate_gradients(model: nn.Module, batches: Iterable[dict]) -> None:
    """Weight gradients summed over the calibration batches, which GroupTaylorImportance reads."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        for batch in batches:
            model(**batch).loss.backward()


def _update_attributes(model: nn.Module) -> None:
    """prune_llm.py's bookkeeping after pruning, for the attributes transformers 5 reads."""
    model.config.hidden_size = model.lm_head.in_features
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        shape = attn_shape(attn)
        attn.num_key_value_groups = shape.heads // shape.kv_heads
        mlp.hidden_size = mlp.gate_proj.in_features
        mlp.intermediate_size = mlp.gate_proj.out_features
        layer.hidden_size = mlp.gate_proj.in_features


def prune_torch_pruning(
    model: nn.Module,
    tokenizer,
    batches: Iterable[dict],
    keep: float,
    *,
    variant: str = "example",
    importance: str = "magnitude",
    timeout_s: float = 300.0,
    log=print,
) -> dict:
    """Prune with Torch-Pruning to about `keep` of the layer parameters; returns the settings it ran with."""
    tp = _import_tp()
    version = _version()
    if not version.startswith(TESTED):
        log(f"warning: torch-pruning {version}; the example's settings are those of {TESTED}.x")
    if variant not in ("example", "ffn"):
        raise ValueError(f"unknown Torch-Pruning variant {variant!r}")
    if importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"unknown Torch-Pruning importance {importance!r}")
    device = next(model.parameters()).device
    example_inputs = torch.tensor(tokenizer.encode(EXAMPLE_TEXT)).unsqueeze(0).to(device)
    if variant == "example":
        ratio = example_ratio(model, keep)
        kw = dict(
            pruning_ratio=ratio,
            ignored_layers=[model.lm_head],
            num_heads=example_num_heads(model),
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
        )
    else:
        ratio = ffn_ratio(model, keep)
        attention = [m for layer in decoder_layers(model) for m in layer.self_attn.modules()
                     if isinstance(m, nn.Linear)]
        kw = dict(pruning_ratio=ratio, ignored_layers=[model.lm_head, *attention])
    settings = {
        "torch_pruning": version,
        "variant": variant,
        "importance": importance,
        "pruning_ratio": ratio,
        "global_pruning": False,
        "round_to": ROUND_TO,
        **({"head_pruning_ratio": ratio, "prune_num_heads": True, "prune_head_dims": False} if variant == "example"
           else {"ignored": "lm_head and every attention projection"}),
    }
    if importance == "taylor":
        _accumulate_gradients(model, batches)

    # the constructor traces the model into a dependency graph, then searches every group (get_all_groups)
    progress = {"stage": "the BasePruner constructor (tracing and dependency-group search)"}
    start = time.perf_counter()
    try:
        with watchdog(timeout_s, progress):
            log(f"torch-pruning {version}: {settings}")
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs=example_inputs,
                importance=imp,
                global_pruning=False,
                output_transform=lambda x: x.logits,
                round_to=ROUND_TO,
                **kw,
            )
            progress["stage"] = "pruning (pruner.step)"
            log(f"torch-pruning: graph and groups ready after {time.perf_counter() - start:.1f} s; pruning")
            for group in pruner.step(interactive=True):
                group.prune()
    except _Timeout:
        elapsed = time.perf_counter() - start
        stage = progress["stage"]
        raise PeerFailure(
            f"hung in {stage}: no result after {elapsed:.0f} s (interrupted in {progress.get('where', '?')})",
            stage=stage,
            ratio_independent=not stage.startswith("pruning"),
        ) from None
    except Exception as e:  # a peer's crash is a table entry, not the benchmark's
        stage = progress["stage"]
        raise PeerFailure(f"failed in {stage}: {type(e).__name__}: {e}", stage=stage,
                          ratio_independent=not stage.startswith("pruning")) from e
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    _update_attributes(model)
    settings["search_and_prune_s"] = time.perf_counter() - start
    return settings

