"""ONNX export: every family x head class, dense and pruned (heads, neurons and hidden dims, emptied layers),
exported from a `save_compact` directory and run in ONNX Runtime against the in-memory PyTorch model; causal
LMs and T5 decode through ORT with their past key values as `generate()` does with its cache."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import tiny_config, tiny_inputs  # noqa: E402
from engine_helpers import T5_CASES, lively, make_plan  # noqa: E402

import prunetune.onnx_export as onnx_export  # noqa: E402
import prunetune.onnx_graphs as onnx_graphs  # noqa: E402
from prunetune.cli import main  # noqa: E402
from prunetune.errors import PrunetuneError  # noqa: E402
from prunetune.export import save_compact  # noqa: E402
from prunetune.families import FAMILIES, token_types  # noqa: E402
from prunetune.onnx_export import TOLERANCE, export_onnx  # noqa: E402
from prunetune.plan import PruningPlan  # noqa: E402
from prunetune.surgery import apply_plan  # noqa: E402


def _own_class(family: str, auto: str) -> bool:
    """The family has its own class for this Auto class (RoBERTa has no pre-training or NSP head: transformers'
    mapping falls back to another class, which the test's saved-architecture check would misread)."""
    from transformers.models.auto import modeling_auto

    from prunetune.onnx_export import AUTO_MAPPINGS

    mapping = getattr(modeling_auto, AUTO_MAPPINGS[auto], {})
    return FAMILIES[family].model_types[0] in mapping and not (
        family == "roberta" and auto in ("AutoModelForPreTraining", "AutoModelForNextSentencePrediction"))


HEADS = [(family, auto) for family in ("bert", "roberta", "t5", "llama") for auto in FAMILIES[family].auto_classes
         if _own_class(family, auto)]
NEW_TOKENS = 3  # generate()'s prefill and two decode steps


def build(family: str, auto_class: str, plan: str | dict | None = None, seed: int = 0, config=None):
    """A tiny model of `family` with the head `auto_class` builds, lively weights, pruned by `plan`:
    "all" (heads with layer 1 of every stack empty, FFN neurons, hidden dims) or {site: kept heads}."""
    cfg = config or tiny_config(family)
    if auto_class == "AutoModelForCausalLM" and family in ("bert", "roberta"):
        cfg.is_decoder = True  # BERT's causal-LM head is a decoder only when the config says so
    torch.manual_seed(seed)
    model = lively(getattr(transformers, auto_class).from_config(cfg).eval(), seed)
    if plan == "all":
        apply_plan(model, make_plan(family, model, "all"))
    elif plan:
        apply_plan(model, PruningPlan(family, heads={k: list(v) for k, v in plan.items()}))
    return model


def session(path: str):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def np_inputs(inputs: dict) -> dict:
    return {k: v.numpy() for k, v in inputs.items()}


def with_eos(family: str, inputs: dict, eos: int = 1) -> dict:
    """T5's classification heads pool at the eos token: every row gets one, after its last real token."""
    if family == "t5":
        ids = inputs["input_ids"].clone()
        ids[torch.arange(len(ids)), inputs["attention_mask"].sum(1) - 1] = eos
        inputs = {**inputs, "input_ids": ids}
    return inputs


def assert_close(got: np.ndarray, ref: torch.Tensor, tol: float = TOLERANCE) -> None:
    ref = ref.detach().numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= tol


def export_dir(model, tmp_path, **kw) -> dict:
    """The user's path: save_compact, then export_onnx on the directory."""
    save_compact(model, tmp_path / "model")
    return export_onnx(tmp_path / "model", tmp_path / "onnx" / "model.onnx", **kw)


# ---------------------------------------------------------------------------------------------------------
# Every family x head, dense and pruned
# ---------------------------------------------------------------------------------------------------------


def check_against_model(model, report: dict, family: str) -> None:
    """ORT on fresh inputs (another batch and length than the traced ones) against the in-memory model."""
    graphs = report["graphs"]
    inputs = tiny_inputs(family, batch=4, length=11, seed=7)
    dec = inputs.pop("decoder_input_ids", None)
    with torch.no_grad():
        if report["kind"] == "single":
            inputs = with_eos(family, inputs)
            if "token_type_ids" in graphs["model"]["inputs"]:  # a sentence pair: segment 1 from position 5
                inputs["token_type_ids"] = (torch.arange(11) >= 5).long().expand(4, 11) * inputs["attention_mask"]
            if report["auto_class"] == "AutoModelForMultipleChoice":  # 2 examples x 2 choices, not 4 rows
                inputs = {k: v.reshape(2, 2, -1) for k, v in inputs.items()}
            ref = model(**inputs)
            got = session(graphs["model"]["file"]).run(None, np_inputs(inputs))
            for name, value in zip(graphs["model"]["outputs"], got, strict=True):
                assert_close(value, ref[name])
        elif report["kind"] == "causal-lm":  # unpadded: the graph's positions are then 0..n-1, as forward's
            inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
            got = session(graphs["model"]["file"]).run(None, np_inputs(inputs))
            assert_close(got[0], model(**inputs).logits)
        else:
            states = session(graphs["encoder"]["file"]).run(None, np_inputs(inputs))[0]
            assert_close(states, model.get_encoder()(**inputs).last_hidden_state)
            feed = {"decoder_input_ids": dec.numpy(), "encoder_hidden_states": states,
                    "encoder_attention_mask": inputs["attention_mask"].numpy()}
            got = session(graphs["decoder"]["file"]).run(None, feed)[0]
            out = model(**inputs, decoder_input_ids=dec)
            assert_close(got, out.logits if "logits" in out else out.last_hidden_state)


@pytest.mark.parametrize("variant", ["dense", "pruned"])
@pytest.mark.parametrize(("family", "auto_class"), HEADS)
def test_round_trip_every_head(family, auto_class, variant, tmp_path):
    model = build(family, auto_class, "all" if variant == "pruned" else None)
    report = export_dir(model, tmp_path)
    assert report["auto_class"] == auto_class and report["verified"]
    assert report["max_abs_diff"] <= TOLERANCE
    expected = {"causal-lm": {"model", "with_past"}, "encoder-decoder": {"encoder", "decoder", "decoder_with_past"},
                "single": {"model"}}[report["kind"]]
    assert set(report["graphs"]) == expected
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(
        {"model": "model.onnx"}.get(g, f"model.{g}.onnx") for g in expected)  # and nothing else (no temporaries)
    if report["past"]:  # per-layer past shapes, read from the pruned weights
        heads = make_plan(family, model, "all").heads if variant == "pruned" else {}
        for lay in report["past"]:
            kept = heads.get(f"{lay['layer']}/self")
            assert lay["empty"] == (kept == [])
            assert lay["past_shape"] == ([1, 1] if lay["empty"] else [lay["kv_heads"], lay["head_dim"]])
    if report["kind"] == "single":  # segment ids are an input where the model embeds more than one type
        assert ("token_type_ids" in report["graphs"]["model"]["inputs"]) == (token_types(model) > 1)
    check_against_model(model, report, family)


def test_pruned_layout_reaches_the_graph(tmp_path):
    """Per-layer kv heads (GQA, one layer empty) appear as the declared shapes of the past inputs."""
    import onnx

    model = build("llama", "AutoModelForCausalLM", "all")
    report = export_dir(model, tmp_path)
    graph = onnx.load(report["graphs"]["with_past"]["file"]).graph
    declared = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert [lay["kv_heads"] for lay in report["past"]] == [2, 0, 2]  # heads 0,2,3,5 and 1,4 keep both KV groups
    for i, lay in enumerate(report["past"]):
        heads, width = lay["past_shape"]
        assert declared[f"past_key_values.{i}.key"] == ["batch", heads, "past_sequence", width]


def test_emptied_bert_decoder_layer_keeps_a_cache_entry():
    """BERT as a causal LM: a layer whose attention core was emptied still has a (placeholder) cache entry, so
    the exported graphs have a present for every layer."""
    model = build("bert", "AutoModelForCausalLM", {"encoder.1/self": []})
    ids, mask = onnx_graphs.Inputs.for_model(model, 0).batch(2, 8, left=True)
    with torch.no_grad():
        live = onnx_graphs.CausalLMGraph(model, with_past=False)(ids, mask)[1:]
    layout = onnx_graphs.past_layout(model, live)
    assert [lay["past_shape"] for lay in layout] == [[4, 8], [1, 1], [4, 8]]
    assert all(t.shape[2] == 8 for t in live)  # every entry holds the whole sequence


# ---------------------------------------------------------------------------------------------------------
# Decoding with past key values, against generate() with its cache
# ---------------------------------------------------------------------------------------------------------


def generate(model, inputs: dict):
    with torch.no_grad():
        # tokens 0 (pad / decoder start) and 1 (eos) would win on a random model and end generation at once
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=[0, 1],
                              output_logits=True, return_dict_in_generate=True)


