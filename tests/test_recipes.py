"""`prunetune finetune` end to end on a tiny BERT and tiny SST-2 files, for every method; and one real-model run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import max_diff, word_tokenizer

from prunetune import adapters, config, recipes, train
from prunetune.cli import main
from prunetune.errors import PrunetuneError
from prunetune.export import MARKER
from prunetune.plan import PruningPlan
from prunetune.surgery import restore_layout
from prunetune.train import TrainHook

WORDS = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "not", "very", "quite", "good", "bad", "great",
         "awful", "fun", "dull", "long", "short", "and", "but"]
POSITIVE = {"good", "great", "fun"}
METHOD_ARGS = {
    "full": [],
    "lora": [],
    "prune-lora": ["--heads-keep", "0.5", "--samples", "16", "--lr", "3e-3"],  # 6 of 12 heads left: a faster rate
    "lora-prune": ["--keep-params", "0.5", "--samples", "16"],
    "apt": ["--keep-params", "0.5", "--distill", "--eval-every", "2"],  # evaluations give the teacher
}
LORA_METHODS = ("lora", "prune-lora", "lora-prune", "apt")

REAL_BENCH = "lora"  # the one run that pays for the fresh-process inference measurement (~5 s)


def rows(n: int, seed: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in torch.randint(0, len(WORDS), (n, 6), generator=g).tolist():
        words = [WORDS[i] for i in row]
        out.append((" ".join(words), int(bool(POSITIVE & set(words)))))
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny BERT (lively weights: its predictions differ between sentences), its tokenizer and SST-2 files."""
    root = tmp_path_factory.mktemp("recipes")
    tok = word_tokenizer(root, WORDS)
    cfg = tiny_config("bert")
    cfg.vocab_size = len(tok)
    cfg.hidden_size, cfg.intermediate_size = 64, 128  # 4 heads of 16
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    model.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    data = root / "sst2"
    data.mkdir()
    for name, n, seed in (("train.tsv", 64, 0), ("dev.tsv", 32, 1)):
        (data / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows(n, seed)))
    return root


