"""Physical pruning: a pruned model computes what the masked model computes, and it really is smaller."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_inputs
from engine_helpers import LLAMA_WHOLE_GROUPS, T5_CASES, make_plan, masks_for, max_diff, tiny

from prunetune.errors import PrunetuneError
from prunetune.families import EmptyAttention, EmptyCore, hidden_size, layer_sites
from prunetune.masks import attach
from prunetune.plan import PruningPlan, layer_param_count, planned_param_count
from prunetune.surgery import apply_plan, current_layout, own_storage

TOL = 1e-4


def masked_and_pruned(model, plan: PruningPlan, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
    with attach(model, masks_for(model, plan)):
        masked = logits(model, inputs)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return masked, logits(pruned, inputs), pruned


@pytest.mark.parametrize("kind", ["heads", "neurons", "hidden", "all"])
def test_masked_equals_pruned(family, kind):
    model = tiny(family)
    inputs = tiny_inputs(family)
    plan = make_plan(family, model, kind)
    masked, pruned_out, _ = masked_and_pruned(model, plan, inputs)
    assert max_diff(masked, logits(model, inputs)) > 1e-2, "the plan must change the output"
    assert max_diff(masked, pruned_out) <= TOL


def test_masked_equals_pruned_llama_classifier():
    """The sequence-classification head (`score`) reads the hidden stream too."""
    model = tiny("llama", task="classify")
    inputs = tiny_inputs("llama")
    masked, pruned_out, _ = masked_and_pruned(model, make_plan("llama", model, "all"), inputs)
    assert max_diff(masked, pruned_out) <= TOL


@pytest.mark.parametrize("hidden", [False, True])
def test_llama_whole_kv_groups(hidden):
    model = tiny("llama")
    inputs = tiny_inputs("llama")
    plan = PruningPlan("llama", heads=dict(LLAMA_WHOLE_GROUPS))
    if hidden:
        plan.hidden = make_plan("llama", model, "hidden").hidden
    masked, pruned_out, pruned = masked_and_pruned(model, plan, inputs)
    assert max_diff(masked, pruned_out) <= TOL
    sites = {s.key: s for lay in layer_sites(pruned) for s in lay.attentions.values()}
    assert [(sites[k].num_heads, sites[k].num_kv_heads) for k in sorted(sites)] == [(3, 1), (3, 1), (0, 0)]


@pytest.mark.parametrize("case", sorted(T5_CASES))
def test_t5_position_bias_and_cross_attention(case):
    model = tiny("t5")
    inputs = tiny_inputs("t5")
    masked, pruned_out, _ = masked_and_pruned(model, PruningPlan("t5", heads=T5_CASES[case]), inputs)
    assert max_diff(masked, logits(model, inputs)) > 1e-2
    assert max_diff(masked, pruned_out) <= TOL


def _generate(model, inputs: dict, use_cache: bool = True):
    # tokens 0 (pad / decoder start) and 1 (eos) would win on a random model and end generation at once
    return model.generate(
        **inputs, max_new_tokens=5, do_sample=False, use_cache=use_cache, suppress_tokens=[0, 1],
        output_logits=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize("case", ["all", "layer0_empty", "later_layers"])
def test_t5_generation_after_pruning(case):
    model = tiny("t5")
    inputs = {k: v for k, v in tiny_inputs("t5").items() if k != "decoder_input_ids"}
    plan = make_plan("t5", model, "all") if case == "all" else PruningPlan("t5", heads=T5_CASES[case])
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    with torch.no_grad():
        with attach(model, masks_for(model, plan)):
            ref = _generate(model, inputs)
        got = _generate(pruned, inputs)
        uncached = _generate(pruned, inputs, use_cache=False)
    assert got.sequences.shape == (3, 6)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(got.sequences, uncached.sequences)
    # the logits of every step, not only the argmax: a wrong cached bias shifts them without changing tokens
    for step_ref, step_got, step_uncached in zip(ref.logits, got.logits, uncached.logits, strict=True):
        assert max_diff(step_ref, step_got) <= TOL
        assert max_diff(step_uncached, step_got) <= TOL


def test_llama_generation_with_empty_first_layer():
    """The causal mask is built from layer 0's cache length, which an empty layer must still keep."""
    model = tiny("llama")
    inputs = tiny_inputs("llama")
    inputs["attention_mask"][:] = 1
    inputs["attention_mask"][0, :3] = 0  # left padding: the mask matters
    plan = PruningPlan("llama", heads={"decoder.0/self": []})
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    with torch.no_grad():
        with attach(model, masks_for(model, plan)):
            ref = _generate(model, inputs, use_cache=False)
        got = _generate(pruned, inputs)
    assert torch.equal(got.sequences, ref.sequences)
    for step_ref, step_got in zip(ref.logits, got.logits, strict=True):
        assert max_diff(step_ref, step_got) <= TOL


