"""The ``prunetune`` command: a thin argparse layer mapping each subcommand to one typed function.

Flags default to None ("not given"): the defaults live in one place, the function or dataclass a command
calls (for finetune, prunetune.config.RunConfig, whose fields also generate the flags), so a flag a command or
method would not use can be refused, not ignored.
Every user error, argparse's own included, is one ``prunetune: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
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

BUDGET_FIELDS = ("keep_params", "keep_flops", "seq_len", "heads_keep", "neurons_keep", "hidden_keep", "gqa", "round_to",
                 "uniform")
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
    if not set(given) - {"seq_len", "gqa", "round_to", "uniform"}:
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
    g.add_argument("--uniform", action="store_true", default=None,
                   help="the same numbers of query heads, KV heads and FFN neurons in every layer: a stock config "
                        "(loads without prunetune) for LLaMA/Mistral/Qwen2/T5; BERT/RoBERTa only with all heads kept")


TASK_OPTION = "task_option:"  # the argparse dest prefix of a task's own options (apart from the command's)


def _task_help() -> str:
    from prunetune import tasks

    return f"a task ({' '.join(tasks.names())}; `prunetune tasks` describes them)"


def _add_task_options(p: argparse.ArgumentParser) -> None:
    """Every registered task's options as flags (built from their dataclasses); a task refuses the others."""
    import dataclasses
    import typing

    from prunetune import tasks

    g = p.add_argument_group("task options (`prunetune tasks` lists each task's)")
    seen: set[str] = set()
    for name in tasks.names():
        cls = tasks.options_class(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            kind = typing.get_args(hints[f.name]) or (hints[f.name],)
            base = next(k for k in kind if k is not type(None))
            kw: dict = {"dest": TASK_OPTION + f.name, "help": f.metadata.get("help")}
            if typing.get_origin(base) is tuple:
                kw.update(nargs="+", metavar=f.metadata.get("metavar", "COLUMN"))
            elif base is bool:
                kw.update(action=argparse.BooleanOptionalAction)
            else:
                kw.update(type=base)
            g.add_argument(tasks.option_flag(f), **kw)


def task_options(args: argparse.Namespace) -> dict | None:
    """The task options given on the command line, by field name (None when none was)."""
    given = {k.removeprefix(TASK_OPTION): v for k, v in vars(args).items()
             if k.startswith(TASK_OPTION) and v is not None}
    return given or None


def _add_data(p: argparse.ArgumentParser, multi: bool = False) -> None:
    action = "append" if multi else "store"
    p.add_argument("--task", action=action, help=_task_help())
    p.add_argument("--data", action=action,
                   help="the task's data: a directory with train and dev files, a data file (CSV, TSV, JSON, JSONL, "
                        "Parquet; the sample comes from the rows finetune trains on, not those it holds out), or a "
                        "`datasets` name where the hub is reachable")
    p.add_argument("--samples", type=int, help="examples used for importance (default 512)")
    p.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    p.add_argument("--seed", type=int, help="picks the sample and seeds a new task head (default 42, as finetune)")


def _add_finetune(sub) -> None:
    from prunetune.arguments import add_arguments, method_epilog

    p = sub.add_parser("finetune", help="fine-tune (full, lora, prune-lora, lora-prune, apt) and export",
                       description="Fine-tune a model on a task with one method and export the compact result, "
                                   "its adapter and a report. Each method refuses the flags it does not use. "
                                   "Under torchrun (or accelerate launch) the run is data-parallel.",
                       epilog=method_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)  # every flag generated from prunetune.config.RunConfig
    _add_task_options(p)  # the tasks' own options (their dataclasses), shared with the other commands


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
    _add_task_options(p)

    p = sub.add_parser("prune", help="remove heads / neurons / hidden dims for real and export the compact model")
    p.add_argument("model", nargs="?")
    p.add_argument("--plan", help="a plan.json to apply instead of a budget")
    _add_budget(p)
    _add_data(p)
    p.add_argument("--scorer", help="importance scorer (default head_grad with --task, magnitude without)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", default=None)
    _add_task_options(p)

    p = sub.add_parser("info", help="parameters, heads, KV heads, FFN width and hidden size per layer")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")

    _add_finetune(sub)

    p = sub.add_parser("evaluate", help="re-score an exported model on a task")
    p.add_argument("model")
    p.add_argument("--task", required=True, help=_task_help())
    p.add_argument("--data", help="a directory (its dev file), or a file scored whole (the file a run trained on: "
                                  "only the rows, or articles, it held out)")
    p.add_argument("--max-length", type=int, help="(default 128)")
    p.add_argument("--batch-size", type=int, help="(default 64)")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--seed", type=int, help="the run's seed (picks the same --eval-limit subset; default 42)")
    _add_task_options(p)

    from prunetune.arguments import add_fields
    from prunetune.config import EvalConfig

    p = sub.add_parser("eval", help="multiple-choice benchmarks (ARC, HellaSwag, MMLU, TruthfulQA) with "
                                    "lm-evaluation-harness on the local files",
                       description="Score a causal LM (pruned or not) on multiple-choice benchmarks as "
                                   "lm-evaluation-harness defines them: log-likelihood of each choice, acc and "
                                   "acc_norm, MMLU over its 57 subjects, TruthfulQA MC1 and MC2.")
    add_fields(p, EvalConfig)  # every flag generated from prunetune.config.EvalConfig

    p = sub.add_parser("export-onnx", help="export a model directory to ONNX and check it in ONNX Runtime")
    p.add_argument("model", help="model directory (a prunetune export or a stock checkpoint)")
    p.add_argument("--out", required=True, help="the .onnx file; a causal LM adds <stem>.with_past.onnx, T5 writes "
                                                 "<stem>.encoder/.decoder/.decoder_with_past.onnx instead")
    # defaults live in onnx_export.export_onnx: flags left out are not passed
    p.add_argument("--opset", type=int, help="ONNX opset, 12-20 (default 20)")
    p.add_argument("--dynamic-axes", action=argparse.BooleanOptionalAction, dest="dynamic",
                   help="dynamic batch and sequence axes (default); --no-dynamic-axes fixes them to the trace shape")
    p.add_argument("--batch-size", type=int, help="trace shape, default 2 (the fixed one with --no-dynamic-axes)")
    p.add_argument("--seq-len", type=int, help="trace shape, default 16 (the fixed one with --no-dynamic-axes)")
    p.add_argument("--quantize", choices=["int8"], help="also write <stem>.int8.onnx (dynamic int8 quantisation)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction,
                   help="compare ONNX Runtime with PyTorch and write nothing beyond --atol (default)")
    p.add_argument("--atol", type=float, help="absolute tolerance of the check (default 1e-4)")
    p.add_argument("--rtol", type=float, help="relative tolerance of the check (default 1e-5)")
    p.add_argument("--auto-class", help="load with this transformers Auto class instead of the saved architecture's")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("tasks", help="list the tasks, the models they run on, their metrics and options")
    p.add_argument("--json", action="store_true")
    return parser


def _tasks_table() -> str:
    """One line per task (what it is, the models it runs on and how, its metrics), then each set of options once."""
    from prunetune import tasks

    catalogue = tasks.catalogue()
    lines = []
    for t in catalogue:
        forms = ", ".join(f"{kind} on {'/'.join(fams)}" for kind, fams in t["forms"].items())
        others = [m for m in t["metrics"] if m != t["main_metric"]]
        arrow = "higher" if t["maximize"] else "lower"
        lines.append(f"{t['name']:<11}{t['description']}")
        lines.append(f"{'':<11}runs as {forms}; main metric {t['main_metric']} ({arrow} is better)"
                     + (f", also {', '.join(others)}" if others else ""))
    groups: dict[str, list[str]] = {}
    text: dict[str, list[str]] = {}
    for t in catalogue:
        key = json.dumps(t["options"], default=str)
        groups.setdefault(key, []).append(t["name"])
        text[key] = [f"  {o['flag']}: {o['help']}" + ("" if o["default"] is None else f" (default {o['default']})")
                     for o in t["options"]]
    lines.append("\noptions (give them with --task on finetune, importance, prune and evaluate):")
    for key, names in groups.items():
        lines.append(f"{', '.join(names)}:")
        lines.extend(text[key] or ["  (none)"])
    return "\n".join(lines)


def _print(obj: dict) -> None:
    print(json.dumps(obj, indent=1))


def _info_table(info: dict) -> str:
    lines = [
        f"family {info['family']}  params {info['params']:,}  layer params {info['layer_params']:,}  "
        f"hidden {info['hidden']}  heads {info['heads']}  ffn {info['ffn']}",
        "loads with: " + (f"`import prunetune` first (needs prunetune because {info.get('needs_prunetune_because')})"
                          if info.get("needs_prunetune") else "transformers alone (stock)"),
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
    given = task_options(args) or {}
    if given and not values.get("task"):  # a task's options mean nothing without the task
        from prunetune import tasks

        flags = {f.name: tasks.option_flag(f)
                 for n in tasks.names() for f in dataclasses.fields(tasks.options_class(n))}
        raise PrunetuneError(f"{', '.join(flags[k] for k in given)} needs --task")


def _outputs(report: dict) -> str:
    out = report["outputs"]
    lines = [f"model:   {out['model']}"]
    if "adapter" in out:
        lines.append(f"adapter: {out['adapter']}")
    lines.append(f"report:  {', '.join(out['report'])}")
    lines.append(f"data:    {out['data_split']} (which rows trained, which were scored)")
    return "\n".join(lines)


def _importance(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune import pipeline

    _print(pipeline.run_importance(
        args.model, args.task or [], args.out, data=args.data, task_options=options,
        **_given(args, "samples", "scorer", "max_length", "hidden", "overwrite", "seed"),
    ))


def _prune(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune import pipeline

    report = pipeline.run_prune(
        args.model, args.out, plan=args.plan, budget=_budget(args), task=args.task, data=args.data,
        task_options=options, **_given(args, "samples", "scorer", "max_length", "overwrite", "seed"),
    )
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    _print(report)


def _info(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune import pipeline

    info = pipeline.run_info(args.model)
    print(json.dumps(info, indent=1) if args.json else _info_table(info))


def _finetune(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune.config import RunConfig
    from prunetune.recipes import finetune

    args.task_options = options
    report = finetune(RunConfig.from_flags(vars(args)))
    if report is not None:  # None: another rank of a data-parallel run, which writes nothing
        print(report["summary"])
        print(_outputs(report))


def _evaluate(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune.recipes import evaluate_export

    _print(evaluate_export(args.model, args.task, data=args.data, task_options=options,
                           **_given(args, "max_length", "batch_size", "eval_limit", "seed")))


def _eval(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune.config import EvalConfig
    from prunetune.mceval.command import run_eval, table

    names = [f.name for f in dataclasses.fields(EvalConfig)]
    print(table(run_eval(EvalConfig(**_given(args, *names)))))


def _export_onnx(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune.onnx_export import export_onnx

    _print(export_onnx(args.model, args.out, **_given(
        args, "opset", "dynamic", "quantize", "verify", "auto_class", "atol", "rtol", "batch_size", "seq_len"),
        overwrite=args.overwrite))


def _tasks(args: argparse.Namespace, options: dict | None) -> None:
    from prunetune import tasks

    print(json.dumps(tasks.catalogue(), indent=1) if args.json else _tasks_table())


# each subcommand's handler (args, the task's options); the parser defines the same names
COMMANDS = {"importance": _importance, "prune": _prune, "info": _info, "finetune": _finetune,
            "evaluate": _evaluate, "eval": _eval, "export-onnx": _export_onnx, "tasks": _tasks}


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    COMMANDS[args.command](args, task_options(args))
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
