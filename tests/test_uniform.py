"""--uniform: one shape for every layer, exported as a stock config that loads without prunetune."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from conftest import tiny_config, tiny_model

from prunetune.errors import PrunetuneError
from prunetune.export import save_compact
from prunetune.families import layer_sites
from prunetune.importance import compute
from prunetune.plan import Budget, PruningPlan, planned_cost, select
from prunetune.surgery import apply_plan

ROUND = 4


def model_of(family: str):
    if family in ("mistral", "qwen2"):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    return tiny_model(family)


def magnitude_plan(model, **budget) -> PruningPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select(model, compute(model, None, "magnitude"), Budget(**budget), normalize="per_kind")


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
@pytest.mark.parametrize("keep", [0.35, 0.6])
def test_uniform_plan_counts_round_and_budget(family, keep):
    model = model_of(family)
    plan = magnitude_plan(model, keep_params=keep, uniform=True, round_to=ROUND)
    layers = layer_sites(model)
    sites = [s for lay in layers for s in lay.attentions.values()]
    heads = {len(plan.heads[s.key]) for s in sites}
    assert len(heads) == 1 and heads.pop() > 0  # equal counts, never an emptied block
    for s in sites:  # GQA: equal query heads in every kept KV group
        groups = {}
        for h in plan.heads[s.key]:
            groups[h // s.group_size] = groups.get(h // s.group_size, 0) + 1
        assert len(set(groups.values())) == 1
    widths = {len(plan.neurons[lay.key]) for lay in layers}
    assert len(widths) == 1
    width = widths.pop()
    assert width % ROUND == 0 or width == layers[0].ffn.width
    target = plan.meta["target_cost"]
    kept = planned_cost(model, plan)
    assert kept <= target and plan.meta["uniform"]["kept_fraction"] == pytest.approx(kept / plan.meta["reference_cost"])
    if width < layers[0].ffn.width:  # close to the budget: one more step of neurons per layer would not fit
        wider = PruningPlan(plan.family, plan.heads, {lay.key: list(range(width + ROUND)) for lay in layers})
        assert planned_cost(model, wider) > target
    if family == "t5":  # every layer of a stack reads layer 0's position bias: the same heads
        for stack in ("encoder", "decoder"):
            assert len({tuple(plan.heads[s.key]) for s in sites if s.key.startswith(stack) and "self" in s.key}) == 1


def test_uniform_counts_budget_and_refusals():
    model = model_of("llama")
    plan = magnitude_plan(model, heads_keep=0.5, neurons_keep=0.5, uniform=True, round_to=ROUND)
    assert {len(v) for v in plan.heads.values()} == {3} and {len(v) for v in plan.neurons.values()} == {20}
    with pytest.raises(PrunetuneError, match="no uniform shape keeps less than"):
        magnitude_plan(model, keep_params=0.01, uniform=True)
    with pytest.raises(PrunetuneError, match="--uniform keeps every layer"):
        magnitude_plan(model, keep_params=0.5, uniform=True, granularity="layers")


CHILD = """
import json, sys, torch, transformers
path, auto, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = getattr(transformers, auto).from_pretrained(path).eval()
assert "prunetune" not in sys.modules
ids = torch.tensor(inputs["ids"])
with torch.no_grad():
    if auto == "AutoModelForSeq2SeqLM":
        logits = model(input_ids=ids, decoder_input_ids=torch.tensor(inputs["dec"])).logits
        tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    else:
        logits = model(input_ids=ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
print(json.dumps({"logits": logits.tolist(), "tokens": tokens.tolist(), "modules": "prunetune" in sys.modules}))
"""


@pytest.mark.parametrize("family", ["llama", "qwen2", "t5"])
def test_uniform_export_loads_and_generates_without_prunetune(family, tmp_path):
    model = model_of(family)
    with torch.no_grad():  # sharper weights, so that greedy decoding does not just repeat one token
        for p in model.parameters():
            p.mul_(3.0)
    plan = magnitude_plan(model, keep_params=0.5, uniform=True, round_to=ROUND)
    assert plan.meta["uniform"]["stock"] is True
    apply_plan(model, plan)
    save_compact(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family and "prunetune_layout" not in config
    assert "**stock**" in (tmp_path / "out" / "README.md").read_text()
    g = torch.Generator().manual_seed(3)
    inputs = {"ids": torch.randint(3, 100, (2, 6), generator=g).tolist(),
              "dec": torch.randint(3, 100, (2, 4), generator=g).tolist()}
    auto = "AutoModelForSeq2SeqLM" if family == "t5" else "AutoModelForCausalLM"
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), auto, json.dumps(inputs)],
                         capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    child = json.loads(run.stdout.strip().splitlines()[-1])
    ids = torch.tensor(inputs["ids"])
    with torch.no_grad():
        if family == "t5":
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor(inputs["dec"])).logits
            tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        else:
            logits = model(input_ids=ids).logits
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not child["modules"]
    assert torch.allclose(torch.tensor(child["logits"]), logits, atol=1e-5)
    assert child["tokens"] == tokens.tolist()
    assert len(set(tokens[0, ids.shape[1]:].tolist())) > 1 or family == "t5"


def test_non_uniform_and_bert_exports_say_why_they_need_prunetune(tmp_path):
    from prunetune.stock import stock_reason

    llama = model_of("llama")
    apply_plan(llama, PruningPlan("llama", heads={"decoder.0/self": [0, 3]}))
    assert "different numbers of attention heads" in stock_reason(llama)
    bert = model_of("bert")
    plan = magnitude_plan(bert, keep_params=0.5, uniform=True, round_to=ROUND)
    assert "derives the head size" in plan.meta["uniform"]["needs_prunetune_because"]
    apply_plan(bert, plan)
    save_compact(bert, tmp_path / "bert")
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["model_type"].startswith("prunetune_bert")
    card = (tmp_path / "bert" / "README.md").read_text()
    assert "**needs prunetune** because bert derives the head size from hidden_size / num_attention_heads" in card
    # BERT with every head kept and its FFN pruned uniformly is stock
    bert = model_of("bert")
    plan = magnitude_plan(bert, keep_params=0.7, heads_keep=1.0, uniform=True, round_to=ROUND)
    apply_plan(bert, plan)
    save_compact(bert, tmp_path / "bert_ffn")
    assert json.loads((tmp_path / "bert_ffn" / "config.json").read_text())["model_type"] == "bert"


def test_cli_prune_uniform_and_info(tmp_path, capsys):
    from prunetune.cli import main

    model_of("llama").save_pretrained(tmp_path / "llama")
    for name, extra in (("uniform", ["--uniform", "--round-to", "4"]), ("free", [])):
        assert main(["prune", str(tmp_path / "llama"), "--keep-params", "0.5", "--out", str(tmp_path / name),
                     *extra]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "uniform")]) == 0
    assert "loads with: transformers alone (stock)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "free"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["needs_prunetune"] and info["needs_prunetune_because"].startswith("the layers keep different")
    plan = json.loads((tmp_path / "uniform" / "plan.json").read_text())
    assert plan["meta"]["uniform"]["stock"] is True and plan["meta"]["uniform"]["ffn"] % 4 == 0
