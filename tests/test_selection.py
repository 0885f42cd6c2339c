"""Selection: kinds ranked together by score per cost, GQA chains, explicit normalisation, hidden dims, budgets."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import transformers
from conftest import FAMILIES, logits, tiny_inputs
from engine_helpers import labelled_batches, masks_for, max_diff, tiny
from test_plan import assert_gqa_valid, kept_heads, kept_neurons, largest_unit, random_scores

from prunetune.costs import head_costs, input_norm_costs, neuron_cost
from prunetune.errors import PrunetuneError, PruningWarning
from prunetune.families import family_of, hidden_size, layer_sites
from prunetune.importance import Scores, compute
from prunetune.masks import attach
from prunetune.plan import Budget, PruningPlan, layer_cost, layer_param_count, planned_param_count, select
from prunetune.selection import Unit, knapsack
from prunetune.surgery import apply_plan

TOL = 1e-4


def smollm_like(layers: int = 2) -> transformers.LlamaForCausalLM:
    """SmolLM2's shape in miniature: 9 query heads on 3 KV heads, head_dim = hidden / heads, FFN 8/3 x hidden."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=54, num_hidden_layers=layers, num_attention_heads=9,
                                   num_key_value_heads=3, head_dim=6, intermediate_size=144,
                                   max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def density_scores(model, draw) -> Scores:
    """Scores of `draw()` per parameter: a head and a neuron matter as much as each other per parameter.

    A query head's cost here includes its share of its KV head's rows (per_kv / group size).
    """
    scores = Scores()
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            per_q, per_kv = head_costs(site)
            scores.heads[site.key] = [draw() * (per_q + per_kv / site.group_size) for _ in range(site.num_heads)]
        scores.neurons[lay.key] = [draw() * neuron_cost(lay.ffn) for _ in range(lay.ffn.width)]
    return scores


def uniform_scores(model, value: float = 1.0) -> Scores:
    scores = Scores(hidden=[value] * hidden_size(model))
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            scores.heads[site.key] = [value] * site.num_heads
        scores.neurons[lay.key] = [value] * lay.ffn.width
    return scores


def scaled(scores: Scores, heads: float = 1.0, neurons: float = 1.0, hidden: float = 1.0) -> Scores:
    return Scores(
        heads={k: [v * heads for v in vs] for k, vs in scores.heads.items()},
        neurons={k: [v * neurons for v in vs] for k, vs in scores.neurons.items()},
        hidden=None if scores.hidden is None else [v * hidden for v in scores.hidden],
        meta=dict(scores.meta),
    )


def assert_tight(model, plan: PruningPlan, fraction: float, budget: Budget) -> None:
    dense = layer_param_count(model)
    kept = planned_param_count(model, plan)
    assert kept <= fraction * dense
    assert fraction * dense - kept < largest_unit(model, budget), f"{kept / dense:.3f} kept"
    assert plan.meta["kept_cost"] == kept
    assert plan.meta["estimated_cost"] == pytest.approx(kept, rel=1e-9)  # the cost model is exact


# ---------------------------------------------------------------------------------------------------------
# GQA: a layer's per-group slices are judged with the KV rows they share
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["per_kind", "none"])
def test_gqa_flat_scores_keep_attention(normalize):
    """Flat scores (per kind, or per parameter) used to keep 0 of 18 heads: the first slice of each layer carries
    the KV rows, so its own score per cost was the lowest and the later slices waited on it for ever."""
    model = smollm_like()
    budget = Budget(keep_params=0.7)
    scores = uniform_scores(model) if normalize == "per_kind" else density_scores(model, lambda: 1.0)
    plan = select(model, scores, budget, normalize=normalize)
    assert kept_heads(plan) >= 9, plan.heads
    assert_gqa_valid(model, plan, "per_group")
    assert_tight(model, plan, 0.7, budget)


def test_gqa_heavy_tailed_scores_keep_a_sensible_number_of_heads():
    model = smollm_like()
    budget = Budget(keep_params=0.7)
    heads = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        plan = select(model, density_scores(model, lambda g=g: float(torch.empty(1).log_normal_(0, 1.5, generator=g))),
                      budget)
        heads.append(kept_heads(plan))
        assert_gqa_valid(model, plan, "per_group")
        assert_tight(model, plan, 0.7, budget)
    assert min(heads) >= 6 and sum(heads) / len(heads) >= 9, heads


