"""Measurement helpers: a tiny BERT on disk, fresh child processes, the memory meter."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from prunetune import PrunetuneError, PruningPlan, apply_plan, save_compact
from prunetune.bench import (
    MemoryMeter,
    compare_inference,
    current_rss_mb,
    machine_description,
    measure_inference,
    peak_rss_mb,
    run_isolated,
)

# a child module for run_isolated: allocations of known size under the meter, and a hang
PROBE = '''
import time

import torch

from prunetune.bench import MemoryMeter, peak_rss_mb


def allocate(mb: int) -> dict:
    with MemoryMeter() as idle:
        pass
    with MemoryMeter() as meter:
        x = torch.ones(mb * 2**18)  # float32: mb MiB, written so the pages are resident
        del x
    return {"idle": idle.peak_mb, "alloc": meter.peak_mb, "exact": meter.exact, "peak_rss": peak_rss_mb()}


def hang(seconds: float) -> dict:
    time.sleep(seconds)
    return {}
'''


def tiny_bert(layers: int = 2, ffn: int = 64) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=ffn, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bench") / "bert"
    tiny_bert().save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> tuple[str, int]:
    """A prunetune export of the tiny BERT (2 of 4 heads, 20 of 64 neurons per layer) and its parameter count."""
    model = tiny_bert()
    plan = PruningPlan.identity(model)
    plan.heads = {k: v[:2] for k, v in plan.heads.items()}
    plan.neurons = {k: v[:20] for k, v in plan.neurons.items()}
    apply_plan(model, plan)
    out = save_compact(model, tmp_path_factory.mktemp("bench") / "pruned")
    return str(out), sum(p.numel() for p in model.parameters())


@pytest.fixture
def probe_env(tmp_path) -> dict[str, str]:
    (tmp_path / "bench_probe.py").write_text(PROBE)
    return {"PYTHONPATH": str(tmp_path)}


def test_process_memory_readings_are_positive():
    assert current_rss_mb() > 0
    assert peak_rss_mb() >= current_rss_mb() - 1  # statm and status round differently


def test_measure_inference_on_a_tiny_bert(bert_dir):
    threads = torch.get_num_threads()
    res = measure_inference(bert_dir, batch_size=2, seq_len=16, warmup=1, repeats=3, threads=1)
    assert 0 < res["latency_s_min"] <= res["latency_s_median"]
    assert len(res["latencies_s"]) == 3
    assert res["params"] == sum(p.numel() for p in tiny_bert().parameters())
    assert res["layer_params"] < res["params"]
    assert res["peak_mem_mb"] >= 0 and res["load_peak_mem_mb"] >= 0
    assert (res["device"], res["threads"], res["batch_size"], res["seq_len"]) == ("cpu", 1, 2, 16)
    assert torch.get_num_threads() == threads  # the caller's setting is restored


def test_measure_inference_loads_a_pruned_export(pruned):
    path, params = pruned
    res = measure_inference(path, batch_size=1, seq_len=8, warmup=0, repeats=1, threads=1)
    assert res["params"] == params < sum(p.numel() for p in tiny_bert().parameters())


def test_measure_inference_refuses_too_long_a_sequence(bert_dir):
    with pytest.raises(PrunetuneError, match="longer than the model.s 64 positions"):
        measure_inference(bert_dir, batch_size=1, seq_len=65, repeats=1, threads=1)


def test_run_isolated_returns_the_childs_dict():
    assert run_isolated("json:loads", {"s": '{"a": [1, 2]}'}) == {"a": [1, 2]}


def test_measure_inference_in_a_fresh_process(pruned):
    path, params = pruned
    kw = {"model_dir": path, "batch_size": 2, "seq_len": 8, "warmup": 0, "repeats": 2, "threads": 1}
    res = run_isolated("prunetune.bench:measure_inference", kw, timeout=120)
    assert res["params"] == params and res["peak_mem_mb"] > 0 and res["mem_exact"]
    assert res["heap"] == "compact"  # glibc (the Linux this runs on)


def test_run_isolated_raises_with_the_childs_last_stderr_line():
    with pytest.raises(RuntimeError, match="JSONDecodeError: Expecting value"):
        run_isolated("json:loads", {"s": "not json"})
    with pytest.raises(RuntimeError, match="not a dict"):
        run_isolated("json:dumps", {"obj": [1]})
    with pytest.raises(ValueError, match="module:function"):
        run_isolated("json.loads", {})


def test_run_isolated_times_out(probe_env):
    with pytest.raises(RuntimeError, match="timed out"):
        run_isolated("bench_probe:hang", {"seconds": 30}, timeout=1, env=probe_env)


def test_memory_meter_sees_an_allocation_in_a_fresh_process(probe_env):
    # give this process a big peak first: the child must not inherit it (ru_maxrss does, across vfork + exec)
    big = torch.ones(1024 * 2**18)
    del big
    res = run_isolated("bench_probe:allocate", {"mb": 200}, timeout=60, env=probe_env)
    assert 0 <= res["idle"] < 20
    assert 190 <= res["alloc"] < 260
    assert res["exact"]
    assert res["peak_rss"] < peak_rss_mb() - 500


def fake_runs(monkeypatch, script: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Replace the child processes by scripted (latency, cpu share) results; returns the order of the timed runs."""
    calls: list[str] = []

    def run(fn_path, kwargs, timeout=None):
        name = kwargs["model_dir"]
        if kwargs["compact"]:  # the memory run
            return {"peak_mem_mb": {"a": 100.0, "b": 60.0}[name], "heap": "compact"}
        latency, share = script[name][sum(c == name for c in calls)]
        calls.append(name)
        return {"latency_s_median": latency, "latency_s_min": latency * 0.9, "cpu_share": share,
                "peak_mem_mb": 500.0, "params": {"a": 10, "b": 4}[name]}

    monkeypatch.setattr("prunetune.bench.run_isolated", run)
    return calls