def common(ws: Path) -> list[str]:
    return ["--task", "sst2", "--data", str(ws / "sst2"), "--batch-size", "16", "--max-length", "16"]


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(ws, tmp_path_factory) -> dict[str, tuple[Path, dict, str]]:
    """Every method, once: (out dir, report, stdout)."""
    real = recipes._isolated_inference

    def measured_only_once(task, model_dir, cfg):
        if cfg.method == REAL_BENCH:
            return real(task, model_dir, cfg)
        return {"batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length}

    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipes, "_isolated_inference", measured_only_once)
        for method, extra in METHOD_ARGS.items():
            out = tmp_path_factory.mktemp("run") / method
            rc, stdout, err = run_cli(["finetune", ws / "bert", *common(ws), "--method", method, "--out", out, *extra])
            assert rc == 0, err
            done[method] = (out, json.loads((out / "report.json").read_text()), stdout)
    return done


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_method_writes_a_complete_run(runs, method):
    out, report, stdout = runs[method]
    names = {p.name for p in out.iterdir()}
    assert {"model", "report.json", "report.md", "metrics.jsonl"} <= names
    assert MARKER in names and (out / "model" / MARKER).exists()  # prunetune's own: --overwrite may replace them
    assert not any(n.startswith(".") for n in names - {MARKER})
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    assert ("adapter" in names) == (method in LORA_METHODS)
    if method in LORA_METHODS:
        assert {"adapter_config.json", "prunetune_base.json"} <= {p.name for p in (out / "adapter").iterdir()}
    assert report["method"] == method and report["task"] == "sst2"
    assert set(report["metrics"]) == {"accuracy", "main"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == report["train_steps"] > 0  # one line per optimizer step, over every phase
    assert all(math.isfinite(e["loss"]) for e in lines)
    md = (out / "report.md").read_text()
    assert md.startswith(f"# prunetune {method} on sst2") and f"{report['metrics']['main']:.4f}" in md
    # the settings as they ran: the method's default rate, fp32 on a CPU, nothing the method does not read
    assert report["config"]["lr"] == float(dict(zip(METHOD_ARGS[method], METHOD_ARGS[method][1:], strict=False)).get(
        "--lr", recipes.DEFAULT_LR[method]))
    assert report["precision"] == {"requested": "auto", "used": "fp32", "device": "cpu"}
    assert set(report["config"]) == config.options_for(method)
    record = json.loads((out / "model" / "config.json").read_text())["prunetune_task"]
    assert record == {"name": "sst2", "labels": ["0", "1"], "trained": True,
                      "options": {"text_columns": None, "label_column": None}}
    assert (report["main_metric"], report["maximize"], report["task_kind"]) == ("accuracy", True, "classify")
    first, *where = stdout.strip().splitlines()
    assert first == report["summary"]
    # then where everything went, each path printed existing
    shown = {line.split(":", 1)[0]: line.split(":", 1)[1].split(" (")[0].strip() for line in where}
    assert set(shown) == {"model", "report", "data"} | ({"adapter"} if method in LORA_METHODS else set())
    for paths in shown.values():
        assert all(Path(p.strip()).exists() for p in paths.split(","))
    assert shown["model"] == str(out / "model") == report["outputs"]["model"]
    inference = report["inference"]
    assert inference["dev_examples"] == 32
    if method == REAL_BENCH:
        assert inference["batch32_latency_s"] > 0 and inference["batch32_peak_mem_mb"] > 0
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_total"]


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_evaluate_reproduces_the_report(ws, runs, method):
    out, report, _ = runs[method]
    rc, stdout, err = run_cli(["evaluate", out / "model", "--task", "sst2", "--data", ws / "sst2", "--max-length",
                               "16"])
    assert rc == 0, err
    assert json.loads(stdout) == report["metrics"]


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_exports_predict_both_classes(ws, runs, method):
    """Otherwise 'evaluate reproduces the metric' could just mean 'both predict one class everywhere'."""
    out, report, _ = runs[method]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    dev = [line.split("\t") for line in (ws / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    batch = tok([text for text, _ in dev], padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    assert set(pred.tolist()) == {0, 1}
    right = sum(int(p == int(label)) for p, (_, label) in zip(pred.tolist(), dev, strict=True))
    assert report["metrics"]["accuracy"] == right / len(dev)


def test_prune_lora_trains_little_and_keeps_fewer_heads(runs):
    full, lora, prune_lora = (runs[m][1] for m in ("full", "lora", "prune-lora"))
    assert prune_lora["trainable_params"] < 0.1 * full["trainable_params"]
    assert prune_lora["trainable_params"] < lora["trainable_params"]
    assert full["heads"] == lora["heads"] == "12/12"
    assert prune_lora["heads"] == "6/12"  # --heads-keep 0.5
    assert prune_lora["params_total"] < full["params_total"] == full["params_dense"]
    assert set(prune_lora["block_ranks"].values()) == {8, 4}
    assert prune_lora["plan"]["family"] == "bert"


@pytest.mark.parametrize("method", ["lora-prune", "apt"])
def test_budgeted_methods_meet_keep_params(runs, method):
    _, report, _ = runs[method]
    assert 0.45 <= report["layer_params_kept"] <= 0.5
    assert report["params_total"] < report["params_dense"]
    if method == "apt":
        assert report["timeline"][-1]["layer_params"] == report["layer_params"]
        assert min(map(float, report["schedule"].values())) == 0.5
        assert report["distill"] is True and report["teacher_mem_mb"] > 0


def apply_kwon_scales(model, scales: dict[str, list[float]]) -> None:
    """Scale the kept columns of the output projections of a pruned base as kwon_rescale did (keys: attention
    sites, "ffn:<layer>"; one scale per kept head or neuron, in order)."""
    from prunetune.families import layer_sites

    with torch.no_grad():
        for lay in layer_sites(model):
            for site in lay.attentions.values():
                if site.key in scales:
                    s = torch.tensor(scales[site.key]).repeat_interleave(site.head_dim)
                    site.proj("o").weight.mul_(s[None, :])
            if f"ffn:{lay.key}" in scales:
                lay.ffn.output.weight.mul_(torch.tensor(scales[f"ffn:{lay.key}"])[None, :])


def test_lora_prune_is_kwon_post_training_pruning(runs):
    """lora-prune prunes the tuned model as Kwon et al.: Fisher mask, rearranged (never a higher block Fisher),
    then rescaled; the report says what each step did."""
    _, report, _ = runs["lora-prune"]
    kwon = report["post_training_pruning"]
    assert kwon["scorer"] == "fisher" and kwon["prune_time_s"] > 0
    assert kwon["rearrangement"]["block_fisher_after"] <= kwon["rearrangement"]["block_fisher_before"] * (1 + 1e-12)
    assert set(kwon["rescale"]) == {"rescaled", "stopped_at"}
    assert report["plan"]["meta"]["kwon_rescale"] == kwon["rescale"]
    assert kwon["scales"] and set(kwon["scales"]) == set(kwon["rescale"]["rescaled"])


@pytest.mark.parametrize("method", LORA_METHODS)
def test_adapter_reloads_onto_its_pruned_base(ws, runs, method):
    """DIR/adapter on the base it was trained on (the dense base cut to the run's layout) reproduces the export."""
    out, _, _ = runs[method]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(ws / "bert").eval()
    layout = json.loads((out / "model" / "config.json").read_text()).get("prunetune_layout")
    assert (layout is not None) == (method != "lora")
    if layout is not None:
        restore_layout(base, PruningPlan.from_dict(layout))
    if method == "lora-prune":  # Kwon's rescaling changed base weights: the cut base alone is not its base
        with pytest.raises(PrunetuneError, match="other weights"):
            adapters.load_adapter(base, out / "adapter")
        apply_kwon_scales(base, runs[method][1]["post_training_pruning"]["scales"])
    loaded = adapters.load_adapter(base, out / "adapter").eval()
    export = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    batch = tok(["the film was good", "a dull and long plot but fun"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert max_diff(loaded(**batch).logits, export(**batch).logits) <= 1e-4


def test_the_adapter_refuses_the_run_model_and_says_how_to_get_its_base(ws, runs):
    """DIR/model already contains the adapter: loading it again there applied it twice (logits moved by 0.08)."""
    out, _, _ = runs["prune-lora"]
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    with pytest.raises(PrunetuneError, match="already merged") as refused:
        adapters.load_adapter(merged, out / "adapter")
    assert str(out / "model") in str(refused.value) and str(ws / "bert") in str(refused.value)
    # what the message (and the adapter's README) says to do works
    assert "pruned_base" in (out / "adapter" / "README.md").read_text()
    dense = transformers.AutoModelForSequenceClassification.from_pretrained(ws / "bert").eval()
    loaded = adapters.load_adapter(adapters.pruned_base(dense, out / "adapter"), out / "adapter").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    batch = tok(["the film was good", "a dull and long plot but fun"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert max_diff(loaded(**batch).logits, merged(**batch).logits) <= 1e-4


def test_existing_output_is_refused(ws, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, _, err = run_cli(["finetune", ws / "bert", *common(ws), "--method", "lora", "--out", out])
    assert rc == 2
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("prunetune: error:") and "--overwrite" in lines[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("bad", [["--rank", "0"], ["--keep-params", "-0.5"], ["--heads-keep", "-1"],
                                 ["--keep-params", "1.5"], ["--epochs", "0"], ["--keep-flops", "1.5"],
                                 ["--keep-params", "0.5", "--keep-flops", "0.5"], ["--seq-len", "0"]])
def test_bad_values_are_rejected(ws, tmp_path, bad):
    budgeted = {"--keep-params", "--keep-flops"} & set(bad)
    method = "apt" if budgeted else "prune-lora" if "--heads-keep" in bad else "lora"
    rc, _, err = run_cli(["finetune", ws / "bert", *common(ws), "--method", method, "--out", tmp_path / "out", *bad])
    assert rc == 2
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("prunetune: error:")
    assert bad[0] in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["lora-prune", "apt"])
def test_keep_flops_is_met_at_the_stated_length(ws, tmp_path, monkeypatch, method):
    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    rc, _, err = run_cli(["finetune", ws / "bert", *common(ws), "--method", method, "--keep-flops", "0.5",
                          "--seq-len", "256", "--out", tmp_path / "out"])
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["flops_seq_len"] == 256
    assert 0.4 <= report["layer_flops_kept"] <= 0.5 + 1e-9
    assert report["layer_params_kept"] != pytest.approx(report["layer_flops_kept"], abs=1e-3)


def test_a_run_is_reproducible_from_a_backbone_without_a_head(ws, tmp_path, monkeypatch):
    """The task head and the adapters start random: a seeded run must give the same model and metrics twice."""
    from safetensors.torch import load_file

    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    backbone = tmp_path / "backbone"
    transformers.BertModel.from_pretrained(ws / "bert").save_pretrained(backbone)
    transformers.AutoTokenizer.from_pretrained(ws / "bert").save_pretrained(backbone)
    reports = []
    for name in ("a", "b"):
        rc, _, err = run_cli(["finetune", backbone, *common(ws), "--method", "apt", "--keep-params", "0.5",
                              "--out", tmp_path / name])
        assert rc == 0, err
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
        torch.manual_seed(len(reports))  # whatever the global generator holds before the next run
    assert reports[0]["metrics"] == reports[1]["metrics"] and reports[0]["timeline"] == reports[1]["timeline"]
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_bench(monkeypatch) -> None:
    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})


def test_a_single_data_file_is_split_and_the_run_says_which_rows(ws, tmp_path, monkeypatch):
    """One --data file was trained on and scored whole: the metric was training accuracy."""
    no_bench(monkeypatch)
    train.set_progress(True)  # the tests run quietly; this one checks what a user sees
    try:
        data = ws / "sst2" / "train.tsv"  # 64 rows
        out = tmp_path / "out"
        rc, _, err = run_cli(["finetune", ws / "bert", "--task", "sst2", "--data", data, "--batch-size", "16",
                              "--max-length", "16", "--samples", "16", "--heads-keep", "0.5", "--out", out])
    finally:
        train.set_progress(False)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    split = json.loads((out / "data_split.json").read_text())
    train_rows, dev_rows = split["train"]["rows"], split["dev"]["rows"]
    assert len(dev_rows) == 6 and len(train_rows) == 58  # a tenth held out (rounded), by --seed 42
    assert not set(train_rows) & set(dev_rows) and sorted(train_rows + dev_rows) == list(range(1, 65))
    assert split["held_out"] == {"file": str(data.resolve()), "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                 "dev_fraction": 0.1, "seed": 42, "by": "row"}
    assert report["data"]["dev"]["examples"] == report["inference"]["dev_examples"] == 6
    assert "held out" in (out / "report.md").read_text()
    # every stage shows itself on stderr, the held-out split first
    stages = [line for line in err.splitlines() if line.startswith("prunetune: ")]
    assert stages[0].startswith(f"prunetune: data: train on 58 of 64 rows of {data}; evaluate on 6 of 64 rows")
    assert "no training row is evaluated" in stages[0]
    for shown in ("importance (head_grad): 100%", "train: 100%", "evaluate: ", "prunetune: exporting to",
                  "prunetune: evaluating the exported model", "prunetune: measuring inference in a fresh process"):
        assert shown in err, shown
    # the export knows its rows: evaluating it on its training file scores only the held-out ones
    record = json.loads((out / "model" / "config.json").read_text())["prunetune_task"]
    assert record["held_out"] == split["held_out"] and record["trained"] is True
    copy = tmp_path / "copied.tsv"  # recognised by its bytes, too
    copy.write_bytes(data.read_bytes())
    for path in (data, copy):
        rc, text, err = run_cli(["evaluate", out / "model", "--task", "sst2", "--data", path, "--max-length", "16"])
        assert rc == 0, err
        assert json.loads(text) == report["metrics"]
    rows = data.read_text().splitlines()[1:]
    held = tmp_path / "held.tsv"
    held.write_text("sentence\tlabel\n" + "".join(rows[i - 1] + "\n" for i in dev_rows))
    rc, text, err = run_cli(["evaluate", out / "model", "--task", "sst2", "--data", held, "--max-length", "16"])
    assert rc == 0, err
    assert json.loads(text) == report["metrics"]  # the same rows, given as a file of their own


def test_dev_data_gives_the_dev_rows(ws, tmp_path, monkeypatch):
    no_bench(monkeypatch)
    rc, _, err = run_cli(["finetune", ws / "bert", "--task", "sst2", "--data", ws / "sst2" / "train.tsv",
                          "--dev-data", ws / "sst2" / "dev.tsv", "--method", "lora", "--batch-size", "16",
                          "--max-length", "16", "--out", tmp_path / "out"])
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["data"]["train"]["examples"], report["data"]["dev"]["examples"]) == (64, 32)
    assert "held_out" not in report["data"] and not report["data"]["dev"]["held_out"]
    assert report["data"]["dev"]["source"] == str(ws / "sst2" / "dev.tsv")


def test_finetuning_a_pruned_model_reports_against_the_dense_original(ws, tmp_path, monkeypatch):
    """A lora run on a `prune` output keeps what it was given: not "100% of layer params"."""
    no_bench(monkeypatch)
    rc, stdout, err = run_cli(["prune", ws / "bert", "--heads-keep", "0.5", "--neurons-keep", "0.5",
                               "--out", tmp_path / "pruned"])
    assert rc == 0, err
    pruned = json.loads(stdout)
    rc, _, err = run_cli(["finetune", tmp_path / "pruned", *common(ws), "--method", "lora", "--out",
                          tmp_path / "out"])
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["layer_params_kept"] == pytest.approx(pruned["layer_params_kept"])
    assert report["layer_params_kept"] < 0.6
    assert report["input_layer_params_kept"] == report["layer_params_kept"]
    assert report["params_dense"] == pruned["params_before"]
    assert (report["heads"], report["neurons"]) == ("6/12", "192/384")
    assert report["layer_flops_kept"] < 0.6
    assert f"({report['layer_params_kept']:.0%} of layer params)" in report["summary"]


def test_importance_equals_the_scores_finetune_computes(ws, tmp_path, monkeypatch):
    """`prunetune importance` and prune-lora's own scoring: same seed, same sample, same new head, same scores."""
    no_bench(monkeypatch)
    backbone = tmp_path / "backbone"
    transformers.BertModel.from_pretrained(ws / "bert").save_pretrained(backbone)
    transformers.AutoTokenizer.from_pretrained(ws / "bert").save_pretrained(backbone)
    rc, _, err = run_cli(["finetune", backbone, *common(ws), "--samples", "16", "--train-limit", "16",
                          "--out", tmp_path / "run"])
    assert rc == 0, err
    rc, _, err = run_cli(["importance", backbone, "--task", "sst2", "--data", ws / "sst2", "--samples", "16",
                          "--max-length", "16", "--out", tmp_path / "imp"])
    assert rc == 0, err
    inside = json.loads((tmp_path / "run" / "importance.json").read_text())
    alone = json.loads((tmp_path / "imp" / "importance_sst2.json").read_text())
    assert inside["heads"] == alone["heads"] and inside["neurons"] == alone["neurons"]
    rc, _, err = run_cli(["importance", backbone, "--task", "sst2", "--data", ws / "sst2", "--samples", "16",
                          "--max-length", "16", "--seed", "7", "--out", tmp_path / "other"])
    assert rc == 0, err
    assert json.loads((tmp_path / "other" / "importance_sst2.json").read_text())["heads"] != alone["heads"]


def test_runs_that_empty_a_block_raise_no_library_warnings(ws, tmp_path, monkeypatch):
    """PEFT's deprecated-alias FutureWarning came with every LoRA run, its DeepSpeed/FSDP warning with every save
    of an adapter on an emptied block, torch's zero-element one with every reload of it."""
    import warnings

    no_bench(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_cli(["finetune", ws / "bert", *common(ws), "--method", "apt", "--keep-params", "0.2",
                              "--out", tmp_path / "out"])
        assert rc == 0, err
        layout = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["prunetune_layout"]
        assert [] in layout["heads"].values()  # a block lost every head: its adapter has a zero-width lora_A
        base = transformers.AutoModelForSequenceClassification.from_pretrained(ws / "bert")
        restore_layout(base, PruningPlan.from_dict(layout))
        adapters.load_adapter(base, tmp_path / "out" / "adapter")
    noise = [str(w.message) for w in caught
             if "is_gradient_checkpointing" in str(w.message) or "invalid shape" in str(w.message)
             or "zero-element" in str(w.message)]
    assert noise == []


class _Stop(TrainHook):
    def __init__(self, exc: BaseException):
        self.exc = exc

    def after_step(self, step, model):
        if step == 2:  # mid-run: a step was taken and metrics.jsonl was written to
            raise self.exc
        return None


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
@pytest.mark.parametrize("method", ["lora", "apt"])
def test_an_interrupted_run_leaves_nothing(ws, tmp_path, monkeypatch, exc, method):
    import prunetune.apt

    real_fit = recipes.fit

    def interrupted_fit(*args, **kwargs):
        kwargs["hooks"] = [*kwargs.get("hooks", ()), _Stop(exc)]
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(recipes, "fit", interrupted_fit)
    monkeypatch.setattr(prunetune.apt, "fit", interrupted_fit)
    out = tmp_path / "run" / "out"
    args = ["finetune", ws / "bert", *common(ws), "--method", method, "--out", out, *METHOD_ARGS[method]]
    if isinstance(exc, KeyboardInterrupt):
        rc, _, err = run_cli(args)
        assert rc == 130 and error_lines(err)[-1] == "prunetune: interrupted"
    else:
        with pytest.raises(RuntimeError, match="boom"):
            run_cli(args)
    assert not out.exists()
    assert list((tmp_path / "run").iterdir()) == []  # no temporary sibling either


# ---------------------------------------------------------------------------------------------------------
# The real embedded model on real SST-2 rows
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_on_the_embedded_model_learns_real_sst2_rows():
    from prunetune import models, tasks
    from prunetune.train import TrainConfig, fit

    location = models.resolve(None)
    tokenizer = models.load_tokenizer(location)
    task = tasks.get("sst2")
    model = task.load_model(location)
    rows = task.read("train", None, limit=64, seed=0).dataset  # the bundled sample
    loader = task.train_batches(rows, tokenizer, max_length=64, batch_size=16, seed=0)
    peft_model = adapters.apply_lora(model, rank=8)
    cfg = TrainConfig(epochs=5, lr=2e-3, warmup_ratio=0.1, seed=0)
    result = fit(peft_model, loader, lambda m: {"main": 0.0}, cfg, device=torch.device("cpu"))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 20  # 4 batches of 16, 5 passes
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.03
