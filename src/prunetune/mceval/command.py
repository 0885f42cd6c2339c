"""`prunetune eval`: load a causal LM (an export reloads with AutoModelForCausalLM), score it, print, write JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from prunetune.config import EvalConfig
from prunetune.errors import PrunetuneError
from prunetune.mceval.benchmarks import BENCHMARKS, parse
from prunetune.mceval.harness import evaluate
from prunetune.mceval.sources import data_dir


def table(result: dict) -> str:
    """One row per benchmark: acc, acc_norm, the headline score, chance and the score above it; then the average."""
    lines = [f"{'benchmark':<16}{'items':>7}{'acc':>8}{'acc_norm':>10}{'score':>8}{'chance':>8}{'above':>8}"]
    for name, r in result["benchmarks"].items():
        m = r["metrics"]
        norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-"
        lines.append(f"{name:<16}{r['items']:>7}{m['acc']:>8.4f}{norm:>10}{r['score']:>8.4f}{r['chance']:>8.4f}"
                     f"{r['above_chance']:>+8.4f}")
    lines.append(f"{'average':<16}{'':>7}{'':>8}{'':>10}{result['average']:>8.4f}{'':>8}"
                 f"{result['average_above_chance']:>+8.4f}")
    lines.append("score: acc_norm where the harness reports it (ARC, HellaSwag), else acc (MMLU item-weighted, "
                 f"TruthfulQA MC2 = mass on true answers); {result['shots']}-shot"
                 + (f", first {result['limit']} items per task" if result["limit"] else "") + f"; {result['harness']}")
    return "\n".join(lines)


def _write_json(path: Path, obj: dict) -> None:
    """Atomically: a temporary file in the same directory, renamed over the target once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_eval(cfg: EvalConfig) -> dict:
    from prunetune.models import load_auto, load_tokenizer, resolve

    parse(cfg.bench)
    root = data_dir(cfg.eval_data)  # refused before any weights load
    if cfg.out is not None and Path(cfg.out).is_dir():
        raise PrunetuneError(f"--out {cfg.out} is a directory; give the JSON file to write")
    location = resolve(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_auto(location, "AutoModelForCausalLM").to(device).eval()
    result = evaluate(model, load_tokenizer(location), cfg.bench, data=str(root), limit=cfg.limit, shots=cfg.shots,
                      batch_size=cfg.batch_size, items=cfg.out is not None)
    result = {"model": location, "data": str(root), **result}
    if cfg.out is not None:
        _write_json(Path(cfg.out), result)
        for r in result["benchmarks"].values():  # the table and the return value stay small
            r.pop("per_item", None)
    return result


__all__ = ["BENCHMARKS", "run_eval", "table"]