def test_chain_is_judged_by_its_envelope():
    """A chain whose first unit only pays off with the next one is taken whole, ahead of a worse single unit."""
    first = Unit("heads", "a", [0], 2.0, 10.0, 0.0)  # carries the shared rows: 0.2 per cost on its own
    second = Unit("heads", "a", [1], 6.0, 2.0, 0.0)  # 3.0 per cost, but only after the first
    single = Unit("neurons", "b", [0], 7.0, 12.0, 0.0)  # 0.58 per cost; the chain together: 8 / 12 = 0.67
    for u in (first, second, single):
        u.cost = u.at_scale(1.0)
    assert knapsack([[first, second], [single]], 12.0) == [first, second]
    # with room for the first unit alone, the fill after the main pass still uses it
    assert knapsack([[first, second], [single]], 11.0) == [first]


@pytest.mark.parametrize(("family", "gqa"), [(f, "per_group") for f in FAMILIES] + [("llama", "whole_group")])
@pytest.mark.parametrize("kind", ["params", "flops", "hidden_keep", "prune_hidden"])
def test_estimated_cost_is_the_measured_cost(family, gqa, kind):
    """The cost model is exact, so the budget check on a weightless copy never has to drop anything."""
    model = tiny(family)
    budget = {
        "params": Budget(keep_params=0.45, gqa=gqa),
        "flops": Budget(keep_flops=0.45, seq_len=64, gqa=gqa),
        "hidden_keep": Budget(keep_params=0.45, hidden_keep=0.75, gqa=gqa),
        "prune_hidden": Budget(keep_params=0.45, prune_hidden=True, gqa=gqa),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        plan = select(model, random_scores(model, 3), budget)
    assert plan.meta["estimated_cost"] == pytest.approx(plan.meta["kept_cost"], rel=1e-9)
    assert plan.meta["kept_cost"] <= plan.meta["target_cost"]


# ---------------------------------------------------------------------------------------------------------
# One scale for every kind; normalisation only when asked for
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [100.0, 0.01])
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_is_invariant_to_scaling_every_score(family, factor):
    model = tiny(family)
    scores = random_scores(model, 1)
    for budget in (Budget(keep_params=0.5), Budget(keep_flops=0.4, seq_len=32), Budget(keep_params=0.5,
                                                                                        prune_hidden=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PruningWarning)
            base = select(model, scores, budget)
            other = select(model, scaled(scores, factor, factor, factor), budget)
        assert (other.heads, other.neurons, other.hidden) == (base.heads, base.neurons, base.hidden)


def test_head_scores_are_weighed_against_neuron_scores():
    """No normalisation: heads 100x more important keep more heads (they used to be rescaled to their cost share,
    which gave the same plan whatever the factor)."""
    model = tiny("bert")
    scores = random_scores(model, 2)
    budget = Budget(keep_params=0.5)
    total = sum(s.num_heads for lay in layer_sites(model) for s in lay.attentions.values())
    base = select(model, scores, budget)
    more = select(model, scaled(scores, heads=100.0), budget)
    fewer = select(model, scaled(scores, heads=0.01), budget)
    assert kept_heads(fewer) <= kept_heads(base) < kept_heads(more) <= total
    assert kept_neurons(more) < kept_neurons(base)
    assert base.meta["normalize"] == "none" and base.meta["normalize_from"] == "default"


def test_per_kind_normalisation_is_explicit_and_recorded():
    model = tiny("bert")
    scores = random_scores(model, 2)
    budget = Budget(keep_params=0.5)
    per_kind = select(model, scores, budget, normalize="per_kind")
    assert (per_kind.meta["normalize"], per_kind.meta["normalize_from"]) == ("per_kind", "argument")
    # the per-kind rule: each kind's scores rescaled so they total the kind's cost (heads and neurons apart)
    head_cost = sum(head_costs(s)[0] * s.num_heads for lay in layer_sites(model) for s in lay.attentions.values())
    neuron_total = sum(neuron_cost(lay.ffn) * lay.ffn.width for lay in layer_sites(model))
    by_hand = scaled(scores, heads=head_cost / sum(sum(v) for v in scores.heads.values()),
                     neurons=neuron_total / sum(sum(v) for v in scores.neurons.values()))
    expected = select(model, by_hand, budget, normalize="none")
    assert (per_kind.heads, per_kind.neurons) == (expected.heads, expected.neurons)
    # which makes the kinds' scales irrelevant
    again = select(model, scaled(scores, heads=100.0), budget, normalize="per_kind")
    assert (again.heads, again.neurons) == (per_kind.heads, per_kind.neurons)
    # a scorer whose kinds are not comparable asks for it; an explicit argument wins
    scores.meta["comparable"] = False
    plan = select(model, scores, budget)
    assert (plan.meta["normalize"], plan.heads) == ("per_kind", per_kind.heads)
    assert plan.meta["normalize_from"] == "scorer: kinds not comparable"
    assert select(model, scores, budget, normalize="none").meta["normalize"] == "none"
    with pytest.raises(PrunetuneError, match="normalisation"):
        select(model, scores, budget, normalize="global")


def test_per_layer_normalisation_weighs_layers_equally():
    model = tiny("bert")
    scores = random_scores(model, 4)
    loud = copy.deepcopy(scores)
    loud.heads["encoder.1/self"] = [v * 1000 for v in loud.heads["encoder.1/self"]]
    budget = Budget(keep_params=0.5)
    quiet_plan = select(model, scores, budget, normalize="per_layer")
    loud_plan = select(model, loud, budget, normalize="per_layer")
    assert (loud_plan.heads, loud_plan.neurons) == (quiet_plan.heads, quiet_plan.neurons)
    assert select(model, loud, budget).heads != select(model, scores, budget).heads


def test_scorers_say_whether_their_kinds_compare():
    model = tiny("bert")
    magnitude = compute(model, None, "magnitude")
    assert magnitude.meta["comparable"] is False  # weight norms are no loss change
    plan = select(model, magnitude, Budget(keep_params=0.5))
    assert (plan.meta["normalize"], plan.meta["normalize_from"]) == ("per_kind", "scorer: kinds not comparable")
    fisher = compute(model, labelled_batches("bert"), "fisher")  # a loss change for every kind: ranked raw
    plan = select(model, fisher, Budget(keep_params=0.5))
    assert (plan.meta["normalize"], plan.meta["normalize_from"]) == ("none", "scorer: comparable kinds")


# ---------------------------------------------------------------------------------------------------------
# Budgets that mean nothing; layers that lose everything
# ---------------------------------------------------------------------------------------------------------


def least_fraction(model) -> float:
    """What no selection removes (norms, biases, T5's position bias), as a fraction of the layers' parameters."""
    layers = layer_sites(model)
    nothing = PruningPlan(family_of(model).name, heads={s.key: [] for lay in layers for s in lay.attentions.values()},
                          neurons={lay.key: [] for lay in layers})
    return planned_param_count(model, nothing) / layer_param_count(model)


def test_budget_below_the_fixed_cost_is_refused(family):
    model = tiny(family)
    # emptying every block also drops the input norms of pre-norm sublayers: whole blocks reach that least;
    # units, chosen one by one, count those norms as fixed
    bare = least_fraction(model)
    blocks = random_scores(model)
    for lay in layer_sites(model):
        blocks.layers.update({s.key: 1.0 for s in lay.attentions.values() if s.num_heads})
        blocks.layers[f"{lay.key}/ffn"] = 1.0
    if bare > 0:  # (a LLaMA without biases keeps nothing at all once every block goes)
        with pytest.raises(PrunetuneError, match="no selection keeps less than") as err:
            select(model, blocks, Budget(keep_params=1e-9, granularity="blocks"))
        assert float(re.search(r"less than ([0-9.e-]+)", str(err.value)).group(1)) == pytest.approx(bare, rel=1e-3)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PruningWarning)
            empty = select(model, blocks, Budget(keep_params=1e-9, granularity="blocks"))
        assert planned_param_count(model, empty) == 0
    least = bare + sum(input_norm_costs(model).values()) / layer_param_count(model)
    with pytest.raises(PrunetuneError, match="no selection keeps less than") as err:
        select(model, random_scores(model), Budget(keep_params=1e-9))
    assert float(re.search(r"less than ([0-9.e-]+)", str(err.value)).group(1)) == pytest.approx(least, rel=1e-3)
    # just above it: a valid plan (it empties every layer, and says so)
    with pytest.warns(PruningWarning):
        plan = select(model, random_scores(model), Budget(keep_params=least * 1.0001))
    assert planned_param_count(model, plan) <= least * 1.0001 * layer_param_count(model)
    # with hidden dims pruned too, the norms can shrink: the least fraction is lower
    with pytest.warns(PruningWarning):
        select(model, random_scores(model), Budget(keep_params=least * 0.9, prune_hidden=True))
    # structures a count fixes count as fixed
    with pytest.raises(PrunetuneError, match="--heads-keep"):
        select(model, random_scores(model), Budget(keep_params=least * 1.01, heads_keep=1.0))


