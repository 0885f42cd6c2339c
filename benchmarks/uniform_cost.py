"""What `--uniform` costs: uniform (stock-exportable) against per-layer (non-uniform) plans at the same budget.

Two measurements, each row from the same scores and the same budget, the only difference being `Budget.uniform`:

* **SmolLM2-135M-Instruct, no training.** Fisher scores on calibration records (Alpaca demo records), then
  `select(Budget(keep_params=F))` with and without `uniform=True, round_to=R`, `apply_plan`, and perplexity on
  held-out natural text: the first 256 tokens of the first 200 CNN/DailyMail validation articles, token-weighted
  (as benchmarks/llm_pruning.py scores it). Per row: layer parameters kept, query/KV heads and FFN neurons per
  layer (min-max), whether the export is stock (loads without prunetune), perplexity.
* **MiniLM on SST-2** (`--sst2`): `prunetune finetune --method apt --keep-params F` with and without
  `--uniform --round-to R`, each its own process; dev accuracy from its report.

    python benchmarks/uniform_cost.py                      # SmolLM2 at 0.9/0.8/0.7 (+ --sst2 for MiniLM)
    python benchmarks/uniform_cost.py --smoke              # tiny random models, seconds: checks the script only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # llm_data lives beside this script

from llm_data import article_batches, token_batches  # noqa: E402

SHARED = HERE.parents[1] / "shared" / "data"


def calibration_batches(tokenizer, path: str, n: int, length: int, batch_size: int) -> list[dict]:
    """The first `n` Alpaca records as plain text (instruction, input, output), every token scored."""
    records = json.loads(Path(path).read_text())[:n]
    texts = [" ".join(r.get(k, "") for k in ("instruction", "input", "output")) for r in records]
    return token_batches(tokenizer, texts, length, batch_size)


def shape_of(model) -> dict:
    from prunetune.families import layer_sites

    layers = layer_sites(model)
    sites = [s for lay in layers for s in lay.attentions.values()]

    def span(values) -> str:
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    return {"heads": span([s.num_heads for s in sites]), "kv_heads": span([s.num_kv_heads for s in sites]),
            "ffn": span([lay.ffn.width for lay in layers])}


def llm_rows(args) -> list[dict]:
    import transformers

    from prunetune.costs import layer_param_count
    from prunetune.importance import compute
    from prunetune.models import load_tokenizer, resolve
    from prunetune.plan import Budget, select
    from prunetune.stock import stock_form
    from prunetune.surgery import apply_plan
    from prunetune.tasks.instruct import perplexity

    location = resolve(args.model)
    tok = load_tokenizer(location)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()

    calib = calibration_batches(tok, args.data, args.calib, args.length, args.batch_size)
    articles = article_batches(tok, args.articles_file, args.articles, args.length, args.batch_size)
    dense = load()
    dense_params = layer_param_count(dense)
    t0 = time.perf_counter()
    rows = [{"row": "dense", "keep": 1.0, "layer_params_kept": 1.0, **shape_of(dense), "stock": True,
             "ppl": perplexity(dense, articles)["perplexity"], "s": time.perf_counter() - t0}]
    print(f"dense: ppl {rows[0]['ppl']:.2f}", flush=True)
    scores = compute(dense, calib, args.scorer)
    for keep in args.keeps:
        for uniform in (False, True):
            t0 = time.perf_counter()
            model = load()
            budget = Budget(keep_params=keep, uniform=uniform, round_to=args.round_to if uniform else 1)
            plan = select(model, scores, budget, normalize=args.normalize)
            apply_plan(model, plan)
            form = stock_form(model)
            row = {"row": "uniform" if uniform else "per-layer", "keep": keep,
                   "layer_params_kept": layer_param_count(model) / dense_params, **shape_of(model),
                   "stock": not isinstance(form, str),
                   "needs_prunetune_because": form if isinstance(form, str) else None,
                   "ppl": perplexity(model, articles)["perplexity"], "s": time.perf_counter() - t0}
            rows.append(row)
            print(f"{row['row']} {keep}: ppl {row['ppl']:.2f}, kept {row['layer_params_kept']:.4f}", flush=True)
    return rows


def make_tiny_bert(out: Path) -> str:
    """A random 2-layer BERT with MiniLM's tokenizer (for --smoke)."""
    from transformers import BertConfig, BertForSequenceClassification

    from prunetune.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(None))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_tiny_llama(out: Path) -> str:
    """A random 3-layer LLaMA with SmolLM2's tokenizer and head layout, 9 query over 3 KV heads (for --smoke)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunetune.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def sst2_rows(args, work: Path) -> list[dict]:
    rows = []
    for keep in args.sst2_keeps:
        for uniform in (False, True):
            out = work / f"sst2_{keep}_{'u' if uniform else 'n'}"
            cmd = [sys.executable, "-m", "prunetune.cli", "finetune", args.sst2_model, "--task", "sst2",
                   "--method", args.sst2_method, "--keep-params", str(keep), "--max-length", str(args.sst2_length),
                   "--epochs", str(args.sst2_epochs), "--out", str(out), "--overwrite",
                   *(["--uniform", "--round-to", str(args.sst2_round_to)] if uniform else []),
                   *(["--train-limit", str(args.sst2_train_limit)] if args.sst2_train_limit else []),
                   *(["--eval-limit", str(args.sst2_eval_limit)] if args.sst2_eval_limit else [])]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                rows.append({"row": "uniform" if uniform else "per-layer", "keep": keep,
                             "error": run.stderr.strip().splitlines()[-1]})
                continue
            report = json.loads((out / "report.json").read_text())
            config = json.loads((out / "model" / "config.json").read_text())
            rows.append({"row": "uniform" if uniform else "per-layer", "keep": keep,
                         "accuracy": report["metrics"]["main"], "layer_params_kept": report.get("layer_params_kept"),
                         "heads": report.get("heads"), "ffn": report.get("neurons"),
                         "stock": not str(config["model_type"]).startswith("prunetune_"),
                         "s": time.perf_counter() - t0})
            print(f"sst2 {rows[-1]['row']} {keep}: acc {rows[-1]['accuracy']:.4f}", flush=True)
    return rows


def table(rows: list[dict], metric: str, header: str) -> str:
    cols = ["row", "keep", "layer_params_kept", "heads", "kv_heads", "ffn", "stock", metric]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['keep']} | failed: {r['error']} |")
            continue
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return f"{header}\n\n" + "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default=str(SHARED / "alpaca_gpt4" / "alpaca_en_demo.json"))
    p.add_argument("--articles-file", default=str(SHARED / "cnn_dailymail" / "validation.jsonl"))
    p.add_argument("--keeps", default="0.9,0.8,0.7")
    p.add_argument("--scorer", default="fisher")
    p.add_argument("--normalize", default=None, help="selection's normalisation (default: the scorer's)")
    p.add_argument("--round-to", type=int, default=64, help="FFN multiple of the uniform rows")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--articles", type=int, default=200)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sst2", action="store_true", help="also MiniLM on SST-2 (apt by default)")
    p.add_argument("--sst2-model", default="minilm")
    p.add_argument("--sst2-method", default="apt", choices=["apt", "lora-prune"])
    p.add_argument("--sst2-keeps", default="0.4")
    p.add_argument("--sst2-round-to", type=int, default=64)
    p.add_argument("--sst2-length", type=int, default=64)
    p.add_argument("--sst2-epochs", type=float, default=1.0)
    p.add_argument("--sst2-train-limit", type=int, default=None)
    p.add_argument("--sst2-eval-limit", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny random models and a few rows: checks the script")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.keeps = [float(k) for k in args.keeps.split(",")]
    args.sst2_keeps = [float(k) for k in args.sst2_keeps.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.smoke:
            args.model = make_tiny_llama(work / "llama")
            args.sst2_model = make_tiny_bert(work / "bert")
            args.keeps, args.round_to, args.calib, args.articles, args.length = [0.7], 8, 4, 4, 32
            args.sst2, args.sst2_keeps, args.sst2_round_to = True, [0.5], 8
            args.sst2_train_limit, args.sst2_eval_limit, args.sst2_length = 32, 32, 32
        when = dt.datetime.now().strftime("%Y-%m-%d")
        llm = llm_rows(args)
        print()
        print(table(llm, "ppl", f"Uniform vs per-layer plans, {args.model}, {args.scorer} scores, no training, "
                                f"perplexity on {args.articles} articles x {args.length} tokens; uniform FFN in "
                                f"multiples of {args.round_to}; {when}"))
        sst2 = sst2_rows(args, work) if args.sst2 else []
        if sst2:
            print()
            print(table(sst2, "accuracy", f"Uniform vs per-layer, {args.sst2_model} on SST-2, {args.sst2_method}, "
                                          f"uniform FFN in multiples of {args.sst2_round_to}; {when}"))
    if args.out:
        Path(args.out).write_text(json.dumps({"llm": llm, "sst2": sst2, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
