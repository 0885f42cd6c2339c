"""How much a task needs each head, FFN neuron and hidden dim: scorers with one interface and a registry.

Data-driven scorers run the model on a sample of task data with all-ones masks attached
(``requires_grad`` on the masks only: no weight gradient is computed or kept) and read:

- ``head_grad``: Michel et al. / the Pruning-Adapter paper: sum over batches of |dL/dmask|, divided by
  the number of tokens, L2-normalised per layer;
- ``taylor``: first-order Taylor on the mask, |sum over batches of dL/dmask|;
- ``fisher``: Kwon et al., sum over batches of (dL/dmask)^2;
- ``salience``: APT's activation x gradient, sum over tokens of |a * dL/da| per structure;
- ``salience_kurtosis``: salience plus APT's outlier term (square root of the activations' kurtosis),
  for pruning before training;
- ``magnitude``: data-free L2 norm of the weights belonging to each structure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import all_norms, family_of, hidden_sites, layer_sites, unwrap
from prunetune.masks import Masks, attach
from prunetune.train import progress


@dataclass
class Scores:
    """Importance per head (by attention site), per neuron (by layer) and per hidden dim; higher = keep."""

    heads: dict[str, list[float]] = field(default_factory=dict)
    neurons: dict[str, list[float]] = field(default_factory=dict)
    hidden: list[float] | None = None
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        try:
            d = json.loads(Path(path).read_text())
            return cls(d["heads"], d["neurons"], d.get("hidden"), d.get("meta", {}))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise PrunetuneError(f"cannot read scores {path}: {e}") from e

    def head_matrix(self, prefix: str = "") -> tuple[list[str], list[list[float]]]:
        """Layers x heads (rows padded with NaN), for heat maps; keys filtered by prefix."""
        keys = [k for k in self.heads if k.startswith(prefix)]
        width = max((len(self.heads[k]) for k in keys), default=0)
        return keys, [self.heads[k] + [math.nan] * (width - len(self.heads[k])) for k in keys]


SCORERS: dict[str, Callable[..., Scores]] = {}


def register(name: str):
    def deco(fn):
        SCORERS[name] = fn
        return fn

    return deco


def get_scorer(name: str) -> Callable[..., Scores]:
    if name not in SCORERS:
        raise PrunetuneError(f"unknown importance scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def _normalise_per_layer(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v / v.norm().clamp_min(1e-20) for k, v in d.items()}


def _listify(d: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {k: [float(x) for x in v.detach().cpu()] for k, v in d.items()}


class ActivationStats:
    """Hooks that accumulate, per structure, |activation x gradient| and the activations' moments.

    Used for scoring before training and, with `ema`, by APT during training (the hooks ride on the
    ordinary backward pass, so they add no extra pass).
    """

    SIGNALS = ("salience", "fisher")

    def __init__(self, model: nn.Module, *, hidden: bool = True, moments: bool = False, ema: float | None = None,
                 signal: str = "salience"):
        if signal not in self.SIGNALS:
            raise PrunetuneError(f"unknown activation signal {signal!r}; known: {', '.join(self.SIGNALS)}")
        self.model = model
        self.moments = moments
        self.ema = ema
        # salience: sum over examples, tokens and a structure's dims of |a * dL/da| (APT).
        # fisher: per example, the structure's summed a * dL/da is exactly dL/dmask of a mask on it (Kwon et al.);
        # its square, summed over examples, is the empirical Fisher, read off the same backward pass.
        self.signal = signal
        self.salience: dict[str, torch.Tensor] = {}
        self._step: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}  # count, sum x, x^2, x^3, x^4 per unit
        self._handles = []
        self.hidden = hidden
        self.rehook(model)

    def rehook(self, model: nn.Module) -> None:
        """(Re)attach the hooks; needed after surgery, since head counts and modules change."""
        self.remove()
        for lay in layer_sites(model):
            for site in lay.attentions.values():
                if site.num_heads:
                    self._handles.append(site.proj("o").register_forward_pre_hook(self._pre(site.key, site.num_heads)))
            if lay.ffn.width:
                self._handles.append(lay.ffn.output.register_forward_pre_hook(self._pre("ffn:" + lay.key, None)))
        if self.hidden:
            for norm in all_norms(model):
                self._handles.append(norm.register_forward_hook(self._post("hidden")))

    def follow_plan(self, plan) -> None:
        """Keep the smoothed salience of the structures a plan keeps, at their new positions."""
        def keep(key: str, index: list[int] | None) -> None:
            if index is not None and key in self.salience:
                self.salience[key] = self.salience[key][torch.tensor(index, dtype=torch.long)]

        for key, idx in plan.heads.items():
            keep(key, idx)
        for key, idx in plan.neurons.items():
            keep("ffn:" + key, idx)
        keep("hidden", plan.hidden)
        self._step, self.stats = {}, {}

    def _add(self, store: dict, key: str, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    def _observe(self, key: str, x: torch.Tensor, heads: int | None) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if heads:
            flat = flat.view(flat.shape[0], heads, -1)
        if self.moments:
            red = (0, 2) if heads else (0,)
            n = torch.tensor(float(flat.numel() / (flat.shape[1] if heads else flat.shape[-1])))
            mom = torch.stack([n.expand(flat.shape[1] if heads else flat.shape[-1])] + [
                flat.pow(p).sum(red) for p in (1, 2, 3, 4)
            ])
            self._add(self.stats, key, mom)
        if x.requires_grad:

            def grad_hook(g, flat=flat, key=key, heads=heads, batch=batch):
                self._add(self._step, key, self._signal(flat, g.reshape(flat.shape), heads, batch))

            x.register_hook(grad_hook)

    CHUNK_ROWS = 1024  # tokens per slice of the activation x gradient product

    def _signal(self, a: torch.Tensor, g: torch.Tensor, heads: int | None, batch: int) -> torch.Tensor:
        """Per unit: sum |a * g| (salience) or sum over examples of (sum a * g)^2 (fisher), a few examples at a time.

        The hook fires early in the backward pass, while nearly every saved activation is still alive: slicing
        keeps the product's transient at a few MB whatever the batch (a whole FFN activation's product and its
        absolute value were 25 MB at MiniLM, batch 32 x 64; a long-sequence decoder batch makes that GBs).
        """
        rows = a.shape[0] // batch  # tokens per example
        step = max(1, self.CHUNK_ROWS // max(rows, 1))
        total = None
        for start in range(0, batch, step):
            sl = slice(start * rows, min(batch, start + step) * rows)
            prod = a[sl] * g[sl].float()
            if self.signal == "fisher":  # (examples, tokens, units[, head dim]) -> per example and unit
                per_example = prod.view(-1, rows, *prod.shape[1:]).sum(1)
                part = (per_example.sum(2) if heads else per_example).pow(2).sum(0)
            else:
                part = prod.abs_().sum((0, 2)) if heads else prod.abs_().sum(0)
            total = part if total is None else total.add_(part)
        return total

    def _pre(self, key: str, heads: int | None):
        def hook(module, args):
            self._observe(key, args[0], heads)

        return hook

    def _post(self, key: str):
        def hook(module, args, output):
            self._observe(key, output, None)

        return hook

    def step(self) -> None:
        """Fold this step's salience in (sum, or exponential moving average when `ema` is set)."""
        for k, v in self._step.items():
            if self.ema is not None and k in self.salience and self.salience[k].shape == v.shape:
                self.salience[k] = self.ema * self.salience[k] + (1 - self.ema) * v
            else:
                self.salience[k] = v if self.ema is not None else self.salience.get(k, 0) + v
        self._step = {}

    def kurtosis(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, (n, s1, s2, s3, s4) in self.stats.items():
            mean = s1 / n
            var = (s2 / n - mean**2).clamp_min(1e-12)
            m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4
            out[k] = (m4 / var**2).clamp_min(0)
        return out

    def reset(self) -> None:
        self.salience, self._step, self.stats = {}, {}, {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def to_scores(self, extra: dict[str, torch.Tensor] | None = None) -> Scores:
        src = extra if extra is not None else self.salience
        heads = {k: v for k, v in src.items() if not k.startswith("ffn:") and k != "hidden"}
        neurons = {k[4:]: v for k, v in src.items() if k.startswith("ffn:")}
        hidden = src.get("hidden")
        return Scores(_listify(heads), _listify(neurons), None if hidden is None else _listify({"h": hidden})["h"])


def _frozen(model: nn.Module):
    """Context: no weight requires grad (restored afterwards), so backward computes only mask/activation grads."""

    class _Ctx:
        def __enter__(self):
            self.flags = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in self.flags:
                p.requires_grad_(False)

        def __exit__(self, *exc):
            for p, flag in self.flags:
                p.requires_grad_(flag)

    return _Ctx()


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise PrunetuneError("importance needs labelled data: the model returned no loss")
    return out.loss


def _run(model: nn.Module, batches: Iterable[dict], *, hidden: bool, moments: bool):
    """One pass over the data: mask gradients (per batch) and activation statistics."""
    device = next(model.parameters()).device
    masks = Masks.ones(model, hidden=hidden, requires_grad=True)
    abs_sum: dict[str, torch.Tensor] = {}
    signed_sum: dict[str, torch.Tensor] = {}
    sq_sum: dict[str, torch.Tensor] = {}
    tokens = 0
    was_training = model.training
    model.eval()  # no dropout: scores must be reproducible
    stats = None
    try:
        with _frozen(model), attach(model, masks):
            # Hooks run in registration order: the statistics hooks go on after the masks, so on the norms
            # they see the masked output the loss depends on. Registered first, they saw the norm's own
            # output, which the hidden-mask hook replaces: no gradient reached it and `salience` silently
            # returned no hidden scores (hidden=None) while heads and neurons were scored.
            stats = ActivationStats(model, hidden=hidden, moments=moments)
            n_batches = 0
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                masks.zero_grad()
                _loss(model, batch).backward()
                stats.step()
                named = {**masks.heads, **{"ffn:" + k: v for k, v in masks.neurons.items()}}
                if masks.hidden is not None:
                    named["hidden"] = masks.hidden
                for k, m in named.items():
                    g = m.grad.detach() if m.grad is not None else torch.zeros_like(m)
                    abs_sum[k] = abs_sum.get(k, 0) + g.abs()
                    signed_sum[k] = signed_sum.get(k, 0) + g
                    sq_sum[k] = sq_sum.get(k, 0) + g.pow(2)
                n_batches += 1
            if n_batches == 0:
                raise PrunetuneError("importance needs data, but the data set is empty")
    finally:
        if stats is not None:
            stats.remove()
        model.train(was_training)
    return abs_sum, signed_sum, sq_sum, tokens, stats


# Scores of kinds that are not on one scale say so (Scores.meta["normalize"], read by selection): after a
# per-layer L2 normalisation a head's and a neuron's score no longer estimate the same loss change.
INCOMPARABLE_KINDS = {"normalize": "per_kind"}


def _mask_scorer(kind: str, normalise: bool):
    def scorer(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
        abs_sum, signed_sum, sq_sum, tokens, stats = _run(model, batches, hidden=hidden, moments=False)
        if kind == "abs":
            vals = {k: v / max(tokens, 1) for k, v in abs_sum.items()}
        elif kind == "signed":
            vals = {k: v.abs() for k, v in signed_sum.items()}
        else:
            vals = sq_sum
        scores = stats.to_scores(_normalise_per_layer(vals) if normalise else vals)
        if normalise:
            scores.meta.update(INCOMPARABLE_KINDS)
        return scores

    return scorer


register("head_grad")(_mask_scorer("abs", normalise=True))
register("taylor")(_mask_scorer("signed", normalise=False))
register("fisher")(_mask_scorer("square", normalise=False))


@register("salience")
def salience(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    *_, stats = _run(model, batches, hidden=hidden, moments=False)
    return stats.to_scores()


@register("salience_kurtosis")
def salience_kurtosis(model: nn.Module, batches: Iterable[dict], *, hidden: bool = False) -> Scores:
    *_, stats = _run(model, batches, hidden=hidden, moments=True)
    kurt = stats.kurtosis()
    combined = {}
    for k, s in stats.salience.items():
        # APT: salience + sqrt(kurtosis), so structures with outlier activations are kept. Both terms are
        # L2-normalised per layer first: raw salience spans orders of magnitude between layers (attention
        # sinks), and a global sum would let a few layers decide everything.
        root_kurt = kurt[k].sqrt()
        combined[k] = s / s.norm().clamp_min(1e-20) + root_kurt / root_kurt.norm().clamp_min(1e-20)
    scores = stats.to_scores(combined)
    scores.meta.update(INCOMPARABLE_KINDS)
    return scores


def _norm_rows(w: torch.Tensor, hd: int) -> torch.Tensor:
    return w.detach().float().view(-1, hd, w.shape[-1]).pow(2).sum((1, 2))


def _weight(lin: nn.Module) -> torch.Tensor:
    return getattr(lin, "base_layer", lin).weight


@register("magnitude")
def magnitude(model: nn.Module, batches: Iterable[dict] | None = None, *, hidden: bool = False) -> Scores:
    """Data-free: L2 norm of the weights a structure owns (q/k/v rows and o columns; FFN rows and columns).

    Not a loss change: a head's norm and a neuron's are not comparable, so the scores ask for per_kind.
    """
    out = Scores(meta=dict(INCOMPARABLE_KINDS))
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if not site.num_heads:
                continue
            hd = site.head_dim
            sq = _norm_rows(_weight(site.proj("q")), hd) + _norm_rows(_weight(site.proj("o")).t(), hd)
            kv = _norm_rows(_weight(site.proj("k")), hd) + _norm_rows(_weight(site.proj("v")), hd)
            sq = sq + kv.repeat_interleave(site.num_heads // max(site.num_kv_heads, 1))
            out.heads[site.key] = [float(x) for x in sq.sqrt()]
        if lay.ffn.width:
            sq = sum(_weight(lin).detach().float().pow(2).sum(1) for lin in lay.ffn.inputs)
            sq = sq + _weight(lay.ffn.output).detach().float().pow(2).sum(0)
            out.neurons[lay.key] = [float(x) for x in sq.sqrt()]
    if hidden:
        sites = hidden_sites(model)
        total = torch.zeros(())
        for mod, _ in sites["embedding"] + sites["linear_in"]:  # hidden is the column index
            total = total + _weight(mod).detach().float().pow(2).sum(0)
        for mod, _ in sites["linear_out"]:  # hidden is the row index
            total = total + _weight(mod).detach().float().pow(2).sum(1)
        out.hidden = [float(x) for x in total.sqrt()]
    return out


def compute(
    model: nn.Module, batches: Iterable[dict] | None, scorer: str = "head_grad", *, hidden: bool = False
) -> Scores:
    """Score `model` with the named scorer; `batches` yield tokenised, labelled dicts (not needed: magnitude)."""
    fn = get_scorer(scorer)
    family_of(unwrap(model))
    if scorer != "magnitude" and batches is None:
        raise PrunetuneError(f"scorer {scorer!r} needs task data")
    if scorer != "magnitude":  # one forward and backward pass per batch: minutes on a CPU for a large model
        batches = progress(batches, desc=f"importance ({scorer})", leave=True)
    scores = fn(unwrap(model), batches, hidden=hidden)
    scores.meta = {**scores.meta, "scorer": scorer}
    return scores


def rank_correlation(a: Scores, b: Scores) -> float:
    """Spearman correlation of two head score sets over the heads they share (how task-specific heads are)."""
    from scipy.stats import spearmanr

    keys = [k for k in a.heads if k in b.heads and len(a.heads[k]) == len(b.heads[k])]
    xs = [v for k in keys for v in a.heads[k]]
    ys = [v for k in keys for v in b.heads[k]]
    if len(xs) < 2:
        raise PrunetuneError("the two score sets share no heads")
    return float(spearmanr(xs, ys).statistic)


def heatmap(scores: list[Scores], titles: list[str], path: str | Path) -> Path:
    """Layers x heads heat map(s), side by side, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 4), squeeze=False)
    for ax, s, title in zip(axes[0], scores, titles, strict=True):
        keys, mat = s.head_matrix()
        im = ax.imshow(np.array(mat, dtype=float), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.set_xlabel("head")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
