"""Multiple-choice evaluation: the harness's figures equal an independent recomputation, item by item.

A tiny random LLaMA (GQA) with SmolLM2's real tokenizer scores the first items of every benchmark through
lm-evaluation-harness; prunetune.mceval.reference recomputes each item from its row (the prompt in plain Python,
one unpadded forward per choice) and must give the same prompt, log-likelihoods (to 1e-4), acc, acc_norm and
MC2, and the benchmark figures must be the harness's aggregation of those items (MMLU: weighted by subject size).
The same holds for a pruned model exported and reloaded with AutoModelForCausalLM. The prompt fields are
compared with the installed harness's own stock YAMLs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from conftest import tiny_config
from engine_helpers import lively, make_plan

import prunetune  # noqa: F401  (registers the pruned layouts for AutoModelForCausalLM)
from prunetune.cli import main
from prunetune.config import BENCHES
from prunetune.export import save_compact
from prunetune.mceval import BENCHMARKS, evaluate, parse, reference, sources
from prunetune.surgery import apply_plan

lm_eval = pytest.importorskip("lm_eval")
EVAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
LIMIT = 2
MMLU_CHECKED = 4  # subjects recomputed item by item (all 57 are scored and aggregated)


@pytest.fixture(scope="module")
def data() -> Path:
    if not EVAL_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {EVAL_DATA}")
    return EVAL_DATA


@pytest.fixture(scope="module")
def tokenizer():
    from prunetune.models import load_tokenizer, resolve

    try:
        return load_tokenizer(resolve("smollm2"))
    except Exception as e:  # the model package is optional
        pytest.skip(f"SmolLM2's tokenizer is not installed: {e}")


def tiny_lm(tokenizer, seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = tiny_config("llama")
    cfg.vocab_size, cfg.max_position_embeddings = len(tokenizer), 4096  # no truncation: MMLU has 1k-token prompts
    torch.manual_seed(seed)
    return lively(transformers.LlamaForCausalLM(cfg), seed).eval()


def _check_items(model, tokenizer, result: dict, data: Path) -> None:
    for name, r in result["benchmarks"].items():
        bench = BENCHMARKS[name]
        rows = {spec.name: next(spec.splits[spec.config[k]] for k in ("test_split", "validation_split")
                                if k in spec.config) for spec in bench.tasks(data)}
        subjects = sorted({i["task"] for i in r["per_item"]})[:MMLU_CHECKED]
        for item in (i for i in r["per_item"] if i["task"] in subjects):
            ref = reference.score_item(model, tokenizer, name, rows[item["task"]][item["doc_id"]])
            assert item["context"] == ref["context"], (name, item["doc_id"])
            assert item["target"] == ref["target"]
            np.testing.assert_allclose(item["loglikelihoods"], ref["loglikelihoods"], rtol=1e-5, atol=1e-4,
                                       err_msg=f"{item['task']} item {item['doc_id']}")
            if name == "truthfulqa_mc2":
                # the definition, on the harness's own log-likelihoods; and the recomputed one (1e-4 in each ll)
                labels = rows[item["task"]][item["doc_id"]]["mc2_targets"]["labels"]
                own = reference.item_scores(item["loglikelihoods"], item["choices"], 0, labels)["mc2"]
                assert item["acc"] == pytest.approx(own, abs=1e-9)
                assert item["acc"] == pytest.approx(ref["mc2"], abs=1e-3)
            else:
                assert {m: item[m] for m in bench.metrics} == {m: ref[m] for m in bench.metrics}, (name, item)
        for m in bench.metrics:  # the benchmark figure is the mean over items (MMLU: all subjects' items pooled)
            assert r["metrics"][m] == pytest.approx(np.mean([i[m] for i in r["per_item"]]), abs=1e-9)
        assert r["items"] == len(r["per_item"]) == LIMIT * (57 if name == "mmlu" else 1)


def test_harness_items_equal_the_reference(data, tokenizer):
    model = tiny_lm(tokenizer)
    result = evaluate(model, tokenizer, list(BENCHMARKS), data=str(data), limit=LIMIT, batch_size=4, items=True)
    _check_items(model, tokenizer, result, data)
    assert result["average"] == pytest.approx(np.mean([r["score"] for r in result["benchmarks"].values()]))
    assert not model.training


def test_pruned_export_reloaded_scores_as_in_memory(data, tokenizer, tmp_path):
    dense = tiny_lm(tokenizer, seed=1)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, make_plan("llama", dense, "all"))  # heads (a layer emptied), neurons, hidden dims
    save_compact(pruned, tmp_path / "m", tokenizer)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    benches = "arc_easy,truthfulqa_mc2"
    before = evaluate(pruned, tokenizer, benches, data=str(data), limit=LIMIT, items=True)
    after = evaluate(again, tokenizer, benches, data=str(data), limit=LIMIT, items=True)
    _check_items(again, tokenizer, after, data)
    for name in parse(benches):
        for a, b in zip(after["benchmarks"][name]["per_item"], before["benchmarks"][name]["per_item"], strict=True):
            np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=1e-5, atol=1e-4)


def _stock(path: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {node.value}")
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / path).read_text(), Loader=Loader)


def test_prompts_are_the_harness_stock_ones(data):
    """doc_to_text/choice/target, metrics and few-shot settings as the installed harness's own task files."""
    keys = ("doc_to_text", "doc_to_choice", "doc_to_target")
    stock = {"arc_challenge": _stock("arc/arc_easy.yaml"), "arc_easy": _stock("arc/arc_easy.yaml"),
             "hellaswag": _stock("hellaswag/hellaswag.yaml"),
             "truthfulqa_mc1": _stock("truthfulqa/truthfulqa_mc1.yaml"),
             "truthfulqa_mc2": {**_stock("truthfulqa/truthfulqa_mc1.yaml"),
                                **_stock("truthfulqa/truthfulqa_mc2.yaml")},
             "mmlu": _stock("mmlu/default/_default_template_yaml")}
    for name, bench in BENCHMARKS.items():
        spec = bench.tasks(data)[0]
        assert {k: spec.config[k] for k in keys} == {k: stock[name][k] for k in keys}, name
        assert [m["metric"] for m in spec.config["metric_list"]] == [m["metric"] for m in stock[name]["metric_list"]]
        assert spec.config.get("num_fewshot") == stock[name].get("num_fewshot")
    anatomy = next(s for s in BENCHMARKS["mmlu"].tasks(data) if s.name == "mmlu_anatomy")
    assert anatomy.config["description"] == _stock("mmlu/default/mmlu_anatomy.yaml")["description"]
    assert anatomy.config["fewshot_config"] == stock["mmlu"]["fewshot_config"]
    assert tuple(BENCHMARKS) == BENCHES  # the CLI help lists them without importing the harness
    assert BENCHMARKS["truthfulqa_mc2"].tasks(data)[0].functions == {"process_results": "process_results_mc2"}
    assert _stock("truthfulqa/truthfulqa_mc2.yaml")["process_results"] == "!function utils.process_results_mc2"


