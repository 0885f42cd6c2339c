"""Runtimes benchmark: PyTorch vs ONNX Runtime (fp32 and int8), dense vs pruned, side by side in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_runtimes.py [--dense DIR --pruned DIR] --out results.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_runtimes.py --llm [--llm-pruned DIR] --out llm.json

Classifier (default): the embedded MiniLM fine-tuned on SST-2, dense (``finetune --method full``) and pruned to
``--keep-params`` of its layer parameters (``finetune --method apt``); ``--dense``/``--pruned`` take finished
``prunetune finetune`` outputs (or model directories) instead of training them here (minutes each). Each
model is exported with ``prunetune.onnx_export.export_onnx`` (checked against PyTorch, plus an int8 copy),
then every row (model x runtime x batch) is timed in fresh processes, interleaved over ``--rounds``, at
``--threads`` threads: latency is the median of ``--repeats`` passes of the best uncontended round (as
``prunetune.bench.compare_inference``); peak memory is the resident high-water mark above the pre-load
baseline in one more fresh process with a compacted heap (``prunetune.bench.compact_heap``). SST-2 dev
accuracy is scored for each model and runtime on the bundled dev set, with the share of predictions equal
to the same model's in PyTorch.

Target: the pruned model in ONNX Runtime at <= 0.35 of the dense PyTorch latency at 32 x 128, its accuracy
within 0.1 point of the pruned PyTorch model's.

``--llm``: SmolLM2-135M dense and pruned (``prunetune prune smollm2 --heads-keep 0.34 --neurons-keep 0.4``,
data-free magnitude scores: 40% of the layer parameters; or ``--llm-pruned``): prefill of a
``--prompt-len`` prompt and per-token decode with the KV cache (``--new-tokens``), in PyTorch and in ONNX
Runtime (the exported graphs with past key values).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from prunetune.bench import (  # noqa: E402
    MemoryMeter,
    compact_heap,
    machine_description,
    run_isolated,
    torch_threads,
)

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.35
TARGET_ACC_POINTS = 0.1
MIN_CPU_SHARE = 0.9
RUNTIMES = ("pytorch", "ort-fp32", "ort-int8")


# ---------------------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------------------


def model_dir(path: str | Path) -> Path:
    """The model inside a `prunetune finetune` output (DIR/model), or DIR itself."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").exists() else path


def _cli(*args: str) -> None:
    """A prunetune command in its own process (training memory and threads stay out of this one)."""
    cmd = [sys.executable, "-m", "prunetune.cli", *args]
    print("$ prunetune " + " ".join(args), file=sys.stderr)
    subprocess.run(cmd, check=True)


def build_classifiers(args, work: Path) -> dict[str, Path]:
    """The dense and pruned SST-2 models: given, already in --workdir, or fine-tuned now."""
    dirs = {}
    for name, given, method in (("dense", args.dense, "full"), ("pruned", args.pruned, "apt")):
        if given:
            dirs[name] = model_dir(given)
            continue
        out = work / f"finetune_{name}"
        if not (out / "model" / "config.json").exists():
            extra = ["--keep-params", str(args.keep_params)] if method == "apt" else []
            if args.train_limit:
                extra += ["--train-limit", str(args.train_limit)]
            if args.eval_limit:
                extra += ["--eval-limit", str(args.eval_limit)]
            _cli("finetune", "--task", "sst2", "--method", method, "--out", str(out), "--overwrite",
                 "--seed", str(args.seed), "--epochs", str(args.epochs), *extra)
        dirs[name] = out / "model"
    return dirs


