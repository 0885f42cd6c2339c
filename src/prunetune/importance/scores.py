"""Scores, what their numbers mean, the scorer registry and the normalisations a caller may ask for.

Nothing here runs a model: the scorers (mask_scorers, activation_scorers, layer_scorers, magnitude)
register themselves with :func:`register`, and :func:`prunetune.importance.compute` runs them.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prunetune.errors import PrunetuneError

# What a scorer's number estimates (Scores.meta["unit"]).
FIRST_ORDER = "loss_change_first_order"  # |first-order Taylor estimate| of the loss change from removing it
FISHER = "loss_change_fisher"  # second-order (empirical Fisher) estimate of the loss change from removing it
PROXY = "proxy"  # a ranking signal without a loss unit (weight norms, activation statistics, similarities)
UNITS = (FIRST_ORDER, FISHER, PROXY)

# Normalisations compute() can apply (Scores.meta["normalize"]); the raw scores stay in meta["raw"].
NORMALIZE = ("none", "layer", "kind")


@dataclass
class Scores:
    """Importance per head, FFN neuron, hidden dim and whole layer; higher = keep.

    - ``heads``: per attention site ("decoder.3/self", "decoder.0/cross"), one score per query head;
    - ``neurons``: per layer ("encoder.2"), one score per FFN neuron;
    - ``hidden``: one score per hidden dim (None when not scored);
    - ``layers``: whole structures: "decoder.3" (the layer), an attention site key ("decoder.3/self": the
      attention block) and "decoder.3/ffn" (the FFN block); empty when the scorer does not score them.

    ``meta`` keys every scorer run through ``compute`` sets:

    - ``"unit"``: what each number estimates: ``"loss_change_first_order"`` (expected |first-order change of
      the task loss| when the structure is removed), ``"loss_change_fisher"`` (the empirical-Fisher estimate
      of that change) or ``"proxy"`` (a ranking signal with no loss unit);
    - ``"comparable"`` (bool): True when heads, neurons, hidden dims and layers share that unit, so that
      selection may rank them together by score per cost as they are. False for proxies and for any
      normalised scores: selection must then not mix kinds without an explicit normalisation of its own;
    - ``"normalize"``: ``"none"``, ``"layer"`` (each site's heads, each layer's neurons, the hidden dims and
      the layers dict scaled to unit L2 norm) or ``"kind"`` (all heads together, all neurons, ...);
    - ``"raw"``: with a normalisation, the unnormalised heads/neurons/hidden/layers (see :meth:`raw`), and
      ``"comparable_raw"``: whether those raw scores are comparable;
    - ``"scorer"`` and ``"options"`` (every option the scorer ran with, ``hidden`` included).
    """

    heads: dict[str, list[float]] = field(default_factory=dict)
    neurons: dict[str, list[float]] = field(default_factory=dict)
    hidden: list[float] | None = None
    meta: dict = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        try:
            d = json.loads(Path(path).read_text())
            return cls(d["heads"], d["neurons"], d.get("hidden"), d.get("meta", {}), d.get("layers", {}))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise PrunetuneError(f"cannot read scores {path}: {e}") from e

    def head_matrix(self, prefix: str = "") -> tuple[list[str], list[list[float]]]:
        """Layers x heads (rows padded with NaN), for heat maps; keys filtered by prefix."""
        keys = [k for k in self.heads if k.startswith(prefix)]
        width = max((len(self.heads[k]) for k in keys), default=0)
        return keys, [self.heads[k] + [math.nan] * (width - len(self.heads[k])) for k in keys]

    def raw(self) -> Scores:
        """The scores before any normalisation (themselves when there was none)."""
        raw = self.meta.get("raw")
        if raw is None:
            return self
        meta = {k: v for k, v in self.meta.items() if k != "raw"}
        meta["normalize"] = "none"
        meta["comparable"] = bool(meta.get("comparable_raw", False))
        return Scores(raw["heads"], raw["neurons"], raw.get("hidden"), meta, raw.get("layers", {}))


def scores_from(values: dict[str, torch.Tensor], layers: dict[str, float] | None = None) -> Scores:
    """Scores from tensors keyed like the hooks: attention site keys, "ffn:<layer>" and "hidden"."""
    heads = {k: _floats(v) for k, v in values.items() if not k.startswith("ffn:") and k != "hidden"}
    neurons = {k[4:]: _floats(v) for k, v in values.items() if k.startswith("ffn:")}
    hidden = values.get("hidden")
    return Scores(heads, neurons, None if hidden is None else _floats(hidden), {}, dict(layers or {}))


def _floats(v: torch.Tensor) -> list[float]:
    return [float(x) for x in v.detach().double().cpu()]


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerInfo:
    """What a registered scorer's numbers are and how compute() runs it."""

    unit: str = PROXY
    comparable: bool = False  # its kinds share the unit (see Scores)
    normalize: str = "none"  # the default normalisation (the method's paper, where it prescribes one)
    needs_data: bool = True


