"""Importance scorers: a head that contributes nothing scores 0, scores are reproducible and well-formed."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import labelled_batches, tiny

from prunetune.errors import PrunetuneError
from prunetune.families import hidden_size, layer_sites
from prunetune.importance import SCORERS, ActivationStats, Scores, compute, heatmap, rank_correlation

DATA_SCORERS = ["head_grad", "taylor", "fisher", "salience", "salience_kurtosis"]
ZERO_FOR_SILENT_HEAD = ["head_grad", "taylor", "fisher", "salience"]


def silence_head(model, site_index: int = 1, head: int = 1) -> str:
    """Zero the output-projection columns of one head, so it contributes nothing; returns the site key."""
    site = [s for lay in layer_sites(model) for s in lay.attentions.values()][site_index]
    with torch.no_grad():
        site.proj("o").weight[:, head * site.head_dim : (head + 1) * site.head_dim] = 0
    return site.key


def test_registry_lists_every_scorer():
    assert set(SCORERS) == {*DATA_SCORERS, "magnitude"}
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


def test_scoring_leaves_the_model_as_it_was(family):
    model = tiny(family).train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute(model, labelled_batches(family), "salience_kurtosis", hidden=True)
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


def test_salience_kurtosis_adds_an_outlier_term(family):
    model = tiny(family)
    key = silence_head(model)
    scores = compute(model, labelled_batches(family), "salience_kurtosis")
    # the silent head's salience is 0, but its activations still have a kurtosis: APT keeps outliers
    assert scores.heads[key][1] > 0


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
    scores.save(tmp_path / "s.json")
    again = Scores.load(tmp_path / "s.json")
    assert (again.heads, again.neurons, again.hidden, again.meta) == (
        scores.heads, scores.neurons, scores.hidden, scores.meta
    )
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PrunetuneError):
        Scores.load(tmp_path / "bad.json")


def test_heatmap_png(tmp_path):
    a = compute(tiny("t5"), None, "magnitude")  # 7 sites of 4 heads
    b = compute(tiny("llama"), None, "magnitude")
    path = heatmap([a, b], ["t5", "llama"], tmp_path / "heads.png")
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
    want = compute(model, singles, "fisher")
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
        assert [n * n * v for v in mine] == pytest.approx(ref, rel=1e-4, abs=1e-12)
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
