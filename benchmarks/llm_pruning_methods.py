"""The rows of `benchmarks/llm_pruning.py`: each prunes a model in place to `keep` of its layer parameters and
returns what it did. prunetune's scorers (with row modifiers) and the peers (benchmarks/peers, not the library).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# prunetune scorers that apply to a decoder before training; the later ones arrive with the scorer work
# and are picked up by name when the installed prunetune registers them
DECODER_SCORERS = ("fisher", "salience_kurtosis", "wanda_sp", "flap", "block_influence", "apt_salience")
PEER_ROWS = ("shortgpt", "wanda_sp", "flap", "torch_pruning", "torch_pruning_ffn")

# row suffixes after the scorer (prunetune:SCORER+MOD...): what is done with its plan besides select -> apply
MODIFIERS = {
    "comp": "FLAP's bias compensation: the removed channels' mean contribution folded into output biases",
    "kwon": "Kwon et al.'s mask rearrangement and least-squares rescaling of what is kept (per-example Fisher)",
    "layers": "granularity layers: whole layers only, ranked by the scorer's whole-layer scores",
    "mixed": "granularity mixed: whole layers and blocks ranked with heads and neurons (the scorer's block scores)",
    "measured": "whole-block scores measured on the calibration sample (fisher's blocks='measured'), not estimated",
    "dropK": "first drop the K layers of least block influence (ShortGPT), then the scorer's units to the budget",
    "iterN": "N rounds of score -> select -> remove, each to a step of the budget (of the dense model), scored anew",
}


def row_parts(name: str) -> tuple[str, list[str]]:
    """`fisher+kwon` -> ("fisher", ["kwon"]); refuses an unknown modifier."""
    scorer, *mods = name.split("+")
    unknown = [m for m in mods if m not in MODIFIERS
               and not any(m.startswith(p) and m[len(p):].isdigit() for p in ("iter", "drop"))]
    if unknown:
        raise SystemExit(f"unknown row modifier(s) {unknown} in {name!r}; known: {', '.join(MODIFIERS)}")
    return scorer, mods


def _prunetune(name: str) -> Callable:
    scorer, mods = row_parts(name)

    def prune(model: nn.Module, tokenizer, batches: list[dict], keep: float, args) -> dict:
        from prunetune.importance import channel_stats, compensate, compute, kwon_rearrange, kwon_rescale
        from prunetune.plan import Budget, layer_cost, select
        from prunetune.surgery import apply_plan

        rounds = next((int(m[4:]) for m in mods if m.startswith("iter")), 1)
        drop = next((int(m[4:]) for m in mods if m.startswith("drop")), 0)
        reference = layer_cost(model)
        if drop:  # whole layers first, by ShortGPT's influence (a k-layer budget drops exactly the k least
            # influential); the budget's rest goes to the scorer's units
            influence = compute(model, batches, "block_influence")
            layers_keep = 1 - drop / len(influence.layers) + 1e-9  # a hair above: rounding must not drop one more
            apply_plan(model, select(model, influence, Budget(keep_params=layers_keep, reference=reference)))
        granularity = next((g for g in ("mixed", "layers") if g in mods), None)
        options = {"blocks": "measured"} if "measured" in mods else {}
        for r in range(1, rounds):  # the earlier rounds: a share of the cut each, scores taken again after it
            step_keep = 1 - (1 - keep) * r / rounds
            apply_plan(model, select(model, compute(model, batches, scorer, **options),
                                     Budget(keep_params=step_keep, reference=reference, granularity=granularity)))
        scores = compute(model, batches, scorer, **options)
        plan = select(model, scores, Budget(keep_params=keep, reference=reference, granularity=granularity))
        extra: dict = {}
        if "kwon" in mods:  # same counts per layer, re-picked for a lower block Fisher; then the kept rescaled
            plan = kwon_rearrange(model, plan, batches)
            extra["kwon_scales"] = len(kwon_rescale(model, plan, batches))
        if "comp" in mods:  # the removed channels' mean contribution folded into the output biases, as FLAP does
            compensate(model, plan, channel_stats(model, batches))
        apply_plan(model, plan)
        return {"scorer": scorer, "modifiers": mods, **extra,
                "plan_meta": {k: v for k, v in plan.meta.items() if k != "budget"}}

    return prune


def _shortgpt(model, tokenizer, batches, keep, args) -> dict:
    from peers.shortgpt import prune_shortgpt

    return prune_shortgpt(model, batches, keep)


def _wanda_sp(model, tokenizer, batches, keep, args) -> dict:
    from peers.wanda_sp import prune_wanda_sp

    return prune_wanda_sp(model, batches, keep)


def _flap(model, tokenizer, batches, keep, args) -> dict:
    from peers.wanda_sp import prune_flap

    return prune_flap(model, batches, keep, structure=args.flap_structure)


def _torch_pruning(variant: str) -> Callable:
    def prune(model, tokenizer, batches, keep, args) -> dict:
        from peers.torch_pruning_peer import prune_torch_pruning

        return prune_torch_pruning(model, tokenizer, batches, keep, variant=variant, importance=args.tp_importance,
                                   timeout_s=args.tp_timeout)

    return prune


def method(row: str) -> Callable:
    if row.startswith("prunetune:"):
        return _prunetune(row.split(":", 1)[1])
    return {
        "dense": lambda *a: {},
        "shortgpt": _shortgpt,
        "wanda_sp": _wanda_sp,
        "flap": _flap,
        "torch_pruning": _torch_pruning("example"),
        "torch_pruning_ffn": _torch_pruning("ffn"),
    }[row]
