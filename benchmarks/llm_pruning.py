"""Decoder pruning against peers: prunetune's scorers vs Torch-Pruning, ShortGPT, Wanda-sp and FLAP.

On SmolLM2-135M-Instruct (LLaMA with grouped-query attention: 30 layers, 9 query / 3 KV heads, FFN 1536),
from one fp32 copy of the weights and the same calibration records, every method prunes to 90%, 80% and 70%
of the layer parameters (attention, MLP and norms of the decoder layers; embeddings excluded), and every
model is scored with no training by perplexity on held-out natural text (the first 256 tokens of the first
200 CNN/DailyMail validation articles, token-weighted). With `--recover`, the best model of each family at
each budget is pruned again and gets the same short LoRA recovery on the Alpaca training split, scored by
perplexity on the instruction hold-out next to LoRA on the unpruned model.

Rows (each one a fresh process, so its time and peak memory are its own):

* `dense`: the unpruned model.
* `prunetune:<scorer>`: `prunetune.importance.compute` -> `plan.select(Budget(keep_params=F))` ->
  `surgery.apply_plan`, for each decoder scorer the installed prunetune registers (`--scorers`; missing
  ones are listed in the table's notes).
* `shortgpt`: whole layers dropped by block influence (benchmarks/peers/shortgpt.py).
* `wanda_sp`, `flap`: the FLAP authors' structured baselines (benchmarks/peers/wanda_sp.py).
* `torch_pruning`: Torch-Pruning 1.6 with its LLM example's settings; `torch_pruning_ffn`: the same with the
  attention ignored, the workaround when the first cannot build its attention groups
  (benchmarks/peers/torch_pruning_peer.py; needs `pip install 'prunetune[bench]'`).

Per row: layer parameters kept (exact), layers/heads/FFN neurons kept, perplexity, prune time (scoring,
selection and removal; loading excluded), peak memory while pruning (process peak RSS above the level just
before the model was loaded, data and libraries already in), and forward latency at batch 8 x 256 (median
of a few passes on seeded random tokens; the ratio is to the dense row's). A peer that fails or hangs is a
row saying how.

    python benchmarks/llm_pruning.py                       # the full run (hours on 2 cores: see README)
    python benchmarks/llm_pruning.py --recover --recover-keeps 0.7
    python benchmarks/llm_pruning.py --make-tiny /tmp/tiny-llama    # a random GQA LLaMA for smoke tests
    python benchmarks/llm_pruning.py --model /tmp/tiny-llama --keeps 0.8 --calib 4 --articles 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
sys.path.insert(0, str(HERE))  # the peers package lives beside this file, outside the library

from llm_data import article_batches, instruction_batches, instruction_split  # noqa: E402
from llm_pruning_methods import DECODER_SCORERS, MODIFIERS, PEER_ROWS, method, row_parts  # noqa: E402
from llm_pruning_report import FAMILY, family, markdown  # noqa: E402
from peers.common import PeerFailure, structure_counts  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def forward_latency(model: nn.Module, vocab: int, batch: int, seq: int, repeats: int, threads: int) -> dict:
    """Median wall time of full forward passes (LM head included) on seeded random tokens, after one warm-up.

    A pass's `cpu_share` is the CPU time the process got over wall x threads. Well below 1, another process
    had part of the cores, and on 2 cores that costs about 3x, not 2x (a parallel GEMM waits for its slowest
    thread; see benchmarks/README.md). So the median is over the passes that had the CPU (share >= 0.9), and
    up to `repeats` more passes are run while fewer than half did; with none, all count and the row is
    flagged `contended`.
    """
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    times, shares = [], []
    for i in range(1 + 2 * repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        wall = time.perf_counter() - t0
        if i:
            times.append(wall)
            shares.append((time.process_time() - c0) / (wall * threads))
        clean = [t for t, s in zip(times, shares, strict=True) if s >= 0.9]
        if len(times) >= repeats and 2 * len(clean) >= repeats:
            break
    return {
        "latency_s": statistics.median(clean or times),
        "contended": not clean,
        "latency_s_all": times,
        "cpu_shares": shares,
    }


class Stage:
    """The row's current stage in a file beside its result: what a killed row was doing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        elapsed = time.perf_counter() - self.start
        self.path.write_text(json.dumps({"stage": stage, "at_s": round(elapsed, 1)}))
        print(f"[{elapsed:7.1f}s] {stage}", flush=True)


