"""The training loop (seeding, learning, accumulation, best state, log) and keeping the optimizer across surgery."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_config, tiny_inputs
from engine_helpers import labelled_batches, make_plan, max_diff, tiny
from transformers import BertForSequenceClassification

from prunetune import adapters
from prunetune import train as train_module
from prunetune.families import layer_sites
from prunetune.optim import remap_optimizer
from prunetune.plan import PruningPlan
from prunetune.structure import Change
from prunetune.surgery import SliceLog, apply_plan
from prunetune.train import RunContext, TrainConfig, TrainHook, fit

# ---------------------------------------------------------------------------------------------------------
# A tiny learnable task: label = whether token 5 occurs in the sequence
# ---------------------------------------------------------------------------------------------------------


def token5_batches(n: int, seed: int, batch_size: int = 16, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 101, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(1, length, (n,), generator=g)
    pos = labels == 1
    ids[pos, where[pos]] = 5
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size],
         "labels": labels[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def tiny_bert(dropout: float | None = None, seed: int = 0):
    cfg = tiny_config("bert")
    if dropout is not None:
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def accuracy(loader):
    def evaluate(model) -> dict:
        right = total = 0
        with torch.no_grad():
            for b in loader:
                pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                right += int((pred == b["labels"]).sum())
                total += len(pred)
        return {"main": right / total}

    return evaluate


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 5e-4, **kw})


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


# ---------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------


def test_fit_is_reproducible_under_a_fixed_seed():
    train = token5_batches(64, 0)
    evaluate = accuracy(token5_batches(32, 1))
    start = tiny_bert()  # dropout on: the seed must drive it
    a, b, c = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    ra = fit(a, train, evaluate, cfg(epochs=2, lr=1e-3, seed=3))
    rb = fit(b, train, evaluate, cfg(epochs=2, lr=1e-3, seed=3))
    rc = fit(c, train, evaluate, cfg(epochs=2, lr=1e-3, seed=4))
    assert len(losses(ra)) == 8
    assert losses(ra) == losses(rb)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert losses(rc) != losses(ra)  # another seed, other dropout masks


def test_fit_learns_a_separable_task():
    train = token5_batches(256, 0)
    evaluate = accuracy(token5_batches(64, 1))
    model = tiny_bert()
    before = evaluate(model.eval())["main"]
    result = fit(model, train, evaluate, cfg(epochs=8, lr=5e-3, warmup_ratio=0.1))
    loss = losses(result)
    assert len(loss) == 128 and result.steps == 128
    assert sum(loss[-10:]) / 10 < 0.1 < 0.6 < sum(loss[:10]) / 10
    assert result.best["main"] >= 0.9 > before + 0.2
    assert not model.training  # handed back in evaluation mode


def recording_optimizer(monkeypatch) -> list[list[torch.Tensor]]:
    """Make fit's optimizer record the gradients it steps with (after clipping, as the update sees them)."""
    seen: list[list[torch.Tensor]] = []
    real = train_module.make_optimizer

    def make(model, config, total):
        optimizer, scheduler = real(model, config, total)
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
        )
        return optimizer, scheduler

    monkeypatch.setattr(train_module, "make_optimizer", make)
    return seen


def test_gradient_accumulation_sums_micro_batches(monkeypatch):
    """Two micro-batches of 8 and one batch of 16 (same rows, no dropout) step with the same gradient."""
    seen = recording_optimizer(monkeypatch)
    start = tiny_bert(dropout=0.0)
    no_clip = {"lr": 1e-3, "max_grad_norm": 1e9, "epochs": 1}
    ra = fit(copy.deepcopy(start), token5_batches(32, 0, batch_size=16), lambda m: {"main": 0.0}, cfg(**no_clip))
    rb = fit(copy.deepcopy(start), token5_batches(32, 0, batch_size=8), lambda m: {"main": 0.0},
             cfg(grad_accum=2, **no_clip))
    assert ra.steps == rb.steps == 2 and len(rb.history) == 2 and len(seen) == 4
    for whole, accumulated in zip(seen[:2], seen[2:], strict=True):
        scale = max(g.abs().max() for g in whole)
        assert scale > 0
        assert max((g - h).abs().max() for g, h in zip(whole, accumulated, strict=True)) <= 1e-5 * scale

    # an odd number of micro-batches still makes ceil(n / accum) steps per epoch
    rc = fit(copy.deepcopy(start), token5_batches(40, 0, batch_size=8), lambda m: {"main": 0.0},
             cfg(grad_accum=2, epochs=2))
    assert rc.steps == 6 and [h["step"] for h in rc.history] == list(range(1, 7))


