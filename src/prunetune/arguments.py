"""The command line of `finetune` and `eval`, generated from the config dataclasses (prunetune.config): one flag
per field, its help and choices from the field's metadata, every default None ("not given", so that a config
knows which settings the user chose)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from prunetune.config import METHOD_OPTIONS, METHODS, PARTS, RunConfig, field_default, flag

_GROUPS = {"training": "training", "budget": "budget (fractions in (0, 1]; heads/neurons may "
           "also be counts)", "lora": "LoRA", "apt": "apt", "runtime": "checkpoints and resuming"}


def _argument_type(part_cls, f) -> type:
    hint = typing.get_type_hints(part_cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _help(f) -> str:
    text = f.metadata["help"]
    methods, not_for = f.metadata["methods"], f.metadata["not_for"]
    if methods and set(methods) != set(METHODS):
        text = f"{', '.join(methods)}: {text}"
    if not_for:
        text += f"; not with {', '.join(not_for)}"
    default = field_default(f)
    if not (default is None or default is False or default == "" or isinstance(default, dict)):
        text += f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
    return text


def _add(target, name: str, f, part_cls) -> None:
    kind = _argument_type(part_cls, f)
    if kind is bool:
        action = argparse.BooleanOptionalAction if f.metadata["negatable"] else "store_true"
        target.add_argument(flag(name), action=action, default=None, help=_help(f))
        return
    choices = f.metadata["choices"]
    target.add_argument(flag(name), type=kind, choices=list(choices) if choices else None, help=_help(f),
                        metavar=None if choices else name.upper())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The finetune command's arguments, one per setting; every default is None ("not given")."""
    top = {f.name: f for f in fields(RunConfig)}
    p.add_argument("model", nargs="?", help=top["model"].metadata["help"])
    p.add_argument("--task", help=top["task"].metadata["help"])
    p.add_argument("--method", choices=METHODS, help=_help(top["method"]))
    p.add_argument("--out", required=True, help=top["out"].metadata["help"])
    p.add_argument("--overwrite", action="store_true", default=None, help=top["overwrite"].metadata["help"])
    group = p.add_argument_group("data")
    for f in fields(RunConfig):
        if f.name not in PARTS and f.metadata["cli"] and f.name not in ("model", "task", "method", "out", "overwrite"):
            _add(group, f.name, f, RunConfig)
    for name, part_cls in PARTS.items():
        group = p.add_argument_group(_GROUPS[name])
        for f in fields(part_cls):
            if f.metadata["cli"]:
                _add(group, f.name, f, part_cls)


def method_epilog() -> str:
    """The flags of one method only, for --help."""
    return "flags of one method only:\n" + "\n".join(
        f"  {m:<11} {' '.join(flag(o) for o in sorted(opts)) or '(none)'}" for m, opts in METHOD_OPTIONS.items())


def add_fields(p: argparse.ArgumentParser, cls) -> None:
    """A command's arguments from its config dataclass: `model` positional, the rest flags defaulting to None."""
    for f in fields(cls):
        if f.name == "model":
            p.add_argument("model", nargs="?", help=f.metadata["help"])
        else:
            _add(p, f.name, f, cls)
