"""Whole attention blocks, FFN blocks and layers as units of selection (Budget.granularity)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import FAMILIES, logits, tiny_inputs
from engine_helpers import labelled_batches, masks_for, max_diff, tiny
from test_plan import assert_gqa_valid, random_scores
from test_selection import smollm_like

from prunetune.costs import input_norm_costs
from prunetune.errors import PrunetuneError, PruningWarning
from prunetune.families import layer_sites
from prunetune.importance import Scores, compute
from prunetune.knapsack import LayerChain, Unit, knapsack
from prunetune.layer_units import layer_chain
from prunetune.masks import attach
from prunetune.plan import Budget, PruningPlan, layer_cost, layer_param_count, planned_cost, select
from prunetune.selection import Pool
from prunetune.surgery import apply_plan

GQA_CASES = [(f, "per_group") for f in FAMILIES] + [("llama", "whole_group")]
TOL = 1e-4


def with_blocks(model, scores: Scores, *, layer_factor: float = 1.0, block_factor: float = 1.0) -> Scores:
    """`scores` with whole-structure scores: a block's is its heads' (neurons') sum x block_factor, a layer's its
    blocks' sum x layer_factor (factors 1: the block scores say nothing the units do not)."""
    out = copy.deepcopy(scores)
    for lay in layer_sites(model):
        blocks = {s.key: sum(scores.heads[s.key]) for s in lay.attentions.values() if s.num_heads}
        blocks[f"{lay.key}/ffn"] = sum(scores.neurons[lay.key])
        out.layers.update({k: v * block_factor for k, v in blocks.items()})
        out.layers[lay.key] = sum(v * block_factor for v in blocks.values()) * layer_factor
    return out


def useless(scores: Scores, layer: str, factor: float = 1e-4) -> Scores:
    """The layer's blocks and the layer itself scored near 0: removing it whole loses (almost) nothing."""
    out = copy.deepcopy(scores)
    for k in list(out.layers):
        if k == layer or k.startswith(layer + "/"):
            out.layers[k] *= factor
    return out


def quiet_select(model, scores, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        return select(model, scores, budget, **kw)


def largest_piece(model, budget: Budget, granularity: str) -> float:
    """The dearest thing the granularity keeps or removes as one: a unit, a block or a layer."""
    pool = Pool(model, random_scores(model), budget, "none", budget.seq_len if budget.keep_flops else None)
    pool.at_scale(1.0)
    units = pool.head_units + pool.neuron_units
    if granularity in ("units", "mixed"):
        return max(u.cost for u in units)
    by: dict[str, float] = {}
    for u in units:
        key = (u.key if u.kind == "heads" else f"{u.key}/ffn") if granularity == "blocks" else u.key.split("/")[0]
        by[key] = by.get(key, 0.0) + u.cost
    return max(by.values())


def assert_masked_equals_pruned(model, plan: PruningPlan, family: str) -> None:
    inputs = tiny_inputs(family)
    with attach(model, masks_for(model, plan)):
        masked = logits(model, inputs)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    assert max_diff(masked, logits(pruned, inputs)) <= TOL
    flops_seq = plan.meta["budget"]["seq_len"] if plan.meta["cost_kind"] == "flops" else None
    assert layer_cost(pruned, flops_seq) == pytest.approx(plan.meta["kept_cost"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Block scores change the plan only where they say something the units do not
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "gqa"), GQA_CASES)
def test_uninformative_block_scores_give_the_units_plan(family, gqa):
    """Block scores equal to their units' sums (no terms between units) and layer scores equal to their blocks':
    "mixed" has nothing more to weigh, and chooses exactly what "units" does. (Under a parameter budget a
    pre-norm block also owns its input norm, which "mixed" weighs and "units" cannot: FLOPs budgets only there.)"""
    model = tiny(family)
    budgets = [dict(keep_flops=0.5, seq_len=64)]
    if not input_norm_costs(model):
        budgets += [dict(keep_params=0.3), dict(keep_params=0.7), dict(keep_params=0.5, prune_hidden=True)]
    for seed in range(3):
        scores = with_blocks(model, random_scores(model, seed))
        for budget in budgets:
            units = quiet_select(model, scores, Budget(**budget, gqa=gqa))
            mixed = quiet_select(model, scores, Budget(**budget, gqa=gqa, granularity="mixed"))
            assert (mixed.heads, mixed.neurons, mixed.hidden) == (units.heads, units.neurons, units.hidden), budget
            assert mixed.meta["granularity"] == "mixed" and units.meta["granularity"] == "units"


def test_flat_high_block_scores_keep_every_block_and_the_units_plan():
    """Every block scored far above its units: removing any block whole would cost more than anything else, so
    each keeps its best unit; the rest is the units' plan wherever that keeps every block."""
    model = tiny("bert")
    for seed in (1, 2, 7):
        scores = random_scores(model, seed)
        flat = copy.deepcopy(scores)
        for lay in layer_sites(model):
            flat.layers.update({f"{lay.key}/self": 100.0, f"{lay.key}/ffn": 100.0, lay.key: 200.0})
        for fraction in (0.7, 0.8, 0.9):
            units = quiet_select(model, scores, Budget(keep_params=fraction))
            assert all(units.heads.values()) and all(units.neurons.values())  # the units' plan keeps every block
            mixed = quiet_select(model, flat, Budget(keep_params=fraction, granularity="mixed"))
            assert (mixed.heads, mixed.neurons) == (units.heads, units.neurons)
    # where the units' plan would empty blocks, "mixed" keeps a unit of each
    low = quiet_select(model, flat, Budget(keep_params=0.3, granularity="mixed"))
    assert all(low.heads.values()) and all(low.neurons.values())
    assert low.meta["dropped"] == {"layers": 0, "attention_blocks": 0, "ffn_blocks": 0, "keys": []}


@pytest.mark.parametrize(("family", "layer"), [("bert", "encoder.1"), ("roberta", "encoder.2"), ("t5", "decoder.1"),
                                               ("t5", "encoder.0"), ("llama", "decoder.1")])
def test_mixed_drops_a_useless_layer_whole(family, layer):
    """Units with their usual scores, but the layer's block and layer scores say removing it whole loses nothing
    (its units' gradients cancel): "mixed" removes it whole and spends the budget elsewhere, which "units"
    cannot know."""
    model = tiny(family)
    scores = useless(with_blocks(model, random_scores(model, 3)), layer)
    dense = layer_param_count(model)
    share = max(planned_cost(model, PruningPlan.identity(model)) - planned_cost(model, drop(model, layer)), 1.0)
    fraction = 1 - share / dense  # room for everything but that layer
    units = quiet_select(model, scores, Budget(keep_params=fraction))
    mixed = quiet_select(model, scores, Budget(keep_params=fraction, granularity="mixed"))
    assert mixed.meta["dropped"]["keys"] == [layer] and mixed.meta["dropped"]["layers"] == 1
    assert layer not in units.meta["dropped"]["keys"]
    for lay in layer_sites(model):  # everything else is kept whole
        if lay.key != layer:
            assert all(mixed.heads[s.key] == list(range(s.num_heads)) for s in lay.attentions.values())
            assert mixed.neurons[lay.key] == list(range(lay.ffn.width))
    assert "warnings" not in mixed.meta  # dropping is what was asked for: no warning
    assert_masked_equals_pruned(model, mixed, family)


def drop(model, layer: str) -> PruningPlan:
    """The plan that removes one layer whole."""
    plan = PruningPlan.identity(model)
    for lay in layer_sites(model):
        if lay.key == layer:
            plan.heads.update({s.key: [] for s in lay.attentions.values()})
            plan.neurons[lay.key] = []
    return plan


def test_mixed_drops_a_block_whose_block_score_is_low():
    model = tiny("llama")
    scores = with_blocks(model, random_scores(model, 4))
    scores.layers["decoder.2/self"] *= 1e-4
    plan = quiet_select(model, scores, Budget(keep_params=0.8, granularity="mixed"))
    assert plan.heads["decoder.2/self"] == [] and plan.neurons["decoder.2"]
    assert plan.meta["dropped"]["attention_blocks"] == 1 and plan.meta["dropped"]["keys"] == ["decoder.2/self"]


# ---------------------------------------------------------------------------------------------------------
# The budget, the engine's constraints, scale
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "gqa"), GQA_CASES)
@pytest.mark.parametrize("granularity", ["mixed", "blocks", "layers"])
def test_budget_is_exact(family, gqa, granularity):
    """On Fisher scores of the model: the cost model is exact, the budget holds, and what is left is less than
    the dearest piece the granularity moves as one; masked = pruned (T5's position bias, GQA groups)."""
    model = tiny(family)
    scores = compute(model, labelled_batches(family, 3), "fisher")
    for budget in (Budget(keep_params=0.35, gqa=gqa, granularity=granularity),
                   Budget(keep_params=0.8, gqa=gqa, granularity=granularity),
                   Budget(keep_flops=0.6, seq_len=64, gqa=gqa, granularity=granularity)):
        plan = quiet_select(model, scores, budget)
        meta = plan.meta
        assert meta["estimated_cost"] == pytest.approx(meta["kept_cost"], rel=1e-9)
        assert meta["kept_cost"] <= meta["target_cost"]
        assert meta["target_cost"] - meta["kept_cost"] < largest_piece(model, budget, granularity)
        if family == "llama":
            assert_gqa_valid(model, plan, gqa)
        plan.validate(model)
        assert_masked_equals_pruned(model, plan, family)


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_blocks_and_layers_move_whole(family):
    model = tiny(family)
    scores = compute(model, labelled_batches(family, 3), "fisher")
    blocks = quiet_select(model, scores, Budget(keep_params=0.5, granularity="blocks"))
    layers = quiet_select(model, scores, Budget(keep_params=0.5, granularity="layers"))
    for lay in layer_sites(model):
        for s in lay.attentions.values():
            assert blocks.heads[s.key] in ([], list(range(s.num_heads)))
        assert blocks.neurons[lay.key] in ([], list(range(lay.ffn.width)))
        whole = [layers.heads[s.key] == list(range(s.num_heads)) for s in lay.attentions.values()]
        whole.append(layers.neurons[lay.key] == list(range(lay.ffn.width)))
        assert all(whole) or (not any(layers.heads[s.key] for s in lay.attentions.values())
                              and not layers.neurons[lay.key]), lay.key
    assert blocks.meta["dropped"]["attention_blocks"] + blocks.meta["dropped"]["ffn_blocks"] \
        + blocks.meta["dropped"]["layers"] > 0


