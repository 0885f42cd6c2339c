"""Exports in transformers pipelines: loaded by path after `import prunetune`, they compute what the pruned model in
memory computes (the same labels and scores, the same generated text).

Every model here is pruned by the engine helpers' "all" plan (heads removed, every head of layer 1 and its FFN
gone, half the hidden dims) and saved by save_compact with a word-level tokenizer that covers its whole vocabulary.

transformers 5 removed the question-answering, summarization and text2text-generation pipelines (pipeline() raises
KeyError, pointing at text-generation with a chat model); a QA head and T5 are checked the way those pipelines
worked: the tokenizer and the Auto class loaded by path, the span or the generated text compared.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_config
from engine_helpers import lively, make_plan, tiny, word_tokenizer

import prunetune  # noqa: F401  (what users do first: registers the prunetune model types)
from prunetune.export import needs_prunetune, save_compact
from prunetune.families import hidden_size
from prunetune.plan import model_info
from prunetune.surgery import apply_plan

TOL = 1e-5  # scores as floats: the same weights, tokens and kernels; only a batch's padding may reorder sums
WORDS = [f"w{i}" for i in range(96)]  # with the 5 special tokens: the tiny models' 101 ids
TEXTS = ["w5 w17 w3", "w40 w41 w90 w9 w77 w2", "w60"]
LABELS = {0: "negative", 1: "positive"}
SPECIAL = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]: a random LM would end on them (LLaMA's eos is 2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tokenizer = word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)
    assert len(tokenizer) == tiny_config("bert").vocab_size
    return tokenizer


def pruned(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """`model` (lively weights) cut by the "all" plan, checked to be really pruned."""
    model = lively(model.eval())
    dense_hidden = hidden_size(model)
    apply_plan(model, make_plan(family, model, "all"))
    assert hidden_size(model) == dense_hidden // 2
    assert any(n == 0 for lay in model_info(model)["layers"] for n in lay["heads"].values())  # a layer emptied
    return model


def export(model, path, tokenizer=None, **kwargs):
    save_compact(model, path, tokenizer, **kwargs)
    return str(path)


def loaded_as_export(pipe, model) -> None:
    """The pipeline runs the export (prunetune's class, the pruned shapes), not a dense stand-in."""
    assert type(pipe.model).__name__ == "Prunetune" + type(model).__name__
    assert needs_prunetune(pipe.model.config)
    assert model_info(pipe.model) == model_info(model)


def softmax_rows(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """The in-memory model's class probabilities, one text at a time (as the pipeline feeds them)."""
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0].softmax(-1) for t in texts]


# ---------------------------------------------------------------------------------------------------------
# Classification heads: text-classification (with label names), token-classification, fill-mask, features
# ---------------------------------------------------------------------------------------------------------


def _classifier(family: str) -> torch.nn.Module:
    config = tiny_config(family)
    config.id2label, config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    torch.manual_seed(0)
    cls = {"bert": transformers.BertForSequenceClassification, "roberta": transformers.RobertaForSequenceClassification,
           "llama": transformers.LlamaForSequenceClassification}[family]
    return pruned(cls(config), family)


@pytest.mark.parametrize("family", ["bert", "roberta", "llama"])
def test_text_classification_pipeline_gives_the_pruned_models_labels_and_scores(family, tok, tmp_path):
    model = _classifier(family)
    pipe = transformers.pipeline("text-classification", model=export(model, tmp_path / "out", tok))
    loaded_as_export(pipe, model)
    got = pipe(TEXTS, top_k=None)
    for rows, probs in zip(got, softmax_rows(model, tok, TEXTS), strict=True):
        assert {r["label"] for r in rows} == set(LABELS.values())  # the names from id2label, not LABEL_0
        scores = {r["label"]: r["score"] for r in rows}
        for i, name in LABELS.items():
            assert abs(scores[name] - probs[i].item()) <= TOL
    top = pipe(TEXTS)  # the default: the best label only
    assert [r["label"] for r in top] == [LABELS[int(p.argmax())] for p in softmax_rows(model, tok, TEXTS)]


