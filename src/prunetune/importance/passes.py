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
from prunetune.families import layer_input, layer_sites
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


class LayerReplay:
    """One stack's layers re-run one at a time on hidden states of the caller's choosing.

    One forward pass per batch (up to the stack's last layer, without a cache: a replayed layer must not append
    to one) records every layer's call: the arguments besides the hidden states (attention masks, position
    embeddings, T5's position bias, a decoder's encoder states) and the first layer's hidden states. A procedure
    that works block by block (Kwon et al.'s rescaling) then pays one layer per step instead of the whole prefix
    of the model before it. Masks attached while recording shape what is recorded (a pruned model's encoder
    states, its masked embeddings); masks attached while replaying act inside the replayed layer.
    """

    def __init__(self, model: nn.Module, batches: list[dict], layers: list) -> None:
        self.calls: dict[str, list[tuple[bool, tuple, dict]]] = {lay.key: [] for lay in layers}
        self.first: list[torch.Tensor] = []
        last = layers[-1].key

        def record(key: str):
            def hook(module, args, kwargs):
                hidden = layer_input(args, kwargs)
                positional = bool(args)
                rest = args[1:] if positional else args
                others = {k: v for k, v in kwargs.items() if positional or k != "hidden_states"}
                self.calls[key].append((positional, rest, others))
                if key == layers[0].key:
                    self.first.append(hidden.detach().clone())
                if key == last:
                    raise Stop
            return hook

        handles = [lay.module.register_forward_pre_hook(record(lay.key), with_kwargs=True) for lay in layers]
        try:
            for batch in batches:
                run_until_stop(model, {**batch, "use_cache": False})
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != len(batches) for v in self.calls.values()):
            raise PrunetuneError("a layer was not called once per batch: it cannot be replayed")

    def __call__(self, lay, index: int, hidden: torch.Tensor):
        """Layer `lay` on batch `index`'s recorded arguments with `hidden` as its input; its raw output."""
        positional, rest, others = self.calls[lay.key][index]
        if positional:
            return lay.module(hidden, *rest, **others)
        return lay.module(*rest, hidden_states=hidden, **others)
