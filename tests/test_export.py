"""Compact export: reloads with the stock Auto classes, holds no pickles, composes layouts, fails cleanly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from conftest import logits, tiny_config, tiny_inputs
from engine_helpers import make_plan, max_diff, second_plan, tiny, word_tokenizer

from prunetune.cli import main
from prunetune.errors import PrunetuneError
from prunetune.export import MARKER, OWNER, check_output_dir, load_compact, save_compact
from prunetune.families import layer_sites
from prunetune.plan import PruningPlan, layer_param_count, model_info
from prunetune.surgery import apply_plan

AUTO = {
    "bert": "AutoModelForSequenceClassification",
    "roberta": "AutoModelForSequenceClassification",
    "t5": "AutoModelForSeq2SeqLM",
    "llama": "AutoModelForCausalLM",
}


def reload(family: str, path):
    return getattr(transformers, AUTO[family]).from_pretrained(path).eval()


def shapes(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def assert_only_safe_files(path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    # weights, JSON and the model card (text): nothing that unpickles
    assert all(p.suffix in (".safetensors", ".json") or p.name == "README.md" for p in files), sorted(
        p.name for p in files)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: the pruned model in memory and its export directory (built once for the module)."""
    out = {}
    for family in AUTO:
        model = tiny(family)
        apply_plan(model, make_plan(family, model, "all"))
        path = tmp_path_factory.mktemp("export") / family
        save_compact(model, path)
        out[family] = (model, path)
    return out


def test_export_reloads_with_stock_auto_class(exported, family):
    model, path = exported[family]
    assert_only_safe_files(path)
    again = reload(family, path)
    assert type(again).__name__ == "Prunetune" + type(model).__name__
    assert shapes(again) == shapes(model)
    assert layer_param_count(again) == layer_param_count(model)
    inputs = tiny_inputs(family)
    torch.testing.assert_close(logits(again, inputs), logits(model, inputs), atol=0, rtol=0)
    # the weights were loaded, not re-initialised: every tensor is the saved one
    saved = dict(model.named_parameters())
    assert all(torch.equal(p, saved[n]) for n, p in again.named_parameters())


def test_export_config_keeps_dense_numbers_and_layout(exported, family):
    model, path = exported[family]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"].startswith(f"prunetune_{family}")
    assert cfg["prunetune_base_model_type"] == family
    assert cfg["prunetune_layout"]["heads"] == make_plan(family, model, "heads").heads
    info = model_info(load_compact(path, AUTO[family]))
    assert info == model_info(model)


def test_pruning_a_reloaded_export_again_round_trips(exported, family, tmp_path):
    _, path = exported[family]
    once = reload(family, path)
    apply_plan(once, second_plan(once, family))
    save_compact(once, tmp_path / "twice")
    assert_only_safe_files(tmp_path / "twice")
    twice = reload(family, tmp_path / "twice")
    inputs = tiny_inputs(family)
    assert shapes(twice) == shapes(once)
    torch.testing.assert_close(logits(twice, inputs), logits(once, inputs), atol=0, rtol=0)
    # the written layout is relative to the dense model: one plan from dense to the twice-pruned shapes
    layout = PruningPlan.from_dict(json.loads((tmp_path / "twice" / "config.json").read_text())["prunetune_layout"])
    dense = tiny(family)
    apply_plan(dense, layout)
    assert shapes(dense) == shapes(twice)


def test_t5_export_generates_like_the_pruned_model(exported):
    model, path = exported["t5"]
    again = reload("t5", path)
    inputs = {k: v for k, v in tiny_inputs("t5").items() if k != "decoder_input_ids"}
    kw = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [0, 1]}
    with torch.no_grad():
        assert torch.equal(again.generate(**inputs, **kw), model.generate(**inputs, **kw))


