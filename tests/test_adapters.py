"""LoRA through PEFT: per-block ranks, what trains, merging, adapters on a pruned base, growth, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_inputs
from engine_helpers import make_plan, masks_for, max_diff, tiny
from torch import nn

from prunetune import adapters
from prunetune.errors import PrunetuneError
from prunetune.families import layer_sites
from prunetune.masks import attach
from prunetune.plan import PruningPlan
from prunetune.surgery import SliceLog, apply_plan

TOL = 1e-4
TASK = {"bert": "auto", "roberta": "auto", "t5": "auto", "llama": "classify"}


def lively_b(model, seed: int = 0, scale: float = 0.3) -> None:
    """PEFT starts lora_B at zero (the adapter is then a no-op): give every B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.lora_layers(model).values():
            b = layer.lora_B[adapters.ADAPTER].weight
            b.copy_(scale * torch.randn(b.shape, generator=g))


def perturb_trainable(model, seed: int = 0, scale: float = 0.1) -> None:
    """What training would do: move every trainable tensor (adapters, norms, head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def layer_key_of(model) -> dict[int, str]:
    """id(module) -> layer key ("encoder.1"), found by walking the layers, not by parsing names."""
    return {id(m): lay.key for lay in layer_sites(model) for m in lay.module.modules()}


# ---------------------------------------------------------------------------------------------------------
# Which layers get which rank
# ---------------------------------------------------------------------------------------------------------


def test_block_ranks_picks_the_top_k():
    scores = {"encoder.0": 0.1, "encoder.1": 0.9, "encoder.2": 0.5, "encoder.3": 0.3}
    assert adapters.block_ranks(scores, 2, 8, 2) == {"encoder.0": 2, "encoder.1": 8, "encoder.2": 8, "encoder.3": 2}
    assert adapters.block_ranks(scores, 0, 8, 2) == dict.fromkeys(scores, 2)
    with pytest.raises(PrunetuneError):
        adapters.block_ranks(scores, 1, 0, 2)


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_block_rank_gives_the_top_blocks_the_high_rank(family):
    model = tiny(family, TASK[family])
    keys = [lay.key for lay in layer_sites(model)]
    scores = {k: float(i % 3) for i, k in enumerate(keys)}  # 0, 1, 2, 0, ...: the "x.2" layers win, then "x.1"
    ranks = adapters.block_ranks(scores, 2, 6, 2)
    high = {k for k, r in ranks.items() if r == 6}
    assert len(high) == 2 and all(scores[k] >= 1 for k in high)

    peft_model = adapters.apply_lora(model, rank=2, block_rank=ranks)
    layers = adapters.lora_layers(peft_model)
    where = layer_key_of(peft_model)
    # q, k, v and o of every attention site carry an adapter
    n_sites = sum(1 for lay in layer_sites(peft_model) for s in lay.attentions.values() if s.num_heads)
    assert len(layers) == 4 * n_sites
    seen = set()
    for name, layer in layers.items():
        key = where[id(layer)]
        seen.add(key)
        want = ranks[key]
        base = layer.base_layer.weight
        a, b = layer.lora_A[adapters.ADAPTER].weight, layer.lora_B[adapters.ADAPTER].weight
        assert layer.r[adapters.ADAPTER] == want, name
        assert a.shape == (want, base.shape[1]) and b.shape == (base.shape[0], want), name
        assert layer.scaling[adapters.ADAPTER] == pytest.approx(2.0)  # alpha = 2 x rank, whatever the rank
    assert seen == set(keys)


# ---------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------

HEAD_PREFIX = {"bert": "classifier.", "roberta": "classifier.", "llama": "score.", "t5": None}  # T5: lm_head is tied


def expected_trainable(peft_model, family: str, *, norms: bool, head: bool) -> set[str]:
    """Built from module types and the known head names, independently of adapters.set_trainable."""
    top = peft_model.get_base_model()
    want = set()
    for mod_name, mod in top.named_modules():
        kind = type(mod).__name__
        is_lora = mod_name.endswith((".lora_A.default", ".lora_B.default"))
        is_norm = isinstance(mod, nn.LayerNorm) or kind.endswith(("RMSNorm", "LayerNorm"))
        if is_lora or (norms and is_norm):
            want |= {f"{mod_name}.{n}" for n, _ in mod.named_parameters(recurse=False)}
    if head and HEAD_PREFIX[family]:
        want |= {n for n, _ in top.named_parameters() if n.startswith(HEAD_PREFIX[family])}
    return want


@pytest.mark.parametrize("family", ["bert", "roberta", "t5", "llama"])
@pytest.mark.parametrize("norms,head", [(True, True), (False, False)])
def test_trainable_is_exactly_lora_norms_and_head(family, norms, head):
    model = tiny(family, TASK[family])
    peft_model = adapters.apply_lora(model, rank=2, train_norms=norms, train_head=head)
    top = peft_model.get_base_model()
    got = {n for n, p in top.named_parameters() if p.requires_grad}
    assert got == expected_trainable(peft_model, family, norms=norms, head=head)
    assert any("lora_A" in n for n in got) and not any(n.endswith("base_layer.weight") for n in got)
    total, trainable = adapters.count_parameters(peft_model)
    assert trainable == sum(p.numel() for n, p in top.named_parameters() if n in got) < total


# ---------------------------------------------------------------------------------------------------------
# Merging, and LoRA on a physically pruned base
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_merged_equals_unmerged(family):
    model = tiny(family, "classify")
    inputs = tiny_inputs(family)
    base = logits(model, inputs)
    peft_model = adapters.apply_lora(model, rank=4)
    lively_b(peft_model)
    unmerged = logits(peft_model, inputs)
    assert max_diff(unmerged, base) > 1e-2, "the adapters must change the output"
    merged = adapters.merge(peft_model)
    assert not adapters.lora_layers(merged) and not hasattr(merged, "peft_config")
    assert max_diff(logits(merged, inputs), unmerged) <= TOL


@pytest.mark.parametrize("targets", ["ffn-in", "all"])
@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_ffn_targets_add_the_ffn_linears_and_skip_an_emptied_ffn(family, targets):
    model = tiny(family, TASK[family])
    emptied = layer_sites(model)[0].key
    apply_plan(model, PruningPlan(family, neurons={emptied: []}))
    peft_model = adapters.apply_lora(model, rank=2, targets=targets)
    wrapped = {id(m) for m in adapters.lora_layers(peft_model).values()}
    for lay in layer_sites(peft_model):
        ffn = {id(m) for m in lay.ffn.inputs}
        if targets == "all":
            ffn.add(id(lay.ffn.output))
        else:  # ffn-in leaves the output projection alone
            assert id(lay.ffn.output) not in wrapped, lay.key
        attention = {id(s.proj(w)) for s in lay.attentions.values() if s.num_heads for w in "qkvo"}
        assert attention <= wrapped, lay.key
        if lay.key == emptied:
            assert lay.ffn.width == 0 and not ffn & wrapped  # a zero-width adapter would train nothing
        else:
            assert ffn <= wrapped, lay.key
    plain = adapters.apply_lora(tiny(family, TASK[family]), rank=2)
    assert len(adapters.lora_layers(plain)) < len(wrapped)
    with pytest.raises(PrunetuneError, match="LoRA targets"):
        adapters.apply_lora(tiny(family, TASK[family]), rank=2, targets="ffn")


@pytest.mark.parametrize("targets", ["attention", "ffn-in", "all"])
@pytest.mark.parametrize("family", ["bert", "roberta", "t5", "llama"])
def test_lora_on_a_physically_pruned_model(family, targets):
    model = tiny(family, TASK[family])
    inputs = tiny_inputs(family)
    peft_model = adapters.apply_lora(model, rank=3, targets=targets)
    lively_b(peft_model)
    plan = make_plan(family, peft_model, "all")
    with attach(peft_model, masks_for(peft_model, plan)):
        masked = logits(peft_model, inputs)

    first = layer_sites(peft_model)[0].attentions["self"]
    kept = plan.heads[first.key]
    hd = first.head_dim
    rows = torch.tensor([h * hd + j for h in kept for j in range(hd)])
    hidden = torch.tensor(plan.hidden)
    q_a = first.proj("q").lora_A[adapters.ADAPTER].weight.detach().clone()
    q_b = first.proj("q").lora_B[adapters.ADAPTER].weight.detach().clone()
    o_a = first.proj("o").lora_A[adapters.ADAPTER].weight.detach().clone()
    o_b = first.proj("o").lora_B[adapters.ADAPTER].weight.detach().clone()

    apply_plan(peft_model, plan)
    assert max_diff(logits(peft_model, inputs), masked) <= TOL
    # the adapters were sliced on the side the base was: lora_A columns (input), lora_B rows (output)
    q, o = first.proj("q"), first.proj("o")
    assert torch.equal(q.lora_A[adapters.ADAPTER].weight, q_a[:, hidden])
    assert torch.equal(q.lora_B[adapters.ADAPTER].weight, q_b[rows])
    assert torch.equal(o.lora_A[adapters.ADAPTER].weight, o_a[:, rows])
    assert torch.equal(o.lora_B[adapters.ADAPTER].weight, o_b[hidden])
    if targets != "attention":  # FFN adapters: the input projections' B lose the pruned neurons' rows, the
        lay = layer_sites(peft_model)[0]  # output's A their columns
        width = lay.ffn.width
        assert width == len(plan.neurons[lay.key])
        assert all(m.lora_B[adapters.ADAPTER].weight.shape[0] == width for m in lay.ffn.inputs)
        if targets == "all":
            assert lay.ffn.output.lora_A[adapters.ADAPTER].weight.shape[1] == width
    for name, layer in adapters.lora_layers(peft_model).items():
        base = layer.base_layer.weight
        a, b = layer.lora_A[adapters.ADAPTER].weight, layer.lora_B[adapters.ADAPTER].weight
        assert a.shape[1] == base.shape[1] and b.shape[0] == base.shape[0], name
        assert a.requires_grad and b.requires_grad and not base.requires_grad, name
    # and the pruned adapters still merge into the pruned weights
    assert max_diff(logits(adapters.merge(peft_model), inputs), masked) <= TOL


# ---------------------------------------------------------------------------------------------------------
# Rank growth
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_grow_rank_keeps_the_function_and_extends_shapes(family):
    model = tiny(family, "classify")
    inputs = tiny_inputs(family)
    peft_model = adapters.apply_lora(model, rank=2)
    lively_b(peft_model)
    before = logits(peft_model, inputs)
    layers = list(adapters.lora_layers(peft_model).values())
    old = {id(layer): (layer.lora_A[adapters.ADAPTER].weight.detach().clone(),
                       layer.lora_B[adapters.ADAPTER].weight.detach().clone()) for layer in layers}
    log = SliceLog()
    grown = layers[::3]
    for layer in grown:
        assert adapters.grow_rank(layer, 5, log)
    assert not adapters.grow_rank(layers[0], 4) and not adapters.grow_rank(layers[0], 5)  # no shrinking
    assert max_diff(logits(peft_model, inputs), before) <= 1e-5
    for layer in layers:
        a, b = layer.lora_A[adapters.ADAPTER].weight, layer.lora_B[adapters.ADAPTER].weight
        a0, b0 = old[id(layer)]
        r = 5 if layer in grown else 2
        assert adapters.lora_rank(layer) == layer.r[adapters.ADAPTER] == r
        assert a.shape == (r, a0.shape[1]) and b.shape == (b0.shape[0], r)
        assert torch.equal(a[:2], a0) and torch.equal(b[:, :2], b0)
        assert torch.all(b[:, 2:] == 0) and (r == 2 or a[2:].abs().sum() > 0)  # new A rows: random, not zero
        assert a.requires_grad and b.requires_grad
        assert layer.scaling[adapters.ADAPTER] == pytest.approx(2.0)  # the scaling is not rescaled to alpha / r
    ops = [entry[2] for entry in log.lineage.values()]
    assert len(ops) == 2 * len(grown) and sorted(map(tuple, ops)) == sorted(
        [(("grow", 0, 3),)] * len(grown) + [(("grow", 1, 3),)] * len(grown)
    )
    # the grown directions train: a step on B's new columns changes the output
    with torch.no_grad():
        grown[0].lora_B[adapters.ADAPTER].weight[:, 2:] += 0.5
    assert max_diff(logits(peft_model, inputs), before) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Saving and loading an adapter of a pruned base
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_load_adapter_round_trip_on_the_pruned_base(family, tmp_path):
    model = tiny(family, "classify")
    inputs = tiny_inputs(family)
    dense = copy.deepcopy(model)
    apply_plan(model, make_plan(family, model, "heads"))
    other = copy.deepcopy(dense)
    apply_plan(other, make_plan(family, other, "neurons"))
    base = copy.deepcopy(model)

    peft_model = adapters.apply_lora(model, rank=2)
    perturb_trainable(peft_model)  # adapters, norms and the head all moved, as after training
    adapters.grow_rank(next(iter(adapters.lora_layers(peft_model).values())), 4)  # as APT does
    want = logits(peft_model, inputs)
    assert max_diff(want, logits(base, inputs)) > 1e-2

    adapters.save_adapter(peft_model, tmp_path / "adapter")
    loaded = adapters.load_adapter(base, tmp_path / "adapter")
    assert max_diff(logits(loaded, inputs), want) <= 1e-5
    assert max_diff(logits(adapters.merge(loaded), inputs), want) <= TOL

    for wrong in (dense, other):
        with pytest.raises(PrunetuneError, match="other shapes"):
            adapters.load_adapter(wrong, tmp_path / "adapter")


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_an_adapter_refuses_the_model_it_was_merged_into(family, trained, tmp_path):
    """The merged model has the base's shapes, so the shape check let the adapter apply a second time."""
    import transformers

    from prunetune.export import save_compact

    model = tiny(family, "classify")
    apply_plan(model, make_plan(family, model, "heads"))
    base = copy.deepcopy(model)
    peft_model = adapters.apply_lora(model, rank=2)
    if trained:  # an untrained adapter (B = 0) merges to identical weights: only the merge record tells
        perturb_trainable(peft_model)
    run = tmp_path / "run"
    adapters.save_adapter(peft_model, run / "adapter", base_model="/models/dense")
    merged = adapters.merge(peft_model)
    save_compact(merged, run / "model")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model")
    for wrong in (merged, reloaded):
        with pytest.raises(PrunetuneError, match="already merged into this model") as refused:
            adapters.load_adapter(wrong, run / "adapter")
        # the message says what to do, with paths that exist or were given
        message = str(refused.value)
        assert "/models/dense" in message and "pruned_base" in message and str(run / "model") in message
    adapters.load_adapter(base, run / "adapter")  # the base it was trained on still takes it


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_an_adapter_refuses_a_base_with_other_weights(family, tmp_path):
    model = tiny(family, "classify")
    plan = make_plan(family, model, "heads")
    apply_plan(model, plan)
    peft_model = adapters.apply_lora(model, rank=2)
    adapters.save_adapter(peft_model, tmp_path / "adapter")
    other = tiny(family, "classify", seed=1)  # same shapes, other weights: another checkpoint
    apply_plan(other, plan)
    with pytest.raises(PrunetuneError, match="other weights") as refused:
        adapters.load_adapter(other, tmp_path / "adapter")
    assert "dense model it was trained from" in str(refused.value)
    assert "/model" not in str(refused.value)  # no merged model next to this adapter: none is named


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pruned_base_rebuilds_the_base_from_the_dense_model(family, tmp_path):
    model = tiny(family, "classify")
    inputs = tiny_inputs(family)
    apply_plan(model, make_plan(family, model, "all"))
    peft_model = adapters.apply_lora(model, rank=2)
    perturb_trainable(peft_model)
    want = logits(peft_model, inputs)
    adapters.save_adapter(peft_model, tmp_path / "adapter")
    base = adapters.pruned_base(tiny(family, "classify"), tmp_path / "adapter")
    assert max_diff(logits(adapters.load_adapter(base, tmp_path / "adapter"), inputs), want) <= 1e-5
    with pytest.raises(PrunetuneError, match="dense model"):
        adapters.pruned_base(base, tmp_path / "adapter")
