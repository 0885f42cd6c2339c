"""Soft structural masks put on stock modules with hooks.

Heads: a forward pre-hook on the attention output projection scales each head's slice of its input.
Neurons: a forward pre-hook on the FFN output projection scales its input.
Hidden dims: a forward hook on every norm of width `hidden` recomputes the norm over the kept dims only
and zeroes the others, so a 0/1 hidden mask gives exactly the statistics of the physically pruned norm
(multiplying the hidden states alone would not: the norm's mean and variance would still see every dim).
Every mask is differentiable, and all-ones masks are the identity.

A mask of shape (batch, units) gives each example of a batch its own row, so one backward pass yields
every example's own mask gradient (the per-example sums that Michel et al.'s |dL/dmask| and the
empirical Fisher need); a 1-D mask is shared by the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunetune.families import Family, all_norms, family_of, hidden_size, layer_sites, norm_eps, unwrap


@dataclass
class Masks:
    """Mask values: per attention site (heads), per layer (FFN neurons) and for the hidden stream."""

    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    neurons: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None

    @classmethod
    def ones(
        cls,
        model: nn.Module,
        *,
        heads: bool = True,
        neurons: bool = True,
        hidden: bool = False,
        requires_grad: bool = False,
        batch: int | None = None,
    ) -> Masks:
        """All-ones masks shaped like the live model; with requires_grad they collect mask gradients.

        With `batch`, every mask has one row per example of a batch of that size (per-example gradients).
        """
        dev = next(unwrap(model).parameters()).device
        lead = () if batch is None else (batch,)

        def one(n: int) -> torch.Tensor:
            return torch.ones(*lead, n, device=dev, requires_grad=requires_grad)

        m = cls()
        for layer in layer_sites(model):
            if heads:
                for key_site in layer.attentions.values():
                    if key_site.num_heads:
                        m.heads[key_site.key] = one(key_site.num_heads)
            if neurons and layer.ffn.width:
                m.neurons[layer.key] = one(layer.ffn.width)
        if hidden:
            m.hidden = one(hidden_size(model))
        return m

    def tensors(self) -> list[torch.Tensor]:
        out = [*self.heads.values(), *self.neurons.values()]
        return out + ([self.hidden] if self.hidden is not None else [])

    def zero_grad(self) -> None:
        for t in self.tensors():
            t.grad = None


def masked_norm(fam: Family, norm: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A LayerNorm/RMSNorm whose statistics see only the (softly) kept dims; dropped dims come out as zero."""
    dtype = x.dtype
    xf = x.float()
    m = _per_token(mask.to(xf.dtype), x)
    n = m.sum(-1, keepdim=True).clamp_min(1e-6)
    eps = norm_eps(fam, norm)
    if fam.norm == "layer":
        mean = (xf * m).sum(-1, keepdim=True) / n
        var = (((xf - mean) ** 2) * m).sum(-1, keepdim=True) / n
        y = (xf - mean) * torch.rsqrt(var + eps)
    else:
        var = (xf.pow(2) * m).sum(-1, keepdim=True) / n
        y = xf * torch.rsqrt(var + eps)
    y = y.to(dtype)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        y = y * weight
    bias = getattr(norm, "bias", None)
    if bias is not None:
        y = y + bias
    return y * _per_token(mask.to(y.dtype), y)


def _per_token(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (batch, units) mask lined up with activations (batch, tokens, units); a 1-D mask as it is."""
    if mask.dim() == 1:
        return mask
    return mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])


class MaskHandle:
    """The hooks of one attached set of masks; remove() takes them all off (also as a context manager)."""

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _head_hook(mask: torch.Tensor, num_heads: int):
    def hook(module, args):
        x = args[0]
        shaped = x.view(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
        m = _per_token(mask.to(x.dtype), x)
        return ((shaped * m[..., None]).view_as(x), *args[1:])

    return hook


def _neuron_hook(mask: torch.Tensor):
    def hook(module, args):
        return (args[0] * _per_token(mask.to(args[0].dtype), args[0]), *args[1:])

    return hook


def _hidden_hook(fam: Family, mask: torch.Tensor):
    def hook(module, args, output):
        return masked_norm(fam, module, args[0], mask)

    return hook


def attach(model: nn.Module, masks: Masks) -> MaskHandle:
    """Put the masks on the model's modules; nothing is copied or modified."""
    fam = family_of(unwrap(model))
    handles = []
    for layer in layer_sites(model):
        for site in layer.attentions.values():
            if site.key in masks.heads:
                o = site.proj("o")
                handles.append(o.register_forward_pre_hook(_head_hook(masks.heads[site.key], site.num_heads)))
        if layer.key in masks.neurons:
            hook = _neuron_hook(masks.neurons[layer.key])
            handles.append(layer.ffn.output.register_forward_pre_hook(hook))
    if masks.hidden is not None:
        for norm in all_norms(model):
            handles.append(norm.register_forward_hook(_hidden_hook(fam, masks.hidden)))
    return MaskHandle(handles)
