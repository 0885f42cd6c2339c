"""Summarisation on a real decoder: SmolLM2-135M-Instruct on CNN/DailyMail, five methods at 70% layer parameters.

Runs, each in its own `prunetune finetune` process (so each peak memory is its own), on the same rows, lengths,
epochs, batch and seed: full fine-tuning (dense), LoRA, LoRA+Prune (`lora-prune`: LoRA, Fisher-scored pruning to the
target, LoRA recovery), APT pruning before training (`apt --prune-before-training`) and APT during training (`apt`),
the pruned ones to 70% of the layer parameters. Each method at its own default learning rate unless --lr is given;
LoRA on q/k/v/o and the MLP for every LoRA method.

Data (the shared CNN/DailyMail files): training rows are train.jsonl (100) + validation_rows500-999.jsonl (500, given
as --extra-train: validation rows 500-999 of CNN/DM 3.0.0, disjoint from the scored ones), a seeded --train-limit
subset of them; scored rows a seeded --eval-limit subset of validation.jsonl (validation rows 0-499). ROUGE F x100
with stemming (rouge-score), Lsum on sentences one per line. Generation: greedy, at most --max-new-tokens tokens.

Printed per method: ROUGE-1/2/L/Lsum, generated tokens, generation time per example (the exported model summarising
the scored rows, batches of 8, in the finetune process), training time and peak training memory, peak inference
memory (one forward at batch 32 x --max-length in a fresh process), each also relative to LoRA.

    PRUNETUNE_LLAMA=1 bash scripts/setup.sh
    python benchmarks/summarize_methods.py                  # about 30 min on 2 CPU cores
    python benchmarks/summarize_methods.py --smoke --methods lora apt-pbt   # the pipeline in a few minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from cli_runs import run_report

from prunetune.bench import machine_description
from prunetune.models import resolve

DATA = Path(__file__).resolve().parents[2] / "shared/data/cnn_dailymail"

# name: (label, finetune method, flags of its own; "{keep}"/"{samples}" filled from the arguments)
RUNS = {
    "full": ("full (dense)", "full", []),
    "lora": ("LoRA", "lora", []),
    "lora-prune": ("LoRA+Prune", "lora-prune", ["--keep-params", "{keep}", "--samples", "{samples}"]),
    "apt-pbt": ("APT, pruned before training", "apt",
                ["--prune-before-training", "--keep-params", "{keep}", "--samples", "{samples}"]),
    "apt": ("APT, pruned during training", "apt", ["--keep-params", "{keep}"]),
}
SMOKE = {"train_limit": 4, "eval_limit": 2, "max_length": 96, "max_target_length": 16, "max_new_tokens": 8,
         "batch_size": 2, "samples": 4}


def run(name: str, args, out: Path) -> dict:
    label, method, own = RUNS[name]
    lora = [] if method == "full" else ["--rank", str(args.rank), "--lora-targets", "all"]
    cmd = [
        sys.executable, "-m", "prunetune.cli", "finetune", "smollm2", "--task", "summarize",
        "--data", str(args.data), "--extra-train", str(Path(args.data) / "validation_rows500-999.jsonl"),
        "--method", method, "--out", str(out), "--overwrite",
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--max-target-length", str(args.max_target_length), "--max-new-tokens", str(args.max_new_tokens),
        "--train-limit", str(args.train_limit), "--eval-limit", str(args.eval_limit), "--seed", str(args.seed),
        *lora, *(["--lr", str(args.lr)] if args.lr else []),
        *(flag.format(keep=args.keep_params, samples=args.samples) for flag in own),
    ]
    print(f"== {label}: {' '.join(cmd[3:])}", flush=True)
    return run_report(cmd, out, label, compact_heap=args.heap == "compact")


def _rel(value: float, base: float | None) -> str:
    return f" ({value / base:.2f})" if base else ""


def table(rows: list[tuple[str, dict]]) -> list[str]:
    base = next((r for name, r in rows if name == "lora"), None)

    def ref(key) -> float | None:
        return key(base) if base else None

    def gen_ms(r):
        return r["inference"]["ms_per_example"]

    def inf_mem(r):
        return r["inference"]["batch32_peak_mem_mb"]

    lines = [
        "| method | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | gen tokens | layer params kept | params "
        "| generation ms/example (rel.) | inference mem MB (rel.) | train time s (rel.) | peak train mem MB (rel.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        m = r["metrics"]
        lines.append(
            f"| {RUNS[name][0]} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} | {m['rougeLsum']:.2f} "
            f"| {m['gen_length']:.1f} | {r['layer_params_kept']:.0%} | {r['params_total']:,} "
            f"| {gen_ms(r):.0f}{_rel(gen_ms(r), ref(gen_ms))} | {inf_mem(r):.0f}{_rel(inf_mem(r), ref(inf_mem))} "
            f"| {r['train_time_s']:.0f}{_rel(r['train_time_s'], ref(lambda x: x['train_time_s']))} "
            f"| {r['peak_train_mem_mb']:.0f}{_rel(r['peak_train_mem_mb'], ref(lambda x: x['peak_train_mem_mb']))} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="the CNN/DailyMail directory (train.jsonl, validation.jsonl, "
                                                     "validation_rows500-999.jsonl)")
    p.add_argument("--out", default="runs/summarize")
    p.add_argument("--methods", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--keep-params", type=float, default=0.7)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384, help="prompt tokens (the article is cut to fit)")
    p.add_argument("--max-target-length", type=int, default=64, help="summary tokens trained on")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=48, help="training rows (of the 600)")
    p.add_argument("--eval-limit", type=int, default=24, help="scored rows (of the 500)")
    p.add_argument("--samples", type=int, default=32, help="calibration examples for the pruning scores")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every run (default: each "
                                                          "method's own)")
    p.add_argument("--heap", choices=["compact", "default"], default="compact")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the pipeline, measures nothing")
    args = p.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if not (Path(args.data) / "validation_rows500-999.jsonl").is_file():
        raise SystemExit(f"{args.data}: no validation_rows500-999.jsonl (the shared CNN/DailyMail files)")
    resolve("smollm2")  # dequantise the GGUF once into the fp32 cache, outside the measured runs
    out = Path(args.out)
    rows = [(name, run(name, args, out / name)) for name in args.methods]
    header = (
        f"SmolLM2-135M-Instruct summarising CNN/DailyMail: {args.train_limit} training rows (seeded, of train.jsonl "
        f"+ validation rows 500-999), {args.eval_limit} scored rows (seeded, of validation rows 0-499); chat-template "
        f"prompt of at most {args.max_length} tokens, summaries trained to {args.max_target_length} tokens, greedy "
        f"generation of at most {args.max_new_tokens}; {args.epochs:g} epoch, batch {args.batch_size}, seed "
        f"{args.seed}, LoRA r={args.rank} on q/k/v/o and the MLP, lr {args.lr or 'each method default'}; pruned "
        f"runs to {args.keep_params:.0%} of the layer parameters ({args.samples} calibration examples where scored "
        "before training). ROUGE F x100 (rouge-score, stemming). Generation time: the exported model over the scored "
        "rows, batches of 8. Inference memory: one forward at batch 32 in a fresh process. Peak training memory: "
        "process peak RSS above the pre-load level"
        f"{' (glibc mmap threshold 64 KiB)' if args.heap == 'compact' else ''}. (rel.) = relative to LoRA."
        f"{' SMOKE SETTINGS: the numbers mean nothing.' if args.smoke else ''}\n"
        f"Measured {dt.date.today()} on {machine_description()}.\n"
    )
    text = header + "\n" + "\n".join(table(rows))
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
