"""Importance scorers: a head that contributes nothing scores 0, scores are reproducible and well-formed,
each scorer computes what its method defines, and the metadata says what the numbers are."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from engine_helpers import labelled_batches, tiny

from prunetune.errors import PrunetuneError
from prunetune.families import hidden_size, layer_sites
from prunetune.importance import (
    FIRST_ORDER,
    FISHER,
    PROXY,
    SCORERS,
    ActivationStats,
    Scores,
    block_importance,
    compute,
    heatmap,
    rank_correlation,
)

DATA_SCORERS = ["head_grad", "taylor", "fisher", "salience", "apt_salience", "salience_kurtosis", "wanda_sp", "flap"]
# every one of them: a silent head's kurtosis term is 0 too (its contributions are all 0, as in APT's code)
ZERO_FOR_SILENT_HEAD = DATA_SCORERS


def silence_head(model, site_index: int = 1, head: int = 1) -> str:
    """Zero the output-projection columns of one head, so it contributes nothing; returns the site key."""
    site = [s for lay in layer_sites(model) for s in lay.attentions.values()][site_index]
    with torch.no_grad():
        site.proj("o").weight[:, head * site.head_dim : (head + 1) * site.head_dim] = 0
    return site.key


def singles(batches: list[dict]) -> list[dict]:
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def test_registry_lists_every_scorer():
    assert set(SCORERS) == {*DATA_SCORERS, "magnitude", "block_influence"}
    for name, fn in SCORERS.items():
        assert fn.info.unit in (FIRST_ORDER, FISHER, PROXY), name
        # loss-change units compare across kinds; of the proxies only APT's salience does (one quantity for
        # every kind, which APT ranks raw)
        assert fn.info.comparable == (fn.info.unit != PROXY or name in ("salience", "apt_salience")), name
    with pytest.raises(PrunetuneError, match="unknown importance scorer"):
        compute(tiny("bert"), None, "nope")


@pytest.mark.parametrize("scorer", ZERO_FOR_SILENT_HEAD)
def test_silent_head_scores_zero(family, scorer):
    model = tiny(family)
    key = silence_head(model)
    scores = compute(model, labelled_batches(family), scorer)
    assert scores.heads[key][1] == 0.0
    others = [v for i, v in enumerate(scores.heads[key]) if i != 1]
    assert all(v > 0 for v in others), others
    assert scores.meta["scorer"] == scorer


@pytest.mark.parametrize("scorer", [*DATA_SCORERS, "magnitude"])
def test_scores_are_well_formed_and_deterministic(family, scorer):
    model = tiny(family)
    batches = labelled_batches(family)
    first = compute(model, batches, scorer, hidden=True)
    second = compute(model, batches, scorer, hidden=True)
    assert (first.heads, first.neurons, first.hidden) == (second.heads, second.neurons, second.hidden)
    layers = layer_sites(model)
    assert {k: len(v) for k, v in first.heads.items()} == {
        s.key: s.num_heads for lay in layers for s in lay.attentions.values()
    }
    assert {k: len(v) for k, v in first.neurons.items()} == {lay.key: lay.ffn.width for lay in layers}
    # hidden scores are there for every scorer (salience used to drop them silently)
    assert first.hidden is not None and len(first.hidden) == hidden_size(model)
    values = [v for d in (first.heads, first.neurons) for vs in d.values() for v in vs] + first.hidden
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert len(set(first.hidden)) > 1


@pytest.mark.parametrize("scorer", ["head_grad", "salience_kurtosis", "flap", "block_influence"])
def test_scoring_leaves_the_model_as_it_was(family, scorer):
    model = tiny(family).train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute(model, labelled_batches(family), scorer, hidden=True)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_head_grad_is_l2_normalised_per_layer(family):
    scores = compute(tiny(family), labelled_batches(family), "head_grad")
    for group in (scores.heads, scores.neurons):
        for key, values in group.items():
            assert math.isclose(math.sqrt(sum(v * v for v in values)), 1.0, rel_tol=1e-5), key


def test_units_normalisation_and_raw_scores():
    model, batches = tiny("bert"), labelled_batches("bert")
    normed = compute(model, batches, "head_grad")  # the paper's default: per layer
    raw = compute(model, batches, "head_grad", normalize="none")
    assert normed.meta["unit"] == raw.meta["unit"] == FIRST_ORDER
    assert (normed.meta["normalize"], normed.meta["comparable"]) == ("layer", False)
    assert (raw.meta["normalize"], raw.meta["comparable"]) == ("none", True)
    back = normed.raw()
    assert (back.heads, back.neurons, back.layers) == (raw.heads, raw.neurons, raw.layers)
    assert back.meta["comparable"] and back.meta["normalize"] == "none"
    assert raw.raw() is raw
    fisher = compute(model, batches, "fisher")
    assert (fisher.meta["unit"], fisher.meta["comparable"], fisher.meta["normalize"]) == (FISHER, True, "none")
    kind = compute(model, batches, "fisher", normalize="kind")
    assert math.isclose(math.sqrt(sum(v * v for vs in kind.heads.values() for v in vs)), 1.0, rel_tol=1e-9)
    assert not kind.meta["comparable"] and kind.raw().heads == fisher.heads
    assert compute(model, batches, "salience").meta["comparable"] is True  # one quantity for every kind
    assert compute(model, batches, "apt_salience", kurtosis=True).meta["comparable"] is False  # + an outlier term
    assert compute(model, batches, "wanda_sp").meta["comparable"] is False
    with pytest.raises(PrunetuneError, match="unknown normalisation"):
        compute(model, batches, "fisher", normalize="per-head")


@pytest.mark.parametrize("family", ["bert", "t5"])  # losses averaged over examples (equal token counts for T5)
def test_head_grad_accumulates_per_example(family):
    """|dL/dmask| is taken per example: equal to the mean over one-example batches, and not the per-batch
    |sum| (which cancels gradients of opposite sign)."""
    model, batches = tiny(family), labelled_batches(family)
    got = compute(model, batches, "head_grad", normalize="none")
    ones = [compute(model, [b], "head_grad", normalize="none") for b in singles(batches)]
    for key, values in got.heads.items():
        want = [sum(o.heads[key][i] for o in ones) / len(ones) for i in range(len(values))]
        assert values == pytest.approx(want, rel=1e-5, abs=1e-15), key
    first = batches[:1]
    per_example = compute(model, first, "head_grad", normalize="none")
    per_batch = compute(model, first, "taylor")  # one batch: |the batch's mask gradient|
    pairs = [(a, b) for key in per_example.heads for a, b in zip(per_example.heads[key], per_batch.heads[key],
                                                                  strict=True)]
    pairs += [(a, b) for key in per_example.neurons for a, b in zip(per_example.neurons[key],
                                                                    per_batch.neurons[key], strict=True)]
    assert all(a >= b * (1 - 1e-9) for a, b in pairs)
    assert sum(a > b * (1 + 1e-3) for a, b in pairs) > len(pairs) // 4  # mixed signs within the batch


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_fisher_is_half_the_mean_squared_example_gradient(family):
    """Per unit and per whole block (off-diagonal terms included): the mean over examples of the one-example
    Fisher, 0.5 * g_e^2 and 0.5 * (sum of the block's g_e)^2."""
    model, batches = tiny(family), labelled_batches(family)
    got = compute(model, batches, "fisher")
    ones = [compute(model, [b], "fisher") for b in singles(batches)]
    for key, values in got.heads.items():
        assert values == pytest.approx([sum(o.heads[key][i] for o in ones) / len(ones)
                                        for i in range(len(values))], rel=1e-4, abs=1e-15)
    assert set(got.layers) == {k for lay in layer_sites(model) for k in
                               [lay.key, f"{lay.key}/ffn", *(s.key for s in lay.attentions.values())]}
    for key, value in got.layers.items():
        assert value == pytest.approx(sum(o.layers[key] for o in ones) / len(ones), rel=1e-4, abs=1e-15)
    # the block Fisher is not the sum of its units' diagonal terms
    site = next(iter(got.heads))
    assert got.layers[site] != pytest.approx(sum(got.heads[site]), rel=1e-3)


def test_taylor_is_at_most_head_grad(family):
    model, batches = tiny(family), labelled_batches(family)
    taylor = compute(model, batches, "taylor")
    absolute = compute(model, batches, "head_grad", normalize="none")
    for key in taylor.heads:
        assert all(t <= a * (1 + 1e-9) for t, a in zip(taylor.heads[key], absolute.heads[key], strict=True))
    for key in taylor.layers:
        assert taylor.layers[key] <= absolute.layers[key] * (1 + 1e-9)


def test_block_importance_sums_raw_head_scores(family):
    model, batches = tiny(family), labelled_batches(family)
    normed = compute(model, batches, "head_grad")
    raw = compute(model, batches, "head_grad", normalize="none")
    want: dict[str, float] = {}
    for key, values in raw.heads.items():
        want[key.split("/")[0]] = want.get(key.split("/")[0], 0.0) + sum(values)
    assert block_importance(normed) == pytest.approx(want, rel=1e-9)
    assert block_importance(raw) == pytest.approx(want, rel=1e-9)


def _hooked_inputs(model, batch: dict) -> dict[str, torch.Tensor]:
    """The output projections' inputs on one batch, with their gradients after the batch's backward."""
    seen, handles = {}, []
    for lay in layer_sites(model):
        sites = [(s.key, s.proj("o")) for s in lay.attentions.values()] + [("ffn:" + lay.key, lay.ffn.output)]
        for key, lin in sites:
            def pre(module, args, key=key):
                args[0].retain_grad()
                seen[key] = args[0]
            handles.append(lin.register_forward_pre_hook(pre))
    model.zero_grad()
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return seen


def _heads_of(model) -> dict[str, int]:
    return {s.key: s.num_heads for lay in layer_sites(model) for s in lay.attentions.values()}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_apt_salience_is_apts_product_of_sums(family):
    """Per batch and channel: (sum over tokens of |a|) x (sum over tokens of |dL/da|); a head sums its channels."""
    model, batches = tiny(family), labelled_batches(family)
    got = compute(model, batches, "apt_salience")
    heads = _heads_of(model)
    want: dict[str, torch.Tensor] = {}
    for batch in batches:
        for key, a in _hooked_inputs(copy.deepcopy(model), batch).items():
            per_channel = a.detach().abs().sum((0, 1)) * a.grad.abs().sum((0, 1))
            value = per_channel.view(heads[key], -1).sum(1) if key in heads else per_channel
            want[key] = want.get(key, 0) + value
    for key, value in want.items():
        mine = got.heads[key] if key in heads else got.neurons[key[4:]]
        assert mine == pytest.approx(value.tolist(), rel=1e-4, abs=1e-12), key


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_kurtosis_term_is_apts(family):
    """salience_kurtosis - apt_salience = per batch sqrt(max(excess kurtosis, 0)) of the entries of
    W * mean input (a head: its columns; a neuron: its column), the kurtosis scipy computes."""
    from scipy.stats import kurtosis

    model, batches = tiny(family), labelled_batches(family)
    site = [s for lay in layer_sites(model) for s in lay.attentions.values()][0]
    with torch.no_grad():  # an outlier weight in head 2's columns
        site.proj("o").weight[3, 2 * site.head_dim] = 25.0
    both = compute(model, batches, "salience_kurtosis")
    plain = compute(model, batches, "apt_salience")
    assert compute(model, batches, "apt_salience", kurtosis=True).heads == both.heads
    heads = _heads_of(model)
    for key, n in heads.items():
        weight = (site.proj("o") if key == site.key else None)
        if weight is None:
            continue
        w = weight.weight.detach().double()
        want = [0.0] * n
        for batch in batches:
            a = _hooked_inputs(copy.deepcopy(model), batch)[key].detach().double()
            contrib = w * a.reshape(-1, a.shape[-1]).mean(0)[None, :]
            for h in range(n):
                k = kurtosis(contrib[:, h * site.head_dim : (h + 1) * site.head_dim].reshape(-1).numpy())
                want[h] += math.sqrt(max(k, 0.0))
        term = [x - y for x, y in zip(both.heads[key], plain.heads[key], strict=True)]
        assert term == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert term[2] == max(term)  # the outlier head
    lay = layer_sites(model)[0]
    w = lay.ffn.output.weight.detach().double()
    want = torch.zeros(lay.ffn.width, dtype=torch.float64)
    for batch in batches:
        a = _hooked_inputs(copy.deepcopy(model), batch)["ffn:" + lay.key].detach().double()
        contrib = w * a.reshape(-1, a.shape[-1]).mean(0)[None, :]
        want += torch.tensor(kurtosis(contrib.numpy(), axis=0)).clamp_min(0).sqrt()
    term = [x - y for x, y in zip(both.neurons[lay.key], plain.neurons[lay.key], strict=True)]
    assert term == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_wanda_sp_and_flap_definitions(family):
    """Over the unpadded tokens: Wanda-sp ||X_j|| x sum|W_:,j|; FLAP Var(X_j) x ||W_:,j||^2 (E[X_j^2] without
    compensation); a head sums its channels."""
    model, batches = tiny(family), labelled_batches(family)
    wanda = compute(model, batches, "wanda_sp")
    flap = compute(model, batches, "flap")
    raw = compute(model, batches, "flap", bias_compensation=False)
    assert flap.meta["options"] == {"hidden": False, "bias_compensation": True}
    heads = _heads_of(model)
    inputs: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        keep = batch["attention_mask"].reshape(-1).bool()
        for key, a in _hooked_inputs(copy.deepcopy(model), batch).items():
            inputs.setdefault(key, []).append(a.detach().double().reshape(-1, a.shape[-1])[keep])
    for lay in layer_sites(model):
        sites = [(s.key, s.proj("o")) for s in lay.attentions.values()] + [("ffn:" + lay.key, lay.ffn.output)]
        for key, lin in sites:
            x = torch.cat(inputs[key])
            w = lin.weight.detach().double()
            metrics = {
                "wanda": x.pow(2).sum(0).sqrt() * w.abs().sum(0),
                "flap": x.var(0, unbiased=False) * w.pow(2).sum(0),
                "raw": x.pow(2).mean(0) * w.pow(2).sum(0),
            }
            for name, scores in (("wanda", wanda), ("flap", flap), ("raw", raw)):
                value = metrics[name]
                if key in heads:
                    value, mine = value.view(heads[key], -1).sum(1), scores.heads[key]
                else:
                    mine = scores.neurons[key[4:]]
                assert mine == pytest.approx(value.tolist(), rel=1e-6), (name, key)


@pytest.mark.parametrize("family", ["llama", "t5"])  # pre-norm: zero output projections make a layer the identity
def test_block_influence_of_an_identity_layer_is_zero(family):
    model = tiny(family)
    lay = layer_sites(model)[1]
    with torch.no_grad():
        for site in lay.attentions.values():
            site.proj("o").weight.zero_()
        lay.ffn.output.weight.zero_()
    scores = compute(model, labelled_batches(family), "block_influence")
    assert set(scores.layers) == {x.key for x in layer_sites(model)}
    assert scores.layers[lay.key] == pytest.approx(0.0, abs=1e-9)
    assert all(1e-4 < v <= 2 for k, v in scores.layers.items() if k != lay.key)
    assert (scores.heads, scores.neurons, scores.hidden) == ({}, {}, None)
    assert scores.meta["unit"] == PROXY


def test_scorer_options_are_checked_and_recorded():
    model, batches = tiny("bert"), labelled_batches("bert")
    with pytest.raises(PrunetuneError, match="has no option kurtosis"):
        compute(model, batches, "head_grad", kurtosis=True)
    scores = compute(model, batches, "apt_salience", hidden=True, kurtosis=True)
    assert scores.meta["options"] == {"hidden": True, "kurtosis": True}
    assert scores.meta["scorer"] == "apt_salience"


def test_data_scorers_need_data(family):
    model = tiny(family)
    for scorer in DATA_SCORERS:
        with pytest.raises(PrunetuneError):
            compute(model, None, scorer)
        with pytest.raises(PrunetuneError, match="empty"):
            compute(model, [], scorer)


def test_magnitude_without_data(family):
    model = tiny(family)
    key = silence_head(model)
    site = next(s for lay in layer_sites(model) for s in lay.attentions.values() if s.key == key)
    with torch.no_grad():  # the head's own q rows too: only the KV rows it shares are left
        site.proj("q").weight[site.head_dim : 2 * site.head_dim] = 0
    lay = layer_sites(model)[0]
    with torch.no_grad():  # neuron 3 of layer 0 owns nothing any more
        for lin in lay.ffn.inputs:
            lin.weight[3] = 0
        lay.ffn.output.weight[:, 3] = 0
    scores = compute(model, None, "magnitude", hidden=True)
    assert scores.neurons[lay.key][3] == 0.0
    assert all(v > 0 for i, v in enumerate(scores.neurons[lay.key]) if i != 3)
    # what is left is the KV head it reads (shared with its group under GQA)
    rows = slice(1 // site.group_size * site.head_dim, (1 // site.group_size + 1) * site.head_dim)
    kv_only = torch.cat([site.proj(w).weight[rows] for w in ("k", "v")])
    assert math.isclose(scores.heads[key][1], kv_only.norm().item(), rel_tol=1e-5)


def test_scores_save_and_load(tmp_path):
    scores = compute(tiny("t5"), None, "magnitude", hidden=True)
    scores.layers = {"decoder.0": 0.25, "decoder.0/self": 0.125}
    scores.save(tmp_path / "s.json")
    again = Scores.load(tmp_path / "s.json")
    assert (again.heads, again.neurons, again.hidden, again.meta, again.layers) == (
        scores.heads, scores.neurons, scores.hidden, scores.meta, scores.layers
    )
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PrunetuneError):
        Scores.load(tmp_path / "bad.json")


def test_heatmap_png(tmp_path):
    a = compute(tiny("t5"), None, "magnitude")  # 7 sites of 4 heads
    b = compute(tiny("llama"), None, "magnitude")
    c = compute(tiny("llama"), labelled_batches("llama"), "block_influence")  # layers only
    path = heatmap([a, b, c], ["t5", "llama", "llama layers"], tmp_path / "heads.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    keys, matrix = a.head_matrix("decoder")
    assert keys == ["decoder.0/self", "decoder.0/cross", "decoder.1/self", "decoder.1/cross"]
    assert all(len(row) == 4 for row in matrix)


def test_rank_correlation(family):
    model = tiny(family)
    scores = compute(model, labelled_batches(family), "head_grad")
    assert rank_correlation(scores, scores) == pytest.approx(1.0)
    flipped = Scores(heads={k: [-v for v in vs] for k, vs in scores.heads.items()})
    assert rank_correlation(scores, flipped) == pytest.approx(-1.0)
    with pytest.raises(PrunetuneError):
        rank_correlation(scores, Scores(heads={"elsewhere/self": [1.0, 2.0]}))


@pytest.mark.parametrize("family", ["bert", "t5"])  # a causal LM's loss averages tokens: no common factor
def test_in_training_fisher_equals_squared_per_example_mask_gradients(family):
    """ActivationStats' fisher signal, read off an ordinary backward over whole batches, equals Kwon's
    Fisher: the squared gradient of a mask on each structure, one example at a time."""
    model = tiny(family)
    batches = labelled_batches(family)
    singles = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    want = compute(model, singles, "fisher")  # 0.5 x mean over the examples of their squared gradients
    model.eval()
    stats = ActivationStats(model, hidden=False, signal="fisher")
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        stats.step()
    stats.remove()
    got = stats.to_scores()
    assert got.heads.keys() == want.heads.keys() and got.neurons.keys() == want.neurons.keys()
    n = len(batches[0]["input_ids"])  # the batch loss is a mean: per-example gradients in it are 1/n of their own
    for mine, ref in [*((got.heads[k], want.heads[k]) for k in want.heads),
                      *((got.neurons[k], want.neurons[k]) for k in want.neurons)]:
        assert [n * n * v for v in mine] == pytest.approx([2 * len(singles) * r for r in ref], rel=1e-4, abs=1e-12)
    with pytest.raises(PrunetuneError, match="unknown activation signal"):
        ActivationStats(model, signal="nope")


@pytest.mark.parametrize("signal", ActivationStats.SIGNALS)
def test_sliced_products_equal_the_whole(signal, monkeypatch):
    """The activation x gradient product is taken a few examples at a time: the slicing changes nothing."""

    def run(chunk_rows: int):
        monkeypatch.setattr(ActivationStats, "CHUNK_ROWS", chunk_rows)
        model = tiny("bert").eval()
        stats = ActivationStats(model, hidden=True, signal=signal)
        for batch in labelled_batches("bert"):
            model(**batch).loss.backward()
            stats.step()
        stats.remove()
        return stats.to_scores()

    whole, sliced = run(10**6), run(1)  # one slice per batch; one example per slice
    for a, b in [*zip(whole.heads.values(), sliced.heads.values(), strict=True),
                 *zip(whole.neurons.values(), sliced.neurons.values(), strict=True), (whole.hidden, sliced.hidden)]:
        assert a == pytest.approx(b, rel=1e-5, abs=1e-12)


def test_measured_block_scores_are_the_loss_with_the_block_masked(family):
    """fisher's blocks="measured": each whole structure's score is the sample's loss with it masked, minus the
    loss with nothing masked, computed here by full forward passes (the scorer replays the layers before it)."""
    from prunetune.masks import Masks, attach

    model, batches = tiny(family), labelled_batches(family)
    scores = compute(model, batches, "fisher", blocks="measured", measure_examples=0)
    estimated = compute(model, batches, "fisher")
    assert scores.heads == estimated.heads and scores.neurons == estimated.neurons  # the units are Fisher's
    assert set(scores.layers) == set(estimated.layers) and scores.meta["measured_examples"] == 6
    assert scores.meta["options"]["blocks"] == "measured"
    model.eval()

    def mean_loss(masks=None) -> float:
        total = 0.0
        for b in batches:
            with torch.no_grad(), attach(model, masks or Masks.ones(model)):
                total += float(model(**b).loss) * b["input_ids"].shape[0]
        return total / 6

    dense = mean_loss()
    for lay in layer_sites(model):
        members = {f"{lay.key}/ffn": ["ffn"], lay.key: ["ffn", *lay.attentions]}
        members.update({site.key: [name] for name, site in lay.attentions.items()})
        for name, parts in members.items():
            masks = Masks.ones(model)
            for part in parts:
                (masks.neurons[lay.key] if part == "ffn" else masks.heads[f"{lay.key}/{part}"]).zero_()
            assert scores.layers[name] == pytest.approx(mean_loss(masks) - dense, abs=1e-5), name
    first = compute(model, batches, "fisher", blocks="measured", measure_examples=3)  # the first batch only
    assert first.meta["measured_examples"] == 3 and first.layers != scores.layers
    with pytest.raises(PrunetuneError, match="blocks must be one of"):
        compute(model, batches, "fisher", blocks="guess")
