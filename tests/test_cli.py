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
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")

    small = tiny_config("bert")
    small.vocab_size = len(tok) - 4  # the tokenizer can emit ids the embedding table does not have
    transformers.BertForSequenceClassification(small).save_pretrained(root / "small_vocab")
    tok.save_pretrained(root / "small_vocab")

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
    "plan of another family": (["prune", "{ws}/bert", "--plan", "{ws}/llama_plan.json"], "family 'llama'"),
    "plan index out of range": (["prune", "{ws}/bert", "--plan", "{ws}/out_of_range_plan.json"], "out of range"),
    "missing plan file": (["prune", "{ws}/bert", "--plan", "{ws}/nothing.json"], "cannot read plan"),
    "data without the column": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/no_sentence.tsv"],
                                "missing column 'sentence'"),
    "empty data file": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/empty.tsv"], "empty"),
    "tokenizer larger than vocab": (["importance", "{ws}/small_vocab", "--task", "sst2", "--data", "{ws}/sst2.tsv"],
                                    "vocabulary"),
    "unsupported model type": (["prune", "{ws}/gpt2", "--keep-params", "0.5"], "unsupported model type 'gpt2'"),
    "unsupported model, importance": (["importance", "{ws}/gpt2", "--task", "sst2", "--data", "{ws}/sst2.tsv"],
                                      "unsupported model type"),
    "unknown scorer": (["importance", "{ws}/bert", "--task", "sst2", "--data", "{ws}/sst2.tsv", "--scorer", "x"],
                       "unknown importance scorer"),
    "unknown task": (["importance", "{ws}/bert", "--task", "sst7", "--data", "{ws}/sst2.tsv"], "unknown task"),
    "no budget": (["prune", "{ws}/bert"], "--plan or a budget"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(ws, capsys, tmp_path, case):
    out = tmp_path / "out"
    command, message = BAD_INPUT[case]
    args = [a.format(ws=ws) for a in command] + ["--out", out]
    if args[0] == "importance":
        args += ["--samples", "8"]
    rc, _, err = cli(capsys, *args)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunetune: error:"), err
    assert message in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left either


def test_existing_output_is_refused_and_kept(ws, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for command in (["prune", ws / "bert", "--keep-params", "0.5"],
                    ["importance", ws / "bert", "--task", "sst2", "--data", ws / "sst2.tsv", "--samples", "8"]):
        rc, _, err = cli(capsys, *command, "--out", out)
        assert rc == 2 and err.startswith("prunetune: error:") and "--overwrite" in err
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    rc, _, _ = cli(capsys, "prune", ws / "bert", "--keep-params", "0.5", "--out", out, "--overwrite")
    assert rc == 0 and (out / "plan.json").exists() and not (out / "mine.txt").exists()


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