@pytest.mark.parametrize("factor", [100.0, 0.01])
@pytest.mark.parametrize("granularity", ["mixed", "blocks", "layers"])
def test_plan_is_invariant_to_scaling_every_score(granularity, factor):
    for family in ("t5", "llama"):
        model = tiny(family)
        scores = compute(model, labelled_batches(family, 3), "fisher")
        big = copy.deepcopy(scores)
        big.heads = {k: [v * factor for v in vs] for k, vs in big.heads.items()}
        big.neurons = {k: [v * factor for v in vs] for k, vs in big.neurons.items()}
        big.layers = {k: v * factor for k, v in big.layers.items()}
        for budget in (Budget(keep_params=0.5, granularity=granularity),
                       Budget(keep_flops=0.4, seq_len=32, granularity=granularity)):
            a, b = quiet_select(model, scores, budget), quiet_select(model, big, budget)
            assert (a.heads, a.neurons) == (b.heads, b.neurons)


# ---------------------------------------------------------------------------------------------------------
# Layers only: ShortGPT
# ---------------------------------------------------------------------------------------------------------


def shortgpt_influence(model, batches: list[dict]) -> list[float]:
    """ShortGPT's block influence, by hand: 1 - cos(h_l, h_l+1) over the unpadded tokens of the hidden states
    the model returns (the final norm taken out, so the last layer's output is its own)."""
    plain = copy.deepcopy(model)
    plain.model.norm = torch.nn.Identity()
    sums, count = None, 0
    with torch.no_grad():
        for b in batches:
            hs = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            keep = b["attention_mask"].bool()
            cos = torch.stack([torch.nn.functional.cosine_similarity(hs.hidden_states[i][keep].double(),
                                                                     hs.hidden_states[i + 1][keep].double(), dim=-1)
                               for i in range(len(hs.hidden_states) - 1)])
            sums = (1 - cos).sum(1) if sums is None else sums + (1 - cos).sum(1)
            count += int(keep.sum())
    return (sums / count).tolist()


