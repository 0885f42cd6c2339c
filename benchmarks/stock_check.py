"""Does a `--uniform` export load and generate without prunetune? (issue 13's check on the real SmolLM2)

    python benchmarks/stock_check.py DIR [--prompt TEXT] [--tokens N]

DIR is a `prunetune prune smollm2 --uniform ... --out DIR` output. The script greedy-generates in this process
with prunetune imported (the pruned model as prunetune loads it), then in a fresh Python process that never
imports prunetune (checked: `prunetune` not in sys.modules after loading and generating) with plain
`transformers.AutoModelForCausalLM`, and prints both token lists and whether they are equal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch, transformers
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=n, do_sample=False)
print(json.dumps({"tokens": out[0].tolist(), "prunetune_imported": "prunetune" in sys.modules,
                  "class": type(model).__name__, "config": {k: getattr(model.config, k, None) for k in
                  ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")}}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()

    import torch
    import transformers

    import prunetune  # noqa: F401  (registers prunetune's classes: the in-process reference)

    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    ids = tok(args.prompt, return_tensors="pt")
    ours = model.generate(**ids, max_new_tokens=args.tokens, do_sample=False)[0].tolist()
    done = subprocess.run([sys.executable, "-c", CHILD, args.model_dir, args.prompt, str(args.tokens)],
                          capture_output=True, text=True, check=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    same = child["tokens"] == ours
    print(json.dumps({"equal_tokens": same, "child_imported_prunetune": child["prunetune_imported"],
                      "child_class": child["class"], "child_config": child["config"],
                      "text": tok.decode(ours[len(ids["input_ids"][0]):])}, indent=1))
    return 0 if same and not child["prunetune_imported"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
