"""Item-level check of `prunetune eval`: the harness's figures against an independent recomputation.

For the first N items of every benchmark (MMLU: the first item of each of its 57 subjects, so at least N), the
per-choice log-likelihoods, acc, acc_norm and TruthfulQA MC2 that lm-evaluation-harness logged are compared with
prunetune.mceval.reference (the stock prompts in plain Python, one unpadded forward per choice).

    python benchmarks/mc_agreement.py                 # SmolLM2-135M-Instruct, 20 items per benchmark
    python benchmarks/mc_agreement.py --model runs/apt/model
"""

from __future__ import annotations

import argparse
import math

from prunetune.mceval import BENCHMARKS, evaluate, reference
from prunetune.mceval.sources import data_dir
from prunetune.models import load_auto, load_tokenizer, resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--items", type=int, default=20)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--tolerance", type=float, default=1e-4, help="on each log-likelihood (plus 1e-5 relative)")
    args = p.parse_args()
    location = resolve(args.model)
    model, tok = load_auto(location, "AutoModelForCausalLM").eval(), load_tokenizer(location)
    failures = 0
    print(f"{'benchmark':<16}{'items':>6}{'max |dll|':>12}{'acc same':>10}{'norm same':>10}{'max |dmc2|':>12}")
    for name, bench in BENCHMARKS.items():
        limit = math.ceil(args.items / 57) if bench.group else args.items
        res = evaluate(model, tok, name, data=args.eval_data, limit=limit, items=True)["benchmarks"][name]
        rows = {s.name: next(s.splits[s.config[k]] for k in ("test_split", "validation_split") if k in s.config)
                for s in bench.tasks(data_dir(args.eval_data))}
        dll, same_acc, same_norm, dmc2 = 0.0, 0, 0, 0.0
        for item in res["per_item"]:
            ref = reference.score_item(model, tok, name, rows[item["task"]][item["doc_id"]])
            assert ref["context"] == item["context"], (name, item["doc_id"])
            for a, b in zip(item["loglikelihoods"], ref["loglikelihoods"], strict=True):
                dll = max(dll, abs(a - b))
                failures += abs(a - b) > args.tolerance + 1e-5 * abs(b)
            if name == "truthfulqa_mc2":
                dmc2 = max(dmc2, abs(item["acc"] - ref["mc2"]))
                same_acc += 1
                same_norm += 1
            else:
                same_acc += item["acc"] == ref["acc"]
                same_norm += item.get("acc_norm", ref["acc_norm"]) == ref["acc_norm"]
        n = len(res["per_item"])
        failures += (n - same_acc) + (n - same_norm)
        print(f"{name:<16}{n:>6}{dll:>12.2e}{same_acc:>10}{same_norm:>10}{dmc2:>12.2e}")
    print("agreement: " + ("all items equal within the tolerance" if not failures else f"{failures} differences"))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
