"""Changes made with a plan before it is applied: FLAP's bias compensation, Kwon et al.'s rearrangement and
rescaling. Each keeps masked = pruned, and brings the pruned model closer to the dense one on the sample."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from conftest import tiny_inputs
from engine_helpers import LLAMA_WHOLE_GROUPS, labelled_batches, make_plan, masks_for, max_diff, tiny

from prunetune.errors import PrunetuneError, PruningWarning
from prunetune.export import load_compact, save_compact
from prunetune.families import layer_sites
from prunetune.importance import channel_stats, compensate, kwon_rearrange, kwon_rescale, mask_gradients
from prunetune.importance.rescale import block_fisher, rearrange_units
from prunetune.masks import attach
from prunetune.plan import PruningPlan
from prunetune.surgery import apply_plan


def outputs(model, batches: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**b).logits for b in batches]


def mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x - y).pow(2).mean()) for x, y in zip(a, b, strict=True))


def heads_and_neurons(family: str, model) -> PruningPlan:
    plan = make_plan(family, model, "all")
    plan.hidden = None
    return plan


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compensation_masked_equals_pruned(family):
    model, batches = tiny(family), labelled_batches(family)
    plan = make_plan(family, model, "all")
    compensate(model, plan, channel_stats(model, batches))
    assert plan.meta["bias_compensation"] is True
    inputs = tiny_inputs(family)
    masked = copy.deepcopy(model)
    with attach(masked, masks_for(masked, plan)), torch.no_grad():
        want = masked(**inputs).logits
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    with torch.no_grad():
        got = pruned(**inputs).logits
    assert max_diff(got, want) < 1e-4


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compensation_brings_the_pruned_model_closer_to_the_dense_one(family):
    model, batches = tiny(family), labelled_batches(family)
    if family == "llama":  # gated-MLP inputs have a mean near 0: give the FFN inputs an offset to remove
        model.config.mlp_bias = True
        lay = layer_sites(model)
        with torch.no_grad():
            for x in lay:
                for lin in x.ffn.inputs:
                    lin.bias = torch.nn.Parameter(torch.full((lin.out_features,), 1.0))
    dense = outputs(model, batches)
    plan = heads_and_neurons(family, model)
    plain = copy.deepcopy(model)
    apply_plan(plain, plan)
    compensate(model, plan, channel_stats(model, batches))
    apply_plan(model, plan)
    assert mse(outputs(model, batches), dense) < 0.7 * mse(outputs(plain, batches), dense)


def test_compensated_llama_survives_export(tmp_path):
    """LLaMA's o_proj/down_proj have no bias: compensation adds them and sets the flags that rebuild them."""
    model, batches = tiny("llama"), labelled_batches("llama")
    plan = heads_and_neurons("llama", model)
    compensate(model, plan, channel_stats(model, batches))
    assert model.config.attention_bias and model.config.mlp_bias
    apply_plan(model, plan)
    save_compact(model, tmp_path / "m")
    again = load_compact(tmp_path / "m", "AutoModelForCausalLM")
    assert max_diff(outputs(again, batches)[0], outputs(model, batches)[0]) < 1e-5


def test_compensation_refuses_families_that_cannot_keep_a_bias():
    model, batches = tiny("t5"), labelled_batches("t5")
    plan = heads_and_neurons("t5", model)
    with pytest.raises(PrunetuneError, match="no bias flag"):
        compensate(model, plan, channel_stats(model, batches))


def test_rearrange_units_lowers_the_block_fisher():
    """Units 0 and 1 have the smallest diagonal Fisher but the same gradient; 2 and 3 cancel each other.
    Removing {0, 1} (the diagonal choice) costs 4x what removing one of them with 3 does."""
    v = torch.tensor([[1.0], [-0.5], [2.0], [0.3]])
    g = torch.cat([v, v, 1.1 * v, -1.1 * v], dim=1)  # (examples, units)
    kept = rearrange_units(g, [2, 3])
    assert kept == [0, 2]
    assert block_fisher(g, [1, 3]) < 0.01 * block_fisher(g, [0, 1])
    assert rearrange_units(g, [0, 1, 2, 3]) == [0, 1, 2, 3] and rearrange_units(g, []) == []


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_kwon_rearrange_keeps_counts_and_grouped_query_attention(family):
    model, batches = tiny(family), labelled_batches(family)
    plans = [heads_and_neurons(family, model)]
    if family == "llama":
        plans.append(PruningPlan("llama", heads=dict(LLAMA_WHOLE_GROUPS)))
    grads = mask_gradients(model, batches, keep_per_example=True)
    for plan in plans:
        new = kwon_rearrange(model, plan, grads=grads)
        new.validate(model)  # grouped-query attention still valid
        assert {k: len(v) for k, v in new.heads.items()} == {k: len(v) for k, v in plan.heads.items()}
        assert {k: len(v) for k, v in new.neurons.items()} == {k: len(v) for k, v in plan.neurons.items()}
        info = new.meta["rearrangement"]
        assert info["block_fisher_after"] <= info["block_fisher_before"] * (1 + 1e-12)
    # whole KV groups stay whole
    if family == "llama":
        for key, kept in new.heads.items():
            assert len(kept) in (0, 3) and (not kept or kept[0] % 3 == 0), key
    assert kwon_rearrange(model, plans[0], batches).heads == kwon_rearrange(model, plans[0], grads=grads).heads