def expected_layer_params(model, plan: PruningPlan) -> int:
    """Prunable-layer parameters after `plan`, counted by hand from the dense shapes."""
    d = len(plan.hidden) if plan.hidden is not None else hidden_size(model)
    total = 0
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            kept = plan.heads.get(site.key, list(range(site.num_heads)))
            kv = len({h // site.group_size for h in kept}) if site.spec.kv_groups_attr else len(kept)
            q, k, o = site.proj("q"), site.proj("k"), site.proj("o")
            total += len(kept) * site.head_dim * (d + (q.bias is not None))
            total += 2 * kv * site.head_dim * (d + (k.bias is not None))
            total += d * len(kept) * site.head_dim + (d if o.bias is not None else 0)
            table = getattr(site.module, "relative_attention_bias", None)  # T5 layer 0: never sliced
            total += table.weight.numel() if table is not None else 0
        n = len(plan.neurons.get(lay.key, range(lay.ffn.width)))
        total += sum(n * (d + (lin.bias is not None)) for lin in lay.ffn.inputs)
        total += d * n + (d if lay.ffn.output.bias is not None else 0)
        # pre-norm stacks: the input norm of a sublayer left with nothing goes (its output would be unused)
        emptied = [not plan.heads.get(s.key, True) for s in lay.attentions.values()] + [n == 0]
        total += sum(d * (1 + (getattr(norm, "bias", None) is not None))
                     for norm, empty in zip(lay.norms, emptied, strict=True)
                     if lay.stack.post_norm or not empty)
    return total


@pytest.mark.parametrize("kind", ["heads", "neurons", "hidden", "all"])
def test_surgery_shrinks_as_predicted(family, kind):
    model = tiny(family)
    plan = make_plan(family, model, kind)
    dense_layers = layer_param_count(model)
    dense_total = sum(p.numel() for p in model.parameters())
    assert expected_layer_params(model, PruningPlan(family)) == dense_layers  # the hand count is right
    predicted = planned_param_count(model, plan)
    assert predicted == expected_layer_params(model, plan) < dense_layers
    apply_plan(model, plan)
    assert layer_param_count(model) == predicted
    assert sum(p.numel() for p in model.parameters()) < dense_total


def test_per_module_attributes_rewritten(family):
    model = tiny(family)
    plan = make_plan(family, model, "all")
    apply_plan(model, plan)
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            kept = plan.heads[site.key]
            mod = site.module
            assert site.num_heads == len(kept)
            if not kept:
                assert isinstance(mod, EmptyCore if family in ("bert", "roberta") else EmptyAttention)
                continue
            assert site.proj("q").out_features == len(kept) * site.head_dim
            assert site.proj("o").in_features == len(kept) * site.head_dim
            if family in ("bert", "roberta"):
                assert (mod.num_attention_heads, mod.all_head_size) == (len(kept), len(kept) * site.head_dim)
            elif family == "t5":
                assert (mod.n_heads, mod.inner_dim) == (len(kept), len(kept) * site.head_dim)
            else:
                kv = len({h // 3 for h in kept})  # dense groups of 3 query heads
                assert site.num_kv_heads == kv
                assert mod.num_key_value_groups == len(kept) // kv
        width = len(plan.neurons[lay.key])
        assert lay.ffn.width == width
        assert all(lin.out_features == width for lin in lay.ffn.inputs)
    assert hidden_size(model) == len(plan.hidden)
    # the stock config keeps the dense numbers; the layout relative to the dense model is recorded
    layout = current_layout(model)
    assert (layout.heads, layout.neurons, layout.hidden) == (plan.heads, plan.neurons, plan.hidden)


def test_llama_kv_groups_per_layer_differ():
    model = tiny("llama")
    apply_plan(model, PruningPlan("llama", heads={"decoder.0/self": [0, 3], "decoder.2/self": [3, 4, 5]}))
    groups = [lay.attentions["self"].module.num_key_value_groups for lay in layer_sites(model)]
    assert groups == [1, 3, 3]


def _bad_plans(family: str) -> dict[str, PruningPlan]:
    first = {"bert": "encoder.0/self", "roberta": "encoder.0/self", "t5": "encoder.0/self", "llama": "decoder.0/self"}
    key = first[family]
    layer = key.split("/")[0]
    other = "llama" if family != "llama" else "bert"
    return {
        "wrong family": PruningPlan(other, heads={key: [0]}),
        "head out of range": PruningPlan(family, heads={key: [0, 99]}),
        "negative index": PruningPlan(family, neurons={layer: [-1, 0]}),
        "unsorted": PruningPlan(family, neurons={layer: [3, 1]}),
        "duplicate": PruningPlan(family, neurons={layer: [1, 1]}),
        "unknown site": PruningPlan(family, heads={"encoder.9/self": [0]}),
        "hidden out of range": PruningPlan(family, hidden=[0, 1000]),
        "no hidden dim": PruningPlan(family, hidden=[]),
    }


@pytest.mark.parametrize(
    "case", ["wrong family", "head out of range", "negative index", "unsorted", "duplicate", "unknown site",
             "hidden out of range", "no hidden dim"],
)
def test_validate_refuses_bad_plans(family, case):
    model = tiny(family)
    before = {n: p.shape for n, p in model.named_parameters()}
    plan = _bad_plans(family)[case]
    with pytest.raises(PrunetuneError):
        plan.validate(model)
    with pytest.raises(PrunetuneError):
        apply_plan(model, plan)
    assert {n: p.shape for n, p in model.named_parameters()} == before  # nothing was touched


@pytest.mark.parametrize("kept", [[0, 1, 3], [0, 1, 2, 3], [2, 3, 4], [0, 1, 2, 3, 4]])
def test_validate_refuses_gqa_breaking_plans(kept):
    model = tiny("llama")
    with pytest.raises(PrunetuneError, match="grouped-query"):
        PruningPlan("llama", heads={"decoder.1/self": kept}).validate(model)


@pytest.mark.parametrize("kept", [[0], [0, 3], [1, 2, 4, 5], [0, 1, 2], [3, 4, 5], [], [0, 1, 2, 3, 4, 5]])
def test_validate_accepts_gqa_plans(kept):
    PruningPlan("llama", heads={"decoder.1/self": kept}).validate(tiny("llama"))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_own_storage_copies_off_the_checkpoint_and_changes_nothing(family, tmp_path):
    """After pruning before training, the kept tensors leave the memory-mapped checkpoint (their pages would
    stay resident): every tensor gets storage of its own, the function and weight tying stay as they were."""
    import transformers

    tiny(family, "classify").save_pretrained(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = tiny_inputs(family)
    before = logits(model, inputs)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    tied = [(a, b) for a, b in [(model.get_input_embeddings(), model.get_output_embeddings())] if b is not None
            and a.weight is b.weight]
    own_storage(model)
    assert all(p.data_ptr() != ptrs[n] for n, p in model.named_parameters())
    assert all(a.weight is b.weight for a, b in tied)
    assert torch.equal(logits(model, inputs), before)