def test_a_tokenizer_without_tokenizer_config_loads_from_the_export(tok, tmp_path):
    """A checkpoint whose tokenizer is a bare vocab.txt (no tokenizer_config.json naming its class): `prune`
    copies the file as it is, and AutoTokenizer then picks the class registered for the config's class, which the
    prunetune config classes did not have (the pipeline failed on the export where it worked on the checkpoint)."""
    model = _classifier("bert")
    path = export(model, tmp_path / "out", copy_files=[tok.name_or_path + "/vocab.txt"])
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
    pipe = transformers.pipeline("text-classification", model=path)
    assert type(pipe.tokenizer).__name__ == "BertTokenizer"
    assert [pipe.tokenizer(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
    got = pipe(TEXTS, top_k=None)
    for rows, probs in zip(got, softmax_rows(model, tok, TEXTS), strict=True):
        assert all(abs(r["score"] - probs[model.config.label2id[r["label"]]].item()) <= TOL for r in rows)


def test_token_classification_pipeline(tok, tmp_path):
    config = tiny_config("bert")
    config.id2label = {0: "O", 1: "B-THING", 2: "I-THING"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    model = pruned(transformers.BertForTokenClassification(config), "bert")
    pipe = transformers.pipeline("token-classification", model=export(model, tmp_path / "out", tok), ignore_labels=[])
    loaded_as_export(pipe, model)
    for text, probs in zip(TEXTS, softmax_rows(model, tok, TEXTS), strict=True):
        got = pipe(text)
        words = text.split()
        assert [g["word"] for g in got] == words and [g["index"] for g in got] == list(range(1, len(words) + 1))
        for g in got:  # each word's best label and its probability, [CLS] and [SEP] left out
            p = probs[g["index"]]
            assert g["entity"] == config.id2label[int(p.argmax())] and abs(g["score"] - p.max().item()) <= TOL


def test_fill_mask_pipeline(tok, tmp_path):
    """The masked-LM head reads and writes the pruned hidden stream; its decoder is tied to the word embeddings."""
    torch.manual_seed(0)
    model = pruned(transformers.BertForMaskedLM(tiny_config("bert")), "bert")
    pipe = transformers.pipeline("fill-mask", model=export(model, tmp_path / "out", tok))
    loaded_as_export(pipe, model)
    text = "w5 [MASK] w17 w3"
    got = pipe(text, top_k=5)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0, enc.input_ids[0].tolist().index(tok.mask_token_id)].softmax(-1)
    values, ids = probs.topk(5)
    assert [g["token"] for g in got] == ids.tolist()
    assert max(abs(g["score"] - v) for g, v in zip(got, values.tolist(), strict=True)) <= TOL


def test_feature_extraction_pipeline(tok, tmp_path):
    torch.manual_seed(0)
    model = pruned(transformers.BertModel(tiny_config("bert")), "bert")
    pipe = transformers.pipeline("feature-extraction", model=export(model, tmp_path / "out", tok))
    loaded_as_export(pipe, model)
    for text in TEXTS:
        got = torch.tensor(pipe(text))
        with torch.no_grad():
            want = model(**tok(text, return_tensors="pt")).last_hidden_state
        assert got.shape == want.shape and got.shape[-1] == 16  # the pruned hidden width
        assert (got - want).abs().max().item() <= TOL


def test_question_answering_head_by_path(tok, tmp_path):
    """What the question-answering pipeline did: the question and context as a pair, the best start/end span."""
    torch.manual_seed(0)
    model = pruned(transformers.BertForQuestionAnswering(tiny_config("bert")), "bert")
    path = export(model, tmp_path / "out", tok)
    again = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert type(again).__name__ == "PrunetuneBertForQuestionAnswering"
    question, context = "w3 w9", "w10 w11 w12 w13 w14 w15 w16"
    enc = tokenizer(question, context, return_tensors="pt")
    assert enc.input_ids.tolist() == tok(question, context, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got, want = again(**enc), model(**enc)
    assert torch.equal(got.start_logits, want.start_logits) and torch.equal(got.end_logits, want.end_logits)

    def best_span(out) -> tuple[int, int]:
        in_context = enc.token_type_ids[0].bool() & (enc.input_ids[0] != tok.sep_token_id)
        scores = out.start_logits[0][:, None] + out.end_logits[0][None, :]
        valid = in_context[:, None] & in_context[None, :] & torch.ones_like(scores, dtype=torch.bool).triu()
        flat = int(scores.masked_fill(~valid, -torch.inf).argmax())
        return divmod(flat, scores.shape[1])

    start, end = best_span(got)
    assert (start, end) == best_span(want)
    assert set(tokenizer.decode(enc.input_ids[0, start : end + 1]).split()) <= set(context.split())


# ---------------------------------------------------------------------------------------------------------
# Generation: text-generation (LLaMA, and the sliding-window Mistral / Qwen2) and T5 by path
# ---------------------------------------------------------------------------------------------------------

GREEDY = {"do_sample": False}
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 20}


def _causal(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        return pruned(tiny("llama"), "llama")
    from test_generation import _tiny_sliding  # window 4, shorter than the prompts: keys are dropped

    return pruned(_tiny_sliding(family), family)


def _generated_text(model, tokenizer, prompts: list[str], settings: dict) -> list[str]:
    """What `model.generate` gives for the prompts, batched and left-padded as the pipeline batches them."""
    # tokenized as the pipeline does (special tokens included); a BERT tokenizer's segment ids are not passed
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, suppress_tokens=SPECIAL, **settings)
    return tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_text_generation_pipeline_generates_what_the_pruned_model_generates(family, settings, tok, tmp_path):
    model = _causal(family)
    pipe = transformers.pipeline("text-generation", model=export(model, tmp_path / "out", tok))
    loaded_as_export(pipe, model)
    kw = {"max_new_tokens": 5, "suppress_tokens": SPECIAL, "return_full_text": False, **settings}
    for prompt in TEXTS:  # one at a time: the pipeline's default
        torch.manual_seed(0)
        got = pipe(prompt, **kw)[0]["generated_text"]
        assert got == _generated_text(model, tok, [prompt], settings)[0]
        assert len(got.split()) == 5
    if settings is GREEDY:
        # One left-padded batch: masks and positions matter. Greedy only: a batched pipeline iterates a DataLoader,
        # which draws its seed from the global generator before generate() samples.
        batched = [b[0]["generated_text"] for b in pipe(TEXTS, batch_size=len(TEXTS), **kw)]
        assert batched == _generated_text(model, tok, TEXTS, settings)
        assert batched == [_generated_text(model, tok, [p], settings)[0] for p in TEXTS]  # padding changes nothing


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_t5_by_path_generates_what_the_pruned_model_generates(settings, tok, tmp_path):
    """What the text2text-generation / summarization pipelines did: tokenizer and Auto class by path, generate."""
    model = pruned(tiny("t5"), "t5")
    path = export(model, tmp_path / "out", tok)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert type(again).__name__ == "PrunetuneT5ForConditionalGeneration"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    outs = []
    for m in (again, model):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(m.generate(**enc, max_new_tokens=5, suppress_tokens=SPECIAL, **settings))
    assert torch.equal(*outs) and outs[0].shape == (len(TEXTS), 6)  # the decoder start token + 5
    texts = tokenizer.batch_decode(outs[0], skip_special_tokens=True)
    assert all(len(t.split()) == 5 for t in texts)

