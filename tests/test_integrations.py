"""The transformers Trainer with prunetune's PruningCallback: the plans and weights of the library's own loop (`fit`
with APT's hook) under the same seed, data and order, with and without gradient accumulation; a run resumed from a
Trainer checkpoint equals the uninterrupted one; evaluation runs on the pruned model; pruning before training; the
export reloads with the stock Auto classes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import lively
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, default_data_collator

import prunetune
from prunetune import adapters
from prunetune.apt import AptHook
from prunetune.config import AptOptions, TrainingOptions
from prunetune.errors import PrunetuneError
from prunetune.integrations import PruningCallback
from prunetune.plan import Budget, layer_cost, model_info
from prunetune.train import fit

HERE = Path(__file__).parent
ROWS, LENGTH = 32, 12
BUDGET = Budget(keep_params=0.5)
# 3 epochs of 8 steps (batch 4): pruning at steps 5, 9 and 12, each followed by rank growth
# no distillation: it changes the loss, which a callback cannot (the callback turns it off with a warning)
APT = AptOptions(prune_steps=3, prune_start=0.2, prune_end=0.5, distill=False)
LR, EPOCHS = 3e-3, 3


class Rows(torch.utils.data.Dataset):
    """Seeded token rows with a label the model can learn (whether the first token is high)."""

    def __init__(self, n: int = ROWS, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 100, (n, LENGTH), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[::3, -4:] = 0  # some padding
        self.labels = (self.ids[:, 1] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def peft_model(family: str = "bert"):
    """A tiny classifier without dropout (dropout draws cannot agree between two loops), with LoRA everywhere."""
    cfg = tiny_config(family)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(cfg, name):
            setattr(cfg, name, 0.0)
    torch.manual_seed(0)
    cls = (transformers.BertForSequenceClassification if family == "bert"
           else transformers.LlamaForSequenceClassification)
    model = lively(cls(cfg))
    torch.manual_seed(1)
    return adapters.apply_lora(model, rank=2, targets="all")


def arguments(out, **kw) -> TrainingArguments:
    """The Trainer's settings that match fit's (AdamW, linear decay without warm-up, clipping at 1, rows in order)."""
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=EPOCHS, learning_rate=LR,
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    optim="adamw_torch", train_sampling_strategy="sequential", seed=0, report_to="none",
                    logging_strategy="no", save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True,
                    remove_unused_columns=False, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **kw})


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def structure(changes: list[dict]) -> list:
    """What the changes removed and grew, step by step (the plans' heads, neurons, hidden dims and new ranks)."""
    out = []
    for record in changes:
        plan = record["change"]["plan"]
        kept = {k: plan[k] for k in ("heads", "neurons", "hidden")} if plan is not None else None
        out.append((record["step"], kept, record["change"]["ranks"]))
    return out


def run_trainer(out, callback: PruningCallback, model=None, resume=None, **kw) -> tuple:
    model = model if model is not None else peft_model()
    trainer = Trainer(model=model, args=arguments(out, **kw), train_dataset=Rows(),
                      data_collator=default_data_collator, callbacks=[callback])
    # PEFT's forward takes **kwargs, so the Trainer believes the model divides its loss by the rows of the whole
    # accumulated step; BERT's classifier takes the batch mean, so the Trainer's gradients would be `accum` times
    # fit's (the same plan, other clipping). Told the truth, it divides by the accumulation steps as fit does.
    trainer.model_accepts_loss_kwargs = False
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def run_fit(batch_size: int = 4, grad_accum: int = 1) -> tuple:
    model = peft_model()
    loader = torch.utils.data.DataLoader(Rows(), batch_size=batch_size, shuffle=False, collate_fn=default_data_collator)
    hook = AptHook(model, APT, BUDGET, layer_cost(model))
    options = TrainingOptions(lr=LR, epochs=EPOCHS, batch_size=batch_size, grad_accum=grad_accum, seed=0,
                              warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0)
    # an evaluation that never improves on the first keeps fit's weights those of its last step, as the Trainer's
    result = fit(model, loader, lambda m: {"main": 0.0}, options, hooks=[hook], device=torch.device("cpu"))
    hook.close()
    return result, model, hook


@pytest.mark.parametrize("batch,accum", [(4, 1), (2, 2)])
def test_trainer_with_the_callback_prunes_as_fit_does(tmp_path, batch, accum):
    callback = PruningCallback(BUDGET, APT)
    _, model = run_trainer(tmp_path, callback, per_device_train_batch_size=batch, gradient_accumulation_steps=accum)
    result, reference, hook = run_fit(batch, accum)
    assert [r["step"] for r in callback.changes if r["change"]["plan"]] == [5, 9, 12]
    assert structure(callback.changes) == structure(result.changes)  # the same units removed, the same ranks grown
    assert callback.timeline == hook.timeline.rows
    assert model_info(model) == model_info(reference)
    ours, theirs = trained(model), trained(reference)
    assert ours.keys() == theirs.keys()
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert worst < 1e-5, worst
    # the Trainer's optimizer was remapped in place: it holds exactly the model's trainable tensors now
    live = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in callback._optimizer.param_groups for p in g["params"]} == live


