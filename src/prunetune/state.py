"""The training loop's state: everything a killed run needs to go on exactly where it stopped.

``fit`` owns one :class:`RunState` and captures it at the end of an optimizer step; a checkpoint stores it as
safetensors (every tensor) and JSON (everything else, tensors replaced by references): never pickle. Per-rank
parts (RNG states, the hooks' running statistics, which differ between ranks) are kept for every rank.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from prunetune.errors import PrunetuneError

FORMAT = 1  # the layout of a saved state; a reader refuses others


@dataclass
class RunState:
    """Where a run is, and everything that decides what it does next."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being read...
    batch: int = 0  # ...and the micro-batches of it already consumed (on every rank)
    total_steps: int = 0
    world_size: int = 1
    train_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per step (loss, lr, evaluations)
    best: dict | None = None
    best_step: int = -1
    best_state: dict[str, torch.Tensor] | None = None  # the trainable tensors at the best evaluation
    changes: list[dict] = field(default_factory=list)  # structure changes applied (structure.Change.to_dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # the trainable tensors now
    shapes: dict[str, list[int]] = field(default_factory=dict)  # every parameter's shape (checks a rebuilt model)
    param_names: list[list[str]] = field(default_factory=list)  # the optimizer's parameters, per group, by name
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    scaler: dict | None = None
    growth: dict = field(default_factory=dict)  # grown rows' birth steps (optim.growth_state)
    ranks: list[dict] = field(default_factory=list)  # per rank: {"rng": ..., "hooks": [each hook's state]}

    def to_payload(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able metadata, tensors by key) of the whole state."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {f.name: encode(getattr(self, f.name), tensors, f.name) for f in fields(self)}
        return {"format": FORMAT, **meta}, tensors

    @classmethod
    def from_payload(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> RunState:
        if meta.get("format") != FORMAT:
            raise PrunetuneError(f"checkpoint state format {meta.get('format')} is not {FORMAT} (another prunetune?)")
        return cls(**{f.name: decode(meta[f.name], tensors) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------------------
# Tensors out of nested structures, and back
# ---------------------------------------------------------------------------------------------------------


def encode(obj, tensors: dict[str, torch.Tensor], path: str):
    """`obj` as JSON-able data: tensors go to `tensors` under their path; dicts with other than string keys (an
    optimizer's state), tuples and NumPy arrays (RNG states) are tagged so decode restores them as they were."""
    if torch.is_tensor(obj):
        # own, contiguous CPU memory: safetensors refuses views sharing storage
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{path}/#k{i}"), encode(v, tensors, f"{path}/#{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise PrunetuneError(f"cannot store a {type(obj).__name__} in a checkpoint ({path})")


def decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__array__" in obj:
        return np.array(obj["__array__"], dtype=obj["dtype"])
    return {k: decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """The states of every generator a training step may draw from (dropout, new adapters, layer sampling)."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
