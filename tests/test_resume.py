"""`finetune --save-every` / `--resume`: a run SIGKILLed before, between and after APT's pruning steps, then
resumed, ends with the very model, plan and metric of an uninterrupted run; a changed setting is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import common, error_lines, run_cli, ws  # noqa: F401 (ws: the fixture)

from prunetune import recipes
from prunetune.checkpoint import MARKER

HERE = Path(__file__).parent
# 64 rows in batches of 16, 6 epochs: 24 steps; APT prunes at steps 5, 9 and 12; evaluations every 3 steps feed
# the self-distillation teacher; dropout is on (the RNG state matters)
APT = ["--method", "apt", "--keep-params", "0.5", "--epochs", "6", "--prune-steps", "3", "--prune-start", "0.2",
       "--prune-end", "0.5", "--distill", "--eval-every", "3", "--lr", "3e-3"]
# the kill hits the checkpoint of this step; the newest complete one is 2 steps earlier
KILLS = {"before": 4, "between": 12, "after": 16}


def no_bench(monkeypatch) -> None:
    monkeypatch.setattr(recipes, "_isolated_inference", lambda task, model_dir, cfg: {
        "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length})


def outcome(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    layout = json.loads((out / "model" / "config.json").read_text())["prunetune_layout"]
    return {
        "model": load_file(str(out / "model" / "model.safetensors")),
        "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
        "layout": layout,
        "metrics": report["metrics"],
        "timeline": report["timeline"],
        "steps": report["train_steps"],
        "best": report["best_eval_step"],
    }


def same(a: dict, b: dict) -> bool:
    tensors = all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
                  for k in ("model", "adapter"))
    return tensors and all(a[k] == b[k] for k in ("layout", "metrics", "timeline", "steps", "best"))


def test_a_killed_run_resumes_to_the_same_model(ws, tmp_path, monkeypatch):  # noqa: F811
    no_bench(monkeypatch)
    torch.set_num_threads(1)  # as in the killed processes
    args = ["finetune", ws / "bert", *common(ws), *APT]
    # the killed runs, in parallel processes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    procs = {
        name: subprocess.Popen([sys.executable, str(HERE / "cli_child.py"), str(step),
                                *map(str, args), "--out", str(tmp_path / name / "out"), "--save-every", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, step in KILLS.items()
    }
    # meanwhile, the uninterrupted run (saving checkpoints too: writing them must not change anything)
    rc, _, err = run_cli([*args, "--out", tmp_path / "whole" / "out", "--save-every", "2"])
    assert rc == 0, err
    reference = outcome(tmp_path / "whole" / "out")
    assert not (tmp_path / "whole" / "out.checkpoints").exists()  # removed after the run succeeded
    assert [r["step"] for r in reference["timeline"]] == [0, 5, 9, 12]
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        folder = tmp_path / name / "out.checkpoints"
        assert (folder / MARKER).is_file() and not (tmp_path / name / "out").exists()
        steps = sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*"))
        assert steps == [s for s in (KILLS[name] - 4, KILLS[name] - 2) if s > 0], name  # the newest complete ones
        rc, _, err = run_cli([*args, "--out", tmp_path / name / "out", "--resume", folder])
        assert rc == 0, err
        assert same(outcome(tmp_path / name / "out"), reference), name
        assert not folder.exists()  # done: the checkpoints went
        assert not any(p.name.startswith(".") for p in (tmp_path / name).iterdir())  # the killed run's temporary


def test_resume_refuses_other_settings_and_foreign_folders(ws, tmp_path, monkeypatch):  # noqa: F811
    no_bench(monkeypatch)
    args = ["finetune", ws / "bert", *common(ws), "--method", "lora", "--epochs", "1", "--out", tmp_path / "out"]
    rc, _, err = run_cli([*args, "--save-every", "2", "--retain-checkpoints"])
    assert rc == 0, err
    folder = tmp_path / "out.checkpoints"
    assert [p.name for p in sorted(folder.glob("step-*"))] == ["step-00000002", "step-00000004"]
    cases = {
        ("--lr", "0.01"): "was made with --lr 0.0005, this run has 0.01",
        ("--rank", "4"): "was made with --rank 8, this run has 4",
        ("--seed", "1"): "was made with --seed 42, this run has 1",
    }
    for extra, message in cases.items():
        rc, _, err = run_cli([*args, "--overwrite", "--resume", folder, *extra])
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and message in lines[0], err
    rc, _, err = run_cli([*args, "--overwrite", "--resume", tmp_path])
    assert rc == 2 and "not a prunetune checkpoint directory" in err
    # a new run does not silently replace an earlier run's checkpoints
    rc, _, err = run_cli([*args[:-1], tmp_path / "other", "--save-every", "2", "--checkpoint-dir", folder])
    assert rc == 2 and f"--resume {folder}" in err
    # the settings that change nothing may differ: a resumed run goes on from the last step and finishes
    rc, _, err = run_cli([*args, "--overwrite", "--resume", folder, "--save-every", "1"])
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["train_steps"] == 4


@pytest.mark.parametrize("flags,message", [
    (["--method", "lora-prune", "--save-every", "2"], "--method lora-prune does not use --save-every"),
    (["--keep-checkpoints", "3"], "--keep-checkpoints needs --save-every"),
    (["--resume", "x", "--checkpoint-dir", "y", "--save-every", "2"], "drop --checkpoint-dir"),
    (["--save-every", "-1"], "--save-every must be"),
])
def test_checkpoint_flags_are_refused_in_one_line(ws, tmp_path, flags, message):  # noqa: F811
    rc, _, err = run_cli(["finetune", ws / "bert", *common(ws), "--out", tmp_path / "out", *flags])
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method,extra", [("prune-lora", ["--heads-keep", "0.5", "--samples", "16"]), ("full", [])])
def test_methods_pruned_before_training_resume_exactly(ws, tmp_path, monkeypatch, method, extra):  # noqa: F811
    """prune-lora prunes before the loop (and full trains every weight): a resumed run rebuilds that model and ends
    where the whole run did."""
    from safetensors.torch import load_file as load

    no_bench(monkeypatch)
    args = ["finetune", ws / "bert", *common(ws), "--method", method, "--epochs", "2", *extra]
    rc, _, err = run_cli([*args, "--out", tmp_path / "whole", "--save-every", "2", "--keep-checkpoints", "4",
                          "--retain-checkpoints"])
    assert rc == 0, err
    rc, _, err = run_cli([*args, "--out", tmp_path / "resumed", "--resume",
                          tmp_path / "whole.checkpoints" / "step-00000004"])
    assert rc == 0, err
    a, b = (load(str(tmp_path / n / "model" / "model.safetensors")) for n in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("whole", "resumed")]
    assert reports[0]["metrics"] == reports[1]["metrics"] and reports[1]["train_steps"] == 8
