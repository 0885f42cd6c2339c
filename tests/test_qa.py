"""Extractive QA: SQuAD v2's exact match and F1 against the official script's definitions, the post-processing of
start/end logits, context windows, reading SQuAD data and the article split, and every method end to end."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import random
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import word_tokenizer
from task_data import WORDS, squad_articles, write_squad

from prunetune import recipes, tasks
from prunetune.cli import main
from prunetune.data import DataSource
from prunetune.errors import PrunetuneError
from prunetune.metrics import exact_match, normalize_answer, squad_v2_metrics, token_f1
from prunetune.tasks.qa import QAOptions, Windows, best_answers, encode_windows, window_spans

# ---- the official SQuAD v2 script (evaluate-v2.0.py), its definitions transcribed as the reference ----------------


def _official_normalize(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_tokens(s):
    return _official_normalize(s).split() if s else []


def _official_f1(a_gold, a_pred):
    gold_toks, pred_toks = _official_tokens(a_gold), _official_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _official_eval(dataset, preds):
    """get_raw_scores, make_qid_to_has_ans, make_eval_dict and merge_eval, without no-answer probabilities."""
    exact, f1, has_ans = {}, {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                has_ans[qid] = bool(qa["answers"])
                gold = [a["text"] for a in qa["answers"] if _official_normalize(a["text"])] or [""]
                exact[qid] = max(int(_official_normalize(a) == _official_normalize(preds[qid])) for a in gold)
                f1[qid] = max(_official_f1(a, preds[qid]) for a in gold)

    def make(qids):
        return {"exact": 100.0 * sum(exact[k] for k in qids) / len(qids),
                "f1": 100.0 * sum(f1[k] for k in qids) / len(qids), "total": len(qids)}

    out = make(list(exact))
    for prefix, want in (("HasAns", True), ("NoAns", False)):
        qids = [k for k, v in has_ans.items() if v == want]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in make(qids).items()})
    return out


# ---- exact match and F1 -------------------------------------------------------------------------------------------


def test_normalisation_and_token_f1_on_hand_cases():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles are whole words only
    assert exact_match("Paris", "paris.") == 1 and exact_match("Paris", "Paris France") == 0
    # gold "the cat sat" -> [cat, sat]; prediction [cat, sat, on, mat]: precision 2/4, recall 2/2
    assert token_f1("the cat sat", "cat sat on mat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # shared tokens counted with repeats
    assert token_f1("cat", "dog") == 0.0


def test_no_answer_questions_are_scored_as_the_official_script_does():
    answers = {"none": [], "article only": ["The"], "two golds": ["Paris", "in Paris, France"]}
    cases = [  # (prediction per question, expected exact and F1 per question)
        ({"none": "", "article only": "", "two golds": "Paris France"}, {"none": (1, 1), "article only": (1, 1),
                                                                         "two golds": (0, 0.8)}),
        # "the" normalises to nothing: for the script it is no answer, right on a question without one
        ({"none": "the", "article only": "a", "two golds": "paris"}, {"none": (1, 1), "article only": (1, 1),
                                                                    "two golds": (1, 1)}),
        ({"none": "London", "article only": "London", "two golds": ""}, {"none": (0, 0), "article only": (0, 0),
                                                                       "two golds": (0, 0)}),
    ]
    for predictions, expected in cases:
        got = squad_v2_metrics(predictions, answers)
        assert got["exact"] == pytest.approx(np.mean([e for e, _ in expected.values()]))
        assert got["f1"] == pytest.approx(np.mean([f for _, f in expected.values()]))
        # a question with an answer list is HasAns even when its only gold text normalises to nothing
        assert (got["total"], got["HasAns_total"], got["NoAns_total"]) == (3, 2, 1)
        assert got["NoAns_exact"] == expected["none"][0]
        assert got["HasAns_f1"] == pytest.approx((expected["article only"][1] + expected["two golds"][1]) / 2)


def test_metrics_equal_the_official_script_on_random_predictions():
    articles = squad_articles(8, seed=3)
    rng = random.Random(0)
    pool = ["", "the", "a", "paris", "Paris.", "red cat", "the red cat", "cat sat", "london", "on the mat", "?"]
    qas = [qa for a in articles for p in a["paragraphs"] for qa in p["qas"]]
    for _ in range(20):
        preds = {qa["id"]: rng.choice(pool + [a["text"] for a in qa["answers"]]) for qa in qas}
        ours = squad_v2_metrics(preds, {qa["id"]: [a["text"] for a in qa["answers"]] for qa in qas})
        official = _official_eval(articles, preds)
        assert set(ours) == set(official)
        for key, value in official.items():
            assert (ours[key] if key.endswith("total") else 100 * ours[key]) == pytest.approx(value)


def test_a_group_without_questions_is_left_out_and_every_question_needs_a_prediction():
    assert "NoAns_f1" not in squad_v2_metrics({"q": "x"}, {"q": ["x"]})
    assert "HasAns_f1" not in squad_v2_metrics({"q": ""}, {"q": []})
    with pytest.raises(ValueError, match="no prediction for 1 question"):
        squad_v2_metrics({}, {"q": ["x"]})


# ---- post-processing start and end logits ------------------------------------------------------------------------

CONTEXT = "alpha beta gamma delta epsilon zeta eta theta"


def _window(context: str = CONTEXT, question_tokens: int = 3) -> list:
    """Offsets of a window: [CLS], question tokens and [SEP] (None), the context's words, a final [SEP]."""
    spans, start = [], 0
    for word in context.split():
        start = context.index(word, start)
        spans.append((start, start + len(word)))
        start += len(word)
    return [None] * (question_tokens + 2) + spans + [None]