def build_llms(args, work: Path) -> dict[str, Path]:
    from prunetune import models

    dirs = {"dense": Path(models.resolve("smollm2"))}
    if args.llm_pruned:
        dirs["pruned"] = model_dir(args.llm_pruned)
    else:
        # Fractions of heads and neurons, not --keep-params: the data-free magnitude scores of heads and neurons
        # are not in one unit, and at keep-params 0.4 the selection removed all 270 heads of SmolLM2.
        out = work / f"smollm2_h{args.llm_heads_keep:g}_n{args.llm_neurons_keep:g}"
        if not (out / "config.json").exists():
            _cli("prune", "smollm2", "--heads-keep", str(args.llm_heads_keep), "--neurons-keep",
                 str(args.llm_neurons_keep), "--out", str(out), "--overwrite")
        dirs["pruned"] = out
    return dirs


def export_models(dirs: dict[str, Path], work: Path, atol: float) -> dict[str, dict]:
    """Each model to ONNX (fp32, checked against PyTorch) with an int8 copy; the export reports."""
    from prunetune.onnx_export import export_onnx

    reports = {}
    for name, path in dirs.items():
        out = work / "onnx" / name / "model.onnx"
        print(f"exporting {name} to ONNX ...", file=sys.stderr)
        reports[name] = export_onnx(path, out, quantize="int8", overwrite=True, atol=atol)
    return reports


def graph_files(report: dict, runtime: str) -> dict[str, str]:
    """{graph: file} of one runtime's copy (fp32 or int8)."""
    if runtime == "ort-fp32":
        return {g: r["file"] for g, r in report["graphs"].items()}
    q = report["quantized"]["files"]
    return dict(zip(report["graphs"], q, strict=True))


# ---------------------------------------------------------------------------------------------------------
# Measurements (run in fresh processes through prunetune.bench.run_isolated)
# ---------------------------------------------------------------------------------------------------------


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _random_ids(vocab: int, batch: int, length: int, seed: int) -> np.ndarray:
    # the same ids prunetune.bench.measure_inference draws for the PyTorch rows
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).numpy()


