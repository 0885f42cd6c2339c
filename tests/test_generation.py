"""Cached generation after pruning: a pruned model generates what the masked model generates.

An attention block that lost every head is replaced by one that computes nothing, but the KV cache still has an
entry for its layer, which transformers reads for the causal mask, the query offset, the position ids and T5's
relative position bias. These tests run `generate()` with each cache class it picks for the families (dynamic,
static, sliding window; T5 wraps them in an EncoderDecoderCache), greedy and sampled, and compare the tokens and
the logits and scores of every step with the masked model, with and without a cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_inputs
from engine_helpers import LLAMA_WHOLE_GROUPS, T5_CASES, lively, make_plan, masks_for, max_diff, tiny

from prunetune.masks import attach
from prunetune.plan import PruningPlan
from prunetune.surgery import apply_plan

TOL = 1e-4
NEW_TOKENS = 4

CACHES = ["dynamic", "static"]
MODES = ["greedy", "sampled"]

T5_PLANS = {
    **{case: T5_CASES[case] for case in ("layer0_empty", "later_layers", "cross_only")},
    # every self-attention of the decoder empty: no layer of the stack writes real keys to the cache
    "decoder_self_empty": {"decoder.0/self": [], "decoder.1/self": []},
    # the last decoder layer empty, the bias owner pruned but not empty
    "last_empty": {"decoder.0/self": [1, 2], "decoder.1/self": [], "decoder.1/cross": []},
}

LLAMA_PLANS = {
    "layer0_empty": {"decoder.0/self": []},
    "middle_empty": {"decoder.0/self": [0, 1, 2], "decoder.1/self": []},
    "last_empty": dict(LLAMA_WHOLE_GROUPS),  # whole KV groups kept, layer 2 empty
    "every_layer_empty": {"decoder.0/self": [], "decoder.1/self": [], "decoder.2/self": []},
}


def _plan(family: str, model, case: str) -> PruningPlan:
    if case == "all":  # heads (layer 1 of every stack empty), FFN neurons and hidden dims together
        return make_plan("t5" if family == "t5" else "llama", model, "all")
    heads = (T5_PLANS if family == "t5" else LLAMA_PLANS)[case]
    return PruningPlan(family, heads={k: list(v) for k, v in heads.items()})


def _generate(model, inputs: dict, cache: str | None, mode: str, new_tokens: int = NEW_TOKENS):
    kwargs = {"use_cache": False} if cache is None else {"use_cache": True, "cache_implementation": cache}
    if mode == "sampled":
        kwargs.update(do_sample=True, temperature=0.8, top_k=20)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(0)  # the same draws for every model compared
    with torch.no_grad():
        # tokens 0 (pad / decoder start) and 1 (eos) would win on a random model and end generation at once
        return model.generate(
            **inputs, max_new_tokens=new_tokens, suppress_tokens=[0, 1], output_logits=True, output_scores=True,
            return_dict_in_generate=True, **kwargs,
        )


def _returned_cache(out):
    # transformers 5.24 names the field `cache`, 5.23 `past_key_values`
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to TOL where finite; -inf (suppressed or filtered tokens) at the same places."""
    assert a.shape == b.shape
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a)
    assert (a[finite] - b[finite]).abs().max().item() <= TOL


def _assert_same_generation(got, ref) -> None:
    assert torch.equal(got.sequences, ref.sequences)
    # every step's logits and processed scores, not only the tokens: a wrong cached mask or bias shifts them
    # without always changing the argmax
    for step_got, step_ref in zip(got.logits, ref.logits, strict=True):
        _assert_close(step_got, step_ref)
    for step_got, step_ref in zip(got.scores, ref.scores, strict=True):
        _assert_close(step_got, step_ref)