def test_best_evaluation_state_is_restored(tmp_path):
    train = token5_batches(128, 0)
    probe = tiny_inputs("bert", seed=7)
    scripted = iter([0.3, 0.9, 0.5, 0.1])  # the 2nd evaluation (step 4) is the best, whatever the model does

    def evaluate(model) -> dict:
        with torch.no_grad():
            out = model(**probe).logits
        return {"main": next(scripted), "fingerprint": out.sum().item(), "logits": out.tolist()}

    model = tiny_bert()
    result = fit(model, train, evaluate, cfg(epochs=1, lr=5e-3, eval_every=2),
                 context=RunContext(log_path=tmp_path / "log.jsonl"))
    assert result.best_step == 4 and result.best["main"] == 0.9
    evals = [h["eval"] for h in result.history if "eval" in h]
    assert len(evals) == 4 and evals[1] == result.best
    with torch.no_grad():
        now = model(**probe).logits
    assert now.tolist() == result.best["logits"]  # exactly the weights evaluated at step 4
    assert now.tolist() != evals[-1]["logits"]


def test_log_has_one_line_per_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    result = fit(tiny_bert(), token5_batches(96, 0), accuracy(token5_batches(16, 1)),
                 cfg(epochs=2, eval_every=4, warmup_ratio=0.25), context=RunContext(log_path=log))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == result.steps == 12
    assert [e["step"] for e in lines] == list(range(1, 13))
    assert [e["loss"] for e in lines] == losses(result)
    assert [e["step"] for e in lines if "eval" in e] == [4, 8, 12]
    lrs = [e["lr"] for e in lines]
    assert lrs[0] < lrs[2] and lrs[-1] == 0.0 and max(lrs) == pytest.approx(5e-4)  # warm-up, then decay to zero
    assert all(e["examples_per_s"] > 0 for e in lines)


def test_every_hook_sees_every_step_and_a_structural_change_resets_the_best():
    class Recorder(TrainHook):
        def __init__(self, changes_at: int | None = None):
            self.changes_at = changes_at
            self.steps, self.evals, self.changes = [], [], []

        def start(self, total, runtime):
            self.total = total

        def after_step(self, step, model):
            self.steps.append((step, self.total))
            if step == self.changes_at:  # a change that keeps everything: the structure is rebuilt all the same
                return Change(plan=PruningPlan.identity(model))
            return None

        def after_change(self, step, change, model, log, before):
            self.changes.append(step)

        def after_eval(self, step, metrics, model, is_best):
            self.evals.append((step, is_best))

    changer, watcher = Recorder(changes_at=3), Recorder()
    scripted = iter([0.9, 0.1, 0.2])
    result = fit(tiny_bert(), token5_batches(96, 0), lambda m: {"main": next(scripted)},
                 cfg(epochs=1, eval_every=2), hooks=[changer, watcher])
    # the second hook sees step 3 too, although the first one asked for a change there; both followed it
    assert changer.steps == watcher.steps == [(s, 6) for s in range(1, 7)]
    assert changer.changes == watcher.changes == [3]
    # step 2's 0.9 was dropped with the old structure: step 4's 0.1 is then the best so far
    assert changer.evals == watcher.evals == [(2, True), (4, True), (6, True)]
    assert result.best_step == 6 and result.best["main"] == 0.2