def ort_causal_decode(report: dict, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> list:
    """The last position's logits of the prefill and of one step per token of `tokens` but the last."""
    first = session(report["graphs"]["model"]["file"])
    step = session(report["graphs"]["with_past"]["file"])
    names = [n for n in report["graphs"]["with_past"]["inputs"] if n.startswith("past_key_values")]
    out = first.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    # the graph with past runs the prefill too, from a past of length 0: one session can serve a whole generation
    empty = {f"past_key_values.{i}.{kv}": np.zeros((len(ids), heads, 0, width), np.float32)
             for i, (heads, width) in enumerate(lay["past_shape"] for lay in report["past"]) for kv in ("key", "value")}
    again = step.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), **empty})
    assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(out, again, strict=True))
    logits = [out[0][:, -1]]
    mask = mask.numpy()
    for t in range(tokens.shape[1] - 1):
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        past = dict(zip(names, out[1:], strict=True))
        feed = {"input_ids": tokens[:, t : t + 1].numpy(), "attention_mask": mask, **past}
        out = step.run(None, feed)
        logits.append(out[0][:, -1])
    return logits


LLAMA_CASES = {
    "all": "all",
    # layer 0's cache entry is where transformers reads the past length (masks, positions): a placeholder there
    "layer0_empty": {"decoder.0/self": []},
    "whole_groups": {"decoder.0/self": [3, 4, 5], "decoder.1/self": [0, 1, 2], "decoder.2/self": []},
    # no attention left: nothing reads the mask, yet the graphs take the inputs every causal-LM export takes
    "every_layer_empty": {"decoder.0/self": [], "decoder.1/self": [], "decoder.2/self": []},
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_causal_lm_decodes_with_past_like_generate(case, tmp_path):
    model = build("llama", "AutoModelForCausalLM", LLAMA_CASES[case])
    report = export_dir(model, tmp_path)
    for g in report["graphs"].values():  # every graph declares (and takes) the inputs the report lists
        assert [i.name for i in session(g["file"]).get_inputs()] == g["inputs"]
    inputs = tiny_inputs("llama", batch=3, length=9, seed=3)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)  # left padding, as generation pads
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 0)
    ref = generate(model, inputs)
    tokens = ref.sequences[:, inputs["input_ids"].shape[1] :]
    got = ort_causal_decode(report, inputs["input_ids"], inputs["attention_mask"], tokens)
    assert len(got) == len(ref.logits) == NEW_TOKENS
    for g, r in zip(got, ref.logits, strict=True):
        assert_close(g, r)


