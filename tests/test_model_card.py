"""The model card every export writes (README.md): parseable YAML metadata in the Hugging Face layout, the pruned
shapes per layer as the export really has them, the method, task, data and metrics of a fine-tuning run, where it
came from, and how to load it (stock, or after `import prunetune`); `prunetune info` says the same."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import tiny_config
from engine_helpers import make_plan, tiny, word_tokenizer

from prunetune import recipes, tasks
from prunetune.cli import main
from prunetune.config import RunConfig
from prunetune.errors import PrunetuneError
from prunetune.export import card_metadata, needs_prunetune, save_compact
from prunetune.plan import model_info
from prunetune.surgery import apply_plan

WORDS = ["the", "a", "movie", "film", "plot", "was", "is", "not", "very", "good", "bad", "great", "awful", "fun",
         "dull", "long", "and", "but"]
POSITIVE = {"good", "great", "fun"}


def card(path: Path) -> tuple[dict, str]:
    """The front matter (parsed with PyYAML, as the hub does) and the body of DIR/README.md."""
    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict) and meta == card_metadata(path)
    return meta, body


def table_rows(body: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of every markdown table row in the body."""
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def heads_cell(now: dict[str, int], dense: dict[str, int]) -> str:
    """"2/4" for a layer with one attention block, "self 1/4, cross 2/4" for a T5 decoder layer."""
    cells = [f"{now[k]}/{dense[k]}" for k in dense]
    return cells[0] if len(cells) == 1 else ", ".join(f"{k} {c}" for k, c in zip(dense, cells, strict=True))


def assert_layers_listed(body: str, export: torch.nn.Module, dense: dict) -> None:
    """Every layer's row: kept/dense heads per attention block (and KV heads), FFN, parameters, share of dense."""
    rows = table_rows(body)
    info = model_info(export)
    gqa = any(v != lay["heads"][k] for lay in dense["layers"] for k, v in lay["kv_heads"].items())
    for lay, ref in zip(info["layers"], dense["layers"], strict=True):
        kv = [heads_cell(lay["kv_heads"], ref["kv_heads"])] if gqa else []
        want = [heads_cell(lay["heads"], ref["heads"]), *kv, f"{lay['ffn']}/{ref['ffn']}", f"{lay['params']:,}",
                pct(lay["params"], ref["params"])]
        assert rows[lay["layer"]] == want, lay["layer"]
    assert rows["attention heads"] == [f"{info['heads']} / {dense['heads']}", pct(info["heads"], dense["heads"])]
    assert rows["FFN neurons"] == [f"{info['ffn']} / {dense['ffn']}", pct(info["ffn"], dense["ffn"])]
    assert rows["hidden size"] == [f"{info['hidden']} / {dense['hidden']}", pct(info["hidden"], dense["hidden"])]
    assert rows["layer parameters"] == [f"{info['layer_params']:,} / {dense['layer_params']:,}",
                                        pct(info["layer_params"], dense["layer_params"])]
    assert ("KV heads" in rows) == gqa


def assert_loading_says(body: str, stock: bool, auto_class: str) -> None:
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    assert f"model = {auto_class}.from_pretrained(path)" in code
    if stock:
        assert "**stock**" in body and "import prunetune" not in code
    else:
        assert "**needs prunetune**" in body and code.startswith("import prunetune")
        assert code.index("import prunetune") < code.index("from transformers import")


# ---------------------------------------------------------------------------------------------------------
# Exports of each family (save_compact)
# ---------------------------------------------------------------------------------------------------------

AUTO = {"bert": "AutoModelForSequenceClassification", "t5": "AutoModelForSeq2SeqLM", "llama": "AutoModelForCausalLM"}
TAGS = {"bert": "text-classification", "t5": "text2text-generation", "llama": "text-generation"}


@pytest.mark.parametrize("family", list(AUTO))
def test_a_pruned_export_lists_its_shapes_per_layer(family, tmp_path):
    model = tiny(family)
    dense = model_info(model)
    apply_plan(model, make_plan(family, model, "all"))  # layer 1 empty; T5's cross-attention pruned apart
    save_compact(model, tmp_path / "out")
    meta, body = card(tmp_path / "out")
    assert meta["library_name"] == "transformers"
    assert meta["tags"][:2] == ["prunetune", "pruned"] and family in meta["tags"]
    assert meta["pipeline_tag"] == TAGS[family]
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta  # nothing says so
    export = getattr(transformers, AUTO[family]).from_pretrained(tmp_path / "out")
    assert_layers_listed(body, export, dense)
    emptied = {"bert": "encoder.1", "llama": "decoder.1", "t5": "encoder.1, decoder.1/self"}[family]
    assert f"No attention head is left in {emptied}:" in body
    assert_loading_says(body, stock=False, auto_class=AUTO[family])
    assert "No tokenizer was saved" in body and "AutoTokenizer" not in body.split("```python")[1].split("```")[0]


