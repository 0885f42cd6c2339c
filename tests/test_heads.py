"""Every head class transformers has for a family: pruned for real (hidden dims included) it computes what the
masked model computes, it round-trips through an export loaded by the stock Auto class, and the data-free
commands (`prune` without --task, `info`) keep whatever head a checkpoint has."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config, tiny_inputs
from engine_helpers import lively, make_plan, masks_for, max_diff, word_tokenizer

from prunetune import models
from prunetune.cli import main
from prunetune.export import save_compact
from prunetune.families import FAMILIES, auto_class_names, layer_sites
from prunetune.masks import attach
from prunetune.plan import PruningPlan
from prunetune.surgery import apply_plan

HEAD_FAMILIES = ["bert", "roberta", "t5", "llama", "mistral", "qwen2"]
# (family, Auto class) for every Auto class the families table lists that builds a class for the family
CASES = [(fam, auto) for fam in HEAD_FAMILIES for auto in FAMILIES[fam].auto_classes
         if auto_class_names(auto).get(fam)]


def test_the_table_covers_every_head_transformers_offers():
    """What the families table lists is all transformers has for these model types (beyond the generic
    pre-training alias; Qwen2's decision-model mapping is for another architecture)."""
    from prunetune.families import AUTO_MAPPINGS

    for fam in HEAD_FAMILIES:
        listed = {auto_class_names(a).get(fam) for a in FAMILIES[fam].auto_classes} - {None}
        offered = {auto_class_names(a).get(fam) for a in AUTO_MAPPINGS} - {None}
        assert listed == offered, fam
    assert len(CASES) >= 30


def head_model(family: str, auto: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = getattr(transformers, auto_class_names(auto)[family])
    return lively(cls(tiny_config(family)), seed).eval()


def head_inputs(family: str, model) -> dict:
    inputs = tiny_inputs(family if family in ("bert", "roberta", "t5") else "llama")
    name = type(model).__name__.removeprefix("Prunetune")
    if name in ("T5EncoderModel", "T5ForTokenClassification"):
        del inputs["decoder_input_ids"]  # encoder only
    if name == "T5ForSequenceClassification":
        # it decodes the input shifted right and classifies at its (one) eos token
        del inputs["decoder_input_ids"]
        inputs["input_ids"][:, -1] = model.config.eos_token_id
    if name.endswith("ForMultipleChoice"):
        inputs = {k: v[:, None].expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
    return inputs


def outputs(model, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def plan_for(family: str, model) -> PruningPlan:
    """make_plan's heads, neurons and hidden dims, for the sites this class has (T5's encoder-only classes)."""
    plan = make_plan(family, model, "all")
    sites = {s.key for lay in layer_sites(model) for s in lay.attentions.values()}
    plan.heads = {k: v for k, v in plan.heads.items() if k in sites}
    return plan


@pytest.mark.parametrize(("family", "auto"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_every_head_masked_equals_pruned(family, auto):
    """Hidden-dim pruning reaches every reader of the hidden stream a head has (a missed or an extra one
    would not even run), and the masked-LM transform's output side and norm."""
    model = head_model(family, auto)
    inputs = head_inputs(family, model)
    plan = plan_for(family, model)
    with attach(model, masks_for(model, plan)):
        masked = outputs(model, inputs)
    dense = outputs(model, inputs)
    apply_plan(model, plan)
    pruned = outputs(model, inputs)
    assert masked.keys() == pruned.keys()
    for k in pruned:
        want = masked[k]
        if want.shape != pruned[k].shape:  # the hidden stream itself: compare the kept dims
            want = want[..., plan.hidden]
        assert max_diff(want, pruned[k]) <= 1e-4, k
    assert any(max_diff(masked[k], dense[k]) > 1e-2 for k in dense), "the plan must change the output"


@pytest.mark.parametrize(("family", "auto"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_every_head_round_trips_through_the_stock_auto_class(family, auto, tmp_path):
    model = head_model(family, auto)
    inputs = head_inputs(family, model)
    apply_plan(model, plan_for(family, model))
    want = outputs(model, inputs)
    save_compact(model, tmp_path / "m")
    again = getattr(transformers, auto).from_pretrained(tmp_path / "m").eval()
    assert type(again).__name__ == "Prunetune" + type(model).__name__
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    got = outputs(again, inputs)
    assert got.keys() == want.keys()
    for k in want:  # (multiple choice differs in the last bits: its batch is laid out differently in memory)
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    # without a task, the declared architecture picks the same class again
    assert type(models.load_native(str(tmp_path / "m"))) is type(again)


def test_a_pruned_llama_classifier_reloads_and_prunes_again(tmp_path):
    """The classifier builds its backbone through AutoModel: the layout must be applied once, by the outer class."""
    model = head_model("llama", "AutoModelForSequenceClassification")
    apply_plan(model, plan_for("llama", model))
    save_compact(model, tmp_path / "once")
    once = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "once").eval()
    heads = {s.key: s.num_heads for lay in layer_sites(once) for s in lay.attentions.values()}
    assert heads == {"decoder.0/self": 4, "decoder.1/self": 0, "decoder.2/self": 2}
    second = PruningPlan.identity(once)
    second.heads["decoder.0/self"] = [0, 2]  # one query head of each of its two KV groups
    apply_plan(once, second)
    save_compact(once, tmp_path / "twice")
    twice = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "twice").eval()
    inputs = head_inputs("llama", twice)
    assert max_diff(outputs(twice, inputs)["logits"], outputs(once, inputs)["logits"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Data-free commands keep the checkpoint's own head, with or without a tokenizer
# ---------------------------------------------------------------------------------------------------------

WORDS = ["the", "a", "movie", "film", "plot", "was", "good", "bad", "fun", "dull"]
# filler words: the tokenizer covers the tiny models' whole vocabulary (101 = 5 special tokens + 96 words), as a
# model's own tokenizer does (a much smaller one is refused as foreign)
WORDS += [f"w{i}" for i in range(96 - len(WORDS))]


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def saved(tmp_path: Path, family: str, auto: str, name: str, *, tokenizer: bool = False, **config) -> Path:
    cfg = tiny_config(family)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = lively(getattr(transformers, auto).from_config(cfg))
    model.save_pretrained(tmp_path / name)
    if tokenizer:
        word_tokenizer(tmp_path, WORDS).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_prune_and_info_keep_a_three_label_head_without_a_tokenizer(tmp_path):
    """An MNLI-style classifier: 3 labels, no tokenizer files; no task asks for another head."""
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    src = saved(tmp_path, "bert", "AutoModelForSequenceClassification", "mnli", num_labels=3, id2label=labels,
                label2id={v: k for k, v in labels.items()})
    rc, text, err = cli("info", src, "--json")
    assert rc == 0, err
    assert json.loads(text)["heads"] == 12
    rc, text, err = cli("prune", src, "--heads-keep", "0.5", "--hidden-keep", "0.75", "--out", tmp_path / "out")
    assert rc == 0, err
    assert json.loads(text)["heads"] == "6/12"
    assert not any("token" in p.name or p.name == "vocab.txt" for p in (tmp_path / "out").iterdir())
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert again.config.id2label == labels and again.classifier.out_features == 3
    in_memory = transformers.AutoModelForSequenceClassification.from_pretrained(src).eval()
    apply_plan(in_memory, PruningPlan.load(tmp_path / "out" / "plan.json"))
    inputs = tiny_inputs("bert")
    assert max_diff(outputs(again, inputs)["logits"], outputs(in_memory, inputs)["logits"]) == 0
    rc, text, err = cli("info", tmp_path / "out", "--json")
    assert rc == 0 and json.loads(text)["heads"] == 6, err


@pytest.mark.parametrize("auto", ["AutoModelForTokenClassification", "AutoModelForQuestionAnswering"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prune_keeps_token_classification_and_qa_heads(tmp_path, family, auto):
    labels = 5 if "Token" in auto else 2  # QA: start and end
    src = saved(tmp_path, family, auto, "src", tokenizer=True, num_labels=labels)
    rc, _, err = cli("prune", src, "--keep-params", "0.5", "--hidden-keep", "0.5", "--out", tmp_path / "out")
    assert rc == 0, err
    tokenizer_files = {p.name for p in src.iterdir() if p.name.startswith(("tokenizer", "vocab", "special"))}
    assert "tokenizer_config.json" in tokenizer_files
    for name in tokenizer_files:  # the tokenizer's files, copied as they were
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    again = getattr(transformers, auto).from_pretrained(tmp_path / "out").eval()
    in_memory = getattr(transformers, auto).from_pretrained(src).eval()
    apply_plan(in_memory, PruningPlan.load(tmp_path / "out" / "plan.json"))
    inputs = head_inputs(family, again)
    got, want = outputs(again, inputs), outputs(in_memory, inputs)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    rc, text, err = cli("info", tmp_path / "out", "--json")
    assert rc == 0 and json.loads(text)["hidden"] == tiny_config(family).hidden_size // 2, err


def test_a_task_still_refuses_a_head_of_another_size(tmp_path):
    src = saved(tmp_path, "bert", "AutoModelForSequenceClassification", "mnli", tokenizer=True, num_labels=3)
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nthe movie was good\t1\nthe plot was dull\t0\n")
    rc, _, err = cli("prune", src, "--task", "sst2", "--data", tmp_path / "d.tsv", "--heads-keep", "0.5",
                     "--samples", "2", "--out", tmp_path / "out")
    assert rc == 2 and "3 labels but task sst2 needs 2" in err and not (tmp_path / "out").exists()


def test_finetune_a_llama_classifier_writes_a_loadable_model(tmp_path, monkeypatch):
    """It trained to the end and then failed to load its own export (the layout was applied twice)."""
    from prunetune import recipes

    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})
    src = saved(tmp_path, "llama", "AutoModelForCausalLM", "llama", tokenizer=True)
    rows = "".join(f"{' '.join(WORDS[(i + j) % len(WORDS)] for j in range(4))}\t{i % 2}\n" for i in range(16))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    rc, _, err = cli("finetune", src, "--task", "sst2", "--data", tmp_path, "--method", "prune-lora",
                     "--heads-keep", "0.5", "--samples", "8", "--batch-size", "8", "--max-length", "8",
                     "--out", tmp_path / "run")
    assert rc == 0, err
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    heads = sum(s.num_heads for lay in layer_sites(model) for s in lay.attentions.values())
    assert 0 < heads <= 9  # of 18, in slices of one query head per KV group
    rc, text, err = cli("info", tmp_path / "run" / "model", "--json")
    assert rc == 0 and json.loads(text)["heads"] == heads, err
