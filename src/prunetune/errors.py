"""User-facing errors: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations


class PrunetuneError(Exception):
    """Bad input (model, data, plan, budget, output path) that the user must fix."""


class PruningWarning(UserWarning):
    """A plan that is valid but probably not what was meant (e.g. a layer losing every head)."""
