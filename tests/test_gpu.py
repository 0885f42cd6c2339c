"""Mixed precision and the GPU: APT under bf16 autocast (fp16 with a gradient scaler), masks = surgery, importance,
rank growth and export, and the CUDA allocator's peak. The `gpu`-marked tests need CUDA and are skipped without
it (benchmarks/gpu_check.sh runs them); the first test runs the same APT path under CPU autocast, so that a
dtype error in salience, selection, surgery, growth or distillation shows up on any machine."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_inputs
from engine_helpers import make_plan, masks_for, max_diff, tiny
from test_apt import batches_for, check_consistent, classifier

from prunetune import adapters
from prunetune import train as train_module
from prunetune.apt import AptHook
from prunetune.config import AptOptions
from prunetune.export import save_compact
from prunetune.importance import compute
from prunetune.masks import attach
from prunetune.plan import Budget, layer_param_count
from prunetune.surgery import apply_plan
from prunetune.train import TrainConfig, fit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def apt_run(device: torch.device, precision: str, family: str = "bert"):
    """APT with distillation, hidden-dim pruning and rank growth, 12 steps on `device`."""
    model = classifier(family)
    dense = layer_param_count(model)
    peft_model = adapters.apply_lora(model, rank=2, targets="all")
    options = AptOptions(prune_steps=3, prune_start=0.1, prune_end=0.6, distill=True, prune_hidden=True)
    hook = AptHook(peft_model, options, Budget(keep_params=0.5, prune_hidden=True), dense)
    batches = batches_for(family)
    probe = on(batches[0], device)

    def evaluate(m) -> dict:
        with torch.no_grad():
            return {"main": -float(m(**probe).logits.float().pow(2).mean())}

    cfg = TrainConfig(epochs=3, lr=2e-3, eval_every=2, seed=0, precision=precision)
    try:
        result = fit(peft_model, batches, evaluate, cfg, hooks=[hook], device=device)
    finally:
        hook.close()
    return peft_model, hook, result, dense


def check_apt_run(model, hook, result, dense) -> None:
    assert result.steps == 12 and len(result.changes) >= 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert layer_param_count(model) <= 0.5 * dense
    check_consistent(model)
    # autocast computes in half precision; the weights, adapters and optimizer stay float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ranks = [r["lora_rank_total"] for r in hook.timeline.rows]
    assert ranks[-1] > ranks[0]


def test_apt_under_cpu_autocast_bf16(monkeypatch):
    """The GPU's bf16 path, on the CPU's autocast: salience hooks, selection, surgery, growth, distillation."""
    monkeypatch.setattr(train_module, "autocast_dtype", lambda precision, device: torch.bfloat16)
    model, hook, result, dense = apt_run(torch.device("cpu"), "bf16")
    assert result.precision == "bf16"
    check_apt_run(model, hook, result, dense)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_apt_on_cuda_under_mixed_precision(precision, tmp_path):
    from prunetune.bench import MemoryMeter

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    meter = MemoryMeter(torch.device("cuda")).start()
    model, hook, result, dense = apt_run(torch.device("cuda"), precision)
    assert result.precision == precision  # fp16 ran with a gradient scaler (train._Loop)
    assert meter.read() > 0  # torch.cuda.max_memory_allocated above the baseline
    check_apt_run(model, hook, result, dense)
    # the export of a run trained under autocast reloads to the same function (float32 weights)
    merged = adapters.merge(model).eval()
    probe = on(batches_for("bert")[1], torch.device("cuda"))
    with torch.no_grad():
        before = merged(**probe).logits
    save_compact(merged, tmp_path / "model")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").cuda().eval()
    with torch.no_grad():
        assert max_diff(again(**probe).logits, before) <= 1e-4


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_masked_equals_pruned_on_cuda(family):
    """Masks and surgery agree on the GPU: exactly in float32, and within bf16's resolution under autocast."""
    device = torch.device("cuda")
    model = tiny(family).to(device)
    plan = make_plan(family, model, "all")
    batch = on(tiny_inputs(family), device)
    outputs = {}
    with torch.no_grad(), attach(model, masks_for(model, plan)):
        outputs["masked"] = model(**batch).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs["masked_bf16"] = model(**batch).logits.float()
    apply_plan(model, plan)
    with torch.no_grad():
        outputs["pruned"] = model(**batch).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs["pruned_bf16"] = model(**batch).logits.float()
    scale = outputs["masked"].abs().max().item()
    assert max_diff(outputs["pruned"], outputs["masked"]) <= 1e-4 * max(1.0, scale)
    assert max_diff(outputs["pruned_bf16"], outputs["masked"]) <= 0.05 * max(1.0, scale)
    assert max_diff(outputs["pruned_bf16"], outputs["masked_bf16"]) <= 0.05 * max(1.0, scale)


@pytest.mark.gpu
@needs_cuda
def test_importance_and_rank_growth_under_autocast_on_cuda():
    device = torch.device("cuda")
    model = classifier("bert").to(device)
    batches = [on(b, device) for b in batches_for("bert")]
    reference = compute(model, batches, "head_grad")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        scores = compute(model, batches, "head_grad")
    for key, values in reference.heads.items():
        got = torch.tensor(scores.heads[key])
        assert torch.isfinite(got).all() and got.shape == torch.Size([len(values)])
    peft_model = adapters.apply_lora(model, rank=2)
    layer = next(iter(adapters.lora_layers(peft_model).values()))
    probe = batches[0]
    peft_model.eval()
    with torch.no_grad():
        layer.lora_B[adapters.ADAPTER].weight.normal_()
        before = peft_model(**probe).logits
        assert adapters.grow_rank(layer, 5, generator=torch.Generator().manual_seed(0))
        after = peft_model(**probe).logits
    assert layer.lora_A[adapters.ADAPTER].weight.device.type == "cuda"
    assert max_diff(after, before) <= 1e-5  # the new directions start at zero


def test_salience_leaves_out_the_gradient_scale_and_overflowed_steps():
    """Under fp16 the salience hooks see the gradients of the scaled loss: the scale is divided out, and a step
    whose gradients overflowed (skipped by the scaler) adds nothing."""
    from prunetune.importance import ActivationStats

    model = classifier("bert").train()
    batch = batches_for("bert")[0]
    plain, scaled = (ActivationStats(model, hidden=False, ema=0.5) for _ in range(2))
    model(**batch).loss.backward()  # both hooks see the same backward pass...
    for key in plain._step:
        scaled._step[key] = plain._step[key] * 1024.0  # ...which fp16 would have scaled
    scaled.unscale_step(1024.0)
    plain.step()
    scaled.step()
    assert plain.salience.keys() == scaled.salience.keys()
    assert all(torch.allclose(plain.salience[k], scaled.salience[k]) for k in plain.salience)
    before = {k: v.clone() for k, v in scaled.salience.items()}
    model(**batch).loss.backward()
    first = next(iter(scaled._step))
    scaled._step[first] = scaled._step[first] * float("inf")
    scaled.unscale_step(1024.0)
    scaled.step()  # the overflowed step is dropped
    assert all(torch.equal(before[k], scaled.salience[k]) for k in before)
    for stats in (plain, scaled):
        stats.remove()
