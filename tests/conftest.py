"""Tiny, seeded, randomly initialised models of every family (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

FAMILIES = ["bert", "roberta", "t5", "llama"]


def tiny_config(family: str):
    if family == "bert":
        return BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=40, max_position_embeddings=64, num_labels=2)
    if family == "roberta":
        return RobertaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=40, max_position_embeddings=70, num_labels=2,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "t5":
        return T5Config(vocab_size=101, d_model=32, d_kv=8, num_heads=4, d_ff=40, num_layers=3,
                        num_decoder_layers=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                        pad_token_id=0, eos_token_id=1)
    if family == "llama":
        return LlamaConfig(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=2, head_dim=8, intermediate_size=40,
                           max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, num_labels=2)
    if family in ("mistral", "qwen2"):  # LLaMA's shapes; Qwen2 adds q/k/v biases, Mistral an untied LM head
        cls = transformers.MistralConfig if family == "mistral" else transformers.Qwen2Config
        return cls(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                   head_dim=8, intermediate_size=40, max_position_embeddings=64, pad_token_id=0, num_labels=2,
                   tie_word_embeddings=family == "qwen2")
    raise ValueError(family)


def tiny_model(family: str, task: str = "auto", seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    if family == "bert":
        m = BertForSequenceClassification(cfg)
    elif family == "roberta":
        m = RobertaForSequenceClassification(cfg)
    elif family == "t5":
        m = T5ForConditionalGeneration(cfg)
    elif task == "classify":
        m = LlamaForSequenceClassification(cfg)
    else:
        m = LlamaForCausalLM(cfg)
    return m.eval()


def tiny_inputs(family: str, batch: int = 3, length: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, so masking paths are exercised
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(3, 100, (batch, 5), generator=g)
    return out


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True, scope="session")
def quiet_progress_bars():
    """Progress bars go to stderr; the CLI error tests check that stderr is one line."""
    import datasets
    import transformers

    from prunetune.train import set_progress

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    set_progress(False)  # prunetune's own bars and stage lines (tests that check them turn them on)
    yield
    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()
    set_progress(True)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
