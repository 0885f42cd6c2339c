"""The ``prunetune`` command: a thin argparse layer mapping each subcommand to one typed function.

Flags default to None ("not given"): the defaults live in one place, the function or dataclass a command
calls (for finetune, prunetune.config.RunConfig, whose fields also generate the flags), so a flag a command or
method would not use can be refused, not ignored.
Every user error, argparse's own included, is one ``prunetune: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

from prunetune.errors import PrunetuneError, PrunetuneWarning

# The hub is unreachable on most machines this runs on; fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DESCRIPTION = (
    "Structured pruning and LoRA fine-tuning for Hugging Face transformers (BERT, RoBERTa, T5, "
    "LLaMA/Mistral/Qwen2): score attention heads and FFN neurons on task data, remove them for real, "
    "fine-tune, and export compact models that reload with the stock Auto classes."
)
EPILOG = "Quick start: prunetune finetune --task sst2 --method prune-lora --out runs/quickstart"

BUDGET_FIELDS = ("keep_params", "keep_flops", "seq_len", "heads_keep", "neurons_keep", "hidden_keep", "gqa", "round_to")
# Flags a command reads only together with another one: (command, flag) -> the flag it needs.
NEEDS: dict[tuple[str, str], str] = {
    ("prune", "data"): "task",  # task data is only read to score importance for the task
    ("prune", "samples"): "task",
    ("prune", "scorer"): "task",  # without --task, prune scores by weight magnitude
}
# Values of a flag that need nothing else (the data-free scorer).
NEEDS_NOTHING: dict[str, tuple[str, ...]] = {"scorer": ("magnitude",)}
# Flags that make others meaningless: (command, flag) -> the flags it replaces.
REPLACES: dict[tuple[str, str], tuple[str, ...]] = {
    ("prune", "plan"): (*BUDGET_FIELDS, "scorer", "samples", "data"),  # a plan file says what to keep
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of the command."""

    def error(self, message: str):
        raise PrunetuneError(f"{message} (see `{self.prog} --help`)")


