"""APT: the cubic schedule, pruning inside `fit`, GQA, hidden dims, distillation with a teacher, reproducibility."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import logits, tiny_config, tiny_inputs
from engine_helpers import masks_for, max_diff, tiny

from prunetune import adapters
from prunetune import train as train_module
from prunetune.apt import AptHook, cubic_schedule
from prunetune.config import AptOptions
from prunetune.families import hidden_size, layer_sites
from prunetune.masks import attach
from prunetune.plan import Budget, layer_cost, layer_param_count, select
from prunetune.runtime import Runtime
from prunetune.structure import step_changes
from prunetune.train import TrainConfig, fit

# ---------------------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,steps,keep", [(1000, 10, 0.4), (200, 5, 0.3), (12, 4, 0.5), (7, 10, 0.6), (1, 3, 0.4),
                                              (50, 1, 0.25)])
def test_cubic_schedule_ends_exactly_at_the_target_and_decreases(total, steps, keep):
    cfg = AptOptions(prune_steps=steps, prune_start=0.05, prune_end=0.5)
    schedule = cubic_schedule(cfg, keep, total)
    order = sorted(schedule)
    values = [schedule[s] for s in order]
    assert values[-1] == keep  # exactly, not approximately
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert all(keep <= v < 1 for v in values)
    assert order[0] >= 1 and order[-1] <= max(1, total)
    if total >= 100:
        assert len(order) == steps
        assert order[0] == round(0.05 * total) and order[-1] == round(0.5 * total)
        # cubic: the first step removes the most (more than a linear schedule would)
        assert 1 - values[0] > (1 - keep) / steps


# ---------------------------------------------------------------------------------------------------------
# Pruning inside fit
# ---------------------------------------------------------------------------------------------------------


def batches_for(family: str, n: int = 4, batch: int = 4) -> list[dict]:
    out = []
    for seed in range(n):
        b = tiny_inputs(family, batch=batch, seed=20 + seed)
        if family == "t5":  # classification: T5 reads the last <eos> of every row
            b.pop("decoder_input_ids")
            b["attention_mask"][:] = 1
            b["input_ids"][:, -1] = 1
        b["labels"] = torch.arange(batch) % 2
        out.append(b)
    return out


def classifier(family: str):
    if family != "t5":
        return tiny(family, "classify")
    cfg = tiny_config("t5")
    cfg.num_labels = 2
    torch.manual_seed(0)
    return transformers.T5ForSequenceClassification(cfg).eval()


def probe_eval(batch: dict):
    """An evaluation whose 'main' moves with the weights (so a best state exists), plus the logits."""

    def evaluate(model) -> dict:
        out = logits(model, batch)
        return {"main": -float(out.float().pow(2).mean()), "logits": out.tolist()}

    return evaluate


class CheckingHook(AptHook):
    """AptHook that, after every pruning step, checks what the rest of training relies on."""

    def __init__(self, *args, probe: dict, optimizers: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe = probe
        self.optimizers = optimizers  # the loop's optimizer, as make_optimizer built it
        self.after_pruning: list[tuple[int, float, int]] = []

    def after_change(self, step, change, model, log, before):
        follow = super().after_change(step, change, model, log, before)
        if change.plan is not None:  # the loop applied the plan and re-pointed the optimizer
            self.after_pruning.append((step, self.schedule[step], layer_cost(model, flops_seq(self.target))))
            check_consistent(model, self.optimizers[-1])
            model.eval()
            out = logits(model, self.probe)
            model.train()
            assert torch.isfinite(out).all() and out.shape == (self.probe["input_ids"].shape[0], 2)
        return follow


def flops_seq(target: Budget):
    return target.seq_len if target.keep_flops is not None else None


def apt_options(**kw) -> tuple[AptOptions, Budget]:
    """AptOptions and the target Budget from the settings the tests give (keep, keep_flops, seq_len, ...)."""
    keep = kw.pop("keep", 0.5)
    keep_flops, seq_len = kw.pop("keep_flops", None), kw.pop("seq_len", 128)
    shape = {"uniform": kw.pop("uniform", False), "round_to": kw.pop("round_to", 1)}
    options = AptOptions(**kw)
    if keep_flops is not None:
        return options, Budget(keep_flops=keep_flops, seq_len=seq_len, prune_hidden=options.prune_hidden, **shape)
    return options, Budget(keep_params=keep, prune_hidden=options.prune_hidden, **shape)


def check_consistent(model, optimizer=None) -> None:
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if not site.num_heads:
                continue
            hd = site.head_dim
            q, k, v, o = (getattr(site.proj(w), "base_layer", site.proj(w)).weight for w in "qkvo")
            assert q.shape[0] == site.num_heads * hd == o.shape[1], site.key
            assert k.shape[0] == v.shape[0] == site.num_kv_heads * hd, site.key
            if site.spec.kv_groups_attr:  # GQA: whole groups of equal size, and the module knows it
                assert site.num_heads % site.num_kv_heads == 0, site.key
                assert site.module.num_key_value_groups == site.num_heads // site.num_kv_heads, site.key
    for name, layer in adapters.lora_layers(model).items():
        base = layer.base_layer.weight
        a, b = layer.lora_A[adapters.ADAPTER].weight, layer.lora_B[adapters.ADAPTER].weight
        assert a.shape[1] == base.shape[1] and b.shape[0] == base.shape[0] and a.shape[0] == b.shape[1], name
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert id(p) in held, name
                state = optimizer.state.get(p)
                if state:
                    assert state["exp_avg"].shape == p.shape == state["exp_avg_sq"].shape, name


def run_apt_fit(family: str, *, keep: float = 0.5, distill: bool = True, seed: int = 0, steps: int = 12, **cfg):
    model = classifier(family)
    options, target = apt_options(keep=keep, prune_steps=4, prune_start=0.1, prune_end=0.6, distill=distill, **cfg)
    dense = layer_cost(model, flops_seq(target))  # parameters, or FLOPs per token under keep_flops
    peft_model = adapters.apply_lora(model, rank=2, targets="all")  # apt's adapters: attention and FFN
    batches = batches_for(family)
    optimizers = []
    real = train_module.make_optimizer

    def recording(*args, **kwargs):
        optimizer, scheduler = real(*args, **kwargs)
        optimizers.append(optimizer)
        return optimizer, scheduler

    hook = CheckingHook(peft_model, options, target, dense, probe=batches[0], optimizers=optimizers)
    train_cfg = TrainConfig(epochs=steps / len(batches), lr=2e-3, eval_every=2, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "make_optimizer", recording)
        try:
            result = fit(peft_model, batches, probe_eval(batches[0]), train_cfg, hooks=[hook])
        finally:
            hook.close()
    return peft_model, hook, result, dense


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_apt_prunes_to_the_target_inside_fit(family):
    model, hook, result, dense = run_apt_fit(family, keep=0.5)
    assert result.steps == 12
    assert [s for s, _, _ in hook.after_pruning] == sorted(hook.schedule) == [1, 3, 5, 7]
    for step, target, count in hook.after_pruning:  # every step meets its own target
        assert count <= target * dense, step
    counts = [c for _, _, c in hook.after_pruning]
    assert counts == sorted(counts, reverse=True) and counts[0] < dense
    final = layer_param_count(model)
    assert 0.47 * dense <= final <= 0.5 * dense
    check_consistent(model)
    # the best state is only taken from evaluations after the last structural change
    assert result.best_step >= max(hook.schedule)
    assert torch.isfinite(torch.tensor(result.best["logits"])).all()
    # adapters grew, within the tuning budget
    ranks = [r["lora_rank_total"] for r in hook.timeline.rows]
    assert ranks[-1] > ranks[0]
    lora_now = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_now <= hook.cfg.tuning_budget * hook.start_lora_params


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_apt_prunes_to_a_flops_target(family):
    """--keep-flops: every step meets its share of the dense FLOPs per token at the stated sequence length."""
    model, hook, result, dense_flops = run_apt_fit(family, keep_flops=0.5, seq_len=64)
    assert hook.keep == 0.5 and min(hook.schedule.values()) == 0.5
    for step, target, flops in hook.after_pruning:
        assert flops <= target * dense_flops * (1 + 1e-9), step
    assert 0.4 * dense_flops <= layer_cost(model, 64) <= 0.5 * dense_flops
    check_consistent(model)


def test_gqa_groups_stay_valid_on_llama():
    model, hook, _, dense = run_apt_fit("llama", keep=0.4)
    check_consistent(model)  # per layer: q heads divisible by KV heads, num_key_value_groups consistent
    sites = [s for lay in layer_sites(model) for s in lay.attentions.values()]
    assert sum(s.num_heads for s in sites) < 18  # something was pruned
    assert layer_param_count(model) <= 0.4 * dense
    top = model.get_base_model()
    for layer in top.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "q_proj"):
            q_heads = attn.q_proj.base_layer.weight.shape[0] // 8
            kv_heads = attn.k_proj.base_layer.weight.shape[0] // 8
            assert q_heads % kv_heads == 0 and attn.num_key_value_groups == q_heads // kv_heads


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_apt_uniform_keeps_every_step_uniform(family):
    """--uniform: each pruning step chooses one count per kind for all layers, so the run ends uniform, within
    the target, with FFN widths in multiples of --round-to."""
    model, hook, _, dense = run_apt_fit(family, keep=0.5, uniform=True, round_to=4, distill=False)
    for step, target, count in hook.after_pruning:
        assert count <= target * dense * (1 + 1e-9), step
    for row in hook.timeline.rows:  # the shape after every step
        assert row["heads"] % len([s for lay in layer_sites(model) for s in lay.attentions.values()]) == 0
    sites = [s for lay in layer_sites(model) for s in lay.attentions.values()]
    assert len({(s.num_heads, s.num_kv_heads) for s in sites}) == 1 and sites[0].num_heads > 0
    widths = {lay.ffn.width for lay in layer_sites(model)}
    assert len(widths) == 1 and widths.pop() % 4 == 0
    assert layer_param_count(model) < 0.6 * dense
    check_consistent(model)


# ---------------------------------------------------------------------------------------------------------
# Hidden dims (AptOptions.prune_hidden): ranked with heads and neurons by salience per parameter
# ---------------------------------------------------------------------------------------------------------


def test_apt_prunes_hidden_dims_inside_fit():
    """hidden=True collected hidden-dim salience, but the budget had no hidden target: no dim was ever removed."""
    model, hook, _, dense = run_apt_fit("bert", keep=0.3, prune_hidden=True, distill=False)
    widths = [r["hidden"] for r in hook.timeline.rows]
    assert widths[-1] < widths[0] == 32 and widths == sorted(widths, reverse=True)
    assert hidden_size(model) == widths[-1] == len(hook.stats.salience["hidden"])  # the salience followed
    for step, target, count in hook.after_pruning:
        assert count <= target * dense, step
    assert layer_param_count(model) >= 0.27 * dense
    check_consistent(model)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_apt_hidden_step_equals_its_masks(family):
    """A pruning step that removes hidden dims (and grows adapters) computes what its plan's masks compute."""
    batch = batches_for(family)[0]
    model = classifier(family)
    dense = layer_param_count(model)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    with torch.no_grad():  # non-zero adapters, so their slicing matters
        for layer in adapters.lora_layers(peft_model).values():
            layer.lora_B[adapters.ADAPTER].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    hook = AptHook(peft_model, *apt_options(keep=0.5, prune_steps=1, prune_hidden=True, distill=False), dense)
    hook.start(10, Runtime.single())
    step = next(iter(hook.schedule))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    peft_model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    hook.stats.step()
    hook.stats.salience["hidden"] *= 0.01  # hidden dims the least salient per parameter: some must go
    plan = select(peft_model, hook.stats.to_scores(), hook.budget(hook.schedule[step]))
    width = hidden_size(peft_model)
    assert plan.hidden is not None and len(plan.hidden) < width
    peft_model.eval()
    with attach(peft_model, masks_for(peft_model, plan)):
        masked = logits(peft_model, batch)

    assert step_changes(step, peft_model, [hook], seed=0, optimizer=optimizer, runtime=Runtime.single(), record=[])
    assert hidden_size(peft_model) == len(plan.hidden)
    assert layer_param_count(peft_model) <= hook.schedule[step] * dense
    peft_model.eval()
    assert max_diff(logits(peft_model, batch), masked) <= 1e-4
    check_consistent(peft_model, optimizer)
    hook.close()


