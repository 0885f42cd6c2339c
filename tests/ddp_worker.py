"""A test helper: APT on a tiny BERT, as one rank of a `torchrun` job or as a single process (see test_ddp.py).

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT

Each rank writes OUT/rank<r>.safetensors (its trainable weights) and OUT/rank<r>.json (the structure changes it
applied, its timeline, best evaluation and step count).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

torch.set_num_threads(1)

ROWS, LENGTH, GLOBAL_BATCH = 64, 10, 16


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(6, 100, (ROWS, LENGTH), generator=g)
    labels = torch.randint(0, 2, (ROWS,), generator=g)
    ids[labels == 1, 3] = 5
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(ROWS)]


def tiny_bert():
    """conftest's tiny BERT with lively weights (O(1) logits), without dropout: ranks see other rows than a single
    process does, so dropout masks could never agree."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p.shape[-1]) if p.dim() >= 2 else
                    (1.0 + 0.2 * noise) if "norm" in name.lower() else 0.1 * noise)
    return model


def run(runtime, batch_size: int, grad_accum: int):
    """APT with distillation for 16 steps (pruning at 3, 5 and 8), global batch 16 whatever the split."""
    from prunetune import adapters
    from prunetune.apt import AptHook
    from prunetune.config import AptOptions
    from prunetune.plan import Budget, layer_param_count
    from prunetune.train import RunContext, TrainConfig, fit

    assert batch_size * runtime.world_size * grad_accum == GLOBAL_BATCH
    model = tiny_bert()
    dense = layer_param_count(model)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    hook = AptHook(peft_model, AptOptions(prune_steps=3, prune_start=0.2, prune_end=0.5, distill=True),
                   Budget(keep_params=0.5), dense)
    loader = DataLoader(rows(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(11))
    probe = torch.stack([r["input_ids"] for r in rows()[:8]])

    def evaluate(m) -> dict:
        with torch.no_grad():
            return {"main": -float(m(input_ids=probe).logits.pow(2).mean())}

    cfg = TrainConfig(epochs=4, lr=3e-3, eval_every=2, seed=9, grad_accum=grad_accum)
    try:
        result = fit(peft_model, loader, evaluate, cfg, hooks=[hook], context=RunContext(runtime=runtime))
    finally:
        hook.close()
    return peft_model, hook, result


def record(model, hook, result) -> tuple[dict, dict]:
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    info = {"timeline": hook.timeline.rows, "best": result.best, "best_step": result.best_step,
            "steps": result.steps, "schedule": sorted(hook.schedule), "changes": result.changes}
    return weights, info


def main(out: str) -> None:
    from safetensors.torch import save_file

    from prunetune.runtime import Runtime

    runtime = Runtime.from_env()
    try:
        weights, info = record(*run(runtime, GLOBAL_BATCH // (2 * runtime.world_size), 2))
        save_file(weights, str(Path(out) / f"rank{runtime.rank}.safetensors"))
        (Path(out) / f"rank{runtime.rank}.json").write_text(json.dumps(info))
    finally:
        runtime.close()


if __name__ == "__main__":
    main(sys.argv[1])