class _Version(argparse.Action):
    """--version: the versions that decide a run's numbers, on one line (argparse's own action wraps it)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from prunetune import __version__

    libs = []
    for name in ("torch", "transformers", "peft"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            libs.append(f"{name} not installed")
    return f"prunetune {__version__} ({', '.join(libs)}; python {platform.python_version()})"


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The named flags the user set (the called function's defaults stand for the others)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _budget(args):
    from prunetune.plan import Budget

    given = _given(args, *BUDGET_FIELDS)
    if not set(given) - {"seq_len", "gqa", "round_to"}:
        return None
    return Budget(**given)


def _add_budget(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (fractions in (0, 1]; heads/neurons may also be counts)")
    g.add_argument("--keep-params", type=float, help="fraction of the prunable layer parameters to keep")
    g.add_argument("--keep-flops", type=float, help="fraction of the layers' FLOPs (at --seq-len) to keep")
    g.add_argument("--seq-len", type=int, help="sequence length for --keep-flops (default 128)")
    g.add_argument("--heads-keep", type=float, help="fraction (or count) of attention heads to keep")
    g.add_argument("--neurons-keep", type=float, help="fraction (or count) of FFN neurons to keep")
    g.add_argument("--hidden-keep", type=float, help="fraction of hidden dims to keep")
    g.add_argument("--gqa", choices=["per_group", "whole_group"],
                   help="grouped-query attention: equal query heads per KV group (default), or whole KV groups")
    g.add_argument("--round-to", type=int, help="keep FFN widths in multiples of this (default 1)")


def _add_data(p: argparse.ArgumentParser, multi: bool = False) -> None:
    action = "append" if multi else "store"
    p.add_argument("--task", action=action, help="GLUE task: sst2 cola mrpc qqp stsb mnli qnli rte wnli")
    p.add_argument("--data", action=action,
                   help="GLUE-format directory or CSV/TSV/JSONL file (a single file: the sample comes from the "
                        "rows finetune trains on, not those it holds out)")
    p.add_argument("--samples", type=int, help="examples used for importance (default 512)")
    p.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    p.add_argument("--seed", type=int, help="picks the sample and seeds a new task head (default 42, as finetune)")


def _add_finetune(sub) -> None:
    from prunetune.config import add_arguments, method_epilog

    p = sub.add_parser("finetune", help="fine-tune (full, lora, prune-lora, lora-prune, apt) and export",
                       description="Fine-tune a model on a task with one method and export the compact result, "
                                   "its adapter and a report. Each method refuses the flags it does not use. "
                                   "Under torchrun (or accelerate launch) the run is data-parallel.",
                       epilog=method_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)  # every flag generated from prunetune.config.RunConfig


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunetune", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_Version, help="prunetune, torch, transformers and peft versions")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("importance", help="score heads and FFN neurons on task data; heat map")
    p.add_argument("model", nargs="?", help="model directory, hub id, or nothing for the embedded default")
    _add_data(p, multi=True)
    p.add_argument("--scorer", help="importance scorer (default head_grad)")
    p.add_argument("--hidden", action="store_true", default=None, help="also score hidden dims")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", default=None)

    p = sub.add_parser("prune", help="remove heads / neurons / hidden dims for real and export the compact model")
    p.add_argument("model", nargs="?")
    p.add_argument("--plan", help="a plan.json to apply instead of a budget")
    _add_budget(p)
    _add_data(p)
    p.add_argument("--scorer", help="importance scorer (default head_grad with --task, magnitude without)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", default=None)

    p = sub.add_parser("info", help="parameters, heads, KV heads, FFN width and hidden size per layer")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")

    _add_finetune(sub)

    p = sub.add_parser("evaluate", help="re-score an exported model on a task")
    p.add_argument("model")
    p.add_argument("--task", required=True)
    p.add_argument("--data", help="GLUE-format directory (its dev file), or a file scored whole (the file a "
                                  "run trained on: only the rows it held out)")
    p.add_argument("--max-length", type=int, help="(default 128)")
    p.add_argument("--batch-size", type=int, help="(default 64)")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--seed", type=int, help="the run's seed (picks the same --eval-limit subset; default 42)")
    return parser


def _print(obj: dict) -> None:
    print(json.dumps(obj, indent=1))


def _info_table(info: dict) -> str:
    lines = [
        f"family {info['family']}  params {info['params']:,}  layer params {info['layer_params']:,}  "
        f"hidden {info['hidden']}  heads {info['heads']}  ffn {info['ffn']}",
        f"{'layer':<14}{'params':>12}  {'heads':<18}{'kv heads':<18}{'ffn':>6}",
    ]
    for lay in info["layers"]:
        heads = ",".join(f"{k}={v}" for k, v in lay["heads"].items())
        kv = ",".join(f"{k}={v}" for k, v in lay["kv_heads"].items())
        lines.append(f"{lay['layer']:<14}{lay['params']:>12,}  {heads:<18}{kv:<18}{lay['ffn']:>6}")
    return "\n".join(lines)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse numbers out of range and flags that the other flags given make meaningless."""
    from prunetune.config import check_numbers

    values = vars(args)
    check_numbers(values)
    for (command, name), needed in NEEDS.items():
        value = values.get(name)
        if (args.command == command and value is not None and value not in NEEDS_NOTHING.get(name, ())
                and values.get(needed) is None):
            raise PrunetuneError(f"{_flag(name)} needs {_flag(needed)}")
    for (command, name), replaced in REPLACES.items():
        if args.command == command and values.get(name) is not None:
            clash = [_flag(r) for r in replaced if values.get(r) is not None]
            if clash:
                raise PrunetuneError(f"{_flag(name)} says what to keep: {', '.join(clash)} would be ignored")


def _outputs(report: dict) -> str:
    out = report["outputs"]
    lines = [f"model:   {out['model']}"]
    if "adapter" in out:
        lines.append(f"adapter: {out['adapter']}")
    lines.append(f"report:  {', '.join(out['report'])}")
    lines.append(f"data:    {out['data_split']} (which rows trained, which were scored)")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    from prunetune import pipeline

    if args.command == "importance":
        _print(pipeline.run_importance(
            args.model, args.task or [], args.out, data=args.data,
            **_given(args, "samples", "scorer", "max_length", "hidden", "overwrite", "seed"),
        ))
    elif args.command == "prune":
        report = pipeline.run_prune(
            args.model, args.out, plan=args.plan, budget=_budget(args), task=args.task, data=args.data,
            **_given(args, "samples", "scorer", "max_length", "overwrite", "seed"),
        )
        for note in report["notes"]:
            print(f"note: {note}", file=sys.stderr)
        _print(report)
    elif args.command == "info":
        info = pipeline.run_info(args.model)
        print(json.dumps(info, indent=1) if args.json else _info_table(info))
    elif args.command == "finetune":
        from prunetune.config import RunConfig
        from prunetune.recipes import finetune

        report = finetune(RunConfig.from_flags(vars(args)))
        if report is not None:  # None: another rank of a data-parallel run, which writes nothing
            print(report["summary"])
            print(_outputs(report))
    elif args.command == "evaluate":
        from prunetune.recipes import evaluate_export

        _print(evaluate_export(args.model, args.task, data=args.data,
                               **_given(args, "max_length", "batch_size", "eval_limit", "seed")))
    return 0


def _one_line_warnings(show):
    """prunetune's own warnings as one line on stderr; every other warning as `show` shows it."""

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, PrunetuneWarning):
            print(f"prunetune: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(previous)
    try:
        return run(argv)
    except PrunetuneError as e:
        print(f"prunetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunetune: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
