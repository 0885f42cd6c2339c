"""One `prunetune` CLI run in its own process, as the method benchmarks start them (compare_methods.py,
squad_methods.py, llama_instruct.py, summarize_methods.py): offline, no progress bars, optionally a compact heap,
its report read back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def run_report(cmd: list[str], out: Path, label: str, *, compact_heap: bool) -> dict:
    """Run `cmd` (a finetune writing to `out`); exit with its stderr's tail if it fails; its report.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if compact_heap:
        # glibc's default keeps freed activations in the heap (its mmap threshold grows to 32 MiB), so the
        # resident peak measured the allocator's history more than the method: 1125 MB for a LoRA run whose
        # live tensors peak near 480 MB. A fixed 64 KiB threshold maps every larger block on its own and
        # unmaps it on free; it slows CPU training ~1.5x, for every method alike.
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    print(report["summary"], flush=True)
    return report