def test_the_best_span_is_the_highest_start_plus_end_within_the_context_and_the_length():
    rng = np.random.default_rng(0)
    offsets = [_window(), _window(question_tokens=1)]
    examples = [{"id": "q", "context": CONTEXT}]
    for trial in range(30):
        starts = [rng.normal(size=len(o)) for o in offsets]
        ends = [rng.normal(size=len(o)) for o in offsets]
        # the highest logits of all sit on question tokens, which are not part of the context
        starts[0][2], ends[0][3] = 50.0, 50.0
        windows = Windows(inputs=[{}, {}], example=[0, 0], offsets=offsets, cls=[0, 0])
        longest = 1 + trial % 4
        got = best_answers(examples, windows, _pad(starts), _pad(ends), n_best=20, max_answer_length=longest,
                           null_threshold=1e9)
        best, text = -np.inf, None
        for w, o in enumerate(offsets):  # brute force over every valid span of both windows
            for s in range(len(o)):
                for e in range(s, min(len(o), s + longest)):
                    if o[s] is not None and o[e] is not None and starts[w][s] + ends[w][e] > best:
                        best, text = starts[w][s] + ends[w][e], CONTEXT[o[s][0]:o[e][1]]
        assert got == {"q": text}
        assert len(text.split()) <= longest


def test_window_spans_keep_to_the_n_best_positions():
    offsets = _window()
    start, end = np.zeros(len(offsets)), np.zeros(len(offsets))
    start[[6, 7, 8]], end[[9, 10, 11]] = [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]
    spans = window_spans(start, end, offsets, n_best=2, max_answer_length=30)
    assert {(s, e) for _, s, e in spans} == {(6, 9), (6, 10), (7, 9), (7, 10)}
    assert max(spans)[1:] == (6, 9) and max(spans)[0] == pytest.approx(6.0)


def test_the_null_threshold_and_the_lowest_no_answer_score_over_windows():
    offsets = _window()
    examples = [{"id": "q", "context": CONTEXT}]

    def answer(null_scores: list[float], threshold: float) -> str:
        starts, ends = [], []
        for null in null_scores:
            s, e = np.full(len(offsets), -10.0), np.full(len(offsets), -10.0)
            s[0] = e[0] = null / 2  # [CLS]: the no-answer score is start + end there
            s[6], e[7] = 4.0, 4.0  # the best span, "beta gamma": 8
            starts.append(s)
            ends.append(e)
        windows = Windows([{}] * len(null_scores), [0] * len(null_scores), [offsets] * len(null_scores),
                          [0] * len(null_scores))
        return best_answers(examples, windows, _pad(starts), _pad(ends), n_best=20, max_answer_length=30,
                            null_threshold=threshold)["q"]

    assert answer([10.0], 0.0) == ""  # no answer beats the span by 2
    assert answer([10.0], 1.9) == ""
    assert answer([10.0], 2.5) == "beta gamma"
    assert answer([10.0], -3.0) == ""
    assert answer([7.0], 0.0) == "beta gamma"
    assert answer([7.0], -1.5) == ""  # a negative threshold favours no answer
    assert answer([10.0, 3.0], 0.0) == "beta gamma"  # the lowest no-answer score of the question's windows counts


def test_no_valid_span_means_no_answer():
    offsets = [None] * 5 + [(0, 5)] + [None]
    windows = Windows([{}], [0], [offsets], [0])
    start = np.array([[0.0, 0, 0, 0, 0, -1, 0]])
    end = np.array([[0.0, 0, 0, 0, 0, -1, 0]])
    assert best_answers([{"id": "q", "context": "alpha"}], windows, start, end, n_best=1, max_answer_length=5,
                        null_threshold=1e9) == {"q": ""}  # the top start is [CLS], not in the context


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=-np.inf) for r in rows])


# ---- windows over long contexts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("qa_tok"), WORDS + ["alpha", "beta", "gamma"])


