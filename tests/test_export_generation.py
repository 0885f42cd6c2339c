"""generate() on a reloaded export: export, load it with the stock Auto class, generate under every cache class the
family uses (dynamic, static; sliding-window layers for Mistral and Qwen2) and with torch.compile, and compare
with the dense model masked to the same plan (tests/test_generation.py does the same for the pruned model in
memory).

torch.compile: the fast test traces the decoding step with a backend that runs the captured graph as it is
(fullgraph: the empty attention blocks' placeholder cache writes and T5's bias hooks must trace without a break);
inductor, which generates and compiles C++ for it, costs 21 s (LLaMA) and 37 s (T5) with a cold inductor cache on
the shared 2-core test machine, 2 s and 6 s with it warm, so that test is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_inputs
from engine_helpers import make_plan, masks_for, tiny
from test_generation import NEW_TOKENS, _assert_same_generation, _generate, _left_padded, _returned_cache, _tiny_sliding
from torch._dynamo.utils import counters

from prunetune.export import needs_prunetune, save_compact
from prunetune.masks import attach
from prunetune.plan import model_info
from prunetune.surgery import apply_plan

FAMILIES = ["t5", "llama", "mistral", "qwen2"]  # Mistral: every layer sliding; Qwen2: layer 0 full, 1-2 sliding
AUTO = {"t5": "AutoModelForSeq2SeqLM", "llama": "AutoModelForCausalLM", "mistral": "AutoModelForCausalLM",
        "qwen2": "AutoModelForCausalLM"}


def _inputs(family: str) -> dict:
    if family == "t5":
        return {k: v for k, v in tiny_inputs("t5").items() if k != "decoder_input_ids"}  # encoder padding kept
    return _left_padded("llama")  # left padding: the causal mask and the position ids matter


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Per family: the dense model, the plan (heads with layer 1 emptied, FFN neurons, half the hidden dims) and
    the export of the pruned model as the stock Auto class loads it."""
    out = {}
    for family in FAMILIES:
        dense = tiny(family) if family in ("t5", "llama") else _tiny_sliding(family)
        plan = make_plan(family, dense, "all")
        pruned = copy.deepcopy(dense)
        apply_plan(pruned, plan)
        path = tmp_path_factory.mktemp("gen") / family
        save_compact(pruned, path)
        again = getattr(transformers, AUTO[family]).from_pretrained(path).eval()
        assert needs_prunetune(again.config) and model_info(again) == model_info(pruned)
        out[family] = (dense, plan, again)
    return out


def _masked_reference(dense, plan, inputs: dict, mode: str):
    """The dense model with the plan's masks, generating without a cache: what every pruned variant must give."""
    with attach(dense, masks_for(dense, plan)):
        return _generate(dense, inputs, None, mode)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_export_generates_like_the_masked_model(exported, family, cache, mode):
    dense, plan, again = exported[family]
    inputs = _inputs(family)
    ref = _masked_reference(dense, plan, inputs, mode)
    got = _generate(again, inputs, cache, mode)
    returned = _returned_cache(got)
    returned = getattr(returned, "self_attention_cache", returned)  # T5: EncoderDecoderCache
    assert type(returned).__name__ == ("StaticCache" if cache == "static" else "DynamicCache")
    _assert_same_generation(got, ref)


def counting_backend() -> tuple[dict[str, int], object]:
    """A torch.compile backend that runs the captured FX graph as it is and counts graphs and their calls: proof
    that generate() ran the compiled decoding step, at the cost of tracing only. A function, not an object:
    CompileConfig deep-copies its settings, which would count in a copy."""
    counts = {"graphs": 0, "calls": 0}

    def backend(gm: torch.fx.GraphModule, example_inputs):
        counts["graphs"] += 1

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)

        return run

    return counts, backend


def _compile_config(**kwargs) -> transformers.CompileConfig:
    config = transformers.CompileConfig(**kwargs)
    config._compile_all_devices = True  # generate() compiles on GPUs only unless told (its flag for CPU testing)
    return config


@pytest.mark.parametrize("family", ["t5", "llama", "qwen2"])
def test_compiled_static_cache_generation_of_a_reloaded_export(exported, family):
    dense, plan, exported_model = exported[family]
    again = copy.deepcopy(exported_model)  # generate() keeps the compiled call on the model
    inputs = _inputs(family)
    ref = _masked_reference(dense, plan, inputs, "greedy")
    counts, backend = counting_backend()
    torch._dynamo.reset()
    with torch.no_grad():
        got = again.generate(
            **inputs, max_new_tokens=NEW_TOKENS, suppress_tokens=[0, 1], output_logits=True, output_scores=True,
            return_dict_in_generate=True, do_sample=False, cache_implementation="static",
            compile_config=_compile_config(backend=backend, fullgraph=True, mode=None),
        )
    # The prefill runs eagerly, every later step through a compiled graph: one graph, or, with Qwen2's sliding
    # layers, two (transformers' sliding static cache recompiles once when it first fills, dense or pruned).
    assert counts == {"graphs": 2 if family == "qwen2" else 1, "calls": NEW_TOKENS - 1}
    _assert_same_generation(got, ref)


@pytest.mark.slow  # inductor: 20-40 s a family cold (C++ code generation and compilation), 2-6 s with its cache warm
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_inductor_compiled_generation_of_a_reloaded_export(exported, family):
    dense, plan, exported_model = exported[family]
    again = copy.deepcopy(exported_model)
    inputs = _inputs(family)
    ref = _masked_reference(dense, plan, inputs, "greedy")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        got = again.generate(
            **inputs, max_new_tokens=NEW_TOKENS, suppress_tokens=[0, 1], output_logits=True, output_scores=True,
            return_dict_in_generate=True, do_sample=False, cache_implementation="static",
            compile_config=_compile_config(fullgraph=True),  # otherwise transformers' defaults (inductor)
        )
    assert counters["stats"]["unique_graphs"] >= 1  # generate() took the compiled path
    _assert_same_generation(got, ref)