@pytest.mark.parametrize("prompt", [4, 9])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_models_decode_with_past(family, prompt, tmp_path):
    """Mistral and Qwen2 with a window of 6: prompts shorter and longer than the window, decoding across it, left
    padded; the graphs are traced at length 16, past the window."""
    base = {k: v for k, v in tiny_config("llama").to_dict().items()
            if k not in ("model_type", "architectures", "transformers_version", "layer_types")}
    if family == "mistral":
        cfg = transformers.MistralConfig(**base, sliding_window=6)
    else:
        cfg = transformers.Qwen2Config(**base, sliding_window=6, use_sliding_window=True, max_window_layers=1)
    model = build("llama", "AutoModelForCausalLM", None, config=cfg)
    plan = make_plan("llama", model, "all")  # the tiny LLaMA's plan: the configs share their shapes
    plan.family = family
    apply_plan(model, plan)
    report = export_dir(model, tmp_path)
    inputs = tiny_inputs("llama", batch=2, length=prompt, seed=4)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    inputs["attention_mask"][0, :2] = 0
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 0)
    ref = generate(model, inputs)
    got = ort_causal_decode(report, inputs["input_ids"], inputs["attention_mask"], ref.sequences[:, prompt:])
    for g, r in zip(got, ref.logits, strict=True):
        assert_close(g, r)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("variant", ["dense", "pruned"])
