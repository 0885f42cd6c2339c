"""Shared pieces of the engine tests: hand-written plans per family, masks equal to a plan, labelled batches."""

from __future__ import annotations

import math

import torch
from conftest import tiny_inputs, tiny_model

from prunetune.families import hidden_size, layer_sites
from prunetune.masks import Masks
from prunetune.plan import PruningPlan

# Tiny models gain nothing from intra-op threads, and on a small CPU box the thread hand-offs cost far more
# than the work (a 27x32 @ 32x40 matmul: 3 us on one thread, 20 ms on two on the 2-core test machine).
torch.set_num_threads(1)


def word_tokenizer(root, words: list[str]):
    """A word-level BERT tokenizer over `words` (plus the special tokens), built in `root`/vocab: tiny models
    need a tokenizer whose ids fit their vocabulary, and there is no hub to fetch one from."""
    import transformers

    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    return transformers.BertTokenizerFast.from_pretrained(root / "vocab")


def tiny(family: str, task: str = "auto", seed: int = 0):
    """conftest's tiny model with lively weights: O(1) logits, so absolute tolerances mean something.

    The stock init (std 0.02) leaves BERT's logits around 1e-2, where a 1e-4 tolerance would hide real errors.
    Norm weights and biases are random too, so slicing one the wrong way shows up.
    """
    return lively(tiny_model(family, task, seed), seed)


def lively(model, seed: int = 0):
    """Redraw every parameter of `model` in place as :func:`tiny` does (O(1) logits, random norms)."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            elif "norm" in name.lower():
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


# Heads kept per attention site. Layer 1 of every stack loses all its heads; T5's layer 0 (which owns the
# relative position bias) keeps a subset, and the decoder's cross-attention is pruned differently.
# LLaMA (6 query heads, 2 KV heads, so groups {0,1,2} and {3,4,5}): equal query heads per KV group.
HEADS: dict[str, dict[str, list[int]]] = {
    "bert": {"encoder.0/self": [1, 3], "encoder.1/self": [], "encoder.2/self": [0, 1, 2]},
    "t5": {
        "encoder.0/self": [0, 2],
        "encoder.1/self": [],
        "encoder.2/self": [1, 2, 3],
        "decoder.0/self": [3],
        "decoder.1/self": [],
        "decoder.0/cross": [0, 1],
        "decoder.1/cross": [2],
    },
    "llama": {"decoder.0/self": [0, 2, 3, 5], "decoder.1/self": [], "decoder.2/self": [1, 4]},
}
HEADS["roberta"] = HEADS["bert"]
HEADS["mistral"] = HEADS["qwen2"] = HEADS["llama"]

# LLaMA, whole KV groups: layer 0 keeps group 1, layer 1 group 0, layer 2 nothing.
LLAMA_WHOLE_GROUPS = {"decoder.0/self": [3, 4, 5], "decoder.1/self": [0, 1, 2], "decoder.2/self": []}


# T5 head plans that stress the shared relative position bias and the cross-attention.
T5_CASES = {
    # every head of the bias owners removed: the bias must still reach the later layers
    "layer0_empty": {"encoder.0/self": [], "decoder.0/self": [], "decoder.0/cross": []},
    "layer0_subset": {"encoder.0/self": [3], "decoder.0/self": [0, 2], "decoder.0/cross": [1, 2, 3]},
    "later_layers": {"encoder.1/self": [0], "encoder.2/self": [1, 3], "decoder.1/self": [0, 2], "decoder.1/cross": []},
    "cross_only": {"decoder.0/cross": [2], "decoder.1/cross": [0, 3]},
}


def neuron_plan(model) -> dict[str, list[int]]:
    """Every third layer (1, 4, ...) loses all its FFN neurons; the others keep every third one."""
    out = {}
    for i, lay in enumerate(layer_sites(model)):
        out[lay.key] = [] if i % 3 == 1 else list(range(i % 2, lay.ffn.width, 3))
    return out


def hidden_plan(model, seed: int = 0) -> list[int]:
    """A seeded, scattered half of the hidden dims."""
    d = hidden_size(model)
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(d, generator=g)[: d // 2].tolist())


def make_plan(family: str, model, kind: str) -> PruningPlan:
    """A plan of one kind ("heads", "neurons", "hidden") or all three ("all") for a tiny model."""
    plan = PruningPlan(family)
    if kind in ("heads", "all"):
        present = {site.key for lay in layer_sites(model) for site in lay.attentions.values()}
        plan.heads = {k: list(v) for k, v in HEADS[family].items() if k in present}  # encoder-only heads: no decoder
    if kind in ("neurons", "all"):
        plan.neurons = neuron_plan(model)
    if kind in ("hidden", "all"):
        plan.hidden = hidden_plan(model)
    return plan


def second_plan(pruned, family: str) -> PruningPlan:
    """A further plan relative to an already pruned model (GQA-valid: first query head of every group)."""
    plan = PruningPlan(family)
    for lay in layer_sites(pruned):
        for site in lay.attentions.values():
            n, g = site.num_heads, site.group_size
            if n:
                plan.heads[site.key] = list(range(0, n, g)) if site.spec.kv_groups_attr else list(range(1, n))
        plan.neurons[lay.key] = list(range(0, lay.ffn.width, 2))
    plan.hidden = list(range(1, hidden_size(pruned), 2))
    return plan


def masks_for(model, plan: PruningPlan) -> Masks:
    """0/1 masks that switch off exactly what the plan removes."""
    masks = Masks.ones(model, hidden=plan.hidden is not None)

    def keep(ones: torch.Tensor, kept: list[int]) -> torch.Tensor:
        out = torch.zeros_like(ones)
        out[kept] = 1.0
        return out

    masks.heads = {k: keep(v, plan.heads[k]) if k in plan.heads else v for k, v in masks.heads.items()}
    masks.neurons = {k: keep(v, plan.neurons[k]) if k in plan.neurons else v for k, v in masks.neurons.items()}
    if plan.hidden is not None:
        masks.hidden = keep(masks.hidden, plan.hidden)
    return masks


def labelled_batches(family: str, n: int = 2) -> list[dict]:
    """Small labelled batches for each family's loss (classification, seq2seq or causal LM)."""
    out = []
    for seed in range(n):
        batch = tiny_inputs(family, seed=seed + 10)
        if family in ("bert", "roberta"):
            batch["labels"] = torch.tensor([0, 1, 1])
        elif family == "t5":
            batch["labels"] = batch.pop("decoder_input_ids")
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out.append(batch)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