# ---------------------------------------------------------------------------------------------------------
# Self-distillation
# ---------------------------------------------------------------------------------------------------------


def test_distillation_can_be_switched_off():
    batches = batches_for("bert")
    start = classifier("bert")
    dense = layer_param_count(start)
    plain = adapters.apply_lora(start, rank=2)
    with_hook = copy.deepcopy(plain)  # the same random lora_A
    hook = AptHook(with_hook, *apt_options(distill=False, prune_steps=0), dense)  # no pruning: only the loss path
    assert hook.distiller is None
    train_cfg = TrainConfig(epochs=2, lr=2e-3, eval_every=1, seed=1)
    ref = fit(plain, batches, probe_eval(batches[0]), train_cfg)
    got = fit(with_hook, batches, probe_eval(batches[0]), train_cfg, hooks=[hook])
    hook.close()
    assert [h["loss"] for h in got.history] == [h["loss"] for h in ref.history]  # the task loss, untouched
    assert hook.forward_kwargs() == {} and hook.loss(with_hook, batches[0], None) is None
    assert len(hook.eval_history) == 8  # evaluations happened, and still no teacher appeared


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_distillation_loss_with_a_teacher(family):
    batch = batches_for(family)[0]
    model = classifier(family)
    peft_model = adapters.apply_lora(model, rank=2)
    options = apt_options(distill=True, distill_teacher="best", distill_ramp=False, distill_weight=0.5)
    hook = AptHook(peft_model, *options, layer_param_count(model))
    assert hook.forward_kwargs() == {} and hook.loss(peft_model, batch, None) is None  # no teacher yet
    peft_model.eval()  # no dropout: teacher and student see the same function
    hook.after_eval(1, {"main": 0.0}, peft_model, True)
    assert hook.forward_kwargs() == {"output_hidden_states": True}
    out = peft_model(**batch, **hook.forward_kwargs())
    # teacher == student: the prediction and layer terms vanish, leaving (1 - w) x the task loss
    assert hook.loss(peft_model, batch, out).item() == pytest.approx(0.5 * out.loss.item(), abs=1e-6)
    with torch.no_grad():
        for layer in adapters.lora_layers(peft_model).values():
            layer.lora_B[adapters.ADAPTER].weight.normal_(0, 0.5)
    out = peft_model(**batch, **hook.forward_kwargs())
    assert hook.loss(peft_model, batch, out).item() > 0.5 * out.loss.item() + 1e-4
    hook.close()