# ---------------------------------------------------------------------------------------------------------
# remap_optimizer: the optimizer survives surgery
# ---------------------------------------------------------------------------------------------------------


def _train_steps(model, optimizer, batches) -> None:
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_remap_optimizer_slices_and_grows_adam_state():
    model = adapters.apply_lora(tiny("bert", "classify"), rank=2)
    adapters.set_trainable(model, norms=True, head=True, all_params=True)  # base weights carry state too
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _train_steps(model, optimizer, labelled_batches("bert", 2))

    site = layer_sites(model)[0].attentions["self"]
    q, o = site.proj("q"), site.proj("o")
    tracked = {
        "q": q.base_layer.weight, "o": o.base_layer.weight,
        "q_lora_B": q.lora_B[adapters.ADAPTER].weight, "o_lora_A": o.lora_A[adapters.ADAPTER].weight,
    }
    old = {k: {s: v.clone() for s, v in optimizer.state[p].items()} for k, p in tracked.items()}
    assert all(float(st["step"]) == 2 for st in old.values())

    plan = make_plan("bert", model, "heads")
    rows = torch.tensor([h * site.head_dim + j for h in plan.heads[site.key] for j in range(site.head_dim)])
    log = SliceLog()
    apply_plan(model, plan, log)
    assert remap_optimizer(optimizer, log) == len(log.lineage) > 0

    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(id(p) in held for p in trainable)  # every live parameter is optimised...
    assert not any(id(old_p) in held for old_p, _, _ in log.lineage.values())  # ...and no replaced one
    new = {"q": q.base_layer.weight, "o": o.base_layer.weight,
           "q_lora_B": q.lora_B[adapters.ADAPTER].weight, "o_lora_A": o.lora_A[adapters.ADAPTER].weight}
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[new["q"]][key], old["q"][key][rows])  # sliced q rows
        assert torch.equal(optimizer.state[new["o"]][key], old["o"][key][:, rows])  # sliced o columns
        assert torch.equal(optimizer.state[new["q_lora_B"]][key], old["q_lora_B"][key][rows])
        assert torch.equal(optimizer.state[new["o_lora_A"]][key], old["o_lora_A"][key][:, rows])
    assert all(float(optimizer.state[p]["step"]) == 2 for p in new.values())

    # rank growth: the state gets zero moments for the new directions
    a_before = {k: v.clone() for k, v in optimizer.state[q.lora_A[adapters.ADAPTER].weight].items()}
    b_before = {k: v.clone() for k, v in optimizer.state[new["q_lora_B"]].items()}
    grow_log = SliceLog()
    assert adapters.grow_rank(q, 5, grow_log)
    assert remap_optimizer(optimizer, grow_log) == 2
    a_state = optimizer.state[q.lora_A[adapters.ADAPTER].weight]
    b_state = optimizer.state[q.lora_B[adapters.ADAPTER].weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a_state[key][:2], a_before[key]) and torch.all(a_state[key][2:] == 0)
        assert torch.equal(b_state[key][:, :2], b_before[key]) and torch.all(b_state[key][:, 2:] == 0)
        assert a_state[key].shape == (5, q.base_layer.weight.shape[1])

    # and training carries on, on the new tensors
    grown_a = q.lora_A[adapters.ADAPTER].weight.detach().clone()
    _train_steps(model, optimizer, labelled_batches("bert", 1))
    assert max_diff(q.lora_A[adapters.ADAPTER].weight.detach(), grown_a) > 0
    assert float(a_state["step"]) == 3


# ---------------------------------------------------------------------------------------------------------
# Rank growth late in training: new rows must not inherit the tensor's bias correction
# ---------------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-3, amsgrad=True),
}


