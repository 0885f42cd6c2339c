"""APT's SQuAD v2 columns side by side for every method, on the real embedded MiniLM (all-MiniLM-L6-v2).

Every method runs as its own `prunetune finetune --task squad_v2` process with the same articles, sequence
length, stride, epochs, batch size and seed, so that each one's peak training memory is its own; inference
latency and memory of the exported models are then measured in fresh processes taking turns
(prunetune.bench.compare_inference), on question windows of --max-length tokens.

The shared data has no SQuAD 2.0 training file, only a 16-article subset of the dev set: each run trains on
some of its articles and is scored on the others, held out by article title with --seed (never the same
article in both: --dev-fraction 0.25 holds out 4 of the 16). Numbers are therefore not comparable with
published SQuAD 2.0 results (trained on train-v2.0.json, 442 articles), only with each other.

    python benchmarks/squad_methods.py --out runs/squad                        # all five methods (hours on 2 cores)
    python benchmarks/squad_methods.py --methods apt --train-limit 64 --eval-limit 32 --out runs/squad-smoke

Prints exact match and F1 (with HasAns/NoAns), training time and memory, inference latency and memory, each
relative to `full`, and writes results.json / results.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

from cli_runs import run_report

import prunetune
from prunetune.bench import compare_inference, machine_description

DATA = Path(__file__).resolve().parents[2] / "shared/data/squad_v2/dev-v2.0_cs224n-subset.json"
METHODS = ("full", "lora", "lora-prune", "prune-lora", "apt")
BUDGETED = ("lora-prune", "apt")  # the methods with a --keep-params target; prune-lora keeps heads by count


def finetune_cmd(method: str, args, out: Path, *, train_limit: int | None, eval_limit: int | None) -> list[str]:
    cmd = [
        sys.executable, "-m", "prunetune.cli", "finetune", "--task", "squad_v2", "--data", str(args.data),
        "--dev-fraction", str(args.dev_fraction), "--method", method, "--out", str(out), "--overwrite",
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--seed", str(args.seed),
    ]
    if args.stride is not None:
        cmd += ["--stride", str(args.stride)]
    if method in ("prune-lora", "lora-prune"):  # the methods that score importance on a sample
        cmd += ["--samples", str(args.samples)]
    if method in BUDGETED:
        cmd += ["--keep-params", str(args.keep_params)]
    for flag, value in (("--train-limit", train_limit), ("--eval-limit", eval_limit),
                        ("--eval-every", args.eval_every), ("--lr", args.lr.get(method))):
        if value:
            cmd += [flag, str(value)]
    return cmd


def run_once(label: str, cmd: list[str], out: Path, *, compact: bool, reuse: bool) -> dict:
    """One finetune process; a finished one in `out` is reused only when started with the same command line and
    heap setting."""
    done = out / "benchmark_run.json"
    run = {"cmd": cmd[1:], "heap": "compact" if compact else "default"}
    if reuse and done.is_file() and (out / "report.json").is_file():
        saved = json.loads(done.read_text())
        if {k: saved.get(k) for k in run} == run:
            report = json.loads((out / "report.json").read_text())
            report["wall_s"] = saved["wall_s"]
            print(f"== {label}: reused {out}\n{report['summary']}", flush=True)
            return report
    done.unlink(missing_ok=True)
    print(f"== {label}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    report = run_report(cmd, out, label, compact_heap=compact)
    report["wall_s"] = time.perf_counter() - t0  # the whole process: data, training, export, evaluations
    done.write_text(json.dumps({**run, "wall_s": report["wall_s"], "date": str(dt.date.today())}, indent=1))
    return report


def run_method(method: str, args, out: Path) -> dict:
    cmd = finetune_cmd(method, args, out, train_limit=args.train_limit, eval_limit=args.eval_limit)
    report = run_once(method, cmd, out, compact=args.heap == "compact", reuse=args.reuse)
    if args.heap == "split":
        # The compacted heap slows CPU training ~1.5x (every large block is mapped afresh), too slow for several
        # epochs here; peak training memory is reached in the first steps (every method trains its largest model
        # first), so a short run of the same command with the heap compacted measures it.
        mem_out = out.with_name(out.name + "_memory")
        cmd = finetune_cmd(method, args, mem_out, train_limit=args.memory_questions, eval_limit=16)
        probe = run_once(f"{method} (memory)", cmd, mem_out, compact=True, reuse=args.reuse)
        report["peak_train_mem_mb_default_heap"] = report["peak_train_mem_mb"]
        report["peak_train_mem_mb"] = probe["peak_train_mem_mb"]
    return report


def method_lrs(pairs: list[str]) -> dict[str, float]:
    """--lr METHOD=VALUE pairs as a dict (methods not named keep their prunetune default)."""
    out = {}
    for pair in pairs:
        method, sep, value = pair.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--lr expects METHOD=VALUE with METHOD one of {', '.join(METHODS)}; got {pair!r}")
        try:
            out[method] = float(value)
        except ValueError:
            raise SystemExit(f"--lr {pair!r}: {value!r} is not a number") from None
    return out


def _rel(value: float, ref: float) -> str:
    return f"{value / ref:.2f}" if ref else "-"


def table(results: dict[str, dict], infer: dict[str, dict]) -> str:
    ref = results.get("full") or next(iter(results.values()))
    ref_inf = infer.get("full") or next(iter(infer.values()))
    lines = [
        "| method | EM | F1 (rel.) | HasAns EM / F1 | NoAns EM / F1 | params | layer params kept "
        "| train time s (rel.) | peak train mem MB (rel.) | latency ms (rel.) | inference mem MB (rel.) |",
        "|" + "---|" * 11,
    ]
    for name, r in results.items():
        m, inf = r["metrics"], infer[name]

        def pair(prefix: str, m=m) -> str:
            return f"{100 * m[prefix + 'exact']:.2f} / {100 * m[prefix + 'f1']:.2f}" if prefix + "f1" in m else "-"

        lines.append(
            f"| {name} | {100 * m['exact']:.2f} | {100 * m['f1']:.2f} ({_rel(m['f1'], ref['metrics']['f1'])}) "
            f"| {pair('HasAns_')} | {pair('NoAns_')} | {r['params_total']:,} | {r['layer_params_kept']:.0%} "
            f"| {r['train_time_s']:.0f} ({_rel(r['train_time_s'], ref['train_time_s'])}) "
            f"| {r['peak_train_mem_mb']:.0f} ({_rel(r['peak_train_mem_mb'], ref['peak_train_mem_mb'])}) "
            f"| {1000 * inf['latency_s_median']:.0f} ({_rel(inf['latency_s_median'], ref_inf['latency_s_median'])}) "
            f"| {inf['peak_mem_mb']:.0f} ({_rel(inf['peak_mem_mb'], ref_inf['peak_mem_mb'])}) |"
        )
    return "\n".join(lines)


def targets(results: dict[str, dict], infer: dict[str, dict]) -> str:
    """APT against full fine-tuning: F1 >= 97% of full's, latency <= 0.5 of full's."""
    if "apt" not in results or "full" not in results:
        return "APT targets: need both `full` and `apt` in --methods."
    full = results["full"]["metrics"]
    f1 = results["apt"]["metrics"]["f1"] / max(full["f1"], 1e-12)
    latency = infer["apt"]["latency_s_median"] / infer["full"]["latency_s_median"]
    verdict = "met" if f1 >= 0.97 else "not met"
    if full.get("HasAns_total") and not full.get("HasAns_f1"):
        # full fine-tuning never answered: every row can match it by saying "no answer", so the ratio says nothing
        verdict = "not assessable: `full` answers no question (train longer, or with more data)"
    return (f"APT targets: F1 {f1:.1%} of full's ({verdict}, target >= 97%); "
            f"latency {latency:.2f} of full's ({'met' if latency <= 0.5 else 'not met'}, target <= 0.50).")


def split_sizes(args) -> tuple[int, int, int, int]:
    """Articles and questions on each side of the article split the runs use (as prunetune reads it)."""
    from prunetune import tasks
    from prunetune.data import DataSource

    task, source = tasks.get("squad_v2"), DataSource(str(args.data), dev_fraction=args.dev_fraction)
    train, dev = (task.read(split, source, seed=args.seed).dataset for split in ("train", "dev"))
    return len({e["title"] for e in train}), len(train), len({e["title"] for e in dev}), len(dev)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--data", type=Path, default=DATA, help="SQuAD v2 JSON (default: the shared 16-article subset)")
    p.add_argument("--dev-fraction", type=float, default=0.25, help="share of the articles held out for evaluation")
    p.add_argument("--out", default="runs/squad")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="tokens per question window")
    p.add_argument("--stride", type=int, default=None, help="tokens windows share (default: a quarter of the length)")
    p.add_argument("--train-limit", type=int, default=None, help="training questions (default: every one)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluation questions (default: every held-out one)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: every epoch)")
    p.add_argument("--samples", type=int, default=256, help="importance sample (prune-lora, lora-prune), questions")
    p.add_argument("--keep-params", type=float, default=0.4, help="lora-prune/apt target share of layer parameters")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=VALUE",
                   help="learning rate for a method (default: prunetune's per-method default)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a method's finished run in --out when its command line was the same")
    p.add_argument("--heap", choices=["compact", "default", "split"], default="compact",
                   help="CPU training processes: compact = resident memory follows the live tensors (~1.5x "
                        "slower); split = timed runs on the default heap, memory from a short compacted run")
    p.add_argument("--memory-questions", type=int, default=160,
                   help="with --heap split: training questions of the short run that measures memory")
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--latency-seq", type=int, default=None, help="default: --max-length")
    args = p.parse_args()
    args.lr = method_lrs(args.lr)
    if not args.data.is_file():
        raise SystemExit(f"no SQuAD v2 file at {args.data}: pass --data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {m: run_method(m, args, out / m) for m in args.methods}
    seq = args.latency_seq or args.max_length
    infer = compare_inference({m: str(out / m / "model") for m in args.methods}, batch_size=args.latency_batch,
                              seq_len=seq)
    total = time.perf_counter() - t0
    first = next(iter(results.values()))["data"]
    train_articles, train_questions, dev_articles, dev_questions = split_sizes(args)
    header = (
        f"SQuAD v2 ({args.data.name}, a subset of the dev set; no training file): train on "
        f"{first['train']['examples']:,} of the {train_questions:,} questions of {train_articles} articles, evaluate "
        f"on {first['dev']['examples']:,} of the {dev_questions:,} questions of the other {dev_articles}, held out "
        f"by --seed {args.seed} (never the same article in both). Embedded all-MiniLM-L6-v2 (BERT, 6x12 heads); "
        f"windows of {args.max_length} tokens, stride {args.stride or args.max_length // 4}; {args.epochs:g} "
        f"epoch(s), batch {args.batch_size}; learning rates "
        + ", ".join(f"{m} {r['config']['lr']:g}" for m, r in results.items())
        + f"; lora-prune/apt target {args.keep_params:.0%} of layer params; heap: "
        f"{args.heap}. "
        f"Latency: batch {args.latency_batch} x {seq} tokens, fresh processes taking turns. EM/F1 x 100 (the "
        f"official script's scale).\n"
        f"Measured {dt.date.today()} on {machine_description()}; peft {version('peft')}, prunetune "
        f"{prunetune.__version__}; {total / 60:.1f} min in all.\n"
    )
    m = next(iter(results.values()))["metrics"]
    never = m.get("NoAns_total", 0) / m["total"]  # "" is right on every unanswerable question, wrong elsewhere
    baseline = (f"A model that never answers scores EM = F1 = {100 * never:.2f} on these questions (their share "
                "without an answer): the floor every row must clear.")
    text = header + "\n" + table(results, infer) + "\n\n" + baseline + "\n" + targets(results, infer)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"args": {**vars(args), "data": str(args.data)},
                                                  "reports": results, "inference": infer, "total_s": total},
                                                 indent=1, default=str))


if __name__ == "__main__":
    main()
