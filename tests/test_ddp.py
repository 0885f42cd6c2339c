"""Data-parallel training on torch.distributed (gloo, 2 CPU processes on localhost, started by torchrun): every
rank ends with the same plans and weights, and they equal a single process's with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import GLOBAL_BATCH, record, run
from safetensors.torch import load_file
from test_recipes import common, ws  # noqa: F401 (ws: the fixture)

from prunetune.runtime import Runtime

HERE = Path(__file__).parent


def torchrun(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(HERE / "ddp_worker.py", out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_ranks_agree_and_equal_one_process(two_ranks):
    weights = [load_file(str(two_ranks / f"rank{r}.safetensors")) for r in (0, 1)]
    infos = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    # every rank applied the same plans (and growth) at the same steps, and holds the same weights, bit for bit
    assert infos[0]["changes"] == infos[1]["changes"] and len(infos[0]["changes"]) == 6  # 3 plans, 3 growths
    assert infos[0]["timeline"] == infos[1]["timeline"]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # one process, micro-batches of the whole global batch
    single, info = record(*run(Runtime.single(torch.device("cpu")), GLOBAL_BATCH, 1))
    assert info["steps"] == infos[0]["steps"] == 16 and info["schedule"] == infos[0]["schedule"] == [3, 5, 8]
    assert info["changes"] == infos[0]["changes"]  # the same plans: the salience was summed over the ranks
    assert [r["lora_rank_total"] for r in info["timeline"]] == [r["lora_rank_total"] for r in infos[0]["timeline"]]
    assert single.keys() == weights[0].keys()
    worst = max((single[k] - weights[0][k]).abs().max().item() for k in single)
    assert worst <= 1e-5, worst
    assert info["best_step"] == infos[0]["best_step"]
    assert info["best"]["main"] == pytest.approx(infos[0]["best"]["main"], abs=1e-5)


def test_finetune_under_torchrun_writes_once_and_resumes_exactly(ws, tmp_path):  # noqa: F811
    """The CLI under torchrun: only the main rank writes (the result and the checkpoints, which hold every rank's
    RNG and salience); resumed from its step-2 checkpoint, a run ends with the same model as the whole run."""
    args = ["finetune", ws / "bert", *common(ws), "--batch-size", "8", "--method", "apt", "--keep-params", "0.5",
            "--epochs", "2", "--prune-steps", "2", "--eval-every", "2", "--save-every", "2"]
    whole = torchrun(HERE / "cli_child.py", 0, *args, "--out", tmp_path / "whole", "--retain-checkpoints",
                     "--keep-checkpoints", "4")
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert whole.stdout.count("apt on sst2:") == 1  # one summary: the other rank prints nothing
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["processes"] == 2 and report["train_steps"] == 8 and report["layer_params_kept"] <= 0.5
    assert [r["step"] for r in report["timeline"]] == [0, 2, 5]
    kept = tmp_path / "whole.checkpoints"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole", "whole.checkpoints"]
    state = json.loads((kept / "step-00000008" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    shutil.copytree(kept, tmp_path / "partial")
    for name in ("step-00000004", "step-00000006", "step-00000008"):
        shutil.rmtree(tmp_path / "partial" / name, ignore_errors=True)
    resumed = torchrun(HERE / "cli_child.py", 0, *args, "--out", tmp_path / "resumed", "--resume",
                       tmp_path / "partial")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert again["metrics"] == report["metrics"] and again["timeline"] == report["timeline"]