def test_long_contexts_are_windows_sharing_stride_tokens_and_answers_map_back(tokenizer):
    words = [random.Random(i).choice(["the", "cat", "sat", "on", "mat", "dog", "ran"]) for i in range(60)]
    context = " ".join(words[:40] + ["red", "bird"] + words[40:])
    example = {"id": "q", "question": "what bird ?", "context": context,
               "answers": {"text": ["red bird"], "answer_start": [context.index("red bird")]}}
    windows = encode_windows(tokenizer, [example], max_length=24, stride=6)
    assert len(windows.inputs) > 3 and all(len(w["input_ids"]) <= 24 for w in windows.inputs)
    spans = [[o for o in offsets if o is not None] for offsets in windows.offsets]
    for before, after in zip(spans, spans[1:], strict=False):
        assert before[-6:] == after[:6]  # consecutive windows share `stride` context tokens
    covered = {c for span in spans for o in span for c in range(*o)}
    assert covered == {i for i, ch in enumerate(context) if ch != " "}
    positions = windows.answer_positions([example])
    hits = [w for w, (s, e) in enumerate(positions) if s != windows.cls[w]]
    assert hits  # some window holds the whole answer, and its positions point at it
    for w in hits:
        s, e = positions[w]
        assert context[windows.offsets[w][s][0]:windows.offsets[w][e][1]] == "red bird"
    for w in set(range(len(positions))) - set(hits):
        assert positions[w] == (windows.cls[w], windows.cls[w])  # elsewhere: "no answer in this window"


def test_a_question_that_leaves_no_room_for_the_context_is_refused(tokenizer):
    example = {"id": "long one", "question": " ".join(["cat"] * 20), "context": "the dog",
               "answers": {"text": [], "answer_start": []}}
    with pytest.raises(PrunetuneError, match="question 'long one' has 20 tokens.*--max-length 24.*--stride 6"):
        encode_windows(tokenizer, [example], max_length=24, stride=6)


def test_options_are_checked():
    assert QAOptions().window_stride(128) == 32 and QAOptions(stride=50).window_stride(128) == 50
    for bad in ({"stride": 0}, {"n_best": -1}, {"max_answer_length": 1.5}, {"null_threshold": float("nan")}):
        with pytest.raises(PrunetuneError, match="must be"):
            QAOptions(**bad)


# ---- data ---------------------------------------------------------------------------------------------------------


def test_squad_json_and_the_article_split(tmp_path):
    path = write_squad(tmp_path / "squad.json", n_articles=10)
    task = tasks.get("squad_v2")
    train = task.read("train", DataSource(str(path), dev_fraction=0.3), seed=1)
    dev = task.read("dev", DataSource(str(path), dev_fraction=0.3), seed=1)
    assert len(train.rows) + len(dev.rows) == train.total == 40 and not set(train.rows) & set(dev.rows)
    dev_titles = {e["title"] for e in dev.dataset}
    assert len(dev_titles) == 3 and not dev_titles & {e["title"] for e in train.dataset}  # whole articles
    assert dev.held_out and dev.held_out_by == "article"
    assert task.read("dev", DataSource(str(path), dev_fraction=0.3), seed=1).rows == dev.rows  # seeded
    assert {e["title"] for e in task.read("dev", DataSource(str(path), dev_fraction=0.3), seed=2).dataset} != \
        dev_titles
    impossible = [e for e in train.dataset if not e["answers"]["text"]]
    assert impossible and all(e["answers"]["answer_start"] == [] for e in impossible)


