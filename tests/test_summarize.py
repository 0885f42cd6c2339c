"""Summarisation: ROUGE against rouge-score itself, the sentence split, loss on the summary tokens only, left-padded
generation batches, T5 pruning of encoder, decoder self- and cross-attention, the data split with extra training
files, and every method end to end on a tiny T5."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_config
from engine_helpers import word_tokenizer
from rouge_score import rouge_scorer
from task_data import WORDS, summarize_rows, write_summarize

from prunetune import recipes, tasks
from prunetune.cli import main
from prunetune.data import DataSource
from prunetune.errors import PrunetuneError
from prunetune.families import layer_sites
from prunetune.importance import compute
from prunetune.metrics import ROUGE_TYPES, rouge_metrics, split_sentences
from prunetune.plan import Budget, select
from prunetune.surgery import apply_plan
from prunetune.tasks.batching import IGNORE
from prunetune.tasks.summarize import CausalSummarizeTask, Seq2SeqSummarizeTask, SummarizeOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cnn_dailymail"

# ---- ROUGE ---------------------------------------------------------------------------------------------------

# (prediction, reference, each cut into sentences by hand): Lsum reads sentences from line breaks
HAND_CASES = [
    ("The cat sat on the mat. It was happy.", "The cat sat.\nThe cat was very happy on the mat.",
     "The cat sat on the mat.\nIt was happy.", "The cat sat.\nThe cat was very happy on the mat."),
    ("Officials say Mr. Smith runs the U.S. office. 3 people were hurt!",
     "Mr. Smith ran the office.\nThree people were hurt in the blast.",
     "Officials say Mr. Smith runs the U.S. office.\n3 people were hurt!",
     "Mr. Smith ran the office.\nThree people were hurt in the blast."),
    ("Nothing in common here", "Entirely different words.", "Nothing in common here", "Entirely different words."),
]


def test_rouge_equals_rouge_score_on_hand_split_summaries():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    direct = {k: 0.0 for k in ROUGE_TYPES}
    for _, _, prediction, reference in HAND_CASES:
        scores = scorer.score(reference, prediction)
        for k in ROUGE_TYPES:
            direct[k] += 100 * scores[k].fmeasure / len(HAND_CASES)
    got = rouge_metrics([c[0] for c in HAND_CASES], [c[1] for c in HAND_CASES])
    assert got == pytest.approx(direct, abs=1e-9)
    # the cut matters to Lsum only: one line per text would score the first case's Lsum differently
    assert rouge_metrics([HAND_CASES[0][0]], [HAND_CASES[0][1]])["rougeLsum"] != pytest.approx(
        100 * scorer.score(HAND_CASES[0][1].replace("\n", " "), HAND_CASES[0][0])["rougeLsum"].fmeasure)


def test_rouge_invariants_and_a_value_worked_by_hand():
    text = "Police said the man was arrested.\nHe faces two charges."
    assert rouge_metrics([text], [text]) == pytest.approx(dict.fromkeys(ROUGE_TYPES, 100.0))
    assert rouge_metrics(["zebra"], [text]) == pytest.approx(dict.fromkeys(ROUGE_TYPES, 0.0))
    # prediction "the cats sat" against "the cat sat on the mat": unigrams 3/3 precise, 3/6 recalled (stemming
    # makes cats = cat); bigrams 2/2 and 2/5
    got = rouge_metrics(["the cats sat"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert got["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)
    assert got["rougeL"] == pytest.approx(got["rouge1"])  # the whole prediction is a subsequence
    with pytest.raises(ValueError):
        rouge_metrics(["a"], [])


def test_sentence_split_keeps_abbreviations_and_initials_and_every_line():
    text = ('Mr. Smith met J. R. Jones in the U.S. on Monday. "It went well," he said. Did it? Yes!\n'
            "Second highlight here\n\n3 people died. 4 more were hurt.")
    assert split_sentences(text) == [
        "Mr. Smith met J. R. Jones in the U.S. on Monday.", '"It went well," he said.', "Did it?", "Yes!",
        "Second highlight here", "3 people died.", "4 more were hurt."]


# ---- tiny models and data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny T5 and a tiny LLaMA with a word tokenizer, and summarisation rows (CNN/DM's columns)."""
    root = tmp_path_factory.mktemp("summarize")
    tok = word_tokenizer(root, WORDS)
    for family, cls in (("t5", transformers.T5ForConditionalGeneration), ("llama", transformers.LlamaForCausalLM)):
        cfg = tiny_config(family)
        cfg.vocab_size = len(tok)
        if family == "t5":
            cfg.pad_token_id = cfg.decoder_start_token_id = tok.pad_token_id
        torch.manual_seed(0)
        cls(cfg).save_pretrained(root / family)
        tok.save_pretrained(root / family)
    write_summarize(root / "cnn.jsonl", n=16)
    write_summarize(root / "extra.jsonl", n=8, seed=1)
    return root


def _tokenizer(ws: Path):
    return transformers.AutoTokenizer.from_pretrained(ws / "llama")


