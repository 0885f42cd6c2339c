"""The task contract: every registered task on a tiny model of each family it runs on.

importance -> prune -> two training steps -> export -> reload with the stock Auto class -> `evaluate` (the command's
own function) equals the metric of the model in memory.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import word_tokenizer
from task_data import WORDS, task_data

from prunetune import recipes, tasks
from prunetune.data import DataSource
from prunetune.export import save_compact
from prunetune.families import auto_class_names
from prunetune.importance import compute
from prunetune.models import load_tokenizer
from prunetune.plan import Budget, layer_param_count, select
from prunetune.surgery import apply_plan
from prunetune.train import RunContext, TrainConfig, fit

MAX_LENGTH = 56  # room for the Alpaca template's prompt and a response (tiny models have 64 positions)
# what each family's base checkpoint is saved as: every task's head is loaded onto it (a new head, seeded)
BASE_CLASS = {"bert": "BertModel", "roberta": "RobertaModel", "t5": "T5ForConditionalGeneration",
              "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CASES = [(name, family) for name in tasks.names() for family in
         dict.fromkeys(f for form in tasks.entry(name).forms for f in form.families)]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """One tiny checkpoint per family with a word-level tokenizer that knows every word of the task data."""
    root = tmp_path_factory.mktemp("contract")
    tok = word_tokenizer(root, WORDS)
    out = {}
    for family, cls in BASE_CLASS.items():
        cfg = tiny_config(family)
        # transformers loads a Qwen2 checkpoint's tokenizer as Qwen2's, which adds <|endoftext|> after the words
        cfg.vocab_size = len(tok) + (family == "qwen2")
        if family == "roberta":
            cfg.type_vocab_size = 2  # the word tokenizer is BERT's: pairs get segment ids 0 and 1
        if family == "t5":
            cfg.pad_token_id = cfg.decoder_start_token_id = tok.pad_token_id
        torch.manual_seed(0)
        getattr(transformers, cls)(cfg).save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


def test_every_registered_task_is_covered():
    assert {name for name, _ in CASES} == set(tasks.names())
    assert {family for _, family in CASES} == set(BASE_CLASS)


@pytest.mark.filterwarnings("ignore::prunetune.errors.PruningWarning")  # tiny layers may lose every head
@pytest.mark.parametrize(("name", "family"), CASES)
def test_task_contract(name, family, models_dir, tmp_path):
    location = str(models_dir[family])
    path, fraction = task_data(tmp_path / "data", name)
    data = DataSource(path, dev_fraction=fraction)
    task = tasks.for_model(name, location)
    assert family in task.families and task.main_metric in task.metric_names
    tokenizer = load_tokenizer(location)
    task.prepare(data, seed=0)  # a head that depends on the data (the user's label set) knows it before loading
    torch.manual_seed(0)
    model = task.load_model(location)
    assert type(model).__name__ == auto_class_names(task.auto_class)[model.config.model_type]  # the task's head
    # importance on the task's sample, then pruning for real
    sample = task.sample_loader(tokenizer, data=data, samples=8, max_length=MAX_LENGTH, seed=0)
    scores = compute(model, sample, "head_grad")
    dense = layer_param_count(model)
    apply_plan(model, select(model, scores, Budget(keep_params=0.6)))
    assert layer_param_count(model) < dense
    # two training steps, evaluated with the task's own evaluation
    loaders = task.loaders(tokenizer, data=data, train_limit=8, eval_limit=None, samples=8, max_length=MAX_LENGTH,
                           batch_size=4, seed=0)
    cfg = TrainConfig(epochs=2 / len(loaders.train), lr=1e-3, seed=0)
    result = fit(model, loaders.train, task.evaluation(loaders.dev), cfg, device=torch.device("cpu"),
                 context=RunContext(progress=False))
    assert result.steps == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    in_memory = task.evaluate(model, loaders.dev)
    assert set(in_memory) == {*task.metric_names, "main"} - _absent(task, in_memory)
    assert in_memory["main"] == in_memory[task.main_metric]
    # export, reload with the stock Auto class, and score it as `prunetune evaluate` does
    tasks.tag_model(model, task, trained=True, held_out=loaders.data.get("held_out"))
    save_compact(model, tmp_path / "model", tokenizer)
    again = getattr(transformers, task.auto_class).from_pretrained(tmp_path / "model")
    assert type(again).__name__.startswith("Prunetune") and layer_param_count(again) == layer_param_count(model)
    example = task.example_inputs(again.config, 2, 8)
    with torch.no_grad():
        again.eval()(**example)  # what benchmarks and exports feed the model runs
    scored = recipes.evaluate_export(str(tmp_path / "model"), name, data=path, max_length=MAX_LENGTH, seed=0)
    # (float noise only: a near-constant untrained regression head makes a correlation sensitive to the 6th digit)
    assert scored == pytest.approx(in_memory, rel=1e-4, abs=1e-5)


def _absent(task, metrics: dict) -> set[str]:
    """Metrics a task leaves out when they have nothing to count (SQuAD's HasAns_/NoAns_ groups)."""
    return {m for m in task.metric_names if m.startswith(("HasAns_", "NoAns_")) and m not in metrics}
