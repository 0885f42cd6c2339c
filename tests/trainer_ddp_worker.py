"""A test helper: the transformers Trainer with PruningCallback as one rank of a `torchrun` job (see
test_integrations.py).

    torchrun --standalone --nproc-per-node 2 tests/trainer_ddp_worker.py OUT

Each rank writes OUT/rank<r>.safetensors (its trainable weights) and OUT/rank<r>.json (the structure changes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)


def main(out: Path) -> None:
    from test_integrations import APT, BUDGET, run_trainer, trained

    from prunetune.integrations import PruningCallback

    callback = PruningCallback(BUDGET, APT)
    # 2 rows per rank and step: the global batch of the single-process run (4)
    trainer, model = run_trainer(out / "trainer", callback, per_device_train_batch_size=2)
    rank = trainer.args.process_index
    save_file({n: t.contiguous() for n, t in trained(model).items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"changes": callback.changes, "timeline": callback.timeline,
                                                      "world": trainer.args.world_size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
