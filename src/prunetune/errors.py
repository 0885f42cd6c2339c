"""User-facing errors and warnings: the CLI prints each as one line (errors exit non-zero)."""

from __future__ import annotations


class PrunetuneError(Exception):
    """Bad input (model, data, plan, budget, output path) that the user must fix."""


class PrunetuneWarning(UserWarning):
    """A run that works but whose numbers may mislead (an untrained head, an unknown task)."""


class PruningWarning(PrunetuneWarning):
    """A plan that is valid but probably not what was meant (e.g. a layer losing every head); the CLI prints
    it as one line like every prunetune warning."""