def test_resumed_from_a_trainer_checkpoint_equals_uninterrupted(tmp_path):
    # the uninterrupted run writes checkpoints at steps 8 and 16 (after one and after all three pruning steps)
    whole = PruningCallback(BUDGET, APT)
    _, model = run_trainer(tmp_path / "whole", whole, save_strategy="steps", save_steps=8)
    checkpoint = tmp_path / "whole" / "checkpoint-8"
    assert (checkpoint / "prunetune_pruning.json").is_file()
    # resumed in a new Trainer, on a freshly built model whose structure prepare_resume restores first
    again = PruningCallback(BUDGET, APT)
    fresh = peft_model()
    again.prepare_resume(fresh, checkpoint)
    assert layer_cost(fresh) < layer_cost(peft_model())  # pruned as the run was at step 8
    _, resumed = run_trainer(tmp_path / "again", again, model=fresh, resume=str(checkpoint))
    assert structure(again.changes) == structure(whole.changes)
    assert again.timeline == whole.timeline
    ours, theirs = trained(resumed), trained(model)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours), [n for n in ours if not torch.equal(ours[n], theirs[n])]


def test_resuming_without_prepare_resume_is_refused(tmp_path):
    run_trainer(tmp_path / "whole", PruningCallback(BUDGET, AptOptions(prune_steps=1, prune_start=0.9, prune_end=0.9)),
                save_strategy="steps", save_steps=8)
    # the checkpoint of step 8 precedes any pruning: the Trainer loads it, the callback must still know the salience
    with pytest.raises(PrunetuneError, match="prepare_resume"):
        run_trainer(tmp_path / "again", PruningCallback(BUDGET, APT), resume=str(tmp_path / "whole" / "checkpoint-8"))


def test_evaluation_runs_on_the_pruned_model_and_the_export_reloads(tmp_path):
    callback = PruningCallback(BUDGET, APT)
    model = peft_model()
    dev = Rows(12, seed=5)
    trainer = Trainer(model=model, args=arguments(tmp_path, eval_strategy="steps", eval_steps=4,
                                                  per_device_eval_batch_size=5),
                      train_dataset=Rows(), eval_dataset=dev, data_collator=default_data_collator,
                      callbacks=[callback])
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [4, 8, 12, 16, 20, 24]  # before, between and after the pruning steps
    assert all(math.isfinite(e["eval_loss"]) for e in evals)
    assert [e["step"] for e in callback.hook.eval_history] == [4, 8, 12, 16, 20, 24]
    # the last evaluation is the pruned model's own loss on the dev rows
    batch = default_data_collator([dev[i] for i in range(len(dev))])
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert evals[-1]["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert model_info(model)["layer_params"] <= 0.5 * model_info(peft_model())["layer_params"] + 1
    # export: merged, compact, reloaded by the stock Auto class (after import prunetune)
    callback.export(trainer.model, tmp_path / "export")
    assert prunetune.__name__  # the import registers the pruned model types
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (again - logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pruning_before_training_reaches_the_budget_and_trains(tmp_path, family):
    options = AptOptions(prune_before_training=True, scorer="fisher")
    callback = PruningCallback(BUDGET, options, samples=8)
    model = peft_model(family)
    dense = layer_cost(model)
    run_trainer(tmp_path, callback, model=model, num_train_epochs=1)
    assert [r["step"] for r in callback.changes] == [0]  # once, before the first step; nothing during training
    assert layer_cost(model) <= 0.5 * dense
    live = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in callback._optimizer.param_groups for p in g["params"]} == live


def test_data_parallel_ranks_agree_and_equal_one_process(tmp_path):
    """torchrun, 2 gloo processes of 2 rows each: the Trainer's DDP wrapper is rebuilt after each change, the
    salience summed over the ranks (runtime.py), so both ranks prune alike and as one process with 4 rows does."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "trainer_ddp_worker.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=HERE,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)]),
                               "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
                               "MASTER_ADDR": "127.0.0.1"})
    assert done.returncode == 0, done.stderr[-4000:]
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos[0]["world"] == 2 and infos[0]["changes"] == infos[1]["changes"] and len(infos[0]["changes"]) == 6
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    single = PruningCallback(BUDGET, APT)
    _, model = run_trainer(tmp_path / "single", single)
    assert structure(single.changes) == structure(infos[0]["changes"])
    ours = trained(model)
    assert ours.keys() == weights[0].keys()
    assert max((ours[k] - weights[0][k]).abs().max().item() for k in ours) < 1e-5