def _check(model, pruned, plan: PruningPlan, inputs: dict, cache: str, mode: str, cache_class: str) -> None:
    with attach(model, masks_for(model, plan)):
        ref = _generate(model, inputs, None, mode)
        masked_cached = _generate(model, inputs, cache, mode)
    got = _generate(pruned, inputs, cache, mode)
    uncached = _generate(pruned, inputs, None, mode)
    dense = _generate(model, inputs, None, "greedy", new_tokens=1)
    assert max_diff(dense.logits[0], ref.logits[0]) > 1e-2, "the plan must change the output"
    prompt = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]  # T5: the decoder start token
    assert got.sequences.shape == (inputs["input_ids"].shape[0], prompt + NEW_TOKENS)
    returned = _returned_cache(got)
    returned = getattr(returned, "self_attention_cache", returned)  # T5: EncoderDecoderCache
    assert type(returned).__name__ == cache_class  # the cache class this case is about was really used
    _assert_same_generation(masked_cached, ref)  # the reference itself is consistent
    _assert_same_generation(got, ref)
    _assert_same_generation(uncached, ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("case", ["all", *T5_PLANS])
def test_t5_cached_generation_after_pruning(case, cache, mode):
    model = tiny("t5")
    inputs = {k: v for k, v in tiny_inputs("t5").items() if k != "decoder_input_ids"}  # encoder padding kept
    plan = _plan("t5", model, case)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    _check(model, pruned, plan, inputs, cache, mode, "StaticCache" if cache == "static" else "DynamicCache")


def _left_padded(family: str) -> dict:
    inputs = tiny_inputs(family)
    inputs["attention_mask"][:] = 1
    inputs["attention_mask"][0, :3] = 0  # left padding: the causal mask and the position ids matter
    return inputs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("case", ["all", *LLAMA_PLANS])
def test_llama_cached_generation_after_pruning(case, cache, mode):
    model = tiny("llama")
    plan = _plan("llama", model, case)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    _check(model, pruned, plan, _left_padded("llama"), cache, mode,
           "StaticCache" if cache == "static" else "DynamicCache")


def _tiny_sliding(family: str):
    """A tiny Mistral (every layer sliding) or Qwen2 (layer 0 full, layers 1-2 sliding) with a window of 4,
    shorter than the prompt, so the sliding cache layers drop keys during generation."""
    import transformers

    shape = dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=40, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    if family == "mistral":
        config = transformers.MistralConfig(head_dim=8, sliding_window=4, **shape)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **shape)
        model = transformers.Qwen2ForCausalLM(config)
    return lively(model.eval())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("case", ["layer0_empty", "middle_empty"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_cached_generation_after_pruning(family, case, cache, mode):
    """Layer 0 is the one whose cache sizes Mistral's sliding mask and Qwen2's full mask; layer 1 sizes Qwen2's
    sliding mask."""
    model = _tiny_sliding(family)
    heads = {k: list(v) for k, v in LLAMA_PLANS[case].items()}
    plan = PruningPlan(family, heads=heads)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    _check(model, pruned, plan, _left_padded("llama"), cache, mode,
           "StaticCache" if cache == "static" else "DynamicCache")


def test_static_cache_initialised_ahead_of_time():
    """With `prefill_chunk_size`, generate() allocates a static cache for every layer with the config's dense KV
    shape before the first forward; the empty layer's placeholder must take that shape, not its own."""
    model = tiny("llama")
    inputs = _left_padded("llama")
    plan = PruningPlan("llama", heads={"decoder.0/self": []})  # the other layers keep their KV heads
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    with attach(model, masks_for(model, plan)):
        ref = _generate(model, inputs, None, "greedy")
    with torch.no_grad():
        got = pruned.generate(
            **inputs, max_new_tokens=NEW_TOKENS, suppress_tokens=[0, 1], output_logits=True, output_scores=True,
            return_dict_in_generate=True, do_sample=False, cache_implementation="static", prefill_chunk_size=4,
        )
    layer0 = _returned_cache(got).layers[0]
    assert tuple(layer0.keys.shape[1:2]) + tuple(layer0.keys.shape[3:]) == (2, 8)  # the dense KV heads, head_dim
    _assert_same_generation(got, ref)
