"""GLUE as text-to-text on T5: label-word targets, scoring by label-word likelihood, every method end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import word_tokenizer

from prunetune import recipes, tasks
from prunetune.cli import main
from prunetune.tasks.glue import LABEL_WORDS
from prunetune.tasks.text2text import class_scores

WORDS = ["the", "a", "movie", "plot", "was", "is", "not", "very", "good", "bad", "great", "dull", "and", "sst2",
         "sentence", ":", "negative", "positive"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny T5ForConditionalGeneration with a word-level tokenizer that knows the label words, and SST-2 files."""
    root = tmp_path_factory.mktemp("t2t")
    tok = word_tokenizer(root, WORDS)
    cfg = tiny_config("t5")
    cfg.vocab_size = len(tok)
    cfg.pad_token_id = cfg.decoder_start_token_id = tok.pad_token_id
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    g = torch.Generator().manual_seed(3)
    data = root / "sst2"
    data.mkdir()
    for name, n in (("train.tsv", 48), ("dev.tsv", 24)):
        rows = []
        for row in torch.randint(0, 12, (n, 5), generator=g).tolist():
            words = [WORDS[i] for i in row]
            rows.append(f"{' '.join(words)}\t{int(bool({'good', 'great'} & set(words)))}\n")
        (data / name).write_text("sentence\tlabel\n" + "".join(rows))
    return root


def run_cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_batches_carry_the_label_word_as_target(ws):
    tok = transformers.AutoTokenizer.from_pretrained(ws / "t5")
    task = tasks.for_family("sst2", "t5")
    loaders = task.loaders(tok, data=str(ws / "sst2"), train_limit=None, eval_limit=None, samples=8, max_length=16,
                           batch_size=8, seed=0)
    targets = task.targets(tok)
    assert [tok.decode(t, skip_special_tokens=True) for t in targets] == list(LABEL_WORDS["sst2"])
    batch = next(iter(loaders.dev))
    classes = loaders.dev.classes[: len(batch["labels"])]
    for row, c in zip(batch["labels"].tolist(), classes, strict=True):
        assert [t for t in row if t != -100] == targets[c]
    source = tok.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert source.startswith("sst2 sentence :")


def test_class_scores_are_the_label_words_log_likelihood(ws):
    """Each class's score is minus the seq2seq loss of its label word, summed over its tokens."""
    tok = transformers.AutoTokenizer.from_pretrained(ws / "t5")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(ws / "t5").eval()
    task = tasks.for_family("sst2", "t5")
    loaders = task.loaders(tok, data=str(ws / "sst2"), train_limit=None, eval_limit=6, samples=4, max_length=16,
                           batch_size=6, seed=0)
    batch = next(iter(loaders.dev))
    scores = class_scores(model, [batch], task.targets(tok))
    assert scores.shape == (6, 2)
    for c, target in enumerate(task.targets(tok)):
        for i in range(6):
            one = {k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                loss = model(**one, labels=torch.tensor([target])).loss
            assert scores[i, c] == pytest.approx(-float(loss) * len(target), rel=1e-4)
    metrics = task.evaluate(model, loaders.dev)
    want = float(np.mean(class_scores(model, loaders.dev, task.targets(tok)).argmax(1) == loaders.dev.classes))
    assert metrics["accuracy"] == pytest.approx(want)


@pytest.mark.parametrize("method", ["lora", "apt"])
def test_finetune_t5_text_to_text_and_evaluate_the_export(ws, tmp_path, monkeypatch, method):
    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    out = tmp_path / method
    extra = ["--keep-params", "0.5"] if method == "apt" else []
    rc, _, err = run_cli(["finetune", ws / "t5", "--task", "sst2", "--data", ws / "sst2", "--batch-size", "8",
                          "--max-length", "16", "--epochs", "2", "--method", method, "--out", out,
                          *extra])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["T5ForConditionalGeneration"]
    if method == "apt":
        assert 0.45 <= report["layer_params_kept"] <= 0.5
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the label-word loss falls
    rc, text, err = run_cli(["evaluate", out / "model", "--task", "sst2", "--data", ws / "sst2", "--max-length", "16"])
    assert rc == 0, err
    assert json.loads(text)["main"] == pytest.approx(report["metrics"]["main"])


def test_a_regression_task_has_no_text_to_text_form(ws, tmp_path):
    rc, _, err = run_cli(["finetune", ws / "t5", "--task", "stsb", "--data", ws / "sst2", "--method", "lora",
                          "--out", tmp_path / "out"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "not on a t5 model" in lines[0]
    assert not (tmp_path / "out").exists()