def test_compare_inference_interleaves_and_keeps_the_best_uncontended_run(monkeypatch):
    script = {"a": [(1.0, 1.0), (0.8, 1.0), (0.9, 1.0)], "b": [(0.1, 0.5), (0.5, 1.0), (0.45, 1.0)]}
    calls = fake_runs(monkeypatch, script)
    res = compare_inference({"dense": "a", "pruned": "b"}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # alternating order
    assert res["dense"]["latency_s_median"] == 0.8
    assert res["pruned"]["latency_s_median"] == 0.45  # 0.1 shared the CPU: not the model's speed
    assert res["pruned"]["latency_ratio"] == pytest.approx(0.45 / 0.8)
    assert res["pruned"]["mem_ratio"] == pytest.approx(0.6) and res["pruned"]["params_ratio"] == 0.4
    assert res["pruned"]["peak_mem_mb_default_heap"] == 500.0 and res["pruned"]["heap"] == "compact"
    assert not res["pruned"]["contended"]


def test_compare_inference_measures_contended_models_again(monkeypatch):
    calls = fake_runs(monkeypatch, {"a": [(1.0, 1.0)], "b": [(0.9, 0.5), (0.8, 0.5), (0.4, 1.0)]})
    res = compare_inference({"dense": "a", "pruned": "b"}, rounds=1, max_rounds=4)
    assert calls == ["a", "b", "b", "b"]
    assert res["pruned"]["latency_s_median"] == 0.4 and res["pruned"]["rounds"] == 3

    calls = fake_runs(monkeypatch, {"a": [(1.0, 1.0)], "b": [(0.9, 0.5), (0.8, 0.5)]})
    res = compare_inference({"dense": "a", "pruned": "b"}, rounds=1, max_rounds=2)
    assert res["pruned"]["contended"] and res["pruned"]["latency_s_median"] == 0.8


def test_memory_meter_in_process_is_non_negative():
    with MemoryMeter() as meter:
        x = torch.ones(2**20)
    assert meter.peak_mb >= 0
    del x


def test_machine_description_names_the_versions():
    text = machine_description()
    assert torch.__version__ in text and "cores" in text