def test_learned_position_decoders_count_positions_with_past(family, variant, tmp_path):
    """BERT-like causal LMs count their learned positions themselves (RoBERTa from padding_idx + 1): decoding
    token by token with past in ORT gives, at every step, the logits of one forward pass over the whole text."""
    model = build(family, "AutoModelForCausalLM", "all" if variant == "pruned" else None)
    report = export_dir(model, tmp_path)
    ids = tiny_inputs(family, batch=2, length=8, seed=5)["input_ids"]
    prompt, mask = ids[:, :5], torch.ones_like(ids[:, :5])
    got = ort_causal_decode(report, prompt, mask, ids[:, 5:])
    with torch.no_grad():
        full = model(input_ids=ids).logits
    for step, logits in enumerate(got):
        assert_close(logits, full[:, 4 + step])


T5_DECODE_CASES = {"all": "all", "layer0_empty": T5_CASES["layer0_empty"], "later_layers": T5_CASES["later_layers"]}


@pytest.mark.parametrize("case", list(T5_DECODE_CASES))
def test_t5_decodes_with_past_like_generate(case, tmp_path):
    model = build("t5", "AutoModelForSeq2SeqLM", T5_DECODE_CASES[case])
    report = export_dir(model, tmp_path)
    inputs = tiny_inputs("t5", batch=3, length=9, seed=5)
    inputs.pop("decoder_input_ids")
    ref = generate(model, inputs)
    g = report["graphs"]
    states = session(g["encoder"]["file"]).run(None, np_inputs(inputs))[0]
    enc = {"encoder_hidden_states": states, "encoder_attention_mask": inputs["attention_mask"].numpy()}
    out = session(g["decoder"]["file"]).run(None, {"decoder_input_ids": ref.sequences[:, :1].numpy(), **enc})
    got = [out[0][:, -1]]
    step = session(g["decoder_with_past"]["file"])
    names = [n for n in g["decoder_with_past"]["inputs"] if n.startswith("past_key_values")]
    for t in range(1, NEW_TOKENS):
        out = step.run(None, {"decoder_input_ids": ref.sequences[:, t : t + 1].numpy(), **enc,
                              **dict(zip(names, out[1:], strict=True))})
        got.append(out[0][:, -1])
    for g_, r in zip(got, ref.logits, strict=True):
        assert_close(g_, r)


# ---------------------------------------------------------------------------------------------------------
# Options: static axes, opset, int8
# ---------------------------------------------------------------------------------------------------------


def test_static_axes_fix_the_trace_shape(tmp_path):
    import onnx

    model = build("llama", "AutoModelForCausalLM", "all")
    report = export_dir(model, tmp_path, dynamic=False, batch_size=2, seq_len=8)
    assert report["max_abs_diff"] <= TOLERANCE and list(report["steps"]) == ["prefill", "step 1"]
    graph = onnx.load(report["graphs"]["with_past"]["file"]).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == [2, 1] and dims["attention_mask"] == [2, 9]
    assert dims["past_key_values.0.key"] == [2, 2, 8, 8]


def test_opset_and_int8_copies(tmp_path):
    import onnx

    model = build("bert", "AutoModelForSequenceClassification", "all")
    report = export_dir(model, tmp_path, opset=12, quantize="int8")
    assert report["opset"] == 12
    q = report["quantized"]
    assert q["files"] == [str(tmp_path / "onnx" / "model.int8.onnx")]
    fp32, int8 = (onnx.load(f).graph for f in (report["graphs"]["model"]["file"], q["files"][0]))
    weights = {i.name for i in fp32.initializer if len(i.dims) == 2}
    linears = [n for n in fp32.node if n.op_type == "Gemm" or (n.op_type == "MatMul" and n.input[1] in weights)]
    assert len(linears) == sum(n.op_type == "MatMulInteger" for n in int8.node) > 0  # every linear is int8
    assert np.isfinite(q["max_abs_diff"]) and q["max_abs_diff"] > 0  # reported, not held to the tolerance
    inputs = {**tiny_inputs("bert"), "token_type_ids": torch.zeros(3, 9, dtype=torch.long)}
    got = session(q["files"][0]).run(None, np_inputs(inputs))[0]
    assert got.shape == (3, 2) and np.isfinite(got).all()