def test_layers_on_block_influence_is_shortgpt():
    """Block influence scores only whole layers: selection then drops whole layers (no flag needed), the least
    influential ones, as many as the budget asks; the same ranking as ShortGPT's, computed by hand."""
    model = smollm_like(layers=6)
    batches = labelled_batches("llama", 3)
    scores = compute(model, batches, "block_influence")
    influence = shortgpt_influence(model, batches)
    assert [scores.layers[f"decoder.{i}"] for i in range(6)] == pytest.approx(influence, rel=1e-6)
    dense = layer_param_count(model)
    share = dense - planned_cost(model, drop(model, "decoder.0"))  # every layer removes the same
    ranking = sorted(range(6), key=lambda i: influence[i])
    for k in range(1, 5):
        fraction = (dense - (k - 0.5) * share) / dense  # room for dropping k layers, not k - 1
        plan = select(model, scores, Budget(keep_params=fraction))
        assert (plan.meta["granularity"], plan.meta["granularity_from"]) == ("layers", "scores: whole layers only")
        assert plan.meta["dropped"]["keys"] == [f"decoder.{i}" for i in sorted(ranking[:k])]
        assert plan.meta["kept_cost"] <= fraction * dense
        # a dropped layer takes its norms with it (pre-norm): a budget of exactly k layers drops k, not k + 1
        exact = select(model, scores, Budget(keep_params=(dense - k * share) / dense))
        assert exact.meta["dropped"]["keys"] == plan.meta["dropped"]["keys"]
        assert exact.meta["kept_cost"] == pytest.approx(dense - k * share, rel=1e-12)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, exact)
        assert layer_param_count(pruned) == dense - k * share
        assert sum(p.numel() for n, p in pruned.named_parameters()
                   if any(f"layers.{i}." in n for i in ranking[:k])) == 0