def _timed(fn, warmup: int, repeats: int, threads: int) -> tuple[list[float], list[float]]:
    """Wall time of each timed call and the share of its threads' CPU time the process got."""
    times, shares = [], []
    for i in range(warmup + repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        if i >= warmup:
            times.append(wall)
            shares.append((time.process_time() - c0) / (wall * threads))
    return times, shares


def _summary(times: list[float], shares: list[float], meter: MemoryMeter, load_peak: float, heap: str) -> dict:
    return {
        "latency_s_median": statistics.median(times), "latency_s_min": min(times), "latencies_s": times,
        "cpu_share": statistics.median(shares), "peak_mem_mb": meter.peak_mb, "load_peak_mem_mb": load_peak,
        "mem_exact": meter.exact, "heap": heap,
    }


def measure_onnx(onnx_file: str, *, vocab: int, batch_size: int, seq_len: int, warmup: int, repeats: int,
                 threads: int, seed: int = 0, compact: bool = True) -> dict:
    """An ONNX classifier's latency at batch x length and its peak memory above the pre-load baseline."""
    import onnxruntime  # noqa: F401  (imported before the baseline, as measure_inference imports the model code)

    heap = "compact" if compact and compact_heap() else "default"
    meter = MemoryMeter("cpu").start()
    sess = _session(onnx_file, threads)
    load_peak = meter.read()
    meter.reset_peak()
    ids = _random_ids(vocab, batch_size, seq_len, seed)
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    with meter:
        times, shares = _timed(lambda: sess.run(None, feed), warmup, repeats, threads)
    return _summary(times, shares, meter, load_peak, heap)


def _llm_inputs(vocab: int, batch: int, prompt: int, new: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = _random_ids(vocab, batch, prompt + new, seed)
    return ids[:, :prompt], ids[:, prompt:]


def measure_llm(model: str, *, runtime: str, files: dict | None = None, batch_size: int, prompt_len: int,
                new_tokens: int, warmup: int, repeats: int, threads: int, seed: int = 0, compact: bool = True) -> dict:
    """Prefill of a prompt and per-token decode with the KV cache (tokens fed, not sampled: same work per step).

    PyTorch: the model's forward with a DynamicCache; ONNX Runtime: the graph with past, from an empty past for
    the prefill, then fed its own presents."""
    import transformers

    import prunetune  # noqa: F401  (registers the prunetune_<family> model types)
    from prunetune.onnx_export import cache_keyword, causal_positions

    config = transformers.AutoConfig.from_pretrained(model)
    prompt, new = _llm_inputs(config.vocab_size, batch_size, prompt_len, new_tokens, seed)
    heap = "compact" if compact and compact_heap() else "default"
    with torch_threads(threads):
        if runtime == "pytorch":
            with torch.device("meta"):  # modelling code imported before the baseline
                transformers.AutoModelForCausalLM.from_config(config)
            meter = MemoryMeter("cpu").start()
            net = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
            cache_kw = cache_keyword(net)
        else:
            import onnxruntime  # noqa: F401

            meter = MemoryMeter("cpu").start()
            # one session for the whole generation (the prefill from an empty past): one copy of the weights
            step = _session(files["with_past"], threads)
            past_inputs = [i for i in step.get_inputs() if i.name.startswith("past_key_values")]
            past_names = [i.name for i in past_inputs]
            empty = {i.name: np.zeros((batch_size, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
        load_peak = meter.read()
        meter.reset_peak()

        def run() -> tuple[float, float]:
            """Seconds of the prefill and of all decode steps."""
            mask = torch.ones(prompt.shape, dtype=torch.long)
            t0 = time.perf_counter()
            if runtime == "pytorch":
                cache = transformers.DynamicCache(config=config)
                with torch.inference_mode():
                    net(input_ids=torch.from_numpy(prompt), attention_mask=mask, use_cache=True,
                        position_ids=causal_positions(mask, prompt.shape[1]), **{cache_kw: cache})
                    t1 = time.perf_counter()
                    for t in range(new.shape[1]):
                        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                        net(input_ids=torch.from_numpy(new[:, t : t + 1]), attention_mask=mask, use_cache=True,
                            position_ids=causal_positions(mask, 1), **{cache_kw: cache})
            else:
                out = step.run(None, {"input_ids": prompt, "attention_mask": mask.numpy(), **empty})
                t1 = time.perf_counter()
                m = mask.numpy()
                for t in range(new.shape[1]):
                    m = np.concatenate([m, np.ones_like(m[:, :1])], axis=1)
                    out = step.run(None, {"input_ids": new[:, t : t + 1], "attention_mask": m,
                                          **dict(zip(past_names, out[1:], strict=True))})
            return t1 - t0, time.perf_counter() - t1

        prefill, decode, shares = [], [], []
        with meter:
            for i in range(warmup + repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                p, d = run()
                if i >= warmup:
                    prefill.append(p)
                    decode.append(d / new.shape[1])
                    shares.append((time.process_time() - c0) / ((time.perf_counter() - w0) * threads))
    return {
        "prefill_s_median": statistics.median(prefill), "decode_s_per_token_median": statistics.median(decode),
        "latency_s_median": statistics.median(prefill) + new.shape[1] * statistics.median(decode),
        "cpu_share": statistics.median(shares), "peak_mem_mb": meter.peak_mb, "load_peak_mem_mb": load_peak,
        "mem_exact": meter.exact, "heap": heap,
    }


def _env() -> dict[str, str]:
    """Children import this file's measurement functions as the module `bench_runtimes`."""
    return {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def measure_rows(rows: dict[str, tuple[str, dict]], rounds: int, max_rounds: int, timeout: float | None) -> dict:
    """Each row's timings in fresh processes (taking turns, alternating order, best uncontended round) and its
    peak memory in one more fresh process with a compacted heap. rows: {name: (fn_path, kwargs)}."""
    names = list(rows)
    runs: dict[str, list[dict]] = {n: [] for n in names}

    def clean(x: dict) -> bool:
        return x["cpu_share"] >= MIN_CPU_SHARE

    for r in range(max(rounds, max_rounds)):
        todo = names if r < rounds else [n for n in names if not any(clean(x) for x in runs[n])]
        if not todo:
            break
        for name in todo if r % 2 == 0 else reversed(todo):
            fn, kw = rows[name]
            print(f"  round {r + 1}: {name}", file=sys.stderr)
            runs[name].append(run_isolated(fn, {**kw, "compact": False}, timeout, env=_env()))
    results = {}
    for name in names:
        fn, kw = rows[name]
        good = [x for x in runs[name] if clean(x)]
        best = dict(min(good or runs[name], key=lambda x: x["latency_s_median"]))
        memory = run_isolated(fn, {**kw, "warmup": 1, "repeats": 1, "compact": True}, timeout, env=_env())
        best.update(contended=not good, rounds=len(runs[name]), peak_mem_mb=memory["peak_mem_mb"],
                    heap=memory["heap"], latency_s_median_rounds=[x["latency_s_median"] for x in runs[name]])
        results[name] = best
    return results


# ---------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------


def sst2_predictions(model: Path, report: dict, *, eval_limit: int | None, seed: int, threads: int) -> dict:
    """Predicted classes on the SST-2 dev set for each runtime, and the labels."""
    from prunetune.data import DataSource
    from prunetune.models import load_tokenizer
    from prunetune.tasks import get as get_task

    tok = load_tokenizer(str(model))
    task = get_task("sst2")
    # the task's own dev batches: the bundled SST-2 dev set (all 872 rows unless --eval-limit)
    loader = list(task.eval_loader(tok, data=DataSource(None), eval_limit=eval_limit, max_length=128, seed=seed,
                                   batch_size=64))
    with torch_threads(threads):
        net = task.load_model(str(model)).eval()
        with torch.inference_mode():
            logits = [net(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader]
    labels = np.concatenate([b["labels"].numpy() for b in loader])
    preds = {"pytorch": torch.cat(logits).argmax(-1).numpy()}
    for runtime in ("ort-fp32", "ort-int8"):
        sess = _session(graph_files(report, runtime)["model"], threads)
        names = {i.name for i in sess.get_inputs()}
        out = []
        for batch in loader:
            feed = {k: v.numpy() for k, v in batch.items() if k in names and k != "labels"}
            out.append(sess.run(None, feed)[0])
        preds[runtime] = np.concatenate(out).argmax(-1)
    return {"labels": labels, **preds}


def accuracy_table(preds: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{model: {runtime: {accuracy (points), agreement with the model in PyTorch}}}."""
    out = {}
    for model, p in preds.items():
        out[model] = {
            rt: {"accuracy": 100.0 * float((p[rt] == p["labels"]).mean()),
                 "agreement": float((p[rt] == p["pytorch"]).mean()), "examples": int(len(p["labels"]))}
            for rt in RUNTIMES
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def classifier_table(results: dict, accuracy: dict, batches: list[int]) -> str:
    cols = ("model", "runtime", "batch x seq", "latency median (ms)", "vs dense PyTorch", "peak mem (MB)",
            "SST-2 dev acc", "agrees with PyTorch", "CPU share")
    lines = ["| " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * (len(cols) - 3)]
    for b in batches:
        ref = results[f"dense pytorch b{b}"]["latency_s_median"]
        for model in ("dense", "pruned"):
            for rt in RUNTIMES:
                r = results[f"{model} {rt} b{b}"]
                a = accuracy.get(model, {}).get(rt, {})
                share = f"{r['cpu_share']:.2f}" + (" (contended)" if r["contended"] else "")
                acc = f"{a['accuracy']:.2f}" if a else "n/a"
                agree = f"{100 * a['agreement']:.1f}%" if a else "n/a"
                cells = (model, rt, f"{b} x {r['seq_len']}", f"{1e3 * r['latency_s_median']:.1f}",
                         f"{r['latency_s_median'] / ref:.3f}", _mb(r["peak_mem_mb"]), acc, agree, share)
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def llm_table(results: dict, batches: list[int]) -> str:
    cols = ("model", "runtime", "batch", "prefill (ms)", "decode (ms/token)", "decode vs dense PyTorch",
            "peak mem (MB)", "CPU share")
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for b in batches:
        ref = results[f"dense pytorch b{b}"]["decode_s_per_token_median"]
        for model in ("dense", "pruned"):
            for rt in RUNTIMES:
                r = results[f"{model} {rt} b{b}"]
                share = f"{r['cpu_share']:.2f}" + (" (contended)" if r["contended"] else "")
                lines.append(f"| {model} | {rt} | {b} | {1e3 * r['prefill_s_median']:.1f} | "
                             f"{1e3 * r['decode_s_per_token_median']:.2f} | "
                             f"{r['decode_s_per_token_median'] / ref:.3f} | {_mb(r['peak_mem_mb'])} | {share} |")
    return "\n".join(lines)


def run_classifier(args, work: Path, batches: list[int]) -> dict:
    import transformers

    dirs = build_classifiers(args, work)
    reports = export_models(dirs, work, args.atol)
    vocab = transformers.AutoConfig.from_pretrained(dirs["dense"]).vocab_size
    common = {"seq_len": args.seq_len, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads}
    rows = {}
    for b in batches:
        for model, path in dirs.items():
            rows[f"{model} pytorch b{b}"] = ("prunetune.bench:measure_inference",
                                             {"model_dir": str(path), "batch_size": b, **common})
            for rt in ("ort-fp32", "ort-int8"):
                rows[f"{model} {rt} b{b}"] = ("bench_runtimes:measure_onnx", {
                    "onnx_file": graph_files(reports[model], rt)["model"], "vocab": vocab, "batch_size": b,
                    **common})
    print(f"measuring {len(rows)} rows x {args.rounds} rounds ...", file=sys.stderr)
    results = measure_rows(rows, args.rounds, args.max_rounds, args.timeout)
    for r in results.values():
        r.setdefault("seq_len", args.seq_len)
    print("scoring SST-2 dev ...", file=sys.stderr)
    preds = {m: sst2_predictions(p, reports[m], eval_limit=args.eval_limit, seed=args.seed, threads=args.threads)
             for m, p in dirs.items()}
    accuracy = accuracy_table(preds)

    big = max(batches)
    dense_latency = results[f"dense pytorch b{big}"]["latency_s_median"]
    ratio = {rt: results[f"pruned {rt} b{big}"]["latency_s_median"] / dense_latency for rt in ("ort-fp32", "ort-int8")}
    acc_delta = {rt: accuracy["pruned"][rt]["accuracy"] - accuracy["pruned"]["pytorch"]["accuracy"]
                 for rt in ("ort-fp32", "ort-int8")}
    print(f"\n{classifier_table(results, accuracy, batches)}\n")
    for rt in ("ort-fp32", "ort-int8"):
        ok = ratio[rt] <= TARGET_RATIO and abs(acc_delta[rt]) <= TARGET_ACC_POINTS
        print(f"target ({rt}): pruned in ORT <= {TARGET_RATIO} of dense PyTorch latency at batch {big} x "
              f"{args.seq_len}: {ratio[rt]:.3f}; accuracy within {TARGET_ACC_POINTS} point of pruned PyTorch: "
              f"{acc_delta[rt]:+.2f} ({'met' if ok else 'MISSED'})")
    return {"models": {k: str(v) for k, v in dirs.items()}, "exports": reports, "results": results,
            "accuracy": accuracy, "latency_ratio_vs_dense_pytorch": ratio, "accuracy_delta_points": acc_delta}


def run_llm(args, work: Path, batches: list[int]) -> dict:
    dirs = build_llms(args, work)
    reports = export_models(dirs, work, args.llm_atol)
    common = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "warmup": args.warmup,
              "repeats": args.repeats, "threads": args.threads}
    rows = {}
    for b in batches:
        for model, path in dirs.items():
            for rt in RUNTIMES:
                files = None if rt == "pytorch" else graph_files(reports[model], rt)
                rows[f"{model} {rt} b{b}"] = ("bench_runtimes:measure_llm", {
                    "model": str(path), "runtime": rt, "files": files, "batch_size": b, **common})
    print(f"measuring {len(rows)} rows x {args.rounds} rounds ...", file=sys.stderr)
    results = measure_rows(rows, args.rounds, args.max_rounds, args.timeout)
    print(f"\n{llm_table(results, batches)}\n")
    return {"models": {k: str(v) for k, v in dirs.items()}, "exports": reports, "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", help="fine-tuned dense SST-2 model (a finetune output or model directory)")
    p.add_argument("--pruned", help="fine-tuned pruned SST-2 model (a finetune output or model directory)")
    p.add_argument("--keep-params", type=float, default=0.4, help="layer parameters the pruned models keep")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs, when the models are built here")
    p.add_argument("--train-limit", type=int, help="fine-tune on this many examples (smoke tests only)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and ONNX Runtime")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed passes per process")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per row, interleaved")
    p.add_argument("--max-rounds", type=int, default=6, help="more rounds for rows that never had the CPU alone")
    p.add_argument("--eval-limit", type=int, help="score this many SST-2 dev examples (default: all 872)")
    p.add_argument("--atol", type=float, default=1e-4, help="export check: largest difference from PyTorch")
    p.add_argument("--llm", action="store_true", help="SmolLM2 prefill and decode instead of the classifier")
    p.add_argument("--llm-pruned", help="a pruned SmolLM2 export (default: pruned here by weight magnitude)")
    p.add_argument("--llm-heads-keep", type=float, default=0.34,
                   help="heads the pruned SmolLM2 keeps (default 0.34: 1 query head of each KV group's 3)")
    p.add_argument("--llm-neurons-keep", type=float, default=0.4, help="FFN neurons it keeps (default 0.4)")
    p.add_argument("--llm-batch-sizes", default="1", help="comma-separated batch sizes for --llm (default 1)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--llm-atol", type=float, default=5e-3,
                   help="export check for --llm (default 5e-3): fp32 itself is no closer on SmolLM2's logits (PyTorch "
                        "fp32 vs fp64: 1.1e-3 dense, 1.7e-3 pruned; eager vs sdpa 1.0e-3 pruned)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=1800, help="seconds one measuring process may take")
    p.add_argument("--workdir", help="where models and exports are built and kept (default: a temporary directory)")
    p.add_argument("--out", help="write every figure as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prunetune-runtimes-"))
    work.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    machine = machine_description()
    import onnxruntime

    print(f"prunetune runtimes benchmark, {date}\nmachine: {machine}; onnxruntime {onnxruntime.__version__}")
    if args.llm:
        batches = [int(b) for b in args.llm_batch_sizes.split(",")]
        print(f"setting: SmolLM2-135M, prompt {args.prompt_len}, {args.new_tokens} decode steps, {args.threads} "
              f"threads, median of {args.repeats} runs, best of {args.rounds}+ fresh processes per row")
        payload = run_llm(args, work, batches)
    else:
        batches = [int(b) for b in args.batch_sizes.split(",")]
        print(f"setting: fp32 (int8: dynamic quantisation), {args.threads} threads, median of {args.repeats} "
              f"passes, best of {args.rounds}+ fresh processes per row; peak memory above the pre-load baseline "
              f"(compact heap)")
        payload = run_classifier(args, work, batches)
    contended = [n for n, r in payload["results"].items() if r["contended"]]
    if contended:
        print(f"warning: {len(contended)} rows never had the CPU to themselves (CPU share < {MIN_CPU_SHARE}): "
              f"{', '.join(contended)}; rerun on an idle machine")
    if args.out:
        payload.update(date=date, machine=machine, settings=vars(args) | {"workdir": str(work)})
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