def test_teacher_follows_surgery_and_growth():
    batches = batches_for("bert")
    model = classifier("bert")
    dense = layer_param_count(model)
    peft_model = adapters.apply_lora(model, rank=2)
    hook = AptHook(peft_model, *apt_options(keep=0.5, prune_steps=1, distill=True, distill_teacher="best",
                                            mask_decay=0.0), dense)
    hook.start(10, Runtime.single())
    step = next(iter(hook.schedule))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    peft_model(**batches[0]).loss.backward()  # salience rides on the backward pass
    optimizer.step()
    optimizer.zero_grad()
    hook.after_eval(step, {"main": 0.0}, peft_model, True)  # teacher = the student now
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    memory = hook.distiller.memory_bytes()

    assert step_changes(step, peft_model, [hook], seed=0, optimizer=optimizer, runtime=Runtime.single(), record=[])
    assert layer_param_count(peft_model) <= 0.5 * dense
    row = hook.timeline.rows[-1]
    assert row["grown_adapters"] > 0 and row["lora_rank_total"] > hook.timeline.rows[0]["lora_rank_total"]
    student = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    teacher = hook.distiller.teacher
    assert set(teacher) == set(student) and set(student) <= set(before)  # removed blocks leave both
    for name, t in teacher.items():
        s = student[name]
        assert t.shape == s.shape, name
        if "lora_A" in name and s.shape[0] > before[name].shape[0]:  # grown: old rows kept, new rows zero
            r = before[name].shape[0]
            assert torch.equal(t[:r], s[:r]) and torch.all(t[r:] == 0), name
        else:  # sliced exactly like the student (grown lora_B columns are zero in both)
            assert torch.equal(t, s), name
    assert hook.distiller.memory_bytes() != memory
    # the teacher still runs on the pruned student's structure
    peft_model.eval()
    out = peft_model(**batches[1], output_hidden_states=True)
    assert torch.isfinite(hook.loss(peft_model, batches[1], out))
    hook.close()


# ---------------------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------------------


def test_apt_run_is_reproducible():
    a, hook_a, res_a, _ = run_apt_fit("bert", seed=5)
    b, hook_b, res_b, _ = run_apt_fit("bert", seed=5)
    probe = batches_for("bert")[2]
    assert torch.equal(logits(a, probe), logits(b, probe))
    assert [h["loss"] for h in res_a.history] == [h["loss"] for h in res_b.history]
    assert hook_a.timeline.rows == hook_b.timeline.rows
    c, _, _, _ = run_apt_fit("bert", seed=6)
    assert max_diff(logits(a, probe), logits(c, probe)) > 0  # the seed matters (dropout, growth init)