def test_an_unpruned_export_is_stock_and_says_so(tmp_path):
    model = tiny("bert")
    save_compact(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "bert" and "prunetune_layout" not in config
    meta, body = card(tmp_path / "out")
    assert "pruned" not in meta["tags"] and "## What was pruned" not in body
    assert_loading_says(body, stock=True, auto_class="AutoModelForSequenceClassification")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(again) is transformers.BertForSequenceClassification and not needs_prunetune(again.config)


def test_a_dense_export_of_an_earlier_prunetune_is_written_stock(tmp_path):
    """An earlier prunetune wrote unpruned models with its own model type (and no layout): loaded, that is
    prunetune's class; exported again, it is the stock config and architecture."""
    save_compact(tiny("bert"), tmp_path / "dense")
    path = tmp_path / "dense" / "config.json"
    old = json.loads(path.read_text())
    pruned_type = json.loads(_pruned_config(tmp_path))["model_type"]
    old.update(model_type=pruned_type, prunetune_layout=None, prunetune_base_model_type="bert",
               architectures=["PrunetuneBertForSequenceClassification"])
    path.write_text(json.dumps(old))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    assert type(loaded).__name__ == "PrunetuneBertForSequenceClassification"
    save_compact(loaded, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForSequenceClassification"]
    assert_loading_says(card(tmp_path / "again")[1], stock=True, auto_class="AutoModelForSequenceClassification")


def _pruned_config(tmp_path: Path) -> str:
    model = tiny("bert")
    apply_plan(model, make_plan("bert", model, "heads"))
    save_compact(model, tmp_path / "pruned")
    return (tmp_path / "pruned" / "config.json").read_text()


def test_card_fields_are_checked_and_given_ones_win(tmp_path):
    model = tiny("bert")
    with pytest.raises(PrunetuneError, match="unknown model card field.*metric"):
        save_compact(model, tmp_path / "out", card={"metric": {"accuracy": 1.0}})
    assert not (tmp_path / "out").exists()
    save_compact(model, tmp_path / "out", card={"base_model": "org/base", "license": "mit", "task": "rte",
                                                "datasets": ["org/data"], "pipeline_tag": "zero-shot-classification"})
    meta, body = card(tmp_path / "out")
    assert (meta["base_model"], meta["license"], meta["datasets"], meta["pipeline_tag"]) == (
        "org/base", "mit", ["org/data"], "zero-shot-classification")
    assert "| task | `rte` |" in body


def test_base_model_and_license_come_from_the_source(tmp_path):
    """A checkpoint in the hub's cache is its hub id; its card's license carries over; an export pruned again
    keeps naming the original base model, not the intermediate export."""
    src = tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / "0123abcd"
    tiny("bert").save_pretrained(src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/its-own-base\n---\n# tiny\n")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(src)
    apply_plan(model, make_plan("bert", model, "heads"))
    save_compact(model, tmp_path / "once")
    meta, _ = card(tmp_path / "once")
    assert (meta["base_model"], meta["license"]) == ("org/tiny-bert", "apache-2.0")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "once")
    apply_plan(again, make_plan("bert", again, "neurons"))
    save_compact(again, tmp_path / "twice")
    meta, body = card(tmp_path / "twice")
    assert (meta["base_model"], meta["license"]) == ("org/tiny-bert", "apache-2.0")
    assert "[org/tiny-bert](https://huggingface.co/org/tiny-bert)" in body
    # a repository without an owner (models--name in the cache)
    unowned = tmp_path / "hub" / "models--tinybert" / "snapshots" / "4567"
    shutil.copytree(src, unowned)
    save_compact(transformers.AutoModelForSequenceClassification.from_pretrained(unowned), tmp_path / "unowned")
    assert card(tmp_path / "unowned")[0]["base_model"] == "tinybert"
    # a local checkpoint's own base_model is not this model's: only its license is taken
    local = tmp_path / "local"
    shutil.copytree(src, local)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(local)
    save_compact(model, tmp_path / "from_local")
    meta, _ = card(tmp_path / "from_local")
    assert meta.get("license") == "apache-2.0" and "base_model" not in meta


# ---------------------------------------------------------------------------------------------------------
# The commands: prune and finetune exports, and `info`
# ---------------------------------------------------------------------------------------------------------


def rows(n: int, seed: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in torch.randint(0, len(WORDS), (n, 6), generator=g).tolist():
        words = [WORDS[i] for i in row]
        out.append((" ".join(words), int(bool(POSITIVE & set(words)))))
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny BERT with its tokenizer and a card of its own (a license), and SST-2 files."""
    root = tmp_path_factory.mktemp("card")
    tok = word_tokenizer(root, WORDS)
    cfg = tiny_config("bert")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lively weights: the importance scores, and so the plan, are not ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    model.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    (root / "bert" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a tiny BERT\n")
    (root / "sst2").mkdir()
    for name, n, seed in (("train.tsv", 48, 0), ("dev.tsv", 16, 1)):
        (root / "sst2" / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows(n, seed)))
    return root


def run(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


def test_prune_writes_a_card_and_info_says_it_needs_prunetune(ws, tmp_path):
    rc, out = run("prune", ws / "bert", "--keep-params", "0.5", "--out", tmp_path / "out")
    assert rc == 0
    report = json.loads(out)
    meta, body = card(tmp_path / "out")
    assert meta["license"] == "mit" and "pruned" in meta["tags"] and "prune" in meta["tags"]
    assert "datasets" not in meta  # no --task: scored without data
    dense = model_info(transformers.AutoModelForSequenceClassification.from_pretrained(ws / "bert"))
    export = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert_layers_listed(body, export, dense)
    assert table_rows(body)["layer parameters"][1] == f"{100 * report['layer_params_kept']:.1f}%"
    settings = table_rows(body.split("### Settings")[1])
    assert settings["scorer"] == ["magnitude"] and settings["keep_params"] == ["0.5"]
    assert_loading_says(body, stock=False, auto_class="AutoModelForSequenceClassification")
    assert "AutoTokenizer.from_pretrained(path)" in body  # the tokenizer files were copied along

    rc, text = run("info", tmp_path / "out", "--json")
    assert rc == 0 and json.loads(text)["needs_prunetune"] is True
    rc, table = run("info", tmp_path / "out")
    assert table.splitlines()[1].startswith("loads with: `import prunetune` first (needs prunetune because ")
    rc, text = run("info", ws / "bert", "--json")
    assert json.loads(text)["needs_prunetune"] is False
    rc, table = run("info", ws / "bert")
    assert table.splitlines()[1] == "loads with: transformers alone (stock)"


def test_finetune_card_names_the_method_task_data_and_metrics(ws, tmp_path, monkeypatch):
    # the fresh-process inference measurement (5 s) says nothing about the card
    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    cfg = RunConfig.from_flags(dict(task="sst2", out=str(tmp_path / "run"), model=str(ws / "bert"),
                                    data=str(ws / "sst2"), method="prune-lora", heads_keep=0.5, samples=16,
                                    batch_size=16, max_length=16, progress=False))
    report = recipes.finetune(cfg)
    out = tmp_path / "run" / "model"
    meta, body = card(out)
    assert meta["tags"][:2] == ["prunetune", "pruned"] and "prune-lora" in meta["tags"]
    assert meta["pipeline_tag"] == "text-classification" and meta["license"] == "mit"
    assert meta["datasets"] == ["nyu-mll/glue"]  # the task is GLUE's
    facts = table_rows(body.split("## Method and results")[1])
    assert facts["method"] == ["`prune-lora`"] and facts["task"] == ["`sst2`"] and facts["task head"] == ["trained"]
    metrics = table_rows(body.split("### Metrics")[1])
    assert set(report["metrics"]) <= set(metrics)  # every metric of the report, with its value
    assert all(metrics[k] == [f"{v:.4g}"] for k, v in report["metrics"].items())
    data = json.loads((tmp_path / "run" / "data_split.json").read_text())
    assert tasks.data_summary(data) in body
    assert table_rows(body.split("### Settings")[1])["lr"] == [f"{report['config']['lr']:.4g}"]
    dense = model_info(transformers.AutoModelForSequenceClassification.from_pretrained(ws / "bert"))
    export = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert_layers_listed(body, export, dense)
    assert table_rows(body)["layer parameters"][1] == f"{100 * report['layer_params_kept']:.1f}%"
    assert_loading_says(body, stock=False, auto_class="AutoModelForSequenceClassification")
