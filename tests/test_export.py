"""Compact export: reloads with the stock Auto classes, holds no pickles, composes layouts, fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import logits, tiny_inputs
from engine_helpers import make_plan, max_diff, second_plan, tiny

from prunetune.errors import PrunetuneError
from prunetune.export import load_compact, save_compact
from prunetune.families import layer_sites
from prunetune.plan import PruningPlan, layer_param_count, model_info
from prunetune.surgery import apply_plan

AUTO = {
    "bert": "AutoModelForSequenceClassification",
    "roberta": "AutoModelForSequenceClassification",
    "t5": "AutoModelForSeq2SeqLM",
    "llama": "AutoModelForCausalLM",
}


def reload(family: str, path):
    return getattr(transformers, AUTO[family]).from_pretrained(path).eval()


def shapes(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def assert_only_safe_files(path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert all(p.suffix in (".safetensors", ".json") for p in files), sorted(p.name for p in files)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: the pruned model in memory and its export directory (built once for the module)."""
    out = {}
    for family in AUTO:
        model = tiny(family)
        apply_plan(model, make_plan(family, model, "all"))
        path = tmp_path_factory.mktemp("export") / family
        save_compact(model, path)
        out[family] = (model, path)
    return out


def test_export_reloads_with_stock_auto_class(exported, family):
    model, path = exported[family]
    assert_only_safe_files(path)
    again = reload(family, path)
    assert type(again).__name__ == "Prunetune" + type(model).__name__
    assert shapes(again) == shapes(model)
    assert layer_param_count(again) == layer_param_count(model)
    inputs = tiny_inputs(family)
    torch.testing.assert_close(logits(again, inputs), logits(model, inputs), atol=0, rtol=0)
    # the weights were loaded, not re-initialised: every tensor is the saved one
    saved = dict(model.named_parameters())
    assert all(torch.equal(p, saved[n]) for n, p in again.named_parameters())


def test_export_config_keeps_dense_numbers_and_layout(exported, family):
    model, path = exported[family]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"].startswith(f"prunetune_{family}")
    assert cfg["prunetune_base_model_type"] == family
    assert cfg["prunetune_layout"]["heads"] == make_plan(family, model, "heads").heads
    info = model_info(load_compact(path, AUTO[family]))
    assert info == model_info(model)


def test_pruning_a_reloaded_export_again_round_trips(exported, family, tmp_path):
    _, path = exported[family]
    once = reload(family, path)
    apply_plan(once, second_plan(once, family))
    save_compact(once, tmp_path / "twice")
    assert_only_safe_files(tmp_path / "twice")
    twice = reload(family, tmp_path / "twice")
    inputs = tiny_inputs(family)
    assert shapes(twice) == shapes(once)
    torch.testing.assert_close(logits(twice, inputs), logits(once, inputs), atol=0, rtol=0)
    # the written layout is relative to the dense model: one plan from dense to the twice-pruned shapes
    layout = PruningPlan.from_dict(json.loads((tmp_path / "twice" / "config.json").read_text())["prunetune_layout"])
    dense = tiny(family)
    apply_plan(dense, layout)
    assert shapes(dense) == shapes(twice)


def test_t5_export_generates_like_the_pruned_model(exported):
    model, path = exported["t5"]
    again = reload("t5", path)
    inputs = {k: v for k, v in tiny_inputs("t5").items() if k != "decoder_input_ids"}
    kw = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [0, 1]}
    with torch.no_grad():
        assert torch.equal(again.generate(**inputs, **kw), model.generate(**inputs, **kw))


def test_plain_transformers_refuses_the_export_with_a_clear_message(exported):
    _, path = exported["bert"]
    code = f"import transformers\ntransformers.AutoModelForSequenceClassification.from_pretrained({str(path)!r})\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "import prunetune" in proc.stderr
    text = proc.stderr.lower()
    assert "size mismatch" not in text and "shape" not in text and "mismatched" not in text


def test_failing_save_leaves_nothing(monkeypatch, tmp_path):
    model = tiny("bert")

    def boom(self, *args, **kwargs):
        (args[0] / "partial.bin").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compact(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output dir, no temporary sibling
    # the model's own config was put back
    assert model.config.model_type == "bert"


def test_existing_output_dir(tmp_path):
    model = tiny("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrunetuneError, match="not empty"):
        save_compact(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_compact(model, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").exists()
    # an empty existing directory is fine without overwrite
    (tmp_path / "empty").mkdir()
    save_compact(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()


def test_save_refuses_unsupported_models(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
    with pytest.raises(PrunetuneError, match="unsupported"):
        save_compact(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_compact_missing_dir(tmp_path):
    with pytest.raises(PrunetuneError):
        load_compact(tmp_path / "nothing")


def test_dense_export_round_trips(family, tmp_path):
    """An unpruned model exports and reloads too (no layout: the stock shapes)."""
    model = tiny(family)
    save_compact(model, tmp_path / "dense")
    again = reload(family, tmp_path / "dense")
    inputs = tiny_inputs(family)
    assert max_diff(logits(again, inputs), logits(model, inputs)) == 0
    assert [s.num_heads for lay in layer_sites(again) for s in lay.attentions.values()] == [
        s.num_heads for lay in layer_sites(model) for s in lay.attentions.values()
    ]