def test_a_layer_losing_everything_warns():
    model = tiny("bert")
    scores = random_scores(model)
    scores.neurons["encoder.2"] = [v * 1e-3 for v in scores.neurons["encoder.2"]]  # the worst layer by far
    with pytest.warns(PruningWarning, match="encoder.2: every FFN neuron removed") as caught:
        plan = select(model, scores, Budget(neurons_keep=80))  # a count: 80 of 3 x 40
    assert len(caught) == 1  # one line, naming every emptied layer
    assert plan.meta["warnings"] == ["encoder.2: every FFN neuron removed"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)
        plan = select(model, scores, Budget(keep_params=0.9))
        assert "warnings" not in plan.meta


def test_flat_scores_prune_layers_evenly():
    """Equal scores say nothing about which layer to cut: every layer gives up the same share."""
    model = tiny("bert")
    plan = select(model, uniform_scores(model), Budget(neurons_keep=60, heads_keep=6))
    assert [len(v) for v in plan.neurons.values()] == [20, 20, 20]
    assert [len(v) for v in plan.heads.values()] == [2, 2, 2]


# ---------------------------------------------------------------------------------------------------------
# Hidden dims ranked with heads and neurons
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_hidden_ranks_hidden_dims_with_the_rest(family):
    model = tiny(family)
    scores = random_scores(model, 5)
    width = hidden_size(model)
    budget = Budget(keep_params=0.5, prune_hidden=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        plan = select(model, scores, budget)
        valued = select(model, scaled(scores, hidden=30.0), budget)
        cheap = select(model, scaled(scores, hidden=0.03), budget)
    assert plan.hidden is not None and 0 < len(plan.hidden) < width
    assert len(cheap.hidden) <= len(plan.hidden) < (len(valued.hidden) if valued.hidden else width)
    # the best hidden dims are the ones kept
    best = sorted(range(width), key=lambda i: -scores.hidden[i])[: len(plan.hidden)]
    assert plan.hidden == sorted(best)
    plan.validate(model)
    dense = layer_param_count(model)
    kept = planned_param_count(model, plan)
    assert 0.45 * dense <= kept <= 0.5 * dense
    # masked = pruned
    inputs = tiny_inputs(family)
    with attach(model, masks_for(model, plan)):
        masked = logits(model, inputs)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    assert max_diff(masked, logits(pruned, inputs)) <= TOL
    assert layer_param_count(pruned) == kept


def test_prune_hidden_budget_flops():
    model = tiny("llama")
    dense = layer_cost(model, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        plan = select(model, random_scores(model, 6), Budget(keep_flops=0.4, seq_len=64, prune_hidden=True))
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    assert plan.hidden is not None and layer_cost(pruned, 64) <= 0.4 * dense * (1 + 1e-9)


@pytest.mark.parametrize(
    ("budget", "message"),
    [({"heads_keep": 0.5, "prune_hidden": True}, "keep-params or --keep-flops"),
     ({"keep_params": 0.5, "hidden_keep": 0.5, "prune_hidden": True}, "not both")],
)
def test_prune_hidden_needs_a_cost_budget(budget, message):
    model = tiny("bert")
    with pytest.raises(PrunetuneError, match=message):
        select(model, random_scores(model), Budget(**budget))


def test_prune_hidden_needs_hidden_scores():
    model = tiny("bert")
    scores = random_scores(model)
    scores.hidden = None
    with pytest.raises(PrunetuneError, match="hidden=True"):
        select(model, scores, Budget(keep_params=0.5, prune_hidden=True))
