"""The `prunetune` command, run in-process: importance, prune, info, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import max_diff, word_tokenizer

import prunetune
from prunetune import models
from prunetune.cli import main
from prunetune.plan import PruningPlan
from prunetune.surgery import apply_plan

WORDS = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "not", "very", "quite", "good", "bad", "great",
         "awful", "fun", "dull", "long", "short", "and", "but"]


def write_tsv(path: Path, rows: list[tuple[str, int]], header: str = "sentence\tlabel") -> Path:
    path.write_text(header + "\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path


def sentences(seed: int, n: int = 16) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n, 6), generator=g).tolist()
    return [(" ".join(WORDS[i] for i in row), k % 2) for k, row in enumerate(picks)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a tiny BERT with its own tokenizer, task data, and models that must be refused."""
    root = tmp_path_factory.mktemp("cli")
    tok = word_tokenizer(root, WORDS)
    assert len(tok) == len(WORDS) + 5

    cfg = tiny_config("bert")
    cfg.vocab_size = len(tok)
    cfg.max_position_embeddings = 128  # the commands' default --max-length
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")

    small = tiny_config("bert")
    small.vocab_size = len(tok) - 4  # the tokenizer can emit ids the embedding table does not have
    transformers.BertForSequenceClassification(small).save_pretrained(root / "small_vocab")
    tok.save_pretrained(root / "small_vocab")

    big = tiny_config("bert")
    big.vocab_size = 4 * len(tok)  # a model of a larger vocabulary: the tokenizer is another model's
    transformers.BertForSequenceClassification(big).save_pretrained(root / "big_vocab")
    tok.save_pretrained(root / "big_vocab")

    # the stock model, recorded as fine-tuned for sst2 (what `finetune` writes into an export's config)
    tagged = transformers.BertForSequenceClassification.from_pretrained(root / "bert")
    tagged.config.prunetune_task = {"name": "sst2", "labels": ["0", "1"], "trained": True}
    tagged.save_pretrained(root / "tagged")
    tok.save_pretrained(root / "tagged")

    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=32, bos_token_id=0,
                                   eos_token_id=0)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")

    write_tsv(root / "sst2.tsv", sentences(0))
    write_tsv(root / "cola.tsv", sentences(1))
    write_tsv(root / "no_sentence.tsv", sentences(2), header="text_x\tlabel")
    (root / "empty.tsv").write_text("")
    PruningPlan("llama", heads={"decoder.0/self": [0, 3]}).save(root / "llama_plan.json")
    PruningPlan("bert", heads={"encoder.0/self": [0, 7]}).save(root / "out_of_range_plan.json")
    return root


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def pruned(ws, tmp_path_factory) -> tuple[Path, dict, str]:
    """`prunetune prune bert --keep-params 0.5` (magnitude): the export, its report and stderr."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as stdout:  # no capsys here
        rc = main(["prune", str(ws / "bert"), "--keep-params", "0.5", "--out", str(out)])
    assert rc == 0, err.getvalue()
    return out, json.loads(stdout.getvalue()), err.getvalue()


def test_prune_keep_params_writes_model_and_plan(ws, pruned):
    out, report, err = pruned
    assert "note: no --task: scored with the data-free weight-magnitude criterion" in err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "plan.json", "prune.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert report["layer_params_after"] <= 0.5 * report["layer_params_before"]
    assert report["layer_params_kept"] > 0.45
    assert report["params_after"] < report["params_before"]
    assert json.loads((out / "prune.json").read_text()) == report
    plan = PruningPlan.load(out / "plan.json")
    assert plan.family == "bert" and plan.meta["scorer"] == "magnitude"


def test_info_reports_the_reduced_numbers(ws, pruned, capsys):
    out, report, _ = pruned
    rc, text, _ = cli(capsys, "info", out, "--json")
    assert rc == 0
    info = json.loads(text)
    rc, dense_text, _ = cli(capsys, "info", ws / "bert", "--json")
    dense = json.loads(dense_text)
    assert (info["params"], info["layer_params"]) == (report["params_after"], report["layer_params_after"])
    assert (dense["params"], dense["layer_params"]) == (report["params_before"], report["layer_params_before"])
    assert f"{info['heads']}/{dense['heads']}" == report["heads"] and info["heads"] < dense["heads"] == 12
    assert f"{info['ffn']}/{dense['ffn']}" == report["ffn"] and info["ffn"] < dense["ffn"] == 120
    assert [lay["params"] for lay in info["layers"]] != [lay["params"] for lay in dense["layers"]]
    rc, table, _ = cli(capsys, "info", out)
    assert rc == 0 and table.startswith("family bert") and "encoder.2" in table


def test_prune_with_a_plan_file_reapplies_it(ws, pruned, capsys, tmp_path):
    first, report, _ = pruned
    rc, text, _ = cli(capsys, "prune", ws / "bert", "--plan", first / "plan.json", "--out", tmp_path / "again")
    assert rc == 0
    again = json.loads(text)
    assert again["layer_params_after"] == report["layer_params_after"]
    a = transformers.AutoModelForSequenceClassification.from_pretrained(first).eval()
    b = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "again").eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        assert max_diff(a(input_ids=ids).logits, b(input_ids=ids).logits) == 0


def test_prune_with_task_data(ws, capsys, tmp_path):
    rc, text, err = cli(capsys, "prune", ws / "bert", "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8",
                        "--heads-keep", "6", "--neurons-keep", "0.5", "--out", tmp_path / "out")
    assert rc == 0, err
    report = json.loads(text)
    assert (report["heads"], report["ffn"]) == ("6/12", "60/120")
    assert PruningPlan.load(tmp_path / "out" / "plan.json").meta["scorer"] == "head_grad"


def test_prune_with_task_data_is_reproducible(ws, capsys, tmp_path):
    """A backbone without a task head gets a new, random one whose gradients decide the scores: seeded."""
    backbone = tmp_path / "backbone"
    transformers.BertModel.from_pretrained(ws / "bert").save_pretrained(backbone)
    transformers.AutoTokenizer.from_pretrained(ws / "bert").save_pretrained(backbone)
    plans = []
    for name in ("a", "b"):
        rc, _, err = cli(capsys, "prune", backbone, "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8",
                         "--heads-keep", "5", "--neurons-keep", "0.3", "--out", tmp_path / name)
        assert rc == 0, err
        plans.append(PruningPlan.load(tmp_path / name / "plan.json"))
        torch.manual_seed(len(plans))  # whatever the global generator holds before the next run
    assert (plans[0].heads, plans[0].neurons) == (plans[1].heads, plans[1].neurons)


def test_importance_one_task(ws, capsys, tmp_path):
    out = tmp_path / "imp"
    rc, text, err = cli(capsys, "importance", ws / "bert", "--task", "sst2", "--data", ws / "sst2.tsv",
                        "--samples", "8", "--out", out)
    assert rc == 0, err
    scores = json.loads((out / "importance_sst2.json").read_text())
    assert set(scores["heads"]) == {f"encoder.{i}/self" for i in range(3)}
    assert all(len(v) == 4 for v in scores["heads"].values())
    meta = scores["meta"]
    assert {k: meta[k] for k in ("scorer", "task", "samples")} == {"scorer": "head_grad", "task": "sst2", "samples": 8}
    # what the numbers are: head_grad is normalised per layer (its paper), so kinds are not comparable
    assert (meta["unit"], meta["normalize"], meta["comparable"]) == ("loss_change_first_order", "layer", False)
    png = (out / "heads.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert json.loads(text) == json.loads((out / "summary.json").read_text())
    assert "spearman_heads" not in json.loads(text)


def test_importance_two_tasks_correlates_them(ws, capsys, tmp_path):
    out = tmp_path / "imp"
    rc, _, err = cli(capsys, "importance", ws / "bert", "--task", "sst2", "--data", ws / "sst2.tsv", "--task", "cola",
                     "--data", ws / "cola.tsv", "--samples", "8", "--out", out)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == ["sst2", "cola"]
    assert -1.0 <= summary["spearman_heads"] <= 1.0
    assert (out / "importance_sst2.json").exists() and (out / "importance_cola.json").exists()
    assert (out / "heads.png").stat().st_size > 1000


# command line (without --out) and a piece of the message that says what is wrong
BAD_INPUT = {
    "missing model dir": (["prune", "{ws}/nope", "--keep-params", "0.5"], "does not exist"),
    "budget 0": (["prune", "{ws}/bert", "--keep-params", "0"], "(0, 1]"),
    "budget 1.5": (["prune", "{ws}/bert", "--keep-params", "1.5"], "(0, 1]"),
    "budget nan": (["prune", "{ws}/bert", "--keep-params", "nan"], "--keep-params must be in (0, 1]"),
    "heads nan": (["prune", "{ws}/bert", "--heads-keep", "nan"], "--heads-keep must be"),
    "heads inf": (["prune", "{ws}/bert", "--heads-keep", "inf"], "--heads-keep must be"),
    "heads 2.5": (["prune", "{ws}/bert", "--heads-keep", "2.5"], "a whole count"),
    "not a number": (["prune", "{ws}/bert", "--keep-params", "half"], "invalid float value: 'half'"),
    "unknown flag": (["prune", "{ws}/bert", "--keep-parms", "0.5"], "unrecognized arguments"),
    "plan and a budget": (["prune", "{ws}/bert", "--plan", "{ws}/llama_plan.json", "--keep-params", "0.5"],
                          "--plan says what to keep: --keep-params would be ignored"),
    "data without a task": (["prune", "{ws}/bert", "--keep-params", "0.5", "--data", "{ws}/sst2.tsv"],
                            "--data needs --task"),
    "scorer without a task": (["prune", "{ws}/bert", "--keep-params", "0.5", "--scorer", "head_grad"],
                              "--scorer needs --task"),
    "samples 0": (["prune", "{ws}/bert", "--keep-params", "0.5", "--task", "sst2", "--data", "{ws}/sst2.tsv",
                   "--samples", "0"], "--samples must be positive"),
    "plan of another family": (["prune", "{ws}/bert", "--plan", "{ws}/llama_plan.json"], "family 'llama'"),
    "plan index out of range": (["prune", "{ws}/bert", "--plan", "{ws}/out_of_range_plan.json"], "out of range"),
    "missing plan file": (["prune", "{ws}/bert", "--plan", "{ws}/nothing.json"], "cannot read plan"),
    "data without the column": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/no_sentence.tsv"],
                                "missing column 'sentence'"),
    "empty data file": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/empty.tsv"], "empty"),
    "tokenizer larger than vocab": (["importance", "{ws}/small_vocab", "--task", "sst2", "--data", "{ws}/sst2.tsv"],
                                    "vocabulary"),
    "tokenizer of a smaller model": (["importance", "{ws}/big_vocab", "--task", "sst2", "--data", "{ws}/sst2.tsv"],
                                     "does not belong to this model"),
    "max length past the positions": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/sst2.tsv",
                                       "--max-length", "200"], "--max-length 200 is longer than the model's 128"),
    "prune max length": (["prune", "{ws}/bert", "--task", "sst2", "--data", "{ws}/sst2.tsv", "--heads-keep", "0.5",
                          "--max-length", "129"], "positions"),
    "unsupported model type": (["prune", "{ws}/gpt2", "--keep-params", "0.5"], "unsupported model type 'gpt2'"),
    "unsupported model, importance": (["importance", "{ws}/gpt2", "--task", "sst2", "--data", "{ws}/sst2.tsv"],
                                      "unsupported model type"),
    "unknown scorer": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/sst2.tsv", "--scorer", "x"],
                       "unknown importance scorer"),
    "unknown task": (["importance", "{ws}/bert", "--task", "sst7", "--data", "{ws}/sst2.tsv"], "unknown task"),
    "no budget": (["prune", "{ws}/bert"], "--plan or a budget"),
    # finetune: refused before anything loads
    "finetune without a task": (["finetune", "{ws}/bert"], "finetune needs --task"),
    "finetune without --out": (["finetune", "{ws}/bert", "--task", "sst2", "--out"], "expected one argument"),
    "lr 0": (["finetune", "{ws}/bert", "--task", "sst2", "--lr", "0"], "--lr must be a positive, finite number"),
    "lr negative": (["finetune", "{ws}/bert", "--task", "sst2", "--lr", "-0.0001"], "--lr must be"),
    "lr nan": (["finetune", "{ws}/bert", "--task", "sst2", "--lr", "nan"], "--lr must be"),
    "epochs nan": (["finetune", "{ws}/bert", "--task", "sst2", "--epochs", "nan"], "--epochs must be"),
    "epochs inf": (["finetune", "{ws}/bert", "--task", "sst2", "--epochs", "inf"], "--epochs must be"),
    "batch size 0": (["finetune", "{ws}/bert", "--task", "sst2", "--batch-size", "0"], "--batch-size must be"),
    "batch size nan": (["finetune", "{ws}/bert", "--task", "sst2", "--batch-size", "nan"], "invalid int value"),
    "dev fraction 1": (["finetune", "{ws}/bert", "--task", "sst2", "--dev-fraction", "1"], "--dev-fraction must be"),
    "lora with a budget": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "lora", "--keep-params", "0.5",
                            "--heads-keep", "0.5"], "--method lora does not use --heads-keep, --keep-params"),
    "prune-lora with keep-params": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "prune-lora",
                                     "--keep-params", "0.5"], "--method prune-lora does not use --keep-params"),
    "prune-lora with rank": (["finetune", "{ws}/bert", "--task", "sst2", "--rank", "16"],
                             "--method prune-lora does not use --rank"),
    "apt with heads-keep": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "apt", "--heads-keep", "0.5"],
                            "--method apt does not use --heads-keep"),
    "apt with top-blocks": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "apt", "--top-blocks", "2"],
                            "does not use --top-blocks"),
    "lora with rank-high": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "lora", "--rank-high", "16"],
                            "does not use --rank-high"),
    "distill outside apt": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "lora", "--distill"],
                            "does not use --distill"),
    "prune before training outside apt": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "lora-prune",
                                           "--prune-before-training"], "does not use --prune-before-training"),
    "scorer outside apt": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "full", "--scorer", "fisher"],
                           "does not use --scorer"),
    "samples with full": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "full", "--samples", "64"],
                          "does not use --samples"),
    "apt scorer without pruning first": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "apt",
                                          "--scorer", "fisher"], "--scorer needs --prune-before-training"),
    "apt best teacher without evaluations": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "apt",
                                              "--distill", "--distill-teacher", "best"],
                                             "--distill-teacher best needs --eval-every"),
    "apt dense teacher with a new head": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "apt", "--distill",
                                           "--distill-teacher", "dense"], "gives it a new, untrained head"),
    "finetune unknown scorer": (["finetune", "{ws}/bert", "--task", "sst2", "--method", "apt",
                                 "--prune-before-training", "--scorer", "x"], "unknown importance scorer"),
    "finetune max length": (["finetune", "{ws}/bert", "--task", "sst2", "--max-length", "512"], "positions"),
    "finetune tokenizer larger than vocab": (["finetune", "{ws}/small_vocab", "--task", "sst2", "--max-length", "32"],
                                             "does not belong to this model"),
    "finetune tokenizer of a smaller model": (["finetune", "{ws}/big_vocab", "--task", "sst2", "--max-length", "32"],
                                              "does not belong to this model"),
    # evaluate: a head of another width, or an export made for another task
    "evaluate more labels than the head": (["evaluate", "{ws}/bert", "--task", "mnli"], "task mnli needs 3"),
    "evaluate fewer labels than the head": (["evaluate", "{ws}/bert", "--task", "stsb"], "task stsb needs 1"),
    "evaluate another task": (["evaluate", "{ws}/tagged", "--task", "mrpc"], "fine-tuned for sst2, not mrpc"),
    "evaluate another task with more labels": (["evaluate", "{ws}/tagged", "--task", "mnli"],
                                               "fine-tuned for sst2, not mnli"),
    "evaluate a foreign tokenizer": (["evaluate", "{ws}/big_vocab", "--task", "sst2", "--max-length", "32"],
                                     "does not belong"),
    "evaluate max length": (["evaluate", "{ws}/tagged", "--task", "sst2", "--max-length", "1000"], "positions"),
    # task options: each task refuses the others' and checks its own
    "another task's option": (["finetune", "{ws}/bert", "--task", "sst2", "--stride", "16"],
                              "task sst2 has no option --stride (its options: --text-column, --label-column)"),
    "a task option without a task": (["prune", "{ws}/bert", "--keep-params", "0.5", "--text-column", "review"],
                                     "--text-column needs --task"),
    "three text columns": (["finetune", "{ws}/bert", "--task", "classify", "--text-column", "a", "b", "c"],
                           "--text-column takes one or two column names"),
    "a bad QA option": (["finetune", "{ws}/bert", "--task", "squad_v2", "--n-best", "0"],
                        "--n-best must be a positive whole number"),
    "QA on an encoder-decoder": (["evaluate", "{ws}/tagged", "--task", "squad-v2", "--data", "{ws}/sst2.tsv"],
                                 "fine-tuned for sst2, not squad_v2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(ws, capsys, tmp_path, case):
    out = tmp_path / "out"
    command, message = BAD_INPUT[case]
    args = [a.format(ws=ws) for a in command]
    if args[0] != "evaluate":
        args += ["--out", out] if args[-1] != "--out" else []
    if args[0] == "importance":
        args += ["--samples", "8"]
    rc, _, err = cli(capsys, *args)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunetune: error:"), err
    assert message in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left either


def test_help_describes_the_tool_and_version_names_the_libraries(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Structured pruning and LoRA fine-tuning") and "argparse" not in text
    with pytest.raises(SystemExit):
        main(["--version"])
    version = capsys.readouterr().out.strip()
    assert version.startswith(f"prunetune {prunetune.__version__} (torch {torch.__version__}, "
                              f"transformers {transformers.__version__}, peft ")
    assert len(version.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    epilog = capsys.readouterr().out.split("flags of one method only:")[1]
    assert "lora        --lora-targets --rank\n" in epilog


def test_every_subcommand_has_its_handler():
    import argparse

    from prunetune.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    # a subcommand without a handler would fail with a KeyError instead of running; a handler without a
    # subcommand is dead code
    assert set(sub.choices) == set(COMMANDS)


def test_evaluate_warns_about_an_untrained_head_and_an_unknown_task(ws, capsys, tmp_path):
    """A `prune --task` output has a new head nobody trained; a stock checkpoint does not say what it is for."""
    rc, _, err = cli(capsys, "prune", ws / "bert", "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8",
                     "--heads-keep", "0.5", "--out", tmp_path / "pruned")
    assert rc == 0, err
    record = json.loads((tmp_path / "pruned" / "config.json").read_text())["prunetune_task"]
    assert record == {"name": "sst2", "labels": ["0", "1"], "trained": False,
                      "options": {"text_columns": None, "label_column": None}}
    for model, warning in ((tmp_path / "pruned", "was never trained"), (ws / "bert", "does not record its task")):
        rc, text, err = cli(capsys, "evaluate", model, "--task", "sst2", "--data", ws / "sst2.tsv", "--max-length",
                            "32")
        assert rc == 0, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("prunetune: warning:") and warning in lines[0], err
        assert set(json.loads(text)) == {"accuracy", "main"}
    # an export recorded as fine-tuned for this task: no warning
    rc, _, err = cli(capsys, "evaluate", ws / "tagged", "--task", "sst2", "--data", ws / "sst2.tsv", "--max-length",
                     "32")
    assert rc == 0 and err.strip() == ""
    # pruning an export fine-tuned for its own task keeps its head's record
    rc, _, err = cli(capsys, "prune", ws / "tagged", "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8",
                     "--heads-keep", "0.5", "--out", tmp_path / "again")
    assert rc == 0, err
    assert json.loads((tmp_path / "again" / "config.json").read_text())["prunetune_task"]["trained"] is True


def test_evaluate_scores_a_single_file_whole(ws, capsys, tmp_path):
    """A file that is not the run's training file is an evaluation set: every row of it is scored."""
    rc, text, err = cli(capsys, "evaluate", ws / "tagged", "--task", "sst2", "--data", ws / "sst2.tsv",
                        "--max-length", "32")
    assert rc == 0, err
    model = transformers.AutoModelForSequenceClassification.from_pretrained(ws / "tagged").eval()
    tok = transformers.AutoTokenizer.from_pretrained(ws / "tagged")
    rows = sentences(0)
    with torch.no_grad():
        pred = model(**tok([t for t, _ in rows], padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    assert json.loads(text)["accuracy"] == sum(p == label for p, (_, label) in zip(pred, rows, strict=True)) / 16


def test_importance_is_seeded(ws, capsys, tmp_path):
    """A backbone gets a new, random task head whose gradients decide the scores: --seed picks it."""
    backbone = tmp_path / "backbone"
    transformers.BertModel.from_pretrained(ws / "bert").save_pretrained(backbone)
    transformers.AutoTokenizer.from_pretrained(ws / "bert").save_pretrained(backbone)
    heads = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        rc, _, err = cli(capsys, "importance", backbone, "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8",
                         "--seed", seed, "--out", tmp_path / name)
        assert rc == 0, err
        heads[name] = json.loads((tmp_path / name / "importance_sst2.json").read_text())["heads"]
        torch.manual_seed(len(heads))  # whatever the global generator holds before the next run
    assert heads["a"] == heads["b"] != heads["c"]


def test_existing_output_is_refused_and_kept(ws, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for command in (["prune", ws / "bert", "--keep-params", "0.5"],
                    ["importance", ws / "bert", "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8"]):
        rc, _, err = cli(capsys, *command, "--out", out)
        assert rc == 2 and err.startswith("prunetune: error:") and "--overwrite" in err
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # --overwrite replaces only what prunetune wrote
    rc, _, err = cli(capsys, "prune", ws / "bert", "--keep-params", "0.5", "--out", out, "--overwrite")
    assert rc == 2 and err.startswith("prunetune: error:") and "not written by prunetune" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    for keep in ("0.5", "0.4"):
        rc, _, _ = cli(capsys, "prune", ws / "bert", "--keep-params", keep, "--out", out, "--overwrite")
        assert rc == 0 and (out / "plan.json").exists()
    assert PruningPlan.load(out / "plan.json").meta["budget"]["keep_params"] == 0.4


@pytest.mark.slow
def test_embedded_model_prune_and_reload(capsys, tmp_path):
    location = models.resolve(None)
    out = tmp_path / "minilm"
    rc, text, err = cli(capsys, "prune", "--keep-params", "0.4", "--out", out)
    assert rc == 0, err
    report = json.loads(text)
    assert report["layer_params_before"] > 10_000_000 and report["heads"].endswith("/72")  # MiniLM: 6 x 12 heads
    assert report["layer_params_after"] <= 0.4 * report["layer_params_before"]

    plan = PruningPlan.load(out / "plan.json")
    in_memory = transformers.AutoModel.from_pretrained(location).eval()
    apply_plan(in_memory, plan)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok(["a fine, moving film", "the plot was dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = in_memory(**batch).last_hidden_state
        got = reloaded.bert(**batch).last_hidden_state
        reloaded(**batch)  # the classification head runs on the pruned encoder
    assert max_diff(got, want) == 0
    rc, info_text, _ = cli(capsys, "info", out, "--json")
    info = json.loads(info_text)
    assert info["layer_params"] == report["layer_params_after"] <= 0.4 * report["layer_params_before"]
