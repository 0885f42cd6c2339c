"""APT as its authors run it: salience warm-up, soft-mask decay before each removal, growth of the adapters with the
most salience of their own, self-momentum distillation (teacher, ramp, KL over the loss tokens)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, tiny_inputs
from engine_helpers import max_diff, tiny
from test_apt import apt_options, batches_for, classifier, run_apt_fit

from prunetune import adapters
from prunetune.apt import AptHook
from prunetune.plan import layer_param_count, select
from prunetune.runtime import Runtime
from prunetune.structure import step_changes


def drive(model, hook, batches, steps: int, *, total: int | None = None, each=None, lr: float = 1e-3):
    """fit's step order by hand (forward/backward, before_optimizer_step, step, after_step and changes) for `steps`
    of a run of `total`, calling each(step, optimizer, record) between the optimizer step and the structure change."""
    hook.start(total or steps, Runtime.single())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    record: list[dict] = []
    model.train()
    for step in range(1, steps + 1):
        batch = batches[(step - 1) % len(batches)]
        out = model(**batch, **hook.forward_kwargs())
        loss = hook.loss(model, batch, out)
        (out.loss if loss is None else loss).backward()
        hook.before_optimizer_step(step, model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if each is not None:
            each(step, optimizer, record)
        step_changes(step, model, [hook], seed=0, optimizer=optimizer, runtime=Runtime.single(), record=record)
    return record


def lora_classifier(family: str = "bert"):
    model = classifier(family)
    dense = layer_param_count(model)
    return adapters.apply_lora(model, rank=2, targets="all"), dense


def test_salience_warmup_collects_nothing_before_step_k():
    model, dense = lora_classifier()
    hook = AptHook(model, *apt_options(prune_steps=1, prune_start=0.5, salience_warmup=0.3, distill=False), dense)
    seen = []
    drive(model, hook, batches_for("bert"), 10,
          each=lambda step, opt, rec: seen.append((step, dict(hook.stats.salience), dict(hook.adapter_salience.rows))))
    assert hook.warmup == 3
    for step, salience, rows in seen:  # between the optimizer step and after_step, which folds the units' signal in
        assert (salience == {}) == (step <= hook.warmup + 1), step
        assert (rows == {}) == (step <= hook.warmup), step
    hook.close()


def test_soft_mask_decay_ends_in_exactly_the_hard_plan():
    """The plan chosen at the decay's start is the one applied; the removed units fade linearly to exactly 0, and
    removing them then changes nothing (masked at 0 = pruned)."""
    model, dense = lora_classifier()
    with torch.no_grad():  # non-zero adapters, so their slicing matters
        for layer in adapters.lora_layers(model).values():
            adapters.lora_weights(layer)[1].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    options = apt_options(keep=0.5, prune_steps=1, prune_start=0.5, salience_warmup=0.1, mask_decay=0.9,
                          distill=False)
    hook = AptHook(model, *options, dense)
    batches, probe = batches_for("bert"), batches_for("bert")[0]
    state: dict = {"levels": []}

    def each(step, optimizer, record):
        if hook.decay.active:
            state["levels"].append((step, hook.decay.level(step - 1)))
        if step == removal:  # after the optimizer step, before the surgery: the masks are at exactly 0
            assert all(float(v.max()) in (0.0, 1.0) for v in hook.decay._live.tensors())
            model.eval()
            state["masked"] = logits(model, probe)
            model.train()

    hook.start(20, Runtime.single())
    (decided, removal), = hook.decide_at.items()
    assert decided < removal == next(iter(hook.schedule))

    def each_with_plan(step, optimizer, record):
        each(step, optimizer, record)

    original_after_step = hook.after_step

    def after_step(step, m):
        out = original_after_step(step, m)
        if step == decided:  # the hard plan from the very scores the decay's plan was chosen from
            state["hard"] = select(m, hook.stats.to_scores(), hook.budget(hook.schedule[removal]))
        return out

    hook.after_step = after_step
    record = drive(model, hook, batches, 20, each=each_with_plan)
    applied = [r for r in record if r["change"]["plan"] is not None]
    assert len(applied) == 1 and applied[0]["step"] == removal
    plan, hard = applied[0]["change"]["plan"], state["hard"]
    assert (plan["heads"], plan["neurons"], plan["hidden"]) == (hard.heads, hard.neurons, hard.hidden)
    # linear from 1 to 0 over the window: the forward of step k runs at (removal - k) / (removal - decided)
    assert [s for s, _ in state["levels"]] == list(range(decided + 1, removal + 1))
    for k, level in state["levels"]:
        assert level == pytest.approx((removal - k) / (removal - decided))
    assert state["levels"][-1][1] == 0.0
    # right after the surgery (and growth, whose new directions are zero) the model computes what it did masked
    # ... after the later steps the weights moved on, so compare at the removal step itself
    assert layer_param_count(model) <= 0.5 * dense
    hook.close()


def test_soft_mask_removal_does_not_change_the_function():
    model, dense = lora_classifier("llama")
    options = apt_options(keep=0.5, prune_steps=1, prune_start=0.5, mask_decay=0.9, distill=False)
    hook = AptHook(model, *options, dense)
    probe = batches_for("llama")[0]
    hook.start(12, Runtime.single())
    (decided, removal), = hook.decide_at.items()
    out: dict = {}
    original = hook.after_change

    def after_change(step, change, m, log, before):
        follow = original(step, change, m, log, before)  # the salience hooks follow the surgery first
        if change.plan is not None:
            m.eval()
            out["pruned"] = logits(m, probe)
            m.train()
        return follow

    def each(step, optimizer, record):
        if step == removal:
            model.eval()
            out["masked"] = logits(model, probe)
            model.train()

    hook.after_change = after_change
    drive(model, hook, batches_for("llama"), removal, total=12, each=each)
    assert max_diff(out["pruned"], out["masked"]) <= 1e-4
    assert layer_param_count(model) <= 0.5 * dense and not hook.decay.active
    hook.close()


def test_growth_is_paced_to_the_budget_by_the_last_pruning_step():
    model, hook, _, _ = run_apt_fit("bert", keep=0.5, distill=False)
    rows = hook.timeline.rows
    start = rows[0]["lora_rank_total"]
    n = len(hook.schedule)
    assert [r["step"] for r in rows[1:]] == sorted(hook.schedule)
    for i, row in enumerate(rows[1:], 1):  # linear pace: r0 x (1 + 3 i / n), reaching 4x at the last
        assert row["lora_rank_total"] == round(start * (1 + 3 * i / n)), row
    assert rows[-1]["lora_rank_total"] == 4 * start
    ranks = [adapters.lora_rank(m) for m in adapters.lora_layers(model).values()]
    assert max(ranks) <= hook.cfg.max_rank_mult * 2


def test_growth_picks_the_adapters_with_the_most_own_salience():
    from prunetune.growth import grow_by_adapter

    model, dense = lora_classifier()
    hook = AptHook(model, *apt_options(prune_steps=4, distill=False), dense)
    hook.start(100, Runtime.single())
    names = list(adapters.lora_layers(model))
    favourites = names[-3:]
    hook.adapter_salience.rows = {n: torch.full((2,), 10.0 if n in favourites else 0.1) for n in names}
    grown = grow_by_adapter(hook, model, min(hook.schedule))  # first of 4 steps: +3/4 of the start rank total
    assert sum(grown.values()) - 2 * len(grown) == round(2 * len(names) * 0.75)
    assert set(favourites) <= set(grown)
    hook.close()


def test_momentum_teacher_never_sees_the_students_updates():
    model, dense = lora_classifier()
    options = apt_options(keep=0.5, prune_steps=2, prune_start=0.4, prune_end=0.8, teacher_momentum=0.9, distill=True)
    hook = AptHook(model, *options, dense)
    m = 0.9
    seen: dict = {"checked": 0}

    def each(step, optimizer, record):
        teacher = hook.distiller.teacher
        if teacher is None:
            assert step <= hook.distiller.window[0] and hook.forward_kwargs() == {}
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert not any(id(t) in held for t in teacher.values())  # no teacher tensor is optimized
        assert all(not t.requires_grad and t.grad is None for t in teacher.values())
        student = dict(model.named_parameters())
        expected = {n: m * t + (1 - m) * student[n].detach() for n, t in teacher.items()}
        seen["expected"] = expected

    original = hook.after_step

    def after_step(step, mod):
        out = original(step, mod)  # the teacher moves here, before any structure change
        if "expected" in seen:
            for n, t in hook.distiller.teacher.items():
                assert torch.allclose(t, seen["expected"][n], atol=1e-7), n
            seen["checked"] += 1
            del seen["expected"]
        return out

    hook.after_step = after_step
    drive(model, hook, batches_for("bert"), 12, each=each)
    assert seen["checked"] >= 5
    # a change to the student alone leaves the teacher as it was
    before = {n: t.clone() for n, t in hook.distiller.teacher.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(before[n], t) for n, t in hook.distiller.teacher.items())
    assert hook.distiller.memory_bytes() > 0 and hook.distiller.time_s > 0
    hook.close()


def test_distillation_weight_ramps_over_the_pruning_window():
    model, dense = lora_classifier()
    hook = AptHook(model, *apt_options(prune_steps=3, prune_start=0.2, prune_end=0.6, distill=True,
                                       distill_weight=1.0), dense)
    hook.start(50, Runtime.single())
    start, end = hook.distiller.window
    assert start == min(hook.decide_at) and end == max(hook.schedule)
    weights = []
    for done in range(0, 50):
        hook.distiller.steps_done = done
        weights.append(hook.distiller.weight())
    assert weights[start - 1] == 0.0 and weights[end - 1] == 1.0 == weights[-1]
    assert all(a <= b for a, b in zip(weights, weights[1:], strict=False))
    hook.close()


def test_lm_distillation_kl_is_averaged_over_the_loss_tokens():
    """Prompt and padding positions change nothing; the KL is a mean over the scored tokens, not a sum."""
    from prunetune.distill import loss_token_mask, prediction_kl

    model = tiny("llama", "causal")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, 100, (2, 8), generator=g)
    labels[:, :4] = -100  # the prompt
    labels[1, 6:] = -100  # padding
    batch = {"input_ids": labels.clamp_min(3), "labels": labels}
    student, teacher = torch.randn(2, 8, 11, generator=g), torch.randn(2, 8, 11, generator=g)
    tokens = loss_token_mask(model, batch, student)
    # position t predicts label t + 1
    assert tokens.tolist() == [[False, False, False, True, True, True, True, False],
                               [False, False, False, True, True, False, False, False]]
    kl = prediction_kl(student, teacher, 2.0, tokens)
    per = torch.stack([prediction_kl(student[i, t][None], teacher[i, t][None], 2.0)
                       for i in range(2) for t in range(8) if tokens[i, t]])
    assert kl.item() == pytest.approx(per.mean().item(), rel=1e-6)
    noisy = student.clone()
    noisy[~tokens] = torch.randn(int((~tokens).sum()), 11, generator=g) * 5
    assert prediction_kl(noisy, teacher, 2.0, tokens).item() == pytest.approx(kl.item(), rel=1e-6)
    # more padding after the sequence: the same mean
    pad = {"input_ids": torch.cat([batch["input_ids"], batch["input_ids"]], 1),
           "labels": torch.cat([labels, torch.full_like(labels, -100)], 1)}
    longer = prediction_kl(torch.cat([student, student], 1), torch.cat([teacher, teacher], 1), 2.0,
                           loss_token_mask(model, pad, torch.cat([student, student], 1)))
    assert longer.item() == pytest.approx(kl.item(), rel=1e-6)
    # T5: the decoder's logits line up with its labels (no shift)
    t5 = classifier("t5")
    assert loss_token_mask(t5, batch, student).tolist() == (labels != -100).tolist()


def lm_batches(n: int = 3) -> list[dict]:
    """Causal-LM batches whose first tokens carry no loss (a prompt) and whose padding carries none."""
    out = []
    for seed in range(n):
        b = tiny_inputs("llama", batch=4, length=10, seed=40 + seed)
        labels = b["input_ids"].clone()
        labels[:, :3] = -100
        labels[b["attention_mask"] == 0] = -100
        out.append({**b, "labels": labels})
    return out


def test_dense_teacher_is_the_model_before_pruning_and_never_moves():
    """distill_teacher="dense": the teacher is the unpruned model as it was before training, never updated, never
    optimized, while the student is pruned under it; its loss is (1 - w) task + w (KL + layer term)."""
    from prunetune.distill import dense_copy

    model = tiny("llama", "causal")
    batches = lm_batches()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    reference = [logits(model, b) for b in batches]
    options, budget = apt_options(keep=0.5, prune_steps=2, prune_start=0.2, prune_end=0.6, distill=True,
                                  distill_teacher="dense", distill_ramp=False, distill_weight=0.5)
    teacher = dense_copy(model, options)
    dense = layer_param_count(model)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    hook = AptHook(peft_model, options, budget, dense, teacher)
    assert hook.forward_kwargs() == {"output_hidden_states": True}  # a teacher from the first step
    # student == teacher before any step (LoRA's B starts at zero; eval: no dropout): only (1 - w) task remains
    peft_model.eval()
    out = peft_model(**batches[0], **hook.forward_kwargs())
    assert hook.loss(peft_model, batches[0], out).item() == pytest.approx(0.5 * out.loss.item(), abs=1e-6)

    def each(step, optimizer, record):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in held for p in hook.distiller.dense.parameters())

    drive(peft_model, hook, batches, 10, each=each, lr=1e-2)
    assert layer_param_count(peft_model) <= 0.5 * dense  # the student was pruned under the teacher
    kept = hook.distiller.dense.state_dict()
    assert set(kept) == set(before) and all(torch.equal(kept[n], before[n]) for n in before)
    assert all(not p.requires_grad and p.grad is None for p in hook.distiller.dense.parameters())
    assert all(torch.equal(logits(hook.distiller.dense, b), r) for b, r in zip(batches, reference, strict=True))
    # now they differ: the distillation term is positive
    peft_model.eval()
    out = peft_model(**batches[1], **hook.forward_kwargs())
    assert hook.loss(peft_model, batches[1], out).item() > 0.5 * out.loss.item() + 1e-4
    assert hook.distiller.memory_bytes() >= sum(t.numel() * t.element_size() for t in before.values())
    hook.close()



def test_distill_hook_in_fit_starts_at_zero_and_leaves_the_teacher_alone():
    """DistillHook (distillation with no pruning, as the recovery benchmark uses it) inside fit: with weight 1 the
    first step's loss is the distillation alone, zero while the student is the teacher's copy (LoRA's B starts
    at zero); training moves the student, never the teacher, and the loss fit records is the hook's."""
    from prunetune.distill import DistillHook
    from prunetune.train import TrainConfig, fit

    model = tiny("llama", "causal")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    hook = DistillHook(copy.deepcopy(model), weight=1.0)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    batches = lm_batches()
    res = fit(peft_model, batches, lambda m: {"main": 0.0}, TrainConfig(epochs=2, lr=1e-2, seed=0), hooks=[hook])
    losses = [h["loss"] for h in res.history]
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and max(losses[1:]) > 1e-4
    kept = hook.distiller.dense.state_dict()
    assert all(torch.equal(kept[n], before[n]) for n in before)
    assert max_diff(logits(peft_model, batches[0]), logits(hook.distiller.dense, batches[0])) > 0


