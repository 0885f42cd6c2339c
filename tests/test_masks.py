"""Hook masks: all-ones masks are the identity, hooks come off cleanly, every mask entry gets a gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, tiny_inputs
from engine_helpers import make_plan, masks_for, max_diff, tiny

from prunetune.families import hidden_size, layer_sites
from prunetune.masks import Masks, attach


@pytest.mark.parametrize("which", ["heads", "neurons", "hidden", "all"])
def test_all_ones_masks_are_identity(family, which):
    model = tiny(family)
    inputs = tiny_inputs(family)
    dense = logits(model, inputs)
    masks = Masks.ones(
        model, heads=which in ("heads", "all"), neurons=which in ("neurons", "all"), hidden=which in ("hidden", "all")
    )
    assert masks.tensors(), "no mask was built"
    with attach(model, masks):
        masked = logits(model, inputs)
    torch.testing.assert_close(masked, dense, atol=1e-6, rtol=0)


def test_masks_cover_the_live_shapes(family):
    model = tiny(family)
    masks = Masks.ones(model, hidden=True)
    layers = layer_sites(model)
    sites = [s for lay in layers for s in lay.attentions.values()]
    assert set(masks.heads) == {s.key for s in sites}
    assert all(masks.heads[s.key].numel() == s.num_heads for s in sites)
    assert {k: v.numel() for k, v in masks.neurons.items()} == {lay.key: lay.ffn.width for lay in layers}
    assert masks.hidden.numel() == hidden_size(model)


def test_masks_are_removable(family):
    model = tiny(family)
    inputs = tiny_inputs(family)
    dense = logits(model, inputs)
    handle = attach(model, masks_for(model, make_plan(family, model, "all")))
    masked = logits(model, inputs)
    assert max_diff(masked, dense) > 1e-3, "a real mask must change the output"
    handle.remove()
    torch.testing.assert_close(logits(model, inputs), dense, atol=0, rtol=0)
    # no hook is left on any module
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    handle.remove()  # removing twice is harmless


def test_mask_context_manager_removes_hooks(family):
    model = tiny(family)
    inputs = tiny_inputs(family)
    dense = logits(model, inputs)
    with attach(model, masks_for(model, make_plan(family, model, "heads"))):
        assert max_diff(logits(model, inputs), dense) > 1e-3
    torch.testing.assert_close(logits(model, inputs), dense, atol=0, rtol=0)


def test_every_mask_entry_gets_a_gradient(family):
    model = tiny(family)
    inputs = tiny_inputs(family)
    masks = Masks.ones(model, hidden=True, requires_grad=True)
    with attach(model, masks):
        out = model(**inputs).logits
    # a fixed random read-out of the logits: no entry's gradient vanishes by symmetry
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    named = {**masks.heads, **{f"ffn {k}": v for k, v in masks.neurons.items()}, "hidden": masks.hidden}
    for key, mask in named.items():
        assert mask.grad is not None, f"no gradient for {key}"
        assert mask.grad.shape == mask.shape
        assert torch.isfinite(mask.grad).all(), key
        assert (mask.grad != 0).all(), f"{key}: some entries got no gradient: {mask.grad}"
    masks.zero_grad()
    assert all(t.grad is None for t in masks.tensors())


def test_zero_head_mask_equals_zeroed_output_projection(family):
    """A head mask of 0 is the same as cutting that head's columns from the output projection."""
    model = tiny(family)
    inputs = tiny_inputs(family)
    site = next(s for lay in layer_sites(model) for s in lay.attentions.values())
    masks = Masks.ones(model, neurons=False)
    masks.heads[site.key][1] = 0.0
    with attach(model, masks):
        masked = logits(model, inputs)
    with torch.no_grad():
        site.proj("o").weight[:, site.head_dim : 2 * site.head_dim] = 0
    torch.testing.assert_close(masked, logits(model, inputs), atol=1e-6, rtol=0)


def test_per_example_mask_rows_act_on_their_own_example(family):
    """A (batch, units) mask: each example's output equals that example run alone under its own row."""
    model = tiny(family)
    inputs = tiny_inputs(family)
    plan = make_plan(family, model, "all")
    pruned = masks_for(model, plan)
    ones = Masks.ones(model, hidden=True)
    batch = inputs["input_ids"].shape[0]
    rows = Masks.ones(model, hidden=True, batch=batch)  # example 1 pruned, the others dense
    rows.heads = {k: torch.stack([ones.heads[k], pruned.heads[k], ones.heads[k]]) for k in rows.heads}
    rows.neurons = {k: torch.stack([ones.neurons[k], pruned.neurons[k], ones.neurons[k]]) for k in rows.neurons}
    rows.hidden = torch.stack([ones.hidden, pruned.hidden, ones.hidden])
    with attach(model, rows):
        mixed = logits(model, inputs)
    for i, masks in enumerate([ones, pruned, ones]):
        alone = {k: v[i : i + 1] for k, v in inputs.items()}
        with attach(model, masks):
            torch.testing.assert_close(mixed[i : i + 1], logits(model, alone), atol=1e-5, rtol=1e-5)