def _import_model_code(location: str) -> None:
    """Build the model weightless once, so importing its code is not charged to the row's memory."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)


def run_row(args) -> dict:
    """One row in this process: load, prune, measure (or prune and recover). Returns the JSON-able result."""
    import transformers

    from prunetune.bench import MemoryMeter, usable_cores
    from prunetune.models import load_tokenizer, resolve
    from prunetune.plan import layer_param_count
    from prunetune.surgery import own_storage
    from prunetune.tasks.instruct import perplexity

    stage = Stage(Path(args.row_out).with_suffix(".stage"))
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    location = resolve(args.model)
    tokenizer = load_tokenizer(location)
    stage("data")
    train, _ = instruction_split(args.data, args.eval_limit, args.seed)
    calib = instruction_batches(tokenizer, train[: args.calib], args.calib_len, args.calib_batch)
    articles = article_batches(tokenizer, args.articles_file, args.articles, args.article_len, args.eval_batch)
    if args.recover:
        import peft  # noqa: F401  (imported before the baseline, like the rest)
    _import_model_code(location)

    meter = MemoryMeter("cpu").start()  # data loaded and libraries imported: what follows is model + method
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    dense_layer_params = layer_param_count(model)
    dense_counts = structure_counts(model)
    result: dict = {"model": location, "threads": threads, "load_s": load_s, "dense": dense_counts,
                    "dense_layer_params": dense_layer_params}

    # the teacher of the recovery: the model before pruning (the unpruned row has nothing to recover towards)
    teacher = None
    if args.recover and args.recover_teacher == "dense" and args.row != "dense":
        import copy

        teacher = copy.deepcopy(model)
        result["recover_teacher"] = "dense"
    stage(f"pruning ({args.row}, keep {args.keep:g})")
    t0 = time.perf_counter()
    info = method(args.row)(model, tokenizer, calib, args.keep, args)
    result["prune_s"] = time.perf_counter() - t0
    result["prune_peak_mb"] = meter.read()
    result["info"] = info
    model.eval()
    for p in model.parameters():  # scorers may leave gradients switched on; measurements need none
        p.requires_grad_(False)
    own_storage(model)  # every row then runs off memory of its own, not the checkpoint's mapping
    result["layer_params"] = layer_param_count(model)
    result["layer_params_kept"] = result["layer_params"] / dense_layer_params
    result["params"] = sum(p.numel() for p in model.parameters())
    result["kept"] = structure_counts(model)

    if args.recover:
        result["recovery"] = recover(model, tokenizer, articles, args, meter, stage, teacher)
        return result
    meter.reset_peak()
    stage("perplexity on held-out articles")
    t0 = time.perf_counter()
    ppl = perplexity(model, articles)
    result.update(ppl=ppl["perplexity"], ppl_tokens=ppl["tokens"], ppl_s=time.perf_counter() - t0)
    stage("latency")
    result.update(forward_latency(model, model.config.vocab_size, args.latency_batch, args.latency_seq,
                                  args.latency_repeats, threads))
    result["eval_peak_mb"] = meter.read()
    if args.mc_bench != "none":  # last, so that its batches cannot touch the timings above
        stage("multiple-choice evaluation")
        result["mc"] = multiple_choice(model, tokenizer, args)
    return result


def multiple_choice(model: nn.Module, tokenizer, args) -> dict:
    """`prunetune eval`'s scores (lm-evaluation-harness definitions, 0-shot) of the pruned model, untrained: per
    benchmark the headline score, chance on the same items and the items scored; with the settings used."""
    from prunetune import mceval

    t0 = time.perf_counter()
    out = mceval.evaluate(model, tokenizer, args.mc_bench, limit=args.mc_limit)
    keep = ("score", "headline", "chance", "above_chance", "items")
    return {"bench": args.mc_bench, "limit": args.mc_limit, "s": time.perf_counter() - t0,
            "benchmarks": {name: {k: b[k] for k in keep} for name, b in out["benchmarks"].items()}}


def recover(model: nn.Module, tokenizer, articles: list[dict], args, meter, stage: Stage,
            teacher: nn.Module | None = None) -> dict:
    """The short LoRA recovery of benchmarks/llama_instruct.py, through prunetune's Python API; with `teacher` (the
    model before pruning), distilled from it as `apt --distill-teacher dense` does."""
    from prunetune import adapters, tasks
    from prunetune.distill import DistillHook
    from prunetune.tasks.instruct import perplexity
    from prunetune.train import RunContext, TrainConfig, fit, seed_everything

    task = tasks.get("instruct")
    loaders = task.loaders(tokenizer, data=args.data, train_limit=args.train_limit, eval_limit=args.eval_limit,
                           samples=1, max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
    stage("instruction perplexity before recovery")
    before = task.evaluate(model, loaders.dev)["perplexity"]
    seed_everything(args.seed)  # the adapters start from seeded random weights
    peft_model = adapters.apply_lora(model, rank=args.rank, targets=args.lora_targets)
    _, trainable = adapters.count_parameters(peft_model)
    meter.reset_peak()
    stage("LoRA recovery")
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
    # the task's evaluation knows perplexity is better lower: the best evaluation is the lowest
    hooks = [DistillHook(teacher)] if teacher is not None else []
    fit_result = fit(peft_model, loaders.train, task.evaluation(loaders.dev), cfg, hooks=hooks,
                     context=RunContext(progress=False))
    train_peak = meter.read()
    after = fit_result.best["perplexity"] if fit_result.best else task.evaluate(peft_model, loaders.dev)["perplexity"]
    merged = adapters.merge(peft_model)
    stage("article perplexity after recovery")
    return {
        "instr_ppl_before": before,
        "instr_ppl_after": after,
        "ppl_after": perplexity(merged, articles)["perplexity"],
        "train_s": fit_result.train_time_s,
        "train_steps": fit_result.steps,
        "train_peak_mb": train_peak,
        "trainable": trainable,
    }


def row_main(args) -> None:
    """`--row`: run one row and write its JSON, whatever happens (a failed peer is a result too)."""
    out = Path(args.row_out)
    result: dict = {"row": args.row, "keep": args.keep, "recover": args.recover, "status": "ok"}
    try:
        result.update(run_row(args))
    except PeerFailure as e:
        result.update(status="failed", error=str(e), failure_stage=e.stage, ratio_independent=e.ratio_independent)
    except Exception as e:  # noqa: BLE001  (any crash becomes the row's entry in the table)
        result.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    out.write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------

# options every row process receives as given to the orchestrator
PASSED = (
    "model", "data", "articles_file", "calib", "calib_len", "calib_batch", "articles", "article_len", "eval_batch",
    "seed", "threads", "latency_batch", "latency_seq", "latency_repeats", "tp_timeout", "tp_importance",
    "flap_structure", "train_limit", "eval_limit", "max_length", "batch_size", "epochs", "rank", "lr",
    "lora_targets", "recover_teacher", "mc_bench", "mc_limit",
)


def _row_cmd(args, row: str, keep: float, out: Path, recover: bool) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--keep", repr(keep), "--row-out", str(out)]
    for name in PASSED:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd + (["--recover"] if recover else [])


def run_process(args, row: str, keep: float, recover: bool = False) -> dict:
    """One row in a fresh interpreter, with a time limit; its JSON, or what became of it."""
    workdir = Path(args.workdir)
    tag = f"{row.replace(':', '-')}_{keep:g}" + ("_recover" if recover else "")
    if recover and row != "dense" and args.recover_teacher != "none":
        tag += f"_{args.recover_teacher}"  # recovered with distillation: another result
    out = workdir / f"{tag}.json"
    if args.reuse and out.exists():
        earlier = json.loads(out.read_text())
        # --report-only: a row without the scores asked for is still a result (its missing cells show as "-")
        if args.report_only or not _lacks_mc(earlier, args):
            return earlier
        print(f"   {tag}: no multiple-choice scores at --mc-bench {args.mc_bench} --mc-limit {args.mc_limit}: "
              "run again", flush=True)
    if args.report_only:
        return {"row": row, "keep": keep, "recover": recover, "status": "not run",
                "error": f"no result in {workdir} (--report-only)"}
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if args.heap == "compact":  # resident memory follows the live tensors (see benchmarks/README.md)
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    print(f"== {tag}", flush=True)
    t0 = time.perf_counter()
    with open(workdir / f"{tag}.log", "w") as log:
        try:
            proc = subprocess.run(_row_cmd(args, row, keep, out, recover), stdout=log, stderr=subprocess.STDOUT,
                                  env=env, timeout=args.row_timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.perf_counter() - t0
    if out.exists():
        result = json.loads(out.read_text())
    else:
        stage_file = out.with_suffix(".stage")
        where = json.loads(stage_file.read_text())["stage"] if stage_file.exists() else "start-up"
        why = f"killed after {wall:.0f} s (--row-timeout)" if code is None else f"exited with code {code}"
        result = {"row": row, "keep": keep, "recover": recover, "status": "failed", "error": f"{why} in: {where}",
                  "log": str(workdir / f"{tag}.log")}
    result["wall_s"] = wall
    status = result["status"] if result["status"] != "ok" else (
        f"ppl {result['ppl']:.2f}" if "ppl" in result else
        f"instr ppl {result['recovery']['instr_ppl_after']:.2f}" if "recovery" in result else "ok")
    print(f"   {status} ({wall:.0f} s){': ' + result['error'] if 'error' in result else ''}", flush=True)
    return result


def _lacks_mc(result: dict, args) -> bool:
    """A finished unrecovered row without the multiple-choice scores now asked for (another bench or limit)."""
    if args.mc_bench == "none" or result.get("recover") or result.get("status") != "ok":
        return False
    mc = result.get("mc") or {}
    return (mc.get("bench"), mc.get("limit")) != (args.mc_bench, args.mc_limit)


def available_rows(args) -> tuple[list[str], list[str]]:
    """The rows to run, and notes on asked-for prunetune scorers this prunetune does not have."""
    from prunetune.importance import SCORERS

    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    scorers = [s.strip() for s in args.scorers.split(",")] if args.scorers else list(DECODER_SCORERS)
    rows, notes = [], []
    for r in wanted:
        if r == "prunetune":
            missing = [s for s in scorers if s not in SCORERS]
            rows += [f"prunetune:{s}" for s in scorers if s in SCORERS]
            if missing:
                notes.append(f"prunetune scorers not registered in this build (skipped): {', '.join(missing)}")
        elif r.startswith("prunetune:"):
            if row_parts(r.split(":", 1)[1])[0] in SCORERS:
                rows.append(r)
            else:
                notes.append(f"{r}: not registered in this build (skipped)")
        elif r in FAMILY:
            rows.append(r)
        else:
            raise SystemExit(f"unknown row {r!r}; rows: dense, prunetune[:SCORER], {', '.join(PEER_ROWS)}")
    return rows, notes


def default_scorer(args) -> str:
    """The scorer the Done-when is about: --default-scorer, else what prunetune declares, else fisher."""
    import prunetune.importance as imp

    return args.default_scorer or getattr(imp, "DEFAULT_DECODER_SCORER", None) or "fisher"


def orchestrate(args) -> None:
    from prunetune.bench import machine_description
    from prunetune.models import resolve

    keeps = [float(k) for k in args.keeps.split(",")]
    rows, notes = available_rows(args)
    if args.mc_bench != "none":
        from prunetune import mceval
        from prunetune.errors import PrunetuneError

        try:
            mceval.parse(args.mc_bench)
        except PrunetuneError as e:
            raise SystemExit(f"--mc-bench: {e}") from None
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolve(args.model)  # dequantise the GGUF once into the fp32 cache, outside every measured row
    started = time.perf_counter()
    results: list[dict] = []
    if "dense" in rows:
        results.append(run_process(args, "dense", 1.0))
    hung: dict[str, dict] = {}  # row -> a failure that does not depend on the budget
    for keep in keeps:
        for row in rows:
            if row == "dense":
                continue
            if row in hung:  # e.g. Torch-Pruning's dependency search: the same at every ratio, not repeated
                first = hung[row]
                results.append({"row": row, "keep": keep, "recover": False, "status": "failed",
                                "error": f"{first['error']} [at keep {first['keep']:g}; the failure comes before "
                                         "the ratio is used, so not run again]"})
                continue
            res = run_process(args, row, keep)
            if res["status"] != "ok" and res.get("ratio_independent"):
                hung[row] = res
            results.append(res)

    recovered: list[dict] = []
    if args.recover:
        recover_keeps = [float(k) for k in args.recover_keeps.split(",")] if args.recover_keeps else keeps
        recovered.append(run_process(args, "dense", 1.0, recover=True))
        for keep in recover_keeps:
            for fam, best in best_of_families(results, keep).items():
                if fam != "dense":
                    recovered.append(run_process(args, best["row"], keep, recover=True))

    scorer = default_scorer(args)
    report = {
        "date": str(dt.date.today()),
        "machine": machine_description(),
        "settings": {k: getattr(args, k) for k in (*PASSED, "keeps", "heap", "rows", "scorers")},
        "default_scorer": scorer,
        "notes": notes,
        "rows": results,
        "recovered": recovered,
        "total_wall_s": time.perf_counter() - started,
    }
    text = markdown(report, keeps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(text)
    print("\n" + text)


def best_of_families(results: list[dict], keep: float) -> dict[str, dict]:
    """Per family, the successful row with the lowest held-out perplexity at this budget."""
    best: dict[str, dict] = {}
    for r in results:
        if r["status"] != "ok" or not math.isclose(r["keep"], keep) or "ppl" not in r:
            continue
        fam = family(r["row"])
        if fam not in best or r["ppl"] < best[fam]["ppl"]:
            best[fam] = r
    return best


# ---------------------------------------------------------------------------------------------------------
# A tiny random GQA LLaMA for smoke tests
# ---------------------------------------------------------------------------------------------------------


def make_tiny(out: str, tokenizer_from: str) -> None:
    """A 4-layer random LLaMA with SmolLM2's head layout (9 query heads over 3 KV heads), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunetune.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(tokenizer_from))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=72, intermediate_size=192, num_hidden_layers=4, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    print(f"tiny GQA LLaMA written to {out}")


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the packaged GGUF, cached as fp32) or a directory")
    p.add_argument("--data", default=str(SHARED / "alpaca_gpt4" / "alpaca_en_demo.json"))
    p.add_argument("--articles-file", default=str(SHARED / "cnn_dailymail" / "validation.jsonl"))
    p.add_argument("--keeps", default="0.9,0.8,0.7", help="fractions of the layer parameters to keep")
    p.add_argument("--rows", default="dense,prunetune," + ",".join(PEER_ROWS),
                   help="comma-separated: dense, prunetune (every decoder scorer), prunetune:SCORER "
                        "(SCORER+MOD[+MOD]: " + "; ".join(f"{k}: {v}" for k, v in MODIFIERS.items()) + "), "
                        + ", ".join(PEER_ROWS))
    p.add_argument("--scorers", help=f"prunetune scorers for the `prunetune` row (default: {', '.join(DECODER_SCORERS)}"
                                     ", those registered)")
    p.add_argument("--default-scorer", help="the scorer the Done-when check is about (default: prunetune's "
                                            "DEFAULT_DECODER_SCORER if it declares one, else fisher)")
    p.add_argument("--calib", type=int, default=128, help="calibration records (the same for every method)")
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--articles", type=int, default=200)
    p.add_argument("--article-len", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, help="torch threads per row (default: the usable cores)")
    p.add_argument("--latency-batch", type=int, default=8)
    p.add_argument("--latency-seq", type=int, default=256)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--tp-timeout", type=float, default=300.0,
                   help="seconds Torch-Pruning may spend building and pruning before it counts as hung")
    p.add_argument("--tp-importance", choices=["magnitude", "taylor"], default="magnitude",
                   help="magnitude: the LLM example's GroupMagnitudeImportance; taylor: GroupTaylorImportance on "
                        "the calibration batches")
    p.add_argument("--flap-structure", choices=["AL-AM", "UL-UM"], default="AL-AM")
    p.add_argument("--mc-bench", default="arc_easy,hellaswag",
                   help="multiple-choice benchmarks every unrecovered row is also scored on, untrained (`prunetune "
                        "eval` names; the two SmolLM2-135M is clearly above chance on), or none")
    p.add_argument("--mc-limit", type=int, default=100, help="items per multiple-choice benchmark (the first N)")
    p.add_argument("--recover", action="store_true", help="also LoRA-recover the best row of each family")
    p.add_argument("--recover-keeps", help="budgets to recover at (default: every --keeps)")
    p.add_argument("--recover-teacher", choices=["none", "dense"], default="none",
                   help="dense: the pruned rows' recovery also distils from the model before pruning (the loss of "
                        "apt --distill-teacher dense); the unpruned LoRA reference never does")
    # recovery: the settings of benchmarks/llama_instruct.py
    p.add_argument("--train-limit", type=int, default=160)
    p.add_argument("--eval-limit", type=int, default=100, help="instruction hold-out records")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-targets", default="all")
    p.add_argument("--heap", choices=["compact", "default"], default="compact",
                   help="compact: glibc returns freed blocks >= 64 KiB, so peak RSS follows live tensors")
    p.add_argument("--row-timeout", type=float, default=3 * 3600.0, help="seconds before a row is killed")
    p.add_argument("--workdir", default="runs/llm_pruning", help="per-row JSON and logs")
    p.add_argument("--reuse", action="store_true", help="keep row results already in --workdir")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: the table from the rows in --workdir (with --reuse), the others marked not run")
    p.add_argument("--out", default=str(HERE / "results" / "llm_pruning"), help="writes OUT.json and OUT.md")
    p.add_argument("--make-tiny", metavar="DIR", help="write a tiny random GQA LLaMA to DIR and exit")
    # internal: one row in this process
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--keep", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--row-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.make_tiny:
        make_tiny(args.make_tiny, "smollm2")
    elif args.row:
        row_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
