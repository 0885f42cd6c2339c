"""Tasks as one contract (base.Task) and a registry of them by name (registry.py).

`get(name)` gives a task; `for_model(name, location)` the form of it that runs on that checkpoint's family (GLUE
on T5 is text-to-text); `options_class(name)` its typed options, from which commands build their flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prunetune.errors import PrunetuneError
from prunetune.tasks.base import (
    EVAL_BATCH_SIZE,
    TASK_ATTR,
    Evaluation,
    Loaders,
    Task,
    data_summary,
    describe_data,
    tag_model,
    task_record,
)
from prunetune.tasks.registry import REGISTRY, Entry


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_BY_KEY = {_key(name): name for name in REGISTRY}


def canonical(name: str) -> str:
    """The registered name of a task ("SST-2" -> "sst2", "squad-v2" -> "squad_v2")."""
    found = _BY_KEY.get(_key(name))
    if found is None:
        raise PrunetuneError(f"unknown task {name!r}; known tasks: {', '.join(REGISTRY)} (see `prunetune tasks`)")
    return found


def names() -> list[str]:
    return list(REGISTRY)


def entry(name: str) -> Entry:
    return REGISTRY[canonical(name)]


def options_class(name: str) -> type:
    """The typed options (a dataclass) of a task."""
    return entry(name).forms[0].options_class


def make_options(name: str, values: Any = None) -> Any:
    """A task's options from an options object, a dict of the options given (by field name), or None."""
    cls = options_class(name)
    if values is None or isinstance(values, cls):
        return values if values is not None else cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        known = ", ".join(option_flag(f) for f in dataclasses.fields(cls)) or "none"
        raise PrunetuneError(f"task {canonical(name)} has no option {', '.join(flag(u) for u in unknown)} "
                             f"(its options: {known})")
    return cls(**values)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_flag(f: dataclasses.Field) -> str:
    """The command-line flag of an options field (its metadata may name another)."""
    return f.metadata.get("flag") or flag(f.name)


def get(name: str, options: Any = None) -> Task:
    """The task of this name in its first form (a classifier for GLUE), not yet tied to a model."""
    key = canonical(name)
    found = REGISTRY[key]
    return found.forms[0](key, make_options(key, options), found.preset)


def for_family(name: str, family: str, options: Any = None) -> Task:
    """The form of the task that runs on models of this family."""
    key = canonical(name)
    found = REGISTRY[key]
    for form in found.forms:
        if family in form.families:
            return form(key, make_options(key, options), found.preset)
    supported = sorted({f for form in found.forms for f in form.families})
    raise PrunetuneError(f"task {key} runs on {', '.join(supported)} models, not on a {family} model")


def for_model(name: str, location: str, options: Any = None) -> Task:
    """The form of the task that runs on the checkpoint at `location` (by its family)."""
    from prunetune.models import family_name

    canonical(name)  # an unknown task is refused before the model's config is read
    return for_family(name, family_name(location), options)


def catalogue() -> list[dict]:
    """Every task: name, description, the families it runs on and how, metrics, and options (for `tasks`)."""
    out = []
    for name, found in REGISTRY.items():
        first = found.forms[0]
        task = first(name, first.options_class(), found.preset)
        out.append({
            "name": name,
            "description": found.description or first.description,
            "forms": {form.kind: list(form.families) for form in found.forms},
            "metrics": list(task.metric_names),
            "main_metric": task.main_metric,
            "maximize": task.maximize,
            "options": [{"flag": option_flag(f), "default": None if f.default is dataclasses.MISSING else f.default,
                         "help": f.metadata.get("help", "")} for f in dataclasses.fields(first.options_class)],
        })
    return out


__all__ = [
    "EVAL_BATCH_SIZE",
    "REGISTRY",
    "TASK_ATTR",
    "Entry",
    "Evaluation",
    "Loaders",
    "Task",
    "canonical",
    "catalogue",
    "data_summary",
    "describe_data",
    "entry",
    "for_family",
    "for_model",
    "get",
    "make_options",
    "names",
    "options_class",
    "tag_model",
    "task_record",
]