SCORERS: dict[str, Callable[..., Scores]] = {}


def register(name: str, *, unit: str = PROXY, comparable: bool | None = None, normalize: str = "none",
             needs_data: bool = True) -> Callable:
    """Register a scorer ``fn(model, batches, *, hidden, **options) -> Scores`` under `name`.

    `comparable` defaults to True for the loss-change units and False for proxies.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalisation {normalize!r}")
    info = ScorerInfo(unit, unit != PROXY if comparable is None else comparable, normalize, needs_data)

    def deco(fn):
        fn.info = info
        SCORERS[name] = fn
        return fn

    return deco


def get_scorer(name: str) -> Callable[..., Scores]:
    if name not in SCORERS:
        raise PrunetuneError(f"unknown importance scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def scorer_options(name: str) -> dict:
    """The keyword options a scorer takes (besides `hidden`), with their defaults."""
    params = inspect.signature(get_scorer(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "hidden"}


# ---------------------------------------------------------------------------------------------------------
# Normalisation (explicit, recorded) and what recipes read off scores
# ---------------------------------------------------------------------------------------------------------


def _unit_norm(values: list[float]) -> list[float]:
    n = math.sqrt(sum(v * v for v in values))
    return [v / n for v in values] if n > 1e-20 else list(values)


def _unit_norm_groups(groups: dict[str, list[float]]) -> dict[str, list[float]]:
    """All groups together scaled to unit L2 norm (one factor for the whole kind)."""
    n = math.sqrt(sum(v * v for vs in groups.values() for v in vs))
    return {k: [v / n for v in vs] for k, vs in groups.items()} if n > 1e-20 else dict(groups)


def normalised(scores: Scores, how: str) -> Scores:
    """`scores` under a normalisation; "none" gives them back unchanged. The raw scores go into meta["raw"].

    "layer": every attention site's heads and every layer's neurons to unit L2 norm (Michel et al.: each layer
    gets the same score mass, so a greedy over layers cannot empty one). "kind": one factor per kind. Either
    way the result has no unit any more, so meta["comparable"] becomes False.
    """
    if how not in NORMALIZE:
        raise PrunetuneError(f"unknown normalisation {how!r}; known: {', '.join(NORMALIZE)}")
    if how == "none":
        return scores
    layer_list = list(scores.layers)
    layer_vals = [scores.layers[k] for k in layer_list]
    if how == "layer":
        heads = {k: _unit_norm(v) for k, v in scores.heads.items()}
        neurons = {k: _unit_norm(v) for k, v in scores.neurons.items()}
    else:
        heads = _unit_norm_groups(scores.heads)
        neurons = _unit_norm_groups(scores.neurons)
    hidden = None if scores.hidden is None else _unit_norm(scores.hidden)
    layers = dict(zip(layer_list, _unit_norm(layer_vals), strict=True))
    raw = {"heads": scores.heads, "neurons": scores.neurons, "hidden": scores.hidden, "layers": scores.layers}
    meta = {**scores.meta, "raw": raw, "comparable_raw": scores.meta.get("comparable", False),
            "normalize": how, "comparable": False}
    return Scores(heads, neurons, hidden, meta, layers)


def block_importance(scores: Scores) -> dict[str, float]:
    """How much the task needs each layer: the sum of its heads' RAW scores (every attention site of it).

    Used to give the most needed layers a higher LoRA rank. Summing per-layer normalised scores would give
    every layer about the same number; the raw sum keeps the differences between layers.
    """
    out: dict[str, float] = {}
    for key, vals in scores.raw().heads.items():
        layer = key.split("/")[0]
        out[layer] = out.get(layer, 0.0) + float(sum(vals))
    return out


def rank_correlation(a: Scores, b: Scores) -> float:
    """Spearman correlation of two head score sets over the heads they share (how task-specific heads are)."""
    from scipy.stats import spearmanr

    keys = [k for k in a.heads if k in b.heads and len(a.heads[k]) == len(b.heads[k])]
    xs = [v for k in keys for v in a.heads[k]]
    ys = [v for k in keys for v in b.heads[k]]
    if len(xs) < 2:
        raise PrunetuneError("the two score sets share no heads")
    return float(spearmanr(xs, ys).statistic)