def test_distillation_without_layer_loss_is_the_prediction_kl():
    """--distill-layers 0: (1 - w) task + w KL(teacher || student) over the loss tokens, nothing else."""
    from prunetune.config import AptOptions
    from prunetune.distill import Distiller, loss_token_mask, prediction_kl

    model = tiny("llama", "causal")
    teacher = copy.deepcopy(model)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    with torch.no_grad():
        for layer in adapters.lora_layers(peft_model).values():
            layer.lora_B[adapters.ADAPTER].weight.normal_(0, 0.5)
    distiller = Distiller(AptOptions(distill=True, distill_teacher="dense", distill_layers=0, distill_ramp=False,
                                     distill_weight=0.3, temperature=2.0), teacher)
    batch = lm_batches(1)[0]
    peft_model.eval()
    out = peft_model(**batch, output_hidden_states=True)
    kl = prediction_kl(out.logits, logits(teacher, batch), 2.0, loss_token_mask(peft_model, batch, out.logits))
    assert kl.item() > 1e-4
    got = distiller.loss(peft_model, batch, out, out.loss)
    assert got.item() == pytest.approx(0.7 * out.loss.item() + 0.3 * kl.item(), rel=1e-5)


@pytest.mark.parametrize("family, task", [("t5", "auto"), ("t5", "classify"), ("llama", "auto"), ("bert", "auto")])
def test_teacher_inputs_give_the_same_outputs_without_a_loss(family, task):
    """A distillation teacher runs without the targets (no loss computed for nothing), yet its logits are the
    ones the model gives with them: T5's decoder inputs are built from the labels as T5 builds them, and a T5
    classifier (decoder inputs from the input ids) just loses its labels."""
    from prunetune.families import inputs_without_targets

    model = classifier("t5") if task == "classify" else tiny(family)
    batch = {k: v for k, v in tiny_inputs(family).items() if k != "decoder_input_ids"}
    if family == "t5" and task == "auto":
        labels = torch.randint(3, 100, (3, 5))
        labels[0, -2:] = -100  # padded targets: the model replaces them by the pad token in its decoder inputs
    elif family == "llama":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        labels = torch.tensor([0, 1, 1])
    if task == "classify":  # T5's classifier reads the representation of each row's one end token
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        batch["input_ids"][:, -1] = model.config.eos_token_id
    batch["labels"] = labels
    teacher = inputs_without_targets(model, batch)
    assert "labels" not in teacher and "labels" in batch  # the student's batch is left as it was
    with torch.no_grad():
        with_targets, without = model(**batch), model(**teacher)
    assert with_targets.loss is not None and without.loss is None
    assert max_diff(with_targets.logits, without.logits) == 0.0