def test_layers_on_fisher_ranks_by_layer_score_per_cost():
    model = tiny("t5")  # layers of different costs: decoder layers have cross-attention
    scores = compute(model, labelled_batches("t5", 3), "fisher")
    plan = quiet_select(model, scores, Budget(keep_params=0.6, granularity="layers"))
    kept = [lay.key for lay in layer_sites(model) if lay.key not in plan.meta["dropped"]["keys"]]
    dropped = plan.meta["dropped"]["keys"]
    assert dropped and kept
    cost = {lay.key: planned_cost(model, PruningPlan.identity(model)) - planned_cost(model, drop(model, lay.key))
            for lay in layer_sites(model)}
    # each dropped layer either has a lower score per cost than every kept one, or did not fit
    worst_kept = min(scores.layers[k] / cost[k] for k in kept)
    room = plan.meta["target_cost"] - plan.meta["kept_cost"]
    assert all(scores.layers[d] / cost[d] <= worst_kept or cost[d] > room for d in dropped)


# ---------------------------------------------------------------------------------------------------------
# Refusals; the greedy on a layer's chain
# ---------------------------------------------------------------------------------------------------------


def test_granularity_refusals():
    model = tiny("bert")
    scores = random_scores(model)
    with pytest.raises(PrunetuneError, match="needs attention-block and FFN-block scores"):
        select(model, scores, Budget(keep_params=0.5, granularity="mixed"))
    with pytest.raises(PrunetuneError, match="needs whole-layer scores"):
        select(model, scores, Budget(keep_params=0.5, granularity="layers"))
    with pytest.raises(PrunetuneError, match="unknown granularity"):
        select(model, scores, Budget(keep_params=0.5, granularity="heads"))
    with pytest.raises(PrunetuneError, match="--keep-params or --keep-flops"):
        select(model, scores, Budget(heads_keep=0.5, granularity="layers"))
    with pytest.raises(PrunetuneError, match="--heads-keep"):
        select(model, scores, Budget(keep_params=0.5, heads_keep=0.5, granularity="mixed"))
    full = with_blocks(model, scores)
    with pytest.raises(PrunetuneError, match="normalised 'per_kind'"):
        select(model, full, Budget(keep_params=0.5, granularity="mixed"), normalize="per_kind")
    magnitude = compute(model, None, "magnitude")  # a proxy: its kinds are not comparable
    magnitude.layers = full.layers
    with pytest.raises(PrunetuneError, match="scorer: kinds not comparable"):
        select(model, magnitude, Budget(keep_params=0.5, granularity="blocks"))
    # explicitly compared as they are: the caller's call
    assert select(model, magnitude, Budget(keep_params=0.5, granularity="blocks"), normalize="none").meta[
        "normalize"] == "none"
    # whole-layer scores alone under a count budget: nothing to drop layers by; the units' default stays
    layers_only = Scores(layers=full.layers)
    assert select(model, layers_only, Budget(heads_keep=6)).meta["granularity"] == "units"


