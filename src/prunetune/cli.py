"""The ``prunetune`` command: a thin argparse layer mapping each subcommand to one typed function."""

from __future__ import annotations

import argparse
import json
import os
import sys

from prunetune.errors import PrunetuneError

# The hub is unreachable on most machines this runs on; fail fast instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _budget(args):
    from prunetune.plan import Budget

    fields = ("keep_params", "keep_flops", "heads_keep", "neurons_keep", "hidden_keep")
    if all(getattr(args, f, None) is None for f in fields):
        return None
    return Budget(
        keep_params=args.keep_params, keep_flops=args.keep_flops, seq_len=args.seq_len, heads_keep=args.heads_keep,
        neurons_keep=args.neurons_keep, hidden_keep=args.hidden_keep, gqa=args.gqa, round_to=args.round_to,
    )


def _add_budget(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (fractions in (0, 1]; heads/neurons may also be counts)")
    g.add_argument("--keep-params", type=float, help="fraction of the prunable layer parameters to keep")
    g.add_argument("--keep-flops", type=float, help="fraction of the layers' FLOPs (at --seq-len) to keep")
    g.add_argument("--seq-len", type=int, default=128, help="sequence length for --keep-flops")
    g.add_argument("--heads-keep", type=float, help="fraction (or count) of attention heads to keep")
    g.add_argument("--neurons-keep", type=float, help="fraction (or count) of FFN neurons to keep")
    g.add_argument("--hidden-keep", type=float, help="fraction of hidden dims to keep")
    g.add_argument("--gqa", choices=["per_group", "whole_group"], default="per_group",
                   help="grouped-query attention: equal query heads per KV group, or whole KV groups")
    g.add_argument("--round-to", type=int, default=1, help="keep FFN widths in multiples of this")


def _add_data(p: argparse.ArgumentParser, multi: bool = False) -> None:
    action = "append" if multi else "store"
    p.add_argument("--task", action=action, help="GLUE task: sst2 cola mrpc qqp stsb mnli qnli rte wnli")
    p.add_argument("--data", action=action, help="GLUE-format directory or CSV/TSV/JSONL file")
    p.add_argument("--samples", type=int, default=512, help="examples used for importance (default 512)")
    p.add_argument("--max-length", type=int, default=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("importance", help="score heads and FFN neurons on task data; heat map")
    p.add_argument("model", nargs="?", help="model directory, hub id, or nothing for the embedded default")
    _add_data(p, multi=True)
    p.add_argument("--scorer", default="head_grad")
    p.add_argument("--hidden", action="store_true", help="also score hidden dims")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("prune", help="remove heads / neurons / hidden dims for real and export the compact model")
    p.add_argument("model", nargs="?")
    p.add_argument("--plan", help="a plan.json to apply instead of a budget")
    _add_budget(p)
    _add_data(p)
    p.add_argument("--scorer", help="importance scorer (default head_grad with --task, magnitude without)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("info", help="parameters, heads, KV heads, FFN width and hidden size per layer")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune (full, lora, prune-lora, lora-prune, apt) and export")
    p.add_argument("model", nargs="?")
    _add_data(p)
    p.add_argument("--method", default="prune-lora",
                   choices=["full", "lora", "prune-lora", "lora-prune", "apt"])
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-limit", type=int, help="train on a seeded subset of this many examples")
    p.add_argument("--eval-limit", type=int, help="evaluate on a seeded subset of this many examples")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: every epoch)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (lora) / starting rank (apt)")
    p.add_argument("--lora-targets", choices=["attention", "ffn-in", "all"],
                   help="linears with adapters: q/k/v/o; also the FFN's input projection(s); or all of the FFN's "
                        "(default: all for apt, else attention)")
    p.add_argument("--rank-high", type=int, default=8)
    p.add_argument("--rank-low", type=int, default=4)
    p.add_argument("--top-blocks", type=int, default=None,
                   help="prune-lora: blocks given --rank-high (default a third of them: 4 of BERT-base's 12)")
    p.add_argument("--heads-keep", type=float, default=None)
    p.add_argument("--neurons-keep", type=float, default=None)
    p.add_argument("--keep-params", type=float, default=None,
                   help="lora-prune/apt: fraction of the prunable layer parameters to keep (default 0.4)")
    p.add_argument("--keep-flops", type=float, default=None,
                   help="lora-prune/apt: or the fraction of the layers' FLOPs per token to keep, at --seq-len")
    p.add_argument("--seq-len", type=int, default=None,
                   help="the sequence length --keep-flops is stated at (default --max-length)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                   help="apt: self-distillation from the best evaluation so far (needs --eval-every)")
    p.add_argument("--prune-before-training", action="store_true")
    p.add_argument("--scorer", help="apt --prune-before-training: scorer (default salience_kurtosis)")

    p = sub.add_parser("evaluate", help="re-score an exported model on a task")
    p.add_argument("model")
    p.add_argument("--task", required=True)
    p.add_argument("--data")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--seed", type=int, default=42, help="the run's seed (picks the same --eval-limit subset)")

    p = sub.add_parser("export-onnx", help="export a model directory to ONNX and check it in ONNX Runtime")
    p.add_argument("model", help="model directory (a prunetune export or a stock checkpoint)")
    p.add_argument("--out", required=True, help="the .onnx file; a causal LM adds <stem>.with_past.onnx, T5 writes "
                                                 "<stem>.encoder/.decoder/.decoder_with_past.onnx instead")
    p.add_argument("--opset", type=int, help="ONNX opset, 12-20 (default 20)")
    p.add_argument("--dynamic-axes", action=argparse.BooleanOptionalAction, default=True,
                   help="dynamic batch and sequence axes (default); --no-dynamic-axes fixes them to the trace shape")
    p.add_argument("--batch-size", type=int, default=2, help="trace shape (the fixed one with --no-dynamic-axes)")
    p.add_argument("--seq-len", type=int, default=16, help="trace shape (the fixed one with --no-dynamic-axes)")
    p.add_argument("--quantize", choices=["int8"], help="also write <stem>.int8.onnx (dynamic int8 quantisation)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare ONNX Runtime with PyTorch and write nothing beyond --atol (default)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the check (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of the check (default 1e-5)")
    p.add_argument("--auto-class", help="load with this transformers Auto class instead of the saved architecture's")
    p.add_argument("--overwrite", action="store_true")
    return parser


def _print(obj: dict, as_json: bool = True) -> None:
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


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from prunetune import pipeline

    if args.command == "importance":
        _print(pipeline.run_importance(
            args.model, args.task or [], args.out, data=args.data, samples=args.samples, scorer=args.scorer,
            max_length=args.max_length, hidden=args.hidden, overwrite=args.overwrite,
        ))
    elif args.command == "prune":
        report = pipeline.run_prune(
            args.model, args.out, plan=args.plan, budget=_budget(args), task=args.task, data=args.data,
            samples=args.samples, scorer=args.scorer, max_length=args.max_length, overwrite=args.overwrite,
        )
        for note in report["notes"]:
            print(f"note: {note}", file=sys.stderr)
        _print(report)
    elif args.command == "info":
        info = pipeline.run_info(args.model)
        print(json.dumps(info, indent=1) if args.json else _info_table(info))
    elif args.command == "finetune":
        from prunetune.recipes import FinetuneConfig, finetune

        cfg = FinetuneConfig.from_args(args)
        report = finetune(cfg)
        print(report["summary"])
    elif args.command == "evaluate":
        from prunetune.recipes import evaluate_export

        _print(evaluate_export(args.model, args.task, data=args.data, max_length=args.max_length,
                               batch_size=args.batch_size, eval_limit=args.eval_limit, seed=args.seed))
    elif args.command == "export-onnx":
        from prunetune.onnx_export import export_onnx

        _print(export_onnx(
            args.model, args.out, opset=args.opset, dynamic=args.dynamic_axes, quantize=args.quantize,
            verify=args.verify, auto_class=args.auto_class, atol=args.atol, rtol=args.rtol,
            batch_size=args.batch_size, seq_len=args.seq_len, overwrite=args.overwrite,
        ))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        return run(argv)
    except PrunetuneError as e:
        print(f"prunetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
