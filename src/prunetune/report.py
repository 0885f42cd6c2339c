"""A fine-tuning run's report: the memory measurement it states, its precision record, summary and markdown."""

from __future__ import annotations

import os

import torch

from prunetune import tasks


def memory_meter(device: torch.device):
    """Peak training memory above the level just before the model loads (prunetune.bench.MemoryMeter)."""
    from prunetune.bench import MemoryMeter

    return MemoryMeter(device).start()


def memory_how(meter) -> str:
    if meter.cuda:
        return "torch.cuda.max_memory_allocated above the allocation just before the model was loaded"
    how = ("process peak resident memory (VmHWM, restarted just before the model was loaded) above the "
           "resident memory at that moment")
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:  # glibc then maps every larger block on its own and unmaps it on free
        how += f"; glibc mmap threshold {threshold} bytes, so freed activations leave the resident set"
    return how


def precision_record(requested: str, used: str, device: torch.device) -> dict:
    """What was asked for, what ran, and where."""
    device = device.type
    out = {"requested": requested, "used": used, "device": device}
    if requested not in ("auto", used):
        out["note"] = "mixed precision runs on GPUs only" if device != "cuda" else "not supported here"
    return out


def _metric_text(name: str, value: float) -> str:
    return f"{value:,}" if name.endswith("total") or name == "tokens" else f"{value:.4f}"


def summary(r: dict) -> str:
    m, main = r["metrics"], r["main_metric"]
    others = ", ".join(f"{k} {_metric_text(k, v)}" for k, v in m.items() if k not in ("main", main))
    bench = r.get("benchmarks")
    return (
        f"{r['method']} on {r['task']}: {main} {m['main']:.4f}" + (f" ({others})" if others else "")
        + (f" | benchmarks average {bench['average']:.4f}" if bench else "")
        + f" | params {r['params_total']:,} ({r['layer_params_kept']:.0%} of layer params) | trainable "
        f"{r['trainable_params']:,} | train {r['train_time_s']:.1f}s | peak train mem {r['peak_train_mem_mb']:.0f} MB"
    )


def _rows_line(d: dict) -> str:
    share = f"{d['examples']:,} of {d['of']:,}" if d["examples"] != d["of"] else f"all {d['of']:,}"
    files = " + ".join((d["source"], *d.get("also", ())))
    return f"{share} rows of {files}" + (" (held out)" if d.get("held_out") else "")


def report_markdown(r: dict) -> str:
    held = r["data"].get("held_out")
    main = r["main_metric"]
    rows = [
        (f"{main} (main metric, {'higher' if r['maximize'] else 'lower'} is better)", f"{r['metrics']['main']:.4f}"),
        *[(k, _metric_text(k, v)) for k, v in r["metrics"].items() if k not in ("main", main)],
        ("training rows", _rows_line(r["data"]["train"])),
        ("dev rows (scored)", _rows_line(r["data"]["dev"]) + (
            f", a seeded {held['dev_fraction']:g} of the training file's {held.get('by', 'row')}s (seed "
            f"{held['seed']}; no {held.get('by', 'row')} in both); row numbers in data_split.json" if held else "")),
        ("task", f"{r['task']} ({r['task_kind']})" + "".join(
            f", {tasks.flag(k)} {v}" for k, v in r["task_options"].items() if v is not None)),
        ("learning rate", f"{r['config']['lr']:g}"),
        ("precision", f"{r['precision']['used']} on {r['precision']['device']}"
                      + (f" ({r['precision']['requested']} requested: {r['precision']['note']})"
                         if "note" in r["precision"] else "")),
        ("total parameters", f"{r['params_total']:,} (dense {r['params_dense']:,})"),
        ("layer parameters kept", f"{r['layer_params_kept']:.1%} of the dense original"
                                  + (f" (the input model had {r['input_layer_params_kept']:.1%})"
                                     if "input_layer_params_kept" in r else "")),
        ("layer FLOPs kept", f"{r['layer_flops_kept']:.1%} (per token, sequence length {r['flops_seq_len']})"),
        ("trainable parameters", f"{r['trainable_params']:,}"),
        ("heads kept", r["heads"]),
        ("FFN neurons kept", r["neurons"]),
        ("hidden size", r["hidden"]),
        ("training time", f"{r['train_time_s']:.1f} s ({r['train_steps']} steps)"),
        ("peak training memory", f"{r['peak_train_mem_mb']:.0f} MB — {r['peak_train_mem_how']}"),
        ("dev inference", f"{r['inference']['ms_per_example']:.2f} ms/example"),
        (
            "inference, batch 32",
            f"{1000 * r['inference']['batch32_latency_s']:.0f} ms, peak "
            f"{r['inference']['batch32_peak_mem_mb']:.0f} MB (fresh process)",
        ),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# prunetune {r['method']} on {r['task']}\n\n| | |\n|---|---|\n{body}\n" + _benchmarks_markdown(r)


def _benchmarks_markdown(r: dict) -> str:
    """The multiple-choice benchmarks of the exported model (finetune --eval-bench), one row each."""
    b = r.get("benchmarks")
    if not b:
        return ""
    rows = [f"| {name} | {x['items']:,} | {x['metrics']['acc']:.4f} | "
            + (f"{x['metrics']['acc_norm']:.4f}" if "acc_norm" in x["metrics"] else "-")
            + f" | {x['score']:.4f} | {x['chance']:.4f} | {x['above_chance']:+.4f} |"
            for name, x in b["benchmarks"].items()]
    scope = (f"first {b['limit']} items per task, " if b["limit"] else "") + f"{b['shots']}-shot"
    rows.append(f"| average ({scope}) | | | | {b['average']:.4f} | | "
                f"{b['average_above_chance']:+.4f} |")
    return ("\n## Multiple-choice benchmarks (lm-evaluation-harness definitions, " + b["harness"] + ")\n\n"
            "score: acc_norm where the harness reports it, else acc (TruthfulQA MC2: mass on true answers)\n\n"
            "| benchmark | items | acc | acc_norm | score | chance | above chance |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