def _grow(optimizer, p: torch.nn.Parameter, dim: int, extra: int, g: torch.Generator) -> torch.nn.Parameter:
    shape = list(p.shape)
    shape[dim] = extra
    new = torch.nn.Parameter(torch.cat([p.detach(), 0.1 * torch.randn(shape, generator=g)], dim))
    log = SliceLog()
    log.record_growth(p, new, dim, p.shape[dim])
    remap_optimizer(optimizer, log)
    return new


def _slice(optimizer, p: torch.nn.Parameter, dim: int, index: list[int]) -> torch.nn.Parameter:
    idx = torch.tensor(index)
    new = torch.nn.Parameter(p.detach().index_select(dim, idx).clone())
    log = SliceLog()
    log.record(p, new, dim, idx)
    remap_optimizer(optimizer, log)
    return new


def _fresh(kind: str, value: torch.Tensor):
    p = torch.nn.Parameter(value.detach().clone())
    return p, OPTIMIZERS[kind]([p])


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_grown_rows_update_like_a_fresh_adam(kind):
    """After 500 steps, rows added by growth used to move 2-6x the learning rate (zero moments, bias correction
    of step 500); now every row updates exactly as a fresh Adam of its own age would, old rows untouched."""
    g = torch.Generator().manual_seed(0)
    lr = 1e-3
    p = torch.nn.Parameter(torch.randn(4, 8, generator=g))
    optimizer = OPTIMIZERS[kind]([p])
    for _ in range(500):
        p.grad = torch.randn(4, 8, generator=g) + 0.3
        optimizer.step()
    old_ref, old_opt = _fresh(kind, p)
    old_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # the old rows go on as if nothing grew
    p = _grow(optimizer, p, 0, 2, g)
    cohorts = [(4, 6, *_fresh(kind, p[4:]))]  # rows 4..5: a fresh Adam of their own
    biggest = 0.0
    for step in range(150):
        if step == 80:  # a second growth, 80 steps later: rows 6..8, fresh again
            p = _grow(optimizer, p, 0, 3, g)
            cohorts.append((6, 9, *_fresh(kind, p[6:])))
        grad = torch.randn(p.shape, generator=g) + 0.3
        skip = step == 40  # a step in which the parameter got no gradient: Adam skips it, and so must the hook
        before = p.detach().clone()
        p.grad = None if skip else grad
        optimizer.step()
        old_ref.grad = None if skip else grad[:4]
        old_opt.step()
        for start, stop, ref, ref_opt in cohorts:
            ref.grad = None if skip else grad[start:stop].clone()
            ref_opt.step()
        biggest = max(biggest, (p.detach()[4:] - before[4:]).abs().max().item())
        if skip:
            assert torch.equal(p.detach(), before)
    assert biggest <= 1.1 * lr, f"a new row moved {biggest / lr:.2f} x lr in one step"
    torch.testing.assert_close(p.detach()[:4], old_ref.detach(), atol=1e-7, rtol=0)
    for start, stop, ref, _ in cohorts:
        torch.testing.assert_close(p.detach()[start:stop], ref.detach(), atol=1e-6, rtol=0)


def test_grown_columns_follow_later_slicing():
    """lora_B grows columns and may later lose rows (its output side pruned): the correction follows the slice."""
    g = torch.Generator().manual_seed(1)
    b = torch.nn.Parameter(torch.randn(6, 3, generator=g))
    optimizer = OPTIMIZERS["adamw"]([b])
    for _ in range(300):
        b.grad = torch.randn(6, 3, generator=g)
        optimizer.step()
    b = _grow(optimizer, b, 1, 2, g)
    ref, ref_opt = _fresh("adamw", b[:, 3:])
    for step in range(60):
        if step == 20:
            rows = [0, 2, 5]
            b = _slice(optimizer, b, 0, rows)
            ref = _slice(ref_opt, ref, 0, rows)
        grad = torch.randn(b.shape, generator=g)
        b.grad, ref.grad = grad, grad[:, 3:].clone()
        optimizer.step()
        ref_opt.step()
    torch.testing.assert_close(b.detach()[:, 3:], ref.detach(), atol=1e-6, rtol=0)
