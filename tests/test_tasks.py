"""The task registry and options, and classification/regression of the user's own data: any label set, read from
the training split, exported as id2label so a stock pipeline names the classes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import word_tokenizer
from task_data import WORDS, write_classify

from prunetune import recipes, tasks
from prunetune.cli import main
from prunetune.data import DataSource
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.tasks.base import Task
from prunetune.tasks.classify import ClassifyOptions, ClassifyTask, RegressionTask
from prunetune.tasks.text2text import Text2TextTask

# ---- registry and options -----------------------------------------------------------------------------------------


def test_every_task_meets_the_contract_statically():
    for name in tasks.names():
        task = tasks.get(name)
        assert isinstance(task, Task) and task.name == name
        assert task.main_metric in task.metric_names and isinstance(task.maximize, bool)
        options = tasks.options_class(name)
        assert dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen
        for f in dataclasses.fields(options):
            assert f.metadata.get("help"), f"{name}: option {f.name} has no help"
        for form in tasks.entry(name).forms:
            assert form.options_class is options and form.families and form.auto_class.startswith("AutoModelFor")


def test_names_are_canonical_whatever_the_spelling():
    assert tasks.canonical("SST-2") == "sst2" and tasks.canonical("squad-v2") == "squad_v2"
    assert tasks.canonical("SQuADv2") == "squad_v2" and tasks.get("STS-B").name == "stsb"
    with pytest.raises(PrunetuneError, match=r"unknown task 'squad'; known tasks: sst2, .*squad_v2, qa"):
        tasks.get("squad")


def test_the_form_follows_the_model_family():
    assert type(tasks.for_family("sst2", "bert")) is ClassifyTask
    assert type(tasks.for_family("sst2", "t5")) is Text2TextTask
    assert type(tasks.for_family("classify", "t5")) is Text2TextTask
    assert type(tasks.for_family("regression", "llama")) is RegressionTask
    with pytest.raises(PrunetuneError, match="task squad_v2 runs on bert, roberta models, not on a llama model"):
        tasks.for_family("squad_v2", "llama")
    with pytest.raises(PrunetuneError, match="not on a bert model"):
        tasks.for_family("instruct", "bert")


def test_options_are_typed_and_checked():
    assert tasks.make_options("classify", {"text_columns": ["a,b"]}).text_columns == ("a", "b")
    assert tasks.make_options("classify", {"text_columns": ("a", " b ")}).text_columns == ("a", "b")
    assert ClassifyOptions(text_columns="review").text_columns == ("review",)
    with pytest.raises(PrunetuneError, match="one or two column names"):
        ClassifyOptions(text_columns=("a", "b", "c"))
    with pytest.raises(PrunetuneError, match=r"task sst2 has no option --stride \(its options: --text-column, "
                                             r"--label-column\)"):
        tasks.get("sst2", {"stride": 3})
    with pytest.raises(PrunetuneError, match="--template must be one of auto, chat, alpaca"):
        tasks.get("instruct", {"template": "llama"})


# ---- the user's own label set -------------------------------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def whole(path: str) -> DataSource:
    """The file as training rows and as dev rows at once (no held-out split)."""
    return DataSource(path, dev_path=path)


def test_string_labels_are_sorted_and_any_number_of_classes(tmp_path):
    path = write(tmp_path / "rows.csv", "text,label\na,pos\nb,neg\nc,neu\nd,pos\ne,zzz\n")
    task = tasks.get("classify")
    rows = task.read("train", whole(path))
    assert task.labels() == ["neg", "neu", "pos", "zzz"] and rows.dataset["label"] == [2, 0, 1, 2, 3]
    assert task.read("dev", whole(path)).dataset.features["label"].names == ["neg", "neu", "pos", "zzz"]


def test_integer_labels_sort_as_numbers_and_json_ints_equal_strings(tmp_path):
    lines = [{"text": "a", "label": 10}, {"text": "b", "label": "2"}, {"text": "c", "label": 1.0},
             {"text": "d", "label": 2}]
    path = write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r) for r in lines))
    task = tasks.get("classify")
    assert task.read("train", whole(path)).dataset["label"] == [2, 1, 0, 1]
    assert task.labels() == ["1", "2", "10"]


def test_the_label_set_comes_from_the_whole_training_split(tmp_path):
    path = write_classify(tmp_path / "rows.csv", n=30)
    task = tasks.get("classify")
    task.read("train", DataSource(str(path), dev_fraction=0.2), limit=2, seed=0)  # two rows, three classes
    assert task.labels() == ["neg", "neu", "pos"]
    other = tasks.get("classify")
    other.prepare(str(path), seed=0)  # before a model loads (importance, prune): no examples built
    assert other.labels() == task.labels()


@pytest.mark.parametrize(("train", "dev", "message"), [
    ("text,label\na,x\nb,y\n", "text,label\nc,z\n", r"row 1, column 'label': label 'z' never appears in the training "
                                                      r"split \(its labels: x, y\)"),
    ("text,label\na,x\n,y\n", None, r"row 2 has an empty text in column 'text'"),
    ("text,label\na,x\nb,\n", None, r"row 2, column 'label': empty label"),
    ("review,label\na,x\nb,y\n", None, r"no text column found \(columns: 'review', 'label'\); name it with "
                                       r"--text-column"),
    ("text,stars\na,x\nb,y\n", None, r"missing column 'label'"),
    ("text,label\na,x\nb,x\n", None, r"a single label \('x'\): nothing to classify"),
])
def test_bad_rows_are_one_clear_error(tmp_path, train, dev, message):
    source = DataSource(write(tmp_path / "train.csv", train),
                        dev_path=write(tmp_path / "dev.csv", dev) if dev else str(tmp_path / "train.csv"))
    task = tasks.get("classify")
    with pytest.raises(PrunetuneError, match=message):
        task.read("train", source)
        task.read("dev", source)


def test_columns_default_to_common_names_and_options_name_others(tmp_path):
    pairs = write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tlabel\na\tb\tyes\nc\td\tno\n")
    assert tasks.get("classify").read("train", whole(pairs)).dataset.column_names == ["text_a", "text_b", "label"]
    own = write(tmp_path / "own.csv", "body,title,verdict\na,b,yes\nc,d,no\n")
    task = tasks.get("classify", {"text_columns": ("title", "body"), "label_column": "verdict"})
    ds = task.read("train", whole(own)).dataset
    assert ds["text_a"] == ["b", "d"] and ds["text_b"] == ["a", "c"] and task.labels() == ["no", "yes"]


def test_regression_reads_numbers(tmp_path):
    path = write(tmp_path / "rows.csv", "text,label\na,1.5\nb,-2\n")
    task = tasks.get("regression")
    assert task.read("train", whole(path)).dataset["label"] == pytest.approx([1.5, -2.0]) and task.labels() == []
    with pytest.raises(PrunetuneError, match="expected a number"):
        task.read("train", whole(write(tmp_path / "bad.csv", "text,label\na,high\n")))


def test_a_directory_of_split_files_any_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20)], "label": ["a", "b"] * 10}),
                   folder / "train.parquet")
    (folder / "validation.jsonl").write_text('{"text": "v", "label": "b"}\n')
    (folder / "test.csv").write_text("text,label\nnever,a\n")  # left alone: score it with evaluate --data
    task = tasks.get("classify")
    assert len(task.read("train", str(folder)).rows) == 20
    assert task.read("dev", str(folder)).dataset["text_a"] == ["v"]
    (folder / "validation.jsonl").unlink()  # no dev file: dev rows are held out of the train file
    train, dev = task.read("train", str(folder), seed=1), task.read("dev", str(folder), seed=1)
    assert train.held_out and dev.held_out and len(dev.rows) == 2 and not set(train.rows) & set(dev.rows)


def test_classification_and_regression_metrics():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 2, 0])
    got = compute_metrics(("accuracy", "macro_f1"), predictions, labels)
    # per class F1: 0 -> 2*0.5*0.5/1 = 0.5, 1 -> 2*0.5*1/1.5 = 2/3, 2 -> 2*1*(2/3)/(5/3) = 0.8
    assert got == pytest.approx({"accuracy": 4 / 6, "macro_f1": (0.5 + 2 / 3 + 0.8) / 3})
    scores = compute_metrics(("pearson", "spearmanr", "mse"), np.array([[1.0], [2.0], [4.0]]),
                             np.array([1.0, 3.0, 4.0]), regression=True)
    assert scores["mse"] == pytest.approx(1 / 3) and scores["spearmanr"] == pytest.approx(1.0)
    assert compute_metrics(("mse",), np.array([np.nan, 1.0]), np.array([0.0, 1.0]), regression=True)["mse"] == \
        float("inf")


# ---- end to end: the label names travel with the export ------------------------------------------------------------


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny BERT fine-tuned (prune-lora, so the export is pruned) on three string labels."""
    root = tmp_path_factory.mktemp("classify")
    tok = word_tokenizer(root, WORDS)
    cfg = tiny_config("bert")
    cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size = len(tok), 64, 128
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    data = write_classify(root / "rows.csv", n=60)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
            "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
        rc, _, err = run_cli(["finetune", root / "bert", "--task", "classify", "--data", data, "--method", "prune-lora",
                              "--heads-keep", "0.5", "--samples", "8", "--max-length", "16", "--batch-size", "8",
                              "--epochs", "3", "--lr", "5e-3", "--out", root / "run"])
    assert rc == 0, err
    return root, data, json.loads((root / "run" / "report.json").read_text())