def test_decoder_only_prompt_tokens_carry_no_loss(ws):
    tok = _tokenizer(ws)
    task = tasks.for_model("summarize", str(ws / "llama"))
    assert isinstance(task, CausalSummarizeTask)
    examples = [{"article": r["article"], "summary": r["highlights"]} for r in summarize_rows(3)]
    examples[1]["summary"] += " and the dog sat"  # rows of different lengths: padding too
    batch = next(iter(task.train_batches(examples, tok, max_length=40, batch_size=3, seed=None)))
    for i, e in enumerate(examples):
        prompt = task.source_ids(tok, e["article"], 40)
        n, width = len(prompt), int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == prompt
        assert (batch["labels"][i, :n] == IGNORE).all() and (batch["labels"][i, width:] == IGNORE).all()
        target = batch["labels"][i, n:width]
        assert (target == batch["input_ids"][i, n:width]).all()  # the summary's own tokens, as labels
        assert tok.decode(target) == tok.decode(tok(e["summary"], add_special_tokens=False)["input_ids"])
    # the model's loss is the cross-entropy of the summary tokens alone
    model = transformers.AutoModelForCausalLM.from_pretrained(ws / "llama").eval()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits[keep], labels[keep]).item(), rel=1e-5)


def test_generation_batches_are_left_padded_prompts_equal_to_the_trained_ones(ws):
    tok = _tokenizer(ws)
    task = tasks.for_model("summarize", str(ws / "llama"))
    examples = [{"article": r["article"], "summary": r["highlights"]} for r in summarize_rows(4)]
    examples[2]["article"] = "the cat ran ."  # a short one: padded
    loader = task.eval_batches(examples, tok, max_length=40, batch_size=64)
    assert len(loader) == 1 and loader.dataset == examples
    batch = next(iter(loader))
    for i, e in enumerate(examples):
        prompt = task.source_ids(tok, e["article"], 40)
        assert len(prompt) <= 40
        assert batch["input_ids"][i, -len(prompt):].tolist() == prompt  # the last prompt token is the last column
        assert batch["attention_mask"][i].tolist() == [0] * (batch["input_ids"].shape[1] - len(prompt)) + [1] * len(
            prompt)
    # the article is what gets cut: the template's end (the response header) always reaches the model
    cut = task.source_ids(tok, " ".join(["cat"] * 200), 40)
    assert len(cut) == 40 and cut[-3:] == task.source_ids(tok, "the cat", 40)[-3:]
    with pytest.raises(PrunetuneError, match="raise --max-length"):
        task.source_ids(tok, "the cat", 8)


def test_beam_search_and_greedy_both_give_scores(ws):
    tok = _tokenizer(ws)
    examples = [{"article": r["article"], "summary": r["highlights"]} for r in summarize_rows(3)]
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ws / "t5").eval()
    for beams in (1, 2):
        task = tasks.for_model("summarize", str(ws / "t5"), {"num_beams": beams, "max_new_tokens": 5})
        assert isinstance(task, Seq2SeqSummarizeTask)
        metrics = task.evaluate(model, task.eval_batches(examples, tok, max_length=32, batch_size=2))
        assert set(metrics) == {*task.metric_names, "main"} and metrics["main"] == metrics["rougeL"]
        assert 0 < metrics["gen_length"] <= 5


def _heads(model) -> dict[str, int]:
    return {site.key: site.num_heads for lay in layer_sites(model) for site in lay.attentions.values()}


def _kind(key: str) -> str:
    """"decoder.1/cross" -> "decoder/cross"."""
    return key.split(".")[0] + "/" + key.split("/")[1]


@pytest.mark.filterwarnings("ignore::prunetune.errors.PruningWarning")
def test_t5_pruning_covers_encoder_and_decoder_self_and_cross_attention(ws):
    tok = _tokenizer(ws)
    task = tasks.for_model("summarize", str(ws / "t5"))
    torch.manual_seed(0)
    model = task.load_model(str(ws / "t5"))
    sample = task.sample_loader(tok, data=DataSource(str(ws / "cnn.jsonl")), samples=8, max_length=32, seed=0)
    scores = compute(model, sample, "head_grad")
    heads = _heads(model)
    assert set(scores.heads) == set(heads)
    assert {_kind(key) for key in heads} == {"encoder/self", "decoder/self", "decoder/cross"}
    plan = select(model, scores, Budget(heads_keep=0.5))
    assert {_kind(key) for key, kept in plan.heads.items() if len(kept) < heads[key]} == {
        "encoder/self", "decoder/self", "decoder/cross"}
    apply_plan(model, plan)
    after = _heads(model)
    assert all(after[k] == len(kept) for k, kept in plan.heads.items())
    metrics = task.evaluate(model, task.eval_batches([{"article": "the cat ran .", "summary": "cat"}], tok,
                                                     max_length=32, batch_size=1))
    assert metrics["gen_length"] > 0  # the pruned model generates