def hidden_states(model, batches: list[dict]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for b in batches:
            res = model(**b, output_hidden_states=True)
            out.extend(getattr(res, "encoder_hidden_states", None) or ())
            out.extend(getattr(res, "decoder_hidden_states", None) or res.hidden_states or ())
    return out


def test_kwon_rescale_brings_layer_outputs_closer(family):
    model, batches = tiny(family), labelled_batches(family)
    plan = heads_and_neurons(family, model)
    dense = hidden_states(model, batches)
    plain = copy.deepcopy(model)
    apply_plan(plain, plan)
    scales = kwon_rescale(model, plan, batches)
    # a scale beyond +-10 (an overfit solve: 2 batches here) stops the procedure, as in Kwon et al.'s code
    assert scales and set(plan.meta["kwon_rescale"]["rescaled"]) == set(scales)
    assert all(abs(x) <= 10 for v in scales.values() for x in v)
    masked = copy.deepcopy(model)
    apply_plan(model, plan)
    rescaled = hidden_states(model, batches)
    assert mse(rescaled, dense) < mse(hidden_states(plain, batches), dense)
    with attach(masked, masks_for(masked, plan)):  # the scales live in kept columns: masked = pruned
        assert max_diff(torch.cat([x.flatten() for x in hidden_states(masked, batches)]),
                        torch.cat([x.flatten() for x in rescaled])) < 1e-4


def prefix_reference_scales(model, plan: PruningPlan, batches: list[dict], damp: float = 1e-4,
                            max_scale: float = 10.0) -> dict[str, torch.Tensor]:
    """Kwon et al.'s rescaling the direct way: for every block, forward passes of the whole model up to it (dense,
    then masked with the scales found so far); no scales folded."""
    from prunetune.importance.passes import TokenRows, scoring, stack_mask_keys
    from prunetune.importance.rescale import NormalEquations, _blocks, _capture, _residual_points, plan_masks

    masks, rows, keys = plan_masks(model, plan), TokenRows(), stack_mask_keys(model)
    hidden_rows = None if plan.hidden is None else torch.tensor(plan.hidden)
    out = {}
    with scoring(model), torch.no_grad():
        for lay in layer_sites(model):
            for index, (key, proj, units, width, kept, store, name) in enumerate(_blocks(lay, plan, masks)):
                if kept is None or len(kept) in (0, units):
                    continue
                before, after = _residual_points(lay, index)
                eq = NormalEquations(proj, kept, width, hidden_rows)
                for batch in batches:
                    rows.set(batch)
                    (dense_sum,) = _capture(functools.partial(model, **batch), [after])
                    with attach(model, masks):
                        residual, x = _capture(functools.partial(model, **batch), [before, ("in", proj)])
                    k = keys[lay.key]
                    eq.add(rows(x, k), rows(dense_sum, k).double() - rows(residual, k).double())
                scale = eq.solve(damp)
                if not torch.isfinite(scale).all() or float(scale.abs().max()) > max_scale:
                    return out
                store[name][torch.tensor(kept)] = scale.float()
                out[key] = scale
    return out


@pytest.mark.parametrize("kind", ["heads_and_neurons", "all"])
@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_kwon_rescale_layer_by_layer_equals_whole_model_passes(family, kind):
    """kwon_rescale carries the dense and pruned streams layer to layer (one layer's compute per block): its
    scales equal those of whole-model passes up to every block, T5's decoder (fed by the rescaled pruned
    encoder), grouped-query attention and hidden-dimension plans included."""
    model, batches = tiny(family), labelled_batches(family)
    plan = heads_and_neurons(family, model) if kind == "heads_and_neurons" else make_plan(family, model, "all")
    reference = prefix_reference_scales(model, plan, batches, max_scale=1e9)
    assert reference
    scales = kwon_rescale(model, plan, batches, max_scale=1e9)
    assert set(scales) == set(reference)
    for key, ref in reference.items():
        torch.testing.assert_close(torch.tensor(scales[key], dtype=torch.float64), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_kwon_rescale_of_a_lora_model(family):
    """lora-prune's pruning step on a LoRA-tuned model (adapters on every projection, trained: B != 0): the
    scales fold into the output projections' columns and their LoRA A, so the rescaled pruned model's layer
    outputs are closer to the unpruned tuned model's than the plain pruned model's, and masked = pruned still."""
    from prunetune import adapters
    from prunetune.importance import compute
    from prunetune.plan import Budget, select

    batches = labelled_batches(family, 4)
    if family == "llama":  # the sequence-classification head's labels
        batches = [{**b, "labels": torch.tensor([0, 1, 1])} for b in batches]
    # (PEFT hands the model back in training mode: dropout would make every comparison noise)
    tuned = adapters.apply_lora(tiny(family, "classify"), rank=4, targets="all").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    dense = hidden_states(tuned, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        plan = select(tuned, compute(tuned, batches, "fisher"), Budget(keep_params=0.6))
    plan = kwon_rearrange(tuned, plan, batches)
    plain = copy.deepcopy(tuned)
    apply_plan(plain, plan)
    lora_a = {n: p.detach().clone() for n, p in tuned.named_parameters() if "lora_A" in n}
    scales = kwon_rescale(tuned, plan, batches)
    assert scales
    assert any(not torch.equal(p, lora_a[n]) for n, p in tuned.named_parameters() if "lora_A" in n)
    masked = copy.deepcopy(tuned)
    apply_plan(tuned, plan)
    rescaled = hidden_states(tuned, batches)
    assert mse(rescaled, dense) < mse(hidden_states(plain, batches), dense)
    with attach(masked, masks_for(masked, plan)):
        assert max_diff(torch.cat([x.flatten() for x in hidden_states(masked, batches)]),
                        torch.cat([x.flatten() for x in rescaled])) < 1e-4