def test_the_export_names_its_classes(run):
    root, _, report = run
    config = json.loads((root / "run" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert config["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    assert config["prunetune_task"]["labels"] == ["neg", "neu", "pos"] and config.get("prunetune_layout")
    assert set(report["metrics"]) == {"accuracy", "macro_f1", "main"}


def test_a_stock_pipeline_prints_the_label_names(run):
    import prunetune  # noqa: F401  (registers the pruned export's model type)

    root = run[0]
    classify = transformers.pipeline("text-classification", model=str(root / "run" / "model"), device="cpu")
    out = classify(["the red cat sat", "a green dog ran", "the blue bird"], top_k=None)
    assert all({d["label"] for d in row} == {"neg", "neu", "pos"} for row in out)


def test_evaluate_reproduces_the_report_and_refuses_unseen_labels(run, tmp_path):
    root, data, report = run
    rc, text, err = run_cli(["evaluate", root / "run" / "model", "--task", "classify", "--data", data,
                             "--max-length", "16"])
    assert rc == 0, err
    assert json.loads(text) == pytest.approx(report["metrics"])
    other = write(tmp_path / "other.csv", "text,label\nthe red cat,neg\nthe cat,maybe\n")
    rc, _, err = run_cli(["evaluate", root / "run" / "model", "--task", "classify", "--data", other,
                          "--max-length", "16"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1
    assert "row 2, column 'label': label 'maybe' never appears in the training split (its labels: neg, neu, pos)" \
        in lines[0]


def test_a_label_set_that_does_not_match_the_head_is_refused(run, tmp_path):
    root = run[0]
    two = write(tmp_path / "two.csv", "text,label\n" + "".join(f"w{i} cat,{'ab'[i % 2]}\n" for i in range(20)))
    three = write(tmp_path / "three.csv", "text,label\n" + "".join(f"cat,{'xyz'[i % 3]}\n" for i in range(30)))
    for data, message in ((two, "head has 3 labels but task classify needs 2 (a, b)"),
                          (three, "head was made for the labels neg, neu, pos; task classify has x, y, z")):
        out = tmp_path / Path(data).stem
        rc, _, err = run_cli(["finetune", root / "run" / "model", "--task", "classify", "--data", data,
                              "--method", "lora", "--max-length", "16", "--out", out])
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and message in lines[0], err
        assert not out.exists()


def test_a_data_name_that_is_no_path_is_tried_as_a_datasets_name(monkeypatch, tmp_path):
    import datasets

    asked = []

    def offline(name, config=None, split=None):
        asked.append((name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PrunetuneError, match=r"--data imdb: no such file or directory, and no `datasets` data set of "
                                             r"that name could be loaded \(ConnectionError: offline\)"):
        tasks.get("classify").read("dev", "imdb")
    assert asked == [("imdb", "train")]  # its dev rows are held out of its train split, like a file's
    with pytest.raises(PrunetuneError, match="data path does not exist"):
        tasks.get("classify").read("train", str(tmp_path / "typo.csv"))  # a file name is not tried on the hub