def test_layer_chain_needs_its_opening_piece():
    """A block whose units only pay off together (its block score is below their sum): its first unit is worth
    less than nothing on its own, the block is judged as a whole, and no unit comes without the first."""

    def unit(key, i, score):
        u = Unit("heads", key, [i], score, 4.0, 0.0)
        u.cost = 4.0
        return u

    a0, a1, a2 = unit("x", 0, 1.0), unit("x", 1, 3.0), unit("x", 2, 3.0)
    other = unit("y", 0, 1.6)  # 0.4 per cost: below the block's 5 / 12, above its first unit with the bonus

    def block() -> LayerChain:  # the block's bonus (-2) on a0; a1 and a2 need a0
        return LayerChain([[a0], [a1], [a2]], [1.0 - 2.0, 3.0, 3.0], [4.0] * 3, [(), (0,), (0,)])

    assert knapsack([block(), [other]], 12.0) == [a0, a1, a2]
    assert knapsack([block(), [other]], 16.0) == [a0, a1, a2, other]
    # no room for the block: the other unit, then the block's leading pieces (keeping part of a structure is
    # taken to lose no more than removing it all)
    assert knapsack([block(), [other]], 8.0) == [other, a0]
    # a unit never comes without the piece it needs, even when it alone would fit
    assert knapsack([LayerChain([[a0], [a1]], [-5.0, 3.0], [8.0, 4.0], [(), (0,)])], 5.0) == []


@pytest.mark.parametrize(("family", "gqa"), [("t5", "per_group"), ("llama", "per_group"), ("llama", "whole_group")])
def test_layer_chain_is_cut_at_its_envelope(family, gqa):
    """layer_chain cuts its segments itself (numpy, only first segments can merge): the same cut as the envelope
    of its pieces, block bonuses of both signs and layers of both signs included; a segment's ratio is strictly
    above that of every segment needing it (the greedy meets it first)."""
    model = tiny(family)
    scores = with_blocks(model, random_scores(model, 5))
    g = torch.Generator().manual_seed(0)
    scores.layers = {k: v * float(torch.empty(1).uniform_(0.2, 3.0, generator=g)) for k, v in scores.layers.items()}
    pool = Pool(model, scores, Budget(keep_params=0.5, gqa=gqa, granularity="mixed"), "none", None, "mixed")
    assert any(b.bonus < 0 and b.anchored for grp in pool.groups for b in grp.blocks)
    assert any(b.bonus > 0 and b.anchored for grp in pool.groups for b in grp.blocks)
    for scale in (1.0, 0.4):
        pool.at_scale(scale)
        for group in pool.groups:
            fast = layer_chain(group, scale)
            # a block's opening piece also carries its input norm (pre-norm stacks), every other piece its units
            opener = {}
            for i, piece in enumerate(fast.pieces):
                block = next(b for b in group.blocks if any(piece[0] is u for u in b.units))
                opener.setdefault(block.key, (i, block.own_hidden * scale))
            expected = [sum(u.cost for u in p) for p in fast.pieces]
            for i, extra in opener.values():
                expected[i] += extra
            assert fast.costs == pytest.approx(expected, rel=1e-12)
            cut = LayerChain(fast.pieces, fast.values, fast.costs, fast.needs)
            assert (fast.bounds, fast.seg_needs) == (cut.bounds, cut.seg_needs)
            assert fast.seg_value == pytest.approx(cut.seg_value, rel=1e-9)
            assert fast.seg_cost == pytest.approx(cut.seg_cost, rel=1e-9)
            r = [v / c for v, c in zip(fast.seg_value, fast.seg_cost, strict=True)]
            assert all(r[j] > r[s] for s, wanted in enumerate(fast.seg_needs) for j in wanted)
            assert all(j < k for k, wanted in enumerate(fast.needs) for j in wanted)
