"""Plans: JSON round trip, composition, and selection under every kind of budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, logits, tiny_inputs
from engine_helpers import make_plan, second_plan, tiny

from prunetune.errors import PrunetuneError
from prunetune.families import hidden_size, layer_sites
from prunetune.importance import Scores, compute
from prunetune.plan import (
    Budget,
    PruningPlan,
    kv_groups_kept,
    layer_cost,
    layer_param_count,
    model_shapes,
    planned_param_count,
    select,
)
from prunetune.selection import Pool
from prunetune.surgery import apply_plan, current_layout

SEQ = 128
# grouped-query modes only differ for LLaMA
GQA_CASES = [(f, "per_group") for f in FAMILIES] + [("llama", "whole_group")]


def random_scores(model, seed: int = 0) -> Scores:
    """Distinct random scores (no ties) for every head, neuron and hidden dim."""
    g = torch.Generator().manual_seed(seed)
    scores = Scores(hidden=torch.rand(hidden_size(model), generator=g).tolist())
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            scores.heads[site.key] = torch.rand(site.num_heads, generator=g).tolist()
        scores.neurons[lay.key] = torch.rand(lay.ffn.width, generator=g).tolist()
    return scores


def kept_heads(plan: PruningPlan) -> int:
    return sum(len(v) for v in plan.heads.values())


def kept_neurons(plan: PruningPlan) -> int:
    return sum(len(v) for v in plan.neurons.values())


def assert_gqa_valid(model, plan: PruningPlan, gqa: str) -> None:
    plan.validate(model)
    for lay in layer_sites(model):
        site = lay.attentions["self"]
        groups = kv_groups_kept(plan.heads[site.key], site.group_size)
        sizes = {len(v) for v in groups.values()}
        assert len(sizes) <= 1, f"{site.key}: unequal groups {groups}"
        if gqa == "whole_group":
            assert sizes <= {site.group_size}, f"{site.key}: partial groups {groups}"


# ---------------------------------------------------------------------------------------------------------
# The plan object
# ---------------------------------------------------------------------------------------------------------


def test_json_round_trip(family, tmp_path):
    model = tiny(family)
    plan = make_plan(family, model, "all")
    plan.meta = {"scorer": "magnitude", "budget": {"keep_params": 0.5}}
    path = tmp_path / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text())["family"] == family
    again = PruningPlan.load(path)
    assert again == plan
    assert PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize("text", ["not json", '{"heads": {}}', '{"family": "bert", "heads": {"x": ["a"]}}'])
def test_load_refuses_garbage(tmp_path, text):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PrunetuneError):
        PruningPlan.load(path)
    with pytest.raises(PrunetuneError):
        PruningPlan.load(tmp_path / "missing.json")


def test_identity_plan_changes_nothing(family):
    model = tiny(family)
    inputs = tiny_inputs(family)
    dense = logits(model, inputs)
    params = layer_param_count(model)
    apply_plan(model, PruningPlan.identity(model))
    assert layer_param_count(model) == params
    torch.testing.assert_close(logits(model, inputs), dense, atol=0, rtol=0)


def test_compose_equals_successive_application(family):
    model = tiny(family)
    inputs = tiny_inputs(family)
    first = make_plan(family, model, "all")
    stepwise = copy.deepcopy(model)
    apply_plan(stepwise, first)
    later = second_plan(stepwise, family)
    apply_plan(stepwise, later)

    composed = first.compose(later)
    composed.validate(model)
    at_once = copy.deepcopy(model)
    apply_plan(at_once, composed)
    torch.testing.assert_close(logits(at_once, inputs), logits(stepwise, inputs), atol=1e-6, rtol=0)
    assert layer_param_count(at_once) == layer_param_count(stepwise) < layer_param_count(model)
    # the layout the export writes is the composition, relative to the dense model
    layout = current_layout(stepwise)
    assert (layout.heads, layout.neurons, layout.hidden) == (composed.heads, composed.neurons, composed.hidden)


def test_compose_with_missing_keys_keeps_the_other_side():
    a = PruningPlan("bert", heads={"encoder.0/self": [0, 2, 3]}, hidden=[1, 2, 5, 7])
    b = PruningPlan("bert", heads={"encoder.0/self": [2], "encoder.1/self": [1]}, neurons={"encoder.2": [4]})
    c = a.compose(b)
    assert c.heads == {"encoder.0/self": [3], "encoder.1/self": [1]}
    assert c.neurons == {"encoder.2": [4]}
    assert c.hidden == [1, 2, 5, 7]
    assert a.compose(PruningPlan("bert", hidden=[0, 3])).hidden == [1, 7]


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------

# counts the tiny models can meet exactly: LLaMA per-group slices hold 2 heads (one per KV group), whole
# groups 3; BERT/RoBERTa have 12 heads, T5 28 (3 encoder + 2 x 2 decoder sites of 4)
HEAD_COUNTS = {"bert": 7, "roberta": 7, "t5": 10, "llama": 8}


@pytest.mark.parametrize(("family", "gqa"), GQA_CASES)
def test_heads_keep_count_is_exact(family, gqa):
    model = tiny(family)
    count = HEAD_COUNTS[family] if not (family == "llama" and gqa == "whole_group") else 6
    plan = select(model, random_scores(model), Budget(heads_keep=count, gqa=gqa))
    assert kept_heads(plan) == count
    assert kept_neurons(plan) == sum(lay.ffn.width for lay in layer_sites(model))  # untouched
    if family == "llama":
        assert_gqa_valid(model, plan, gqa)
    plan.validate(model)


def test_heads_keep_keeps_the_best_heads():
    model = tiny("bert")
    scores = random_scores(model)
    plan = select(model, scores, Budget(heads_keep=5))
    flat = sorted(((v, k, i) for k, vs in scores.heads.items() for i, v in enumerate(vs)), reverse=True)
    best = {(k, i) for _, k, i in flat[:5]}
    assert {(k, i) for k, v in plan.heads.items() for i in v} == best


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_neurons_keep_fraction_is_exact(family, fraction):
    model = tiny(family)
    total = sum(lay.ffn.width for lay in layer_sites(model))
    plan = select(model, random_scores(model), Budget(neurons_keep=fraction))
    assert kept_neurons(plan) == round(fraction * total)
    assert kept_heads(plan) == sum(s.num_heads for lay in layer_sites(model) for s in lay.attentions.values())


def largest_unit(model, budget: Budget, flops_seq: int | None = None) -> float:
    pool = Pool(model, random_scores(model), budget, "none", flops_seq)
    return max(u.at_scale(1.0) for u in pool.head_units + pool.neuron_units)


@pytest.mark.parametrize("fraction", [0.15, 0.4, 0.75])
@pytest.mark.parametrize(("family", "gqa"), GQA_CASES)
def test_keep_params_holds_and_is_tight(family, gqa, fraction):
    model = tiny(family)
    dense = layer_param_count(model)
    for seed in range(3):
        budget = Budget(keep_params=fraction, gqa=gqa)
        plan = select(model, random_scores(model, seed), budget)
        kept = planned_param_count(model, plan)
        assert kept <= fraction * dense
        assert fraction * dense - kept < largest_unit(model, budget), f"seed {seed}: {kept / dense:.3f} kept"
        if family == "llama":
            assert_gqa_valid(model, plan, gqa)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    assert layer_param_count(pruned) == kept  # the prediction is what surgery gives


@pytest.mark.parametrize("fraction", [0.15, 0.5])
@pytest.mark.parametrize(("family", "gqa"), GQA_CASES)
def test_keep_flops_holds(family, gqa, fraction):
    model = tiny(family)
    dense = layer_cost(model, SEQ)
    for seed in range(3):
        plan = select(model, random_scores(model, seed), Budget(keep_flops=fraction, seq_len=SEQ, gqa=gqa))
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        kept = layer_cost(pruned, SEQ)
        assert kept <= fraction * dense * (1 + 1e-9)
        assert fraction * dense - kept < largest_unit(model, Budget(gqa=gqa), SEQ), f"seed {seed}"
        assert plan.meta["cost_kind"] == "flops"


def test_keep_params_with_hidden_keep(family):
    model = tiny(family)
    dense = layer_param_count(model)
    plan = select(model, random_scores(model), Budget(keep_params=0.5, hidden_keep=0.5))
    assert len(plan.hidden) == hidden_size(model) // 2
    assert planned_param_count(model, plan) <= 0.5 * dense
    plan.validate(model)


def test_magnitude_scores_select_and_apply(family):
    model = tiny(family)
    plan = select(model, compute(model, None, "magnitude"), Budget(keep_params=0.5))
    dense = layer_param_count(model)
    apply_plan(model, plan)
    assert 0.4 * dense < layer_param_count(model) <= 0.5 * dense


@pytest.mark.parametrize(
    "budget",
    [
        {"keep_params": 0}, {"keep_params": 1.5}, {"keep_params": -0.2}, {"keep_flops": 0}, {"keep_flops": 2.0},
        {"hidden_keep": 0}, {"hidden_keep": 1.01}, {"heads_keep": 0}, {"heads_keep": 2.5}, {"neurons_keep": -1},
        {"keep_params": 0.5, "keep_flops": 0.5}, {},
    ],
)
def test_bad_budgets_raise(budget):
    model = tiny("bert")
    with pytest.raises(PrunetuneError):
        select(model, random_scores(model), Budget(**budget))


def test_count_above_model_size_raises():
    model = tiny("bert")
    with pytest.raises(PrunetuneError):
        select(model, random_scores(model), Budget(heads_keep=13))


def test_full_budget_keeps_everything(family):
    model = tiny(family)
    plan = select(model, random_scores(model), Budget(keep_params=1.0))
    assert planned_param_count(model, plan) == layer_param_count(model)


# ---------------------------------------------------------------------------------------------------------
# A plan fits only the model it was made for
# ---------------------------------------------------------------------------------------------------------


def _bert(**sizes):
    import transformers
    from conftest import tiny_config

    cfg = tiny_config("bert")
    for k, v in sizes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize(("other", "message"), [
    ({"num_hidden_layers": 6}, "3 encoder layers, this one has 6 encoder layers"),
    ({"hidden_size": 48, "num_attention_heads": 4}, "hidden size 32, this one has hidden size 48"),
    ({"hidden_size": 32, "num_attention_heads": 8}, "4 query heads in encoder.0/self, this one has 8"),
    ({"intermediate_size": 64}, "40 FFN neurons in encoder.0, this one has 64"),
])
def test_a_plan_from_another_model_is_refused(other, message, tmp_path):
    """A tiny BERT's plan used to cut a bigger BERT's first layers without a word: its indices were in range."""
    small = _bert()
    plan = select(small, compute(small, None, "magnitude"), Budget(keep_params=0.5))
    assert plan.shapes == model_shapes(small)
    plan.save(tmp_path / "plan.json")
    big = _bert(**other)
    before = {n: p.shape for n, p in big.named_parameters()}
    with pytest.raises(PrunetuneError, match=message):
        apply_plan(big, PruningPlan.load(tmp_path / "plan.json"))
    assert {n: p.shape for n, p in big.named_parameters()} == before
    apply_plan(small, PruningPlan.load(tmp_path / "plan.json"))  # its own model takes it


def test_plans_without_shapes_still_apply_as_far_as_checkable(family):
    model = tiny(family)
    legacy = make_plan(family, model, "all").to_dict()
    del legacy["shapes"]
    plan = PruningPlan.from_dict(legacy)
    assert plan.shapes is None
    apply_plan(model, plan)
    with pytest.raises(PrunetuneError, match="out of range"):  # the index checks still run
        PruningPlan.from_dict({"family": family, "hidden": [10_000]}).validate(model)


def test_identity_compose_and_layout_record_the_shapes_they_refer_to(family):
    model = tiny(family)
    dense = model_shapes(model)
    assert PruningPlan.identity(model).shapes == dense
    plan = make_plan(family, model, "all")
    apply_plan(model, plan)
    layout = current_layout(model)
    assert layout.shapes == dense  # relative to the dense model, so its shapes are the dense ones
    later = PruningPlan.identity(model)
    assert later.shapes == model_shapes(model) != dense
    assert plan.compose(later).shapes == plan.shapes
    assert PruningPlan.from_dict(json.loads(json.dumps(later.to_dict()))) == later