def test_plain_transformers_refuses_the_export_with_a_clear_message(exported, tmp_path):
    _, path = exported["bert"]
    dense = tiny("bert")
    save_compact(dense, tmp_path / "dense")  # nothing pruned: a stock export, which transformers alone loads
    ids = tiny_inputs("bert")["input_ids"]
    code = (
        "import sys, torch, transformers\n"
        f"stock = transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'dense')!r})\n"
        f"torch.save(stock.eval()(torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print('stock loaded', file=sys.stderr)\n"
        f"transformers.AutoModelForSequenceClassification.from_pretrained({str(path)!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "stock loaded" in proc.stderr, proc.stderr
    with torch.no_grad():  # the same weights (another thread count: summation order may differ)
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt").detach(), dense(ids).logits, atol=1e-6, rtol=0)
    assert proc.returncode != 0
    assert "import prunetune" in proc.stderr
    text = proc.stderr.lower()
    assert "size mismatch" not in text and "shape" not in text and "mismatched" not in text


def test_failing_save_leaves_nothing(monkeypatch, tmp_path):
    model = tiny("bert")

    def boom(self, *args, **kwargs):
        (args[0] / "partial.bin").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compact(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output dir, no temporary sibling
    # the model's own config was put back
    assert model.config.model_type == "bert"


def test_existing_output_dir(tmp_path):
    model = tiny("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrunetuneError, match="not empty"):
        save_compact(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # an empty existing directory is fine without overwrite
    (tmp_path / "empty").mkdir()
    save_compact(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_refuses_what_prunetune_did_not_write(tmp_path):
    model = tiny("bert")
    out = tmp_path / "results"
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "deeper" / "data.csv").write_text("1,2")
    before = tree(out)
    with pytest.raises(PrunetuneError, match="not written by prunetune"):
        save_compact(model, out, overwrite=True)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_overwrite_replaces_a_prunetune_output(tmp_path):
    out = tmp_path / "out"
    save_compact(tiny("bert"), out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["prunetune"] and marker["command"] and marker["written"]
    (out / "stale.json").write_text("{}")
    save_compact(tiny("bert", seed=1), out, overwrite=True)
    assert not (out / "stale.json").exists() and (out / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup left


def test_never_the_current_directory_or_a_parent_of_it(tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    save_compact(tiny("bert"), work)  # a prunetune output, even: still not while it is the current directory
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), str(tmp_path)):
        with pytest.raises(PrunetuneError, match="current directory"):
            save_compact(tiny("bert"), out, overwrite=True)
    assert (work / "model.safetensors").exists()


def test_never_an_input(tmp_path):
    out = tmp_path / "out"
    save_compact(tiny("bert"), out)
    (out / "plan.json").write_text("{}")
    for given in (out, out / "plan.json"):  # the model directory itself; a file inside the output
        with pytest.raises(PrunetuneError, match="input"):
            save_compact(tiny("bert"), out, overwrite=True, inputs=[given])
    assert (out / "plan.json").read_text() == "{}"


def test_output_dirs_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_compact(tiny("bert"), tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    # safetensors writes its files 0600: the output's files are as readable as umask allows, too
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "README.md": 0o644, MARKER: 0o644}


def test_a_failed_run_keeps_the_previous_result(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_compact(tiny("bert"), out)
    good = tree(out)
    model = tiny("bert", seed=1)

    def boom(self, *args, **kwargs):
        (args[0] / "partial.bin").write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(type(model), "save_pretrained", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            save_compact(model, out, overwrite=True)
    assert tree(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # the swap itself fails: the new result cannot be moved in, the old one goes back
    real_rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == out.resolve() and self.name.startswith(".out."):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="No space"):
        save_compact(model, out, overwrite=True)
    monkeypatch.undo()
    assert tree(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from prunetune.export import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)  # what `kill -9` (or the out-of-memory killer) does mid-run
"""


def test_a_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out.") and (left[0] / OWNER).exists()
    # someone else's hidden directory next to it, and a temporary of a process that is still running
    (tmp_path / ".out.mine").mkdir()
    alive = tmp_path / ".other.alive"
    alive.mkdir()
    (alive / OWNER).write_text(json.dumps({**json.loads((left[0] / OWNER).read_text()), "pid": os.getpid(),
                                            "start": None}))
    save_compact(tiny("bert"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.alive", ".out.mine", "out"]


def test_a_killed_swap_puts_the_previous_result_back(tmp_path):
    """Killed between moving the old result aside and moving the new one in: the next run restores the old."""
    out = tmp_path / "out"
    save_compact(tiny("bert"), out)
    good = tree(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = tmp_path / ".out.killed"
    holder.mkdir()
    out.rename(holder / "old")
    record = {"pid": int(dead.stdout), "start": None, "host": socket.gethostname(), "out": "out", "role": "old"}
    (holder / OWNER).write_text(json.dumps(record))
    with pytest.raises(PrunetuneError, match="use --overwrite"):  # the restored result is not replaced unasked
        save_compact(tiny("bert", seed=1), out)
    assert tree(out) == good and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unwritable_place_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a file system that refuses everyone
        parent = Path("/sys/prunetune-test")
        if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and _can_create(Path("/sys")):
            pytest.skip("no read-only directory to test with")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    with pytest.raises(PrunetuneError, match="not writable"):
        check_output_dir(parent / "out")


def _can_create(directory: Path) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory))
    except OSError:
        return False
    return True


def test_save_refuses_unsupported_models(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
    with pytest.raises(PrunetuneError, match="unsupported"):
        save_compact(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_compact_missing_dir(tmp_path):
    with pytest.raises(PrunetuneError):
        load_compact(tmp_path / "nothing")


def test_dense_export_round_trips(family, tmp_path):
    """An unpruned model exports and reloads too (no layout: the stock shapes)."""
    model = tiny(family)
    save_compact(model, tmp_path / "dense")
    again = reload(family, tmp_path / "dense")
    inputs = tiny_inputs(family)
    assert max_diff(logits(again, inputs), logits(model, inputs)) == 0
    assert [s.num_heads for lay in layer_sites(again) for s in lay.attentions.values()] == [
        s.num_heads for lay in layer_sites(model) for s in lay.attentions.values()
    ]


# ---------------------------------------------------------------------------------------------------------
# The commands: one line and exit 2 for an output they must not write, or a model they cannot load
# ---------------------------------------------------------------------------------------------------------

WORDS = ["the", "movie", "was", "good", "bad"]


@pytest.fixture(scope="module")
def cli_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    tok = word_tokenizer(root, WORDS)
    cfg = tiny_config("bert")
    cfg.vocab_size = len(tok)
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    (root / "data").mkdir()
    for split in ("train", "dev"):
        (root / "data" / f"{split}.tsv").write_text("sentence\tlabel\nthe movie was good\t1\nthe movie was bad\t0\n")
    return root


def run_cli(*args) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    return rc, [line for line in err.getvalue().splitlines() if line.strip()]


def assert_one_error_line(rc: int, lines: list[str], message: str) -> None:
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("prunetune: error:"), lines
    assert message in lines[0], lines[0]


def test_commands_never_replace_an_input_or_the_current_directory(cli_ws, tmp_path, monkeypatch):
    bert, data = cli_ws / "bert", cli_ws / "data"
    out = tmp_path / "out"
    rc, lines = run_cli("prune", bert, "--keep-params", "0.5", "--out", out)
    assert rc == 0, lines
    before = {p: tree(p) for p in (bert, data, out)}
    cases = {
        "data is the output": (["prune", bert, "--task", "sst2", "--data", data, "--heads-keep", "2",
                                "--out", data], "input"),
        "finetune onto its data": (["finetune", bert, "--task", "sst2", "--data", data, "--out", data], "input"),
        "model is the output": (["prune", out, "--keep-params", "0.5", "--out", out], "input"),
        "plan inside the output": (["prune", bert, "--plan", out / "plan.json", "--out", out], "input"),
        "model dir unmarked": (["prune", bert, "--keep-params", "0.5", "--out", bert], "input"),
        "current directory": (["prune", bert, "--keep-params", "0.5", "--out", "."], "current directory"),
        "parent of it": (["importance", bert, "--task", "sst2", "--data", data, "--out", ".."], "current directory"),
    }
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for name, (args, message) in cases.items():
        rc, lines = run_cli(*args, "--overwrite")
        assert_one_error_line(rc, lines, message)
        assert {p: tree(p) for p in before} == before, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]
    assert list((tmp_path / "work").iterdir()) == []


def test_an_unwritable_output_is_one_line_before_loading(cli_ws, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        if not Path("/sys").is_dir() or _can_create(Path("/sys")):
            pytest.skip("no read-only directory to test with")
        parent = Path("/sys/prunetune-test")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    loaded = []
    monkeypatch.setattr(transformers.BertForSequenceClassification, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a)))
    for args in (["prune", cli_ws / "bert", "--keep-params", "0.5"],
                 ["finetune", cli_ws / "bert", "--task", "sst2", "--data", cli_ws / "data"]):
        rc, lines = run_cli(*args, "--out", parent / "out")
        assert_one_error_line(rc, lines, "not writable")
    assert loaded == []


def test_a_truncated_checkpoint_is_one_line(cli_ws, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cli_ws / "bert", broken)
    weights = broken / "model.safetensors"
    for size in (weights.stat().st_size // 2, 5):  # weights cut short; a header cut short
        weights.write_bytes(weights.read_bytes()[:size])
        for args in (["info", broken],
                     ["evaluate", broken, "--task", "sst2", "--data", cli_ws / "data", "--max-length", "32"],
                     ["prune", broken, "--keep-params", "0.5", "--out", tmp_path / "out"]):
            rc, lines = run_cli(*args)
            assert_one_error_line(rc, lines, "cannot load model")
    assert not (tmp_path / "out").exists()


def test_an_export_whose_config_no_longer_builds_its_layout_is_one_line(exported, tmp_path):
    """The layout records the dense shapes it cuts: a config edited to other dense shapes is refused by name."""
    _, path = exported["bert"]
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (edited / "config.json").write_text(json.dumps(cfg))
    rc, lines = run_cli("info", edited)
    assert_one_error_line(rc, lines, "40 FFN neurons in encoder.0, this one has 48")
