"""APT's pruning before training on a real LLaMA-architecture model: SmolLM2-135M-Instruct (GQA, 9/3 heads).

Runs, each in its own process (so each peak memory is its own): LoRA on the unpruned model, and
`apt --prune-before-training` to 70% of the layer parameters (outlier-aware salience + kurtosis scored on
a calibration sample, whole-structure removal respecting the KV groups, then LoRA), on the same
Alpaca-style records, and prints held-out perplexity and peak memory side by side.

    PRUNETUNE_LLAMA=1 bash scripts/setup.sh
    python benchmarks/llama_instruct.py --data ../shared/data/alpaca_gpt4/alpaca_en_demo.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from cli_runs import run_report

from prunetune.bench import machine_description
from prunetune.models import resolve


def run(method: str, args, out: Path, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "prunetune.cli",
        "finetune",
        "smollm2",
        "--task",
        "instruct",
        "--data",
        args.data,
        "--method",
        method,
        "--out",
        str(out),
        "--overwrite",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--train-limit",
        str(args.train_limit),
        "--eval-limit",
        str(args.eval_limit),
        "--seed",
        str(args.seed),
        "--rank",
        str(args.rank),
        "--lr",
        str(args.lr),
        "--lora-targets",
        args.lora_targets,
        *extra,
    ]
    print(f"== {method} {' '.join(extra)}", flush=True)
    return run_report(cmd, out, method, compact_heap=args.heap == "compact")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/alpaca_gpt4/alpaca_en_demo.json")
    )
    p.add_argument("--out", default="runs/llama")
    p.add_argument("--keep-params", type=float, default=0.7)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--train-limit", type=int, default=160)
    p.add_argument("--eval-limit", type=int, default=100)
    p.add_argument("--samples", type=int, default=64, help="calibration examples for pruning before training")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="the same for every run")
    p.add_argument("--lora-targets", choices=["attention", "all"], default="all", help="the same for every run")
    p.add_argument("--heap", choices=["compact", "default"], default="compact")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scorers", nargs="+", default=["salience_kurtosis", "fisher"],
                   help="importance scorers for pruning before training, one run each")
    args = p.parse_args()
    resolve("smollm2")  # dequantise the GGUF once into the fp32 cache, outside the measured runs
    out = Path(args.out)
    rows = [("LoRA, unpruned", run("lora", args, out / "lora", []))]
    for scorer in args.scorers:
        flags = ["--prune-before-training", "--keep-params", str(args.keep_params), "--scorer", scorer,
                 "--samples", str(args.samples)]
        rows.append((f"APT prune-before-training {args.keep_params:.0%}, {scorer}",
                     run("apt", args, out / f"apt-pbt-{scorer}", flags)))
    lines = [
        "| run | held-out perplexity | params | layer params kept | heads | FFN | peak train mem MB | train time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['metrics']['perplexity']:.2f} | {r['params_total']:,} | {r['layer_params_kept']:.0%} "
            f"| {r['heads']} | {r['neurons']} | {r['peak_train_mem_mb']:.0f} | {r['train_time_s']:.0f} |"
        )
    header = (
        f"SmolLM2-135M-Instruct, Alpaca-GPT4 demo records: {args.train_limit} train / {args.eval_limit} held out "
        f"(seeded split), max length {args.max_length}, {args.epochs:g} epoch, batch {args.batch_size}, "
        f"LoRA r={args.rank} on {'q/k/v/o' if args.lora_targets == 'attention' else 'q/k/v/o and the MLP'}, "
        f"lr {args.lr:g}, {args.samples} calibration examples. Peak memory: process peak RSS above the pre-load level"
        f"{' (glibc mmap threshold 64 KiB, so freed activations leave it)' if args.heap == 'compact' else ''}.\n"
        f"Measured {dt.date.today()} on {machine_description()}.\n"
    )
    text = header + "\n" + "\n".join(lines)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
