"""A test helper, run as a script (or by torchrun): `prunetune ...` without the fresh-process latency measurement,
optionally SIGKILLed while it writes the checkpoint of a step.

    python tests/cli_child.py STEP finetune ARGS...     (STEP 0: never killed)

At STEP the process leaves half a checkpoint on disk (a temporary folder with a truncated state) and kills itself
with SIGKILL: nothing of Python's shutdown runs, as when a job is killed or a machine goes down.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

torch.set_num_threads(1)  # the test process runs single-threaded too: the same arithmetic, to the bit

from prunetune import checkpoint, recipes  # noqa: E402
from prunetune.cli import main  # noqa: E402

KILL_AT = int(sys.argv[1])
_save = checkpoint.CheckpointStore.save


def _save_then_die(self, state, config):
    if KILL_AT and state.step == KILL_AT:
        tmp = self.directory / f".{checkpoint.PREFIX}{state.step:08d}.tmp"
        tmp.mkdir()
        (tmp / checkpoint.STATE).write_text('{"format": 1, "step": ')
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(self, state, config)


checkpoint.CheckpointStore.save = _save_then_die
# the fresh-process latency measurement is not what this is about
recipes._isolated_inference = lambda task, model_dir, cfg: {
    "batch32_latency_s": 0.0, "batch32_peak_mem_mb": 0.0, "batch32_seq_len": cfg.max_length}
sys.exit(main(sys.argv[2:]))
