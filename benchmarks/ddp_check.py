"""`apt` in one process against two data-parallel processes (torchrun) with the same global batch.

Runs `prunetune finetune --method apt` on the real embedded MiniLM and the bundled SST-2 sample twice: once in
one process with batch 2B, once under `torchrun --standalone --nproc-per-node 2` with batch B per process (gloo
on CPUs, NCCL on GPUs), and prints the final dev accuracy, whether the two runs pruned the same structures (the
kept heads and neurons of the final layout), and the wall and training times.

    python benchmarks/ddp_check.py --out runs/ddp_check                       # the full run
    python benchmarks/ddp_check.py --train-limit 128 --eval-limit 64 --out /tmp/ddp_smoke   # a smoke test

MiniLM trains with dropout, whose masks cannot agree between one process and two (each draws for its own rows):
with it the two runs differ by more than rounding, and their plans may differ in a few structures. By default
(--no-dropout) both runs therefore use a copy of MiniLM whose config sets the dropout rates to 0 (the same
weights): what is left between the runs is the order of the gradient sums, so the plans should be identical and
the accuracies equal; --dropout keeps the model as shipped. tests/test_ddp.py checks the same equivalence to 1e-5
on tiny models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def dropout_free_copy(where: Path) -> Path:
    """The embedded MiniLM with its dropout rates set to 0 in the config (weights and tokenizer linked, not copied)."""
    from prunetune.models import resolve

    src = Path(resolve(None))
    where.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not (where / f.name).exists():
            (where / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    for key in [k for k in config if k.endswith("dropout_prob") or k.endswith("dropout")]:
        config[key] = 0.0
    (where / "config.json").write_text(json.dumps(config, indent=1))
    return where


def finetune(out: Path, batch_size: int, args, processes: int) -> tuple[dict, float]:
    cmd = ["-m", "prunetune.cli", "finetune", *([str(args.model)] if args.model else []), "--task", "sst2",
           "--method", "apt", "--out", str(out), "--overwrite",
           "--epochs", str(args.epochs), "--batch-size", str(batch_size), "--max-length", str(args.max_length),
           "--seed", str(args.seed), "--keep-params", str(args.keep_params)]
    for flag, value in (("--train-limit", args.train_limit), ("--eval-limit", args.eval_limit)):
        if value:
            cmd += [flag, str(value)]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    print(f"== {processes} process(es): {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text()), wall


def layout(out: Path) -> dict:
    return json.loads((out / "model" / "config.json").read_text()).get("prunetune_layout") or {}


def kept(plan: dict) -> set[tuple]:
    units = {("head", k, i) for k, v in plan.get("heads", {}).items() for i in v}
    units |= {("neuron", k, i) for k, v in plan.get("neurons", {}).items() for i in v}
    return units | {("hidden", "", i) for i in plan.get("hidden") or []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ddp_check")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="per process; the single process gets twice as many")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="default: the bundled 4000-row SST-2 sample")
    p.add_argument("--eval-limit", type=int, default=None, help="default: all 872 dev rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--keep-params", type=float, default=0.4)
    p.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=False,
                   help="keep MiniLM's dropout (default: a copy with dropout 0, see the docstring)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model = None if args.dropout else dropout_free_copy(out / "minilm_no_dropout")
    single, single_wall = finetune(out / "one_process", 2 * args.batch_size, args, 1)
    ddp, ddp_wall = finetune(out / "two_processes", args.batch_size, args, 2)
    a, b = kept(layout(out / "one_process")), kept(layout(out / "two_processes"))
    same = a == b
    overlap = len(a & b) / max(1, len(a | b))
    rows = [
        ("processes", 1, ddp["processes"]),
        ("batch per process", 2 * args.batch_size, args.batch_size),
        ("dev accuracy", f"{100 * single['metrics']['main']:.2f}", f"{100 * ddp['metrics']['main']:.2f}"),
        ("layer params kept", f"{single['layer_params_kept']:.1%}", f"{ddp['layer_params_kept']:.1%}"),
        ("heads / neurons kept", f"{single['heads']} / {single['neurons']}", f"{ddp['heads']} / {ddp['neurons']}"),
        ("training steps", single["train_steps"], ddp["train_steps"]),
        ("training time s", f"{single['train_time_s']:.1f}", f"{ddp['train_time_s']:.1f}"),
        ("wall time s (whole command)", f"{single_wall:.1f}", f"{ddp_wall:.1f}"),
    ]
    text = "| | 1 process | 2 processes |\n|---|---|---|\n" + "\n".join(f"| {k} | {x} | {y} |" for k, x, y in rows)
    text += (f"\n\nplans identical: {'yes' if same else 'no'} ({overlap:.1%} of the kept structures in common; "
             + ("dropout draws differ between the runs, see the docstring)\n" if args.dropout else
                "dropout off in both runs)\n"))
    print("\n" + text)
    (out / "results.md").write_text(text)
    record = {"args": {**vars(args), "model": str(args.model)}, "one_process": single, "two_processes": ddp,
              "wall_s": [single_wall, ddp_wall], "plans_identical": same, "kept_overlap": overlap}
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
