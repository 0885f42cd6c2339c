"""Side-by-side comparison of the fine-tuning methods on the real embedded model and real SST-2.

Every method runs as its own `prunetune finetune` process with the same data subset, sequence length,
epochs, batch size and seed, so that each one's peak memory is its own (CPU: peak resident memory above
the level just before the model was loaded). Inference latency and memory of the exported models are
then measured in fresh processes, interleaved in rounds (prunetune.bench.compare_inference).

    python benchmarks/compare_methods.py --methods full lora prune-lora --out runs/compare
    python benchmarks/compare_methods.py --epochs 1 --keep-params 0.4   # all methods, and apt with distillation

Prints the table of the Pruning-Adapter paper (accuracy, parameters, memory, relative training time,
inference) and APT's (everything relative to full fine-tuning), and writes results.json / results.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from cli_runs import run_report

from prunetune.bench import compare_inference, machine_description

# extra rows: a method with other flags. Each row takes one piece away from (or adds one to) apt at its defaults
# (README "APT as its authors run it"); apt-distill-best: the teacher is the best evaluation so far
VARIANTS = {
    "apt-distill": ("apt", ["--distill"]),
    "apt-distill-full": ("apt", ["--distill", "--distill-weight", "1"]),  # APT's code: the task loss ramped out
    "apt-distill-best": ("apt", ["--distill", "--distill-teacher", "best", "--eval-every", "25"]),
    "apt-no-decay": ("apt", ["--mask-decay", "0"]),
    "apt-no-warmup": ("apt", ["--salience-warmup", "0"]),
    "apt-layer-growth": ("apt", ["--growth", "layer"]),
    "apt-signal-apt": ("apt", ["--signal", "apt"]),  # APT's code's salience: per-channel sums multiplied
}


def run_method(name: str, args, out: Path) -> dict:
    method, extra = VARIANTS.get(name, (name, []))
    cmd = [
        sys.executable, "-m", "prunetune.cli", "finetune", "--task", "sst2", "--method", method,
        "--out", str(out), "--overwrite", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--seed", str(args.seed),
    ]
    if method in ("prune-lora", "lora-prune"):  # the methods that score importance on a sample (the others refuse it)
        cmd += ["--samples", str(args.samples)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.eval_every:
        cmd += ["--eval-every", str(args.eval_every)]
    if method in ("lora-prune", "apt"):
        cmd += ["--keep-params", str(args.keep_params)]
    if method == "prune-lora" and args.neurons_keep:
        cmd += ["--neurons-keep", str(args.neurons_keep)]
    cmd += extra
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    return run_report(cmd, out, name, compact_heap=args.heap == "compact")


def table(results: dict[str, dict], infer: dict[str, dict]) -> str:
    ref = results.get("full") or next(iter(results.values()))
    ref_inf = infer.get("full") or next(iter(infer.values()))
    head = ("| method | dev acc | params | layer params kept | trainable (% of full) | peak train mem MB (rel.) "
            "| train time s (rel.) | latency ms b32xL128 (rel.) | inference mem MB (rel.) |")
    lines = [head, "|" + "---|" * 9]
    for name, r in results.items():
        inf = infer[name]
        trainable_pct = 100 * r["trainable_params"] / ref["params_total"]
        lines.append(
            f"| {name} | {100 * r['metrics']['main']:.2f} | {r['params_total']:,} | {r['layer_params_kept']:.0%} "
            f"| {r['trainable_params']:,} ({trainable_pct:.2f}%) "
            f"| {r['peak_train_mem_mb']:.0f} ({r['peak_train_mem_mb'] / ref['peak_train_mem_mb']:.2f}) "
            f"| {r['train_time_s']:.0f} ({r['train_time_s'] / ref['train_time_s']:.2f}) "
            f"| {1000 * inf['latency_s_median']:.0f} ({inf['latency_s_median'] / ref_inf['latency_s_median']:.2f}) "
            f"| {inf['peak_mem_mb']:.0f} ({inf['peak_mem_mb'] / max(ref_inf['peak_mem_mb'], 1e-9):.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+",
                   default=["full", "lora", "lora-prune", "prune-lora", "apt", "apt-distill"])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="default: the bundled 4000-row SST-2 sample")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--keep-params", type=float, default=0.4)
    p.add_argument("--neurons-keep", type=float, default=None, help="prune-lora: also prune FFN neurons")
    p.add_argument("--heap", choices=["compact", "default"], default="compact",
                   help="CPU training processes: compact = resident memory follows the live tensors (see run_method)")
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--latency-seq", type=int, default=128)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {m: run_method(m, args, out / m) for m in args.methods}
    infer = compare_inference({m: str(out / m / "model") for m in args.methods}, batch_size=args.latency_batch,
                              seq_len=args.latency_seq)
    text = table(results, infer)
    heap_note = (" (glibc mmap threshold 64 KiB: training memory = live tensors; CPU training ~1.5x slower, "
                 "for every method)") if args.heap == "compact" else ""
    header = (
        f"SST-2, embedded all-MiniLM-L6-v2 (BERT, 6x12 heads); train: bundled 4000-row sample"
        f"{f' (first {args.train_limit} of a seeded shuffle)' if args.train_limit else ''}, dev: all 872 rows; "
        f"max length {args.max_length}, {args.epochs:g} epochs, batch {args.batch_size}, seed {args.seed}; "
        f"lora-prune/apt target {args.keep_params:.0%} of layer params; heap: {args.heap}{heap_note}.\n"
        f"Measured {dt.date.today()} on {machine_description()}.\n"
    )
    print("\n" + header + "\n" + text)
    (out / "results.md").write_text(header + "\n" + text + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "reports": results, "inference": infer},
                                                 indent=1, default=str))


if __name__ == "__main__":
    main()
