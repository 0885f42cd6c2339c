"""The loop's run state: the resumable data order, checkpoints on disk, and resumed = uninterrupted, to the bit."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from engine_helpers import tiny
from torch.utils.data import DataLoader

from prunetune import adapters
from prunetune.apt import AptHook
from prunetune.checkpoint import MARKER, CheckpointStore
from prunetune.config import AptOptions
from prunetune.errors import PrunetuneError
from prunetune.plan import Budget, layer_param_count
from prunetune.runtime import EpochBatches
from prunetune.state import RunState, capture_rng, decode, encode, restore_rng
from prunetune.train import RunContext, TrainConfig, fit

# ---------------------------------------------------------------------------------------------------------
# The data order
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch", [(37, 5), (32, 8)])
def test_epoch_batches_are_the_dataloaders_and_resume_anywhere(n, batch):
    """A single process reads the batches a seeded shuffling DataLoader gives, epoch after epoch, and an epoch read
    from micro-batch k on is the tail of the whole epoch."""
    loader = DataLoader(list(range(n)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(7))
    for epoch in range(3):
        expected = [b.tolist() for b in loader]
        assert EpochBatches(n, batch, shuffle=True, seed=7, epoch=epoch).all_batches() == expected
        for start in (0, 1, len(expected) - 1):
            assert list(EpochBatches(n, batch, shuffle=True, seed=7, epoch=epoch, start=start)) == expected[start:]


def test_ranks_share_each_global_batch():
    """Two ranks of per-rank batch 4 read together, micro-batch by micro-batch, what one process of batch 8 reads."""
    one = EpochBatches(32, 8, shuffle=True, seed=3, epoch=1).all_batches()
    ranks = [EpochBatches(32, 4, shuffle=True, seed=3, epoch=1, rank=r, world_size=2).all_batches() for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    odd = [EpochBatches(13, 4, shuffle=False, seed=0, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    assert [len(b) for b in odd[0]] == [len(b) for b in odd[1]]  # padded to equal shares (DistributedSampler)


# ---------------------------------------------------------------------------------------------------------
# The state on disk
# ---------------------------------------------------------------------------------------------------------


def test_encoding_keeps_tensors_tuples_int_keys_and_rng_states():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    obj = {"opt": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}}, "betas": (0.9, 0.999)}
    obj["rng"] = capture_rng()
    tensors: dict = {}
    meta = encode(obj, tensors, "x")
    back = decode(json.loads(json.dumps(meta)), tensors)
    assert set(back["opt"]) == {0} and back["betas"] == (0.9, 0.999)
    assert torch.equal(back["opt"][0]["exp_avg"], obj["opt"][0]["exp_avg"])
    draws = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws


def test_checkpoints_are_kept_atomic_and_refused_when_foreign(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=2)
    store.create()
    assert (tmp_path / "ck" / MARKER).is_file()
    for step in (2, 4, 6):
        store.save(RunState(step=step, params={"w": torch.ones(2) * step}), {"method": "x"})
    assert [p.name for p in store.checkpoints()] == ["step-00000004", "step-00000006"]
    (tmp_path / "ck" / ".step-00000008.tmp").mkdir()  # a kill mid-write: never a checkpoint
    again, latest = CheckpointStore.for_resume(tmp_path / "ck")
    assert latest.name == "step-00000006" and not (tmp_path / "ck" / ".step-00000008.tmp").exists()
    assert torch.equal(again.load(latest).params["w"], torch.ones(2) * 6)
    with pytest.raises(PrunetuneError, match="--resume"):
        CheckpointStore(tmp_path / "ck").create()  # another run's checkpoints are not silently replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(PrunetuneError, match="not made by prunetune"):
        CheckpointStore(tmp_path / "foreign").create(overwrite=True)
    with pytest.raises(PrunetuneError, match="not a prunetune checkpoint"):
        CheckpointStore.for_resume(tmp_path / "foreign")


# ---------------------------------------------------------------------------------------------------------
# Resumed = uninterrupted, in-process
# ---------------------------------------------------------------------------------------------------------


def _rows(n: int = 48, length: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(6, 100, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 3] = 5
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _apt_run(store: CheckpointStore | None = None, resume: RunState | None = None):
    """APT on a tiny BERT (dropout on) with distillation: 24 steps, pruning at steps 5, 9 and 12."""
    model = tiny("bert", "classify")  # fresh and identical every time (seeded)
    dense = layer_param_count(model)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    options = AptOptions(prune_steps=3, prune_start=0.2, prune_end=0.5, distill=True)
    hook = AptHook(peft_model, options, Budget(keep_params=0.5), dense)
    loader = DataLoader(_rows(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(11))
    probe = _rows(8, 10)

    def evaluate(m) -> dict:
        with torch.no_grad():
            out = m(input_ids=torch.stack([r["input_ids"] for r in probe])).logits
        return {"main": -float(out.pow(2).mean())}

    ctx = RunContext(save_every=1 if store else 0, save=(lambda s: store.save(s, {})) if store else None,
                     resume=resume)
    try:
        result = fit(peft_model, loader, evaluate, TrainConfig(epochs=4, lr=3e-3, eval_every=3, seed=9),
                     hooks=[hook], context=ctx)
    finally:
        hook.close()
    return peft_model, hook, result


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_resumed_fit_is_bit_identical_before_between_and_after_pruning(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=100)
    store.create()
    model, hook, result = _apt_run(store)
    assert sorted(hook.schedule) == [5, 9, 12] and result.steps == 24
    reference = _weights(model)
    for step in (3, 7, 15):  # before the first pruning step, between two, after the last
        resumed, hook2, result2 = _apt_run(resume=CheckpointStore.load(tmp_path / "ck" / f"step-{step:08d}"))
        again = _weights(resumed)
        assert again.keys() == reference.keys(), step
        assert all(torch.equal(again[k], reference[k]) for k in again), step
        assert hook2.timeline.rows == hook.timeline.rows and result2.best == result.best, step
        assert [h["loss"] for h in result2.history] == [h["loss"] for h in result.history], step