def test_rows_with_question_context_and_answers_columns(tmp_path):
    context = "the red cat sat in paris ."
    rows = [
        {"question": "where ?", "context": context, "answers": {"text": ["paris"], "answer_start": [19]}},
        {"question": "who ?", "context": context, "answers": [{"text": "red cat", "answer_start": 4}]},
        {"question": "what ?", "context": context, "answers": {"text": [], "answer_start": []}},
        # a start that is off (as in some SQuAD copies) moves to the nearest occurrence of the text
        {"question": "which ?", "context": context, "answers": {"text": ["cat"], "answer_start": [3]}},
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    got = tasks.get("qa").read("dev", DataSource(dev_path=str(jsonl))).dataset
    assert [e["answers"] for e in got] == [{"text": ["paris"], "answer_start": [19]},
                                           {"text": ["red cat"], "answer_start": [4]},
                                           {"text": [], "answer_start": []}, {"text": ["cat"], "answer_start": [8]}]
    assert [e["id"] for e in got] == ["1", "2", "3", "4"]  # no id column: row numbers
    csv = tmp_path / "qa.csv"  # a CSV cell holds the answers as JSON
    csv.write_text('question,context,answers\nwhere ?,the cat sat in paris .,"{""text"": [""paris""], '
                   '""answer_start"": [15]}"\n')
    assert tasks.get("qa").read("dev", DataSource(dev_path=str(csv))).dataset[0]["answers"]["text"] == ["paris"]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"question": "q", "context": "c"}], "missing column 'answers'"),
    ([{"question": "", "context": "c", "answers": []}], "question 1 .* has an empty question"),
    ([{"question": "q", "context": "the cat", "answers": {"text": ["dog"], "answer_start": [0]}}],
     "the answer 'dog' is not in its context"),
    ([{"question": "q", "context": "c", "answers": {"text": ["c"], "answer_start": []}}], "1 answer texts but 0"),
    ([{"question": "q", "context": "c", "answers": 3}], "column 'answers': expected"),
])
def test_bad_qa_rows_are_one_clear_error(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(PrunetuneError, match=message):
        tasks.get("qa").read("dev", DataSource(dev_path=str(path)))


def test_a_directory_of_squad_files(tmp_path):
    (tmp_path / "train-v2.0.json").write_text(json.dumps({"data": squad_articles(3, seed=0)}))
    (tmp_path / "dev-v2.0.json").write_text(json.dumps({"data": squad_articles(2, seed=1)}))
    task = tasks.get("squad_v2")
    assert len(task.read("train", str(tmp_path)).rows) == 12 and len(task.read("dev", str(tmp_path)).rows) == 8
    assert not task.read("dev", str(tmp_path)).held_out


def test_squad_v2_without_data_offline_asks_for_data(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(PrunetuneError, match="rajpurkar/squad_v2.*pass --data"):
        tasks.get("squad_v2").read("train", None)
    with pytest.raises(PrunetuneError, match="task qa needs --data"):
        tasks.get("qa").read("train", None)


# ---- every method end to end -----------------------------------------------------------------------------------

METHOD_ARGS = {
    "full": [],
    "lora": [],
    "prune-lora": ["--heads-keep", "0.5", "--samples", "8"],
    "lora-prune": ["--keep-params", "0.5", "--samples", "8"],
    "apt": ["--keep-params", "0.5", "--distill", "--eval-every", "2"],  # distillation of start and end logits
}


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa_runs")
    tok = word_tokenizer(root, WORDS)
    cfg = tiny_config("bert")
    cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size = len(tok), 64, 128
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(root / "bert")  # no head: the QA head starts seeded
    tok.save_pretrained(root / "bert")
    write_squad(root / "squad.json", n_articles=8)
    return root


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_trains_exports_and_evaluates_qa(ws, tmp_path, monkeypatch, method):
    if method != "apt":  # one run pays for the fresh-process inference measurement (QA model, QA inputs)
        monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
            "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    out = tmp_path / method
    rc, stdout, err = run_cli(["finetune", ws / "bert", "--task", "squad_v2", "--data", ws / "squad.json",
                               "--dev-fraction", "0.25", "--max-length", "32", "--stride", "8", "--batch-size", "8",
                               "--epochs", "2", "--method", method, "--out", out, *METHOD_ARGS[method]])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["main_metric"] == "f1" and report["task_kind"] == "qa" and report["task_options"]["stride"] == 8
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "main"} <= set(report["metrics"])
    assert report["data"]["held_out"]["by"] == "article"
    assert stdout.startswith(f"{method} on squad_v2: f1 ")
    assert "f1 (main metric, higher is better)" in (out / "report.md").read_text()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]  # the stock class; the layout says the shapes
    assert (config.get("prunetune_layout") is not None) == (method not in ("full", "lora"))
    if method in ("lora-prune", "apt"):
        assert 0.45 <= report["layer_params_kept"] <= 0.5
    if method == "apt":
        assert report["inference"]["batch32_latency_s"] > 0
    # evaluate re-derives the held-out articles and the run's options from the export
    rc, text, err = run_cli(["evaluate", out / "model", "--task", "squad_v2", "--data", ws / "squad.json",
                             "--max-length", "32"])
    assert rc == 0, err
    assert json.loads(text) == pytest.approx(report["metrics"])


def test_importance_and_prune_score_qa(ws, tmp_path):
    rc, _, err = run_cli(["importance", ws / "bert", "--task", "qa", "--data", ws / "squad.json", "--samples", "8",
                          "--max-length", "32", "--out", tmp_path / "imp"])
    assert rc == 0, err
    assert (tmp_path / "imp" / "importance_qa.json").is_file()
    rc, _, err = run_cli(["prune", ws / "bert", "--task", "qa", "--data", ws / "squad.json", "--samples", "8",
                          "--max-length", "32", "--heads-keep", "0.5", "--out", tmp_path / "pruned"])
    assert rc == 0, err
    record = json.loads((tmp_path / "pruned" / "config.json").read_text())["prunetune_task"]
    assert record["name"] == "qa" and record["trained"] is False
