"""Integrations with other training loops: the transformers Trainer (:class:`PruningCallback`)."""

from prunetune.integrations.trainer import PruningCallback

__all__ = ["PruningCallback"]
