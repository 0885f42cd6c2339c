"""Hooks that accumulate, per structure, activation x gradient signals on an ordinary backward pass."""

from __future__ import annotations

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import all_norms, layer_sites
from prunetune.importance.scores import FISHER, PROXY, Scores, scores_from


class ActivationStats:
    """Per-structure signals read off the activations at the masks' sites and their gradients.

    Sites: each attention output projection's input (viewed per head), each FFN output projection's input
    (per neuron) and, with `hidden`, every norm of width hidden (per dim). Used for scoring before training
    and, with `ema`, by APT during training (the hooks ride on the ordinary backward pass: no extra pass).

    Signals, per structure and backward pass:

    - ``salience``: sum over examples, tokens and the structure's dims of |a * dL/da|;
    - ``apt``: APT's code: per dim, (sum over the batch's tokens of |a|) x (sum of |dL/da|), summed over the
      structure's dims (a head's head_dim channels);
    - ``fisher``: per example, the structure's summed a * dL/da is exactly dL/dmask of a mask on it (Kwon et
      al.); its square, summed over examples, is the empirical Fisher, read off the same backward pass.

    With `means`, each step also keeps every site's per-channel input sum and row count (APT's kurtosis).
    """

    SIGNALS = ("salience", "apt", "fisher")

    def __init__(self, model: nn.Module, *, hidden: bool = True, ema: float | None = None,
                 signal: str = "salience", means: bool = False):
        if signal not in self.SIGNALS:
            raise PrunetuneError(f"unknown activation signal {signal!r}; known: {', '.join(self.SIGNALS)}")
        self.model = model
        self.ema = ema
        self.signal = signal
        self.means = means
        self.salience: dict[str, torch.Tensor] = {}
        self._step: dict[str, torch.Tensor] = {}
        # APT's signal is a product of two sums over the step's tokens, (sum |a|) x (sum |dL/da|), per unit (per
        # head dimension for heads): the two sums are kept apart until the step ends, so that micro-batches and
        # ranks add up to the product of the whole batch's sums, as one process with the whole batch gives
        self._act: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._sums: dict[str, tuple[int, torch.Tensor]] = {}
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
            for i, norm in enumerate(all_norms(model)):
                self._handles.append(norm.register_forward_hook(self._post("hidden", f"hidden#{i}")))

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
        self._step, self._sums = {}, {}

    def _add(self, store: dict, key: str, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    def _observe(self, key: str, x: torch.Tensor, heads: int | None, site: str | None = None) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if self.means:
            rows, total = self._sums.get(key, (0, 0))
            self._sums[key] = (rows + flat.shape[0], total + flat.double().sum(0))
        if heads:
            flat = flat.view(flat.shape[0], heads, -1)
        if x.requires_grad:
            act_sum = flat.abs().sum(0) if self.signal == "apt" else None

            def grad_hook(g, flat=flat, key=key, heads=heads, batch=batch, act_sum=act_sum):
                g = g.reshape(flat.shape)
                if act_sum is not None:  # per site: the hidden dims' product is summed over the norms' outputs
                    self._add(self._act, site or key, act_sum)
                    self._add(self._grad, site or key, g.float().abs().sum(0))
                else:
                    self._add(self._step, key, self._signal(flat, g, heads, batch))

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

    def _post(self, key: str, site: str | None = None):
        def hook(module, args, output):
            self._observe(key, output, None, site)

        return hook

    def step_means(self) -> dict[str, torch.Tensor]:
        """This step's mean input per channel at each site (with `means`): key -> (channels,), float64."""
        return {k: total / max(rows, 1) for k, (rows, total) in self._sums.items()}

    def add_to_step(self, key: str, value: torch.Tensor) -> None:
        """Add a term to this step's signal of one site before it is folded in (APT's kurtosis term)."""
        self._add(self._step, key, value)

    def unscale_step(self, scale: float) -> None:
        """This step's gradients were of the loss times `scale` (fp16's gradient scaler): divide it out (the fisher
        signal is quadratic in the gradient), or drop the step when they overflowed (the optimizer skips it too)."""
        power = 2 if self.signal == "fisher" else 1
        if not all(bool(torch.isfinite(v).all()) for v in [*self._step.values(), *self._grad.values()]):
            self._step, self._act, self._grad = {}, {}, {}
            return
        self._step = {k: v / scale**power for k, v in self._step.items()}
        self._grad = {k: v / scale for k, v in self._grad.items()}

    def _fold_products(self, runtime=None) -> None:
        """APT's products of the step's sums into the step's signal; under data parallelism the activation sums
        add over the ranks and the gradient sums average (each rank's loss is the mean over its own rows, so its
        gradients are world_size times those of the whole batch's mean loss)."""
        act, grad = self._act, self._grad
        if runtime is not None and runtime.distributed and act:
            act = {k: v * runtime.world_size for k, v in runtime.mean(act).items()}
            grad = runtime.mean(grad)
        for site, a in act.items():
            per_dim = a * grad[site]
            self._add(self._step, site.split("#")[0], per_dim.sum(-1) if per_dim.dim() > 1 else per_dim)
        self._act, self._grad = {}, {}

    def step(self, runtime=None) -> None:
        """Fold this step's signal in (sum, or exponential moving average when `ema` is set). `runtime` (a
        prunetune.runtime.Runtime): under data parallelism every rank calls this at the same steps."""
        self._fold_products(runtime)
        for k, v in self._step.items():
            if self.ema is not None and k in self.salience and self.salience[k].shape == v.shape:
                self.salience[k] = self.ema * self.salience[k] + (1 - self.ema) * v
            else:
                self.salience[k] = v if self.ema is not None else self.salience.get(k, 0) + v
        self._step, self._sums = {}, {}

    def skip(self) -> None:
        """Drop this step's signal (APT's salience warm-up)."""
        self._step, self._sums, self._act, self._grad = {}, {}, {}, {}

    def reset(self) -> None:
        self.salience, self._step, self._sums, self._act, self._grad = {}, {}, {}, {}, {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def to_scores(self, extra: dict[str, torch.Tensor] | None = None) -> Scores:
        """The accumulated signal (or `extra`) as Scores, with the meta keys selection reads.

        The fisher signal is the empirical Fisher of the batch-mean loss summed over steps: a loss-change
        estimate up to one factor shared by heads and neurons, so they compare (hidden dims approximately:
        read at the norm outputs, it leaves out the norm statistics' share of the hidden mask's gradient).
        """
        scores = scores_from(extra if extra is not None else self.salience)
        fisher = self.signal == "fisher" and extra is None
        # salience is the same quantity for every kind (|a x dL/da| summed over a structure's channels: the
        # magnitude of a first-order estimate), and APT ranks heads, neurons and hidden dims by it raw
        scores.meta = {"scorer": f"activations:{self.signal}", "unit": FISHER if fisher else PROXY,
                       "comparable": True, "normalize": "none", "options": {"ema": self.ema}}
        return scores