def test_local_rows_are_the_official_test_sets(data):
    """Row counts of the scored splits (../shared/data/README.md) and labels that index the choices."""
    counts = {"arc_challenge": 1172, "arc_easy": 2376, "hellaswag": 10042, "mmlu": 14042, "truthfulqa_mc1": 817}
    for name, n in counts.items():
        specs = BENCHMARKS[name].tasks(data)
        scored = [r for s in specs for r in s.splits.get("test", s.splits.get("validation", []))]
        assert len(scored) == n, name
    assert len(BENCHMARKS["mmlu"].tasks(data)) == 57
    for r in sources.truthfulqa(data)["validation"]:
        assert r["mc1_targets"]["labels"][0] == 1 and sum(r["mc1_targets"]["labels"]) == 1
    for r in sources.arc_easy(data)["test"]:
        assert r["answerKey"] in r["choices"]["label"] and all(t == t.strip() and t for t in r["choices"]["text"])


def test_eval_command_writes_the_table_and_json(data, tokenizer, tmp_path, capsys):
    model = tiny_lm(tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "res" / "eval.json"
    assert main(["eval", str(tmp_path / "m"), "--bench", "arc_easy,hellaswag", "--limit", "2", "--eval-data",
                 str(data), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert set(got["benchmarks"]) == {"arc_easy", "hellaswag"} and got["limit"] == 2
    assert "arc_easy" in shown and "average" in shown and f"{got['average']:.4f}" in shown
    again = evaluate(model, tokenizer, "arc_easy,hellaswag", data=str(data), limit=2, items=True)
    for name, r in again["benchmarks"].items():  # the reloaded directory scores as the model in memory
        assert got["benchmarks"][name]["metrics"] == pytest.approx(r["metrics"])
        for a, b in zip(got["benchmarks"][name]["per_item"], r["per_item"], strict=True):
            np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=1e-5, atol=1e-4)
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary left beside it


@pytest.mark.parametrize("args,says", [
    (["--bench", "arc_easy,piqa"], "unknown benchmark 'piqa'"),
    (["--bench", "arc_easy", "--limit", "0"], "--limit must be positive"),
    (["--bench", "arc_easy", "--eval-data", "/nonexistent/eval"], "no evaluation data at /nonexistent/eval"),
])
def test_eval_command_refuses_bad_input_in_one_line(tmp_path, capsys, args, says):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "no-model"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_finetune_instruct_scores_the_merged_export_on_the_benchmarks(data, tokenizer, tmp_path, monkeypatch):
    """finetune --eval-bench: the report's figures are those of the exported model as `prunetune eval` loads it."""
    from task_data import write_instruct

    from prunetune import recipes
    from prunetune.config import RunConfig
    from prunetune.errors import PrunetuneError

    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    tiny_lm(tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    records = write_instruct(tmp_path / "records.json")
    flags = dict(task="instruct", out=str(tmp_path / "run"), model=str(tmp_path / "m"), data=str(records),
                 method="lora", batch_size=8, max_length=96, progress=False, eval_bench="arc_easy,truthfulqa_mc2",
                 eval_bench_limit=2, eval_data=str(data))
    report = recipes.finetune(RunConfig.from_flags(flags))
    bench = report["benchmarks"]
    assert set(bench["benchmarks"]) == {"arc_easy", "truthfulqa_mc2"} and bench["limit"] == 2
    export = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    again = evaluate(export, tokenizer, "arc_easy,truthfulqa_mc2", data=str(data), limit=2)
    for name, r in again["benchmarks"].items():
        assert bench["benchmarks"][name]["metrics"] == pytest.approx(r["metrics"], abs=1e-5)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Multiple-choice benchmarks" in md and "| truthfulqa_mc2 | 2 |" in md
    with pytest.raises(PrunetuneError, match="--eval-bench scores a causal LM"):
        RunConfig.from_flags({**flags, "task": "sst2"})
    with pytest.raises(PrunetuneError, match="--eval-bench-limit needs --eval-bench"):
        RunConfig.from_flags({k: v for k, v in flags.items() if k not in ("eval_bench", "eval_data")})