def test_extra_training_files_train_and_are_never_scored(ws, tmp_path):
    task = tasks.get("summarize", {"extra_train": [str(ws / "extra.jsonl")]})
    source = DataSource(str(ws / "cnn.jsonl"), dev_fraction=0.25)
    train, dev = task.read("train", source, seed=0), task.read("dev", source, seed=0)
    extra = [{"article": r["article"], "summary": r["highlights"]} for r in summarize_rows(8, seed=1)]
    assert all(e in train.dataset for e in extra) and not any(e in dev.dataset for e in extra)
    assert len(train.dataset) == 12 + 8 and len(dev.dataset) == 4
    assert not any(e in train.dataset for e in dev.dataset)
    assert train.source == str(ws / "cnn.jsonl") and train.describe()["also"] == [str(ws / "extra.jsonl")]
    assert train.describe()["of"] == 16 + 8 and dev.describe()["of"] == 16
    # a directory: its dev file whole, the extra rows join its train file
    (tmp_path / "d").mkdir()
    write_summarize(tmp_path / "d" / "train.jsonl", n=6)
    write_summarize(tmp_path / "d" / "validation.jsonl", n=5, seed=2)
    assert len(task.read("train", str(tmp_path / "d")).dataset) == 14
    assert len(task.read("dev", str(tmp_path / "d")).dataset) == 5


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared CNN/DailyMail files are not beside the repository")
def test_the_shared_cnn_dailymail_split():
    task = tasks.get("summarize", {"extra_train": [str(SHARED / "validation_rows500-999.jsonl")]})
    train, dev = task.read("train", str(SHARED)), task.read("dev", str(SHARED))
    assert (len(train.dataset), len(dev.dataset)) == (600, 500)
    assert not {e["article"] for e in train.dataset} & {e["article"] for e in dev.dataset}


def test_options_and_rows_are_checked(ws, tmp_path):
    for bad, message in (({"num_beams": 0}, "--num-beams"), ({"template": "jinja"}, "--template"),
                         ({"article_column": " "}, "--article-column"), ({"max_new_tokens": 1.5}, "--max-new-tokens")):
        with pytest.raises(PrunetuneError, match=message):
            SummarizeOptions(**bad)
    with pytest.raises(PrunetuneError, match="missing column 'story'"):
        tasks.get("summarize", {"article_column": "story"}).read("train", str(ws / "cnn.jsonl"))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"article": "x", "highlights": ""}) + "\n")
    with pytest.raises(PrunetuneError, match="row 1 has no text in column 'highlights'"):
        tasks.get("summarize").read("dev", DataSource(None, dev_path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(PrunetuneError, match="--extra-train"):
        tasks.get("summarize", {"extra_train": [str(tmp_path / "none.jsonl")]}).read("train", str(ws / "cnn.jsonl"))


def test_without_data_offline_asks_for_data(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(PrunetuneError, match="abisee/cnn_dailymail.*pass --data"):
        tasks.get("summarize").read("train", None)


# ---- every method end to end on a tiny T5 --------------------------------------------------------------------

METHOD_ARGS = {
    "full": [],
    "lora": ["--num-beams", "2"],
    "prune-lora": ["--heads-keep", "0.5", "--samples", "8"],
    "lora-prune": ["--keep-params", "0.6", "--samples", "8"],
    "apt": ["--keep-params", "0.6"],
    "apt-before": ["--keep-params", "0.6", "--prune-before-training", "--samples", "8"],
}


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.filterwarnings("ignore::prunetune.errors.PruningWarning")
@pytest.mark.parametrize("run", list(METHOD_ARGS))
def test_every_method_trains_exports_and_evaluates_summaries_on_t5(ws, tmp_path, monkeypatch, run):
    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    out = tmp_path / run
    rc, stdout, err = run_cli(["finetune", ws / "t5", "--task", "summarize", "--data", ws / "cnn.jsonl",
                               "--extra-train", ws / "extra.jsonl", "--dev-fraction", "0.25", "--max-length", "32",
                               "--max-target-length", "12", "--max-new-tokens", "6", "--batch-size", "10",
                               "--epochs", "1", "--method", run.split("-before")[0], "--out", out, *METHOD_ARGS[run]])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["main_metric"] == "rougeL" and report["task_kind"] == "summarize_seq2seq"
    assert set(report["metrics"]) == {*ROUGE_TYPES, "gen_length", "main"}
    assert report["data"]["train"]["examples"] == 12 + 8 and report["data"]["dev"]["examples"] == 4
    assert report["data"]["held_out"]["file"] == str((ws / "cnn.jsonl").resolve())  # evaluate finds its dev rows
    assert report["task_options"]["extra_train"] == [str(ws / "extra.jsonl")]
    assert report["inference"]["dev_examples"] == 4 and report["inference"]["ms_per_example"] > 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]
    if run in ("lora-prune", "apt", "apt-before"):
        assert 0.55 <= report["layer_params_kept"] <= 0.6
    # evaluate re-derives the held-out rows and the run's decoding options from the export
    rc, text, err = run_cli(["evaluate", out / "model", "--task", "summarize", "--data", ws / "cnn.jsonl",
                             "--max-length", "32"])
    assert rc == 0, err
    assert json.loads(text) == pytest.approx(report["metrics"])
