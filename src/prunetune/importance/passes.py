"""The passes over a calibration sample that scorers, compensation and rescaling share.

Every pass iterates through :func:`each_batch` (one place for device moves, the empty-data check and
progress reporting), inside :func:`scoring` (eval mode, weights frozen, restored afterwards).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import layer_sites
from prunetune.train import progress


class Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a hook once it has what it needs, so the rest of the forward pass is skipped."""


@contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: scores must be reproducible) and no weight requiring grad, so a backward pass
    computes only mask and activation gradients; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


_LABEL = {"desc": "importance"}  # what the progress bar says; compute() names the scorer


@contextmanager
def labelled(desc: str) -> Iterator[None]:
    """Name the passes made inside (the progress bar's label), e.g. "importance (fisher)"."""
    before = _LABEL["desc"]
    _LABEL["desc"] = desc
    try:
        yield
    finally:
        _LABEL["desc"] = before


def each_batch(model: nn.Module, batches: Iterable[dict] | None) -> Iterator[dict]:
    """The batches on the model's device, with a progress bar; an error when there are none."""
    if batches is None:
        raise PrunetuneError("this needs task data (a calibration sample)")
    device = next(model.parameters()).device
    n = 0
    # one forward (and backward) pass per batch: minutes on a CPU for a large model, so the user sees them go
    for batch in progress(batches, desc=_LABEL["desc"], leave=True):
        n += 1
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if n == 0:
        raise PrunetuneError("importance needs data, but the data set is empty")


def observe(model: nn.Module, batches: Iterable[dict] | None, handles: list, rows: TokenRows) -> None:
    """Forward passes without gradients over the sample, for hooks that only watch; the hooks are removed after."""
    try:
        with scoring(model), torch.no_grad():
            for batch in each_batch(model, batches):
                rows.set(batch)
                model(**batch)
    finally:
        for h in handles:
            h.remove()


def batch_size(batch: dict) -> int:
    """Examples in a batch (its input ids' first dim, or any tensor's)."""
    first = batch.get("input_ids")
    if first is None:
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(first.shape[0])


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise PrunetuneError("importance needs labelled data: the model returned no loss")
    return out.loss


def run_until_stop(model: nn.Module, batch: dict) -> None:
    """A forward pass that a hook may cut short with :class:`Stop`."""
    with suppress(Stop):
        model(**batch)


class TokenRows:
    """Flattens hooked activations to (tokens, features), dropping padded positions where the batch marks them.

    Each stack reads its own mask (T5's decoder: ``decoder_attention_mask``, usually absent: every label
    position counts); an activation whose leading dims do not match the mask is taken whole.
    """

    def __init__(self) -> None:
        self.batch: dict = {}

    def set(self, batch: dict) -> None:
        self.batch = batch

    def __call__(self, x: torch.Tensor, mask_key: str = "attention_mask") -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        mask = self.batch.get(mask_key)
        if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            flat = flat[mask.reshape(-1).to(torch.bool)]
        return flat


def stack_mask_keys(model: nn.Module) -> dict[str, str]:
    """Layer key -> the batch entry marking its stack's real tokens."""
    return {lay.key: lay.stack.token_mask for lay in layer_sites(model)}