def test_bf16_checkpoint_exports_in_fp32(tmp_path):
    model = build("bert", "AutoModelForSequenceClassification", "all").to(torch.bfloat16)
    report = export_dir(model, tmp_path)
    assert report["max_abs_diff"] <= TOLERANCE
    assert [o.type for o in session(report["graphs"]["model"]["file"]).get_outputs()] == ["tensor(float)"]


# ---------------------------------------------------------------------------------------------------------
# Failures: one line, nothing written
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "model"
    save_compact(build("bert", "AutoModelForSequenceClassification", "all"), path)
    return path


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_failed_check_writes_nothing(bert_dir, tmp_path, monkeypatch):
    real = onnx_export._diffs
    monkeypatch.setattr(onnx_export, "_diffs", lambda *a: {k: (v + 1, e + 1) for k, (v, e) in real(*a).items()})
    with pytest.raises(PrunetuneError, match="differs from PyTorch by .* graph: nothing written"):
        export_onnx(bert_dir, tmp_path / "model.onnx", quantize="int8")
    assert leftovers(tmp_path) == []


def test_failed_export_leaves_no_partial_file(bert_dir, tmp_path, monkeypatch):
    def half_written(module, args, path, **kw):
        with open(path, "wb") as f:
            f.write(b"\x08\x07partial")
        raise RuntimeError("exporter crashed\nwith a long traceback")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    with pytest.raises(PrunetuneError, match="^ONNX export of the model graph failed: RuntimeError: exporter crashed$"):
        export_onnx(bert_dir, tmp_path / "model.onnx")
    assert leftovers(tmp_path) == []


def test_existing_output_is_kept_without_overwrite(bert_dir, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(PrunetuneError, match="already exists"):
        export_onnx(bert_dir, out)
    assert out.read_bytes() == b"mine"
    export_onnx(bert_dir, out, overwrite=True, verify=False)
    assert out.stat().st_size > 1000 and leftovers(tmp_path) == ["model.onnx"]


def test_missing_runtime_says_what_to_install(bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(PrunetuneError, match=r"pip install prunetune\[onnx\]"):
        export_onnx(bert_dir, tmp_path / "model.onnx")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"out": "model.bin"}, "must end in .onnx"),
    ({"quantize": "int4"}, "quantize must be one of int8"),
    ({"opset": 11}, "opset must be between 12 and 20"),
    ({"auto_class": "AutoModelForImageClassification"}, "unknown auto class"),
])
def test_bad_arguments_are_one_line(bert_dir, tmp_path, kwargs, message):
    kwargs = {"out": "model.onnx", **kwargs}
    with pytest.raises(PrunetuneError, match=message):
        export_onnx(bert_dir, tmp_path / kwargs.pop("out"), **kwargs)
    assert leftovers(tmp_path) == []


def test_cli_export_onnx(bert_dir, tmp_path, capsys):
    out = tmp_path / "cli" / "model.onnx"
    assert main(["export-onnx", str(bert_dir), "--out", str(out), "--quantize", "int8", "--seq-len", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] <= TOLERANCE and report["trace_shape"] == [2, 8]
    assert leftovers(out.parent) == ["model.int8.onnx", "model.onnx"]
    assert main(["export-onnx", str(bert_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunetune: error:") and "already exists" in err and "\n" not in err


def test_check_tolerance_scales_with_the_values():
    """|ORT - PyTorch| <= atol + rtol x |PyTorch| (numpy.allclose's rule): 5e-4 on a logit of 100 passes at
    rtol 1e-5, on a logit of 1 it does not; the reported difference is the plain one."""
    ref = (torch.tensor([100.0, 1.0]),)
    d = onnx_export._diffs(["x"], ref, [np.array([100.0005, 1.0], np.float32)], 1e-5)["x"]
    assert d[0] == pytest.approx(5e-4, rel=0.02) and d[1] < TOLERANCE
    d = onnx_export._diffs(["x"], ref, [np.array([100.0, 1.0005], np.float32)], 1e-5)["x"]
    assert d[1] > TOLERANCE
