"""APT's LLaMA table on SmolLM2-135M-Instruct (GQA): the dense model, LoRA, LoRA+Prune, APT pruning before
training and APT pruning during training, at --keep-params of the layer parameters, instruction-tuned on the
Alpaca records and scored on the multiple-choice benchmarks as lm-evaluation-harness defines them.

Each run is its own process (`prunetune finetune ... --eval-bench`, so every peak memory is its own); the dense
row is `prunetune eval` plus the same fresh-process inference measurement. Every benchmark is shown as its score
(acc_norm for ARC and HellaSwag, acc for MMLU, MC2 for TruthfulQA) and as the score above chance (chance = the
mean over the scored items of 1/choices; for MC2, of the share of true answers among the choices, the mass a
model with equal probabilities puts on them): a 135M model sits near chance on MMLU and ARC-Challenge, where a
ratio of scores means nothing. Training time, peak training memory, inference latency and memory are also given
relative to LoRA.

    python benchmarks/llm_table.py                       # ~1 hour on 2 CPU cores with the default limits
    python benchmarks/llm_table.py --smoke               # a tiny random LLaMA, a few items: checks the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from prunetune.bench import machine_description, run_isolated
from prunetune.models import resolve

# the table's rows, in order; LoRA is the reference
RUNS = ("dense", "lora", "lora-prune", "apt-pbt", "apt-pbt-kd", "apt")
BENCHES = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "truthfulqa_mc2")
SHOWN = {"arc_challenge": "ARC-C", "arc_easy": "ARC-E", "hellaswag": "HellaSwag", "mmlu": "MMLU",
         "truthfulqa_mc2": "TruthfulQA"}


def _env(args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # resident memory follows the live tensors (cli_runs.py)
    return env


def _call(cmd: list[str], args, what: str) -> None:
    print(f"== {what}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "prunetune.cli", *cmd], env=_env(args), capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")


def _data_flag(args) -> list[str]:
    return ["--eval-data", args.eval_data] if args.eval_data else []


def bench_flags(args) -> list[str]:
    # MMLU is scored apart (mmlu_results): its limit counts per subject, 57 of them
    benches = [b for b in args.benches if b != "mmlu"]
    return [f"--eval-bench={','.join(benches)}", "--eval-bench-limit", str(args.limit), *_data_flag(args)]


def mmlu_results(model: str, args, out: Path) -> dict | None:
    """MMLU with its own per-subject limit (`prunetune eval` on the model or the run's export)."""
    if "mmlu" not in args.benches:
        return None
    path = out / "mmlu.json"
    if args.reuse and path.exists():
        return json.loads(path.read_text())["benchmarks"]["mmlu"]
    _call(["eval", model, "--bench", "mmlu", "--limit", str(args.mmlu_limit), "--out", str(path), *_data_flag(args)],
          args, f"MMLU of {model}")
    return json.loads(path.read_text())["benchmarks"]["mmlu"]


def with_mmlu(results: dict, mmlu: dict | None) -> dict:
    """The run's benchmark results with MMLU's added and the averages recomputed over every benchmark."""
    if mmlu is None:
        return results
    benches = {**results["benchmarks"], "mmlu": mmlu}
    n = len(benches)
    return {**results, "benchmarks": benches,
            "average": sum(b["score"] for b in benches.values()) / n,
            "average_above_chance": sum(b["above_chance"] for b in benches.values()) / n}


def finetune(method: str, args, out: Path, extra: list[str]) -> dict:
    cmd = ["finetune", args.model, "--task", "instruct", "--data", args.data, "--method", method, "--out", str(out),
           "--overwrite", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length",
           str(args.max_length), "--train-limit", str(args.train_limit), "--eval-limit", str(args.eval_limit),
           "--seed", str(args.seed), "--rank", str(args.rank), "--lr", str(args.lr), "--lora-targets",
           args.lora_targets, *bench_flags(args), *extra]
    if not (args.reuse and (out / "report.json").exists()):  # --reuse: a finished run's report is read again
        _call(cmd, args, f"{method} {' '.join(extra)}")
    report = json.loads((out / "report.json").read_text())
    print(report["summary"], flush=True)
    scored = report["benchmarks"]
    if scored.get("limit") != args.limit:  # a reused run scored on other items: its export scored on these
        scored = scores(str(out / "model"), args, out / f"eval_{args.limit}.json", f"{method} at --limit {args.limit}")
    benchmarks = with_mmlu(scored, mmlu_results(str(out / "model"), args, out))
    return {"benchmarks": benchmarks, "train_s": report["train_time_s"],
            "train_mb": report["peak_train_mem_mb"], "infer_s": report["inference"]["batch32_latency_s"],
            "infer_mb": report["inference"]["batch32_peak_mem_mb"], "kept": report["layer_params_kept"]}


def scores(model: str, args, path: Path, what: str) -> dict:
    """`prunetune eval` of `model` on the benchmarks other than MMLU, the first --limit items of each; with
    --reuse, an earlier result at the same limit is read again."""
    earlier = json.loads(path.read_text()) if args.reuse and path.exists() else None
    if earlier is not None and earlier.get("limit") == args.limit:
        return earlier
    benches = [b for b in args.benches if b != "mmlu"]
    _call(["eval", model, "--bench", ",".join(benches), "--limit", str(args.limit), "--out", str(path),
           *_data_flag(args)], args, what)
    return json.loads(path.read_text())


def dense(args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    res = with_mmlu(scores(args.model, args, out / "eval.json", "dense (no training)"),
                    mmlu_results(args.model, args, out))
    inf = run_isolated("prunetune.bench:measure_inference", {"model_dir": resolve(args.model), "batch_size": 32,
                                                             "seq_len": args.max_length, "repeats": 3,
                                                             "task": "instruct"}, timeout=600)
    return {"benchmarks": res, "train_s": None, "train_mb": None, "infer_s": inf["latency_s_median"],
            "infer_mb": inf["peak_mem_mb"], "kept": 1.0}


def _ratio(v, ref) -> str:
    return "-" if v is None or not ref else f"{v / ref:.2f}x"


def table(rows: list[tuple[str, dict]], benches: list[str]) -> str:
    lora = dict(rows)["LoRA"]
    head = ["method", "layer params", *(SHOWN[b] for b in benches), "avg",
            *(f"{SHOWN[b]} above chance" for b in benches), "avg above chance", "above chance vs LoRA",
            "train time", "train mem", "inference time", "inference mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        b = r["benchmarks"]["benchmarks"]
        scores = [100 * b[x]["score"] for x in benches]
        above = [100 * b[x]["above_chance"] for x in benches]
        ref = lora["benchmarks"]["average_above_chance"]
        cells = [name, f"{r['kept']:.0%}", *(f"{s:.1f}" for s in scores), f"{sum(scores) / len(scores):.1f}",
                 *(f"{a:+.1f}" for a in above), f"{sum(above) / len(above):+.1f}",
                 _ratio(r["benchmarks"]["average_above_chance"], ref),
                 _ratio(r["train_s"], lora["train_s"]), _ratio(r["train_mb"], lora["train_mb"]),
                 _ratio(r["infer_s"], lora["infer_s"]), _ratio(r["infer_mb"], lora["infer_mb"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tiny_model(out: Path) -> str:
    """--smoke: a tiny random LLaMA (GQA) with SmolLM2's tokenizer, so the script runs in a minute or two."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(resolve("smollm2"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
    path = out / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def main() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared/data"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default=str(shared / "alpaca_gpt4/alpaca_en_demo.json"))
    p.add_argument("--eval-data", default=None, help="the evaluation files (default ../shared/data/eval)")
    p.add_argument("--out", default="runs/llm_table")
    p.add_argument("--benches", nargs="+", default=list(BENCHES), choices=BENCHES)
    p.add_argument("--limit", type=int, default=200, help="items per benchmark (the first N, as the harness's --limit)")
    p.add_argument("--mmlu-limit", type=int, default=5, help="MMLU items per subject (57 subjects)")
    p.add_argument("--keep-params", type=float, default=0.7)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--train-limit", type=int, default=160)
    p.add_argument("--eval-limit", type=int, default=100, help="held-out records for perplexity")
    p.add_argument("--samples", type=int, default=64,
                   help="calibration examples (lora-prune's mask search, APT's pruning before training)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="the same for every run")
    p.add_argument("--lora-targets", choices=["attention", "all"], default="all", help="the same for every run")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rows", nargs="+", choices=RUNS, default=list(RUNS), help="the rows to run (lora is needed: "
                   "the ratios are to it)")
    p.add_argument("--reuse", action="store_true", help="read the rows already finished under --out instead of "
                   "running them again (their reports and MMLU results; the dense row's inference is re-measured); "
                   "a row scored on another --limit has its export scored on this one")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 2 items, 16 records")
    args = p.parse_args()
    if "lora" not in args.rows:
        p.error("--rows needs lora: every ratio is to LoRA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.model = _tiny_model(out)
        args.limit, args.train_limit, args.eval_limit, args.max_length, args.samples = 2, 16, 8, 128, 8
        args.mmlu_limit = 1
        args.benches = ["arc_easy", "hellaswag", "truthfulqa_mc2"]
    else:
        resolve(args.model)  # dequantise the GGUF once into the fp32 cache, outside the measured runs
    keep = ["--keep-params", str(args.keep_params)]
    runs = {
        "dense": ("dense", lambda: dense(args, out / "dense")),
        "lora": ("LoRA", lambda: finetune("lora", args, out / "lora", [])),
        "lora-prune": ("LoRA+Prune", lambda: finetune("lora-prune", args, out / "lora-prune",
                                                      [*keep, "--samples", str(args.samples)])),
        "apt-pbt": ("APT, pruned before training", lambda: finetune("apt", args, out / "apt-pbt", [
            *keep, "--prune-before-training", "--samples", str(args.samples)])),
        "apt-pbt-kd": ("APT, pruned before training, distilled from the dense model", lambda: finetune(
            "apt", args, out / "apt-pbt-kd", [*keep, "--prune-before-training", "--samples", str(args.samples),
                                              "--distill", "--distill-teacher", "dense", "--distill-layers", "0"])),
        "apt": ("APT", lambda: finetune("apt", args, out / "apt", keep)),
    }
    rows = [(runs[r][0], runs[r][1]()) for r in RUNS if r in args.rows]
    mmlu = f" (MMLU: the first {args.mmlu_limit} of each of its 57 subjects)" if "mmlu" in args.benches else ""
    header = (
        f"{args.model}, instruction-tuned on {args.train_limit} Alpaca-GPT4 demo records ({args.eval_limit} held "
        f"out for perplexity), max length {args.max_length}, {args.epochs:g} epoch, batch {args.batch_size}, LoRA "
        f"r={args.rank} ({args.lora_targets}), lr {args.lr:g}; pruned methods at {args.keep_params:.0%} of the "
        f"layer parameters. Benchmarks: lm-evaluation-harness definitions, 0-shot, the first {args.limit} items "
        f"of each{mmlu}; scores x100 (acc_norm for ARC and HellaSwag, acc for MMLU, MC2 for TruthfulQA); above "
        f"chance = score - chance on the same items. Ratios are to LoRA. Inference: batch 32 x {args.max_length} "
        f"tokens, fresh process. Peak memory: process peak RSS above the pre-load level (glibc mmap threshold "
        f"64 KiB).\nMeasured {dt.date.today()} on {machine_description()}.\n"
    )
    text = header + "\n" + table(rows, args.benches)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(dict(rows), indent=1, default=str))


if __name__ == "__main__":
    main()
