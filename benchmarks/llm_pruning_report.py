"""The llm_pruning.py table: row names and families, the markdown report and the Done-when verdict."""

from __future__ import annotations

import math

FAMILY = {
    "dense": "dense",
    "shortgpt": "ShortGPT",
    "wanda_sp": "Wanda-sp/FLAP",
    "flap": "Wanda-sp/FLAP",
    "torch_pruning": "Torch-Pruning",
    "torch_pruning_ffn": "Torch-Pruning",
}
LABEL = {
    "dense": "dense (unpruned)",
    "shortgpt": "ShortGPT layer dropping",
    "wanda_sp": "Wanda-sp (uniform)",
    "flap": "FLAP (WIFV, AL-AM, bias comp.)",
    "torch_pruning": "Torch-Pruning 1.6, LLM example",
    "torch_pruning_ffn": "Torch-Pruning 1.6, attention ignored",
}


def _failed_row(r: dict, lead: list[str], blanks: int) -> str:
    """A table row for a run that did not finish: its keep, `lead` cells, dashes, and how it failed."""
    why = f"{r['status']}: {r.get('error', '')}".replace("|", "/")
    return "| " + " | ".join([f"{r['keep']:g}", *lead, *["—"] * blanks, why]) + " |"


def family(row: str) -> str:
    return "prunetune" if row.startswith("prunetune:") else FAMILY[row]


def label(row: str, default_scorer: str | None = None) -> str:
    if row.startswith("prunetune:"):
        scorer = row.split(":", 1)[1]
        return f"prunetune {scorer}" + (" (default)" if scorer == default_scorer else "")
    return LABEL[row]



# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".2f", empty: str = "—") -> str:
    return empty if v is None else format(v, spec)


def _mc_settings(settings: dict, benches: list[str]) -> str:
    if not benches:
        return "Multiple-choice evaluation: not run (--mc-bench none)."
    return (f"Multiple choice: `prunetune eval` (lm-evaluation-harness definitions, 0-shot) of each model as pruned, "
            f"untrained, on the first {settings.get('mc_limit')} items of each benchmark; x100, acc_norm where the "
            "harness reports it, with the score above chance on the same items; '—': the row ran before or without "
            "it.")


def _mc_cell(r: dict, bench: str) -> str:
    b = (r.get("mc") or {}).get("benchmarks", {}).get(bench)
    return "—" if b is None else f"{100 * b['score']:.1f} ({100 * b['above_chance']:+.1f})"


def markdown(report: dict, keeps: list[float]) -> str:
    s = report["settings"]
    scorer = report["default_scorer"]
    rows = report["rows"]
    benches = list(dict.fromkeys(b for r in rows for b in (r.get("mc") or {}).get("benchmarks", {})))
    dense = next((r for r in rows if r["row"] == "dense" and r["status"] == "ok"), None)
    heap = "glibc mmap threshold 64 KiB" if s["heap"] == "compact" else "default heap"
    lines = [
        f"# Decoder pruning vs peers, {report['date']}",
        "",
        f"Machine: {report['machine']}.",
        f"Model: `{s['model']}`; calibration: {s['calib']} Alpaca records from the training split (seed "
        f"{s['seed']}, prompt + response, up to {s['calib_len']} tokens, batches of {s['calib_batch']}); held-out "
        f"text: first {s['article_len']} tokens of the first {s['articles']} CNN/DailyMail validation articles "
        "(token-weighted perplexity, no training). Budget: fraction of the decoder-layer parameters (embeddings "
        f"excluded). Latency: full forward at batch {s['latency_batch']} x {s['latency_seq']}, median of "
        f"{s['latency_repeats']}+ passes (those that had the CPU to themselves), ratio to dense. Peak memory: "
        f"process peak RSS above the level before the model was loaded, while pruning ({heap}). Each row ran in "
        f"its own process. {_mc_settings(s, benches)}",
        "",
        "| keep | method | family | layer params kept | layers | heads (q/kv) | FFN | perplexity "
        + "".join(f"| {b} (above chance) " for b in benches)
        + "| prune s | prune peak MB | latency ms | latency ratio | note |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(benches) + "---|---|---|---|---|",
    ]
    for r in rows:
        name = label(r["row"], scorer)
        if r["status"] != "ok":
            lines.append(_failed_row(r, [name, family(r["row"])], 9 + len(benches)))
            continue
        k, d = r["kept"], r["dense"]
        ratio = r["latency_s"] / dense["latency_s"] if dense else None
        note = "latency: CPU shared with other processes" if r.get("contended") else ""
        lines.append(
            f"| {r['keep']:g} | {name} | {family(r['row'])} | {r['layer_params_kept']:.1%} "
            f"| {k['layers']}/{d['layers']} | {k['heads']}/{k['kv_heads']} | {k['ffn']}/{d['ffn']} | {r['ppl']:.2f} "
            + "".join(f"| {_mc_cell(r, b)} " for b in benches)
            + f"| {r['prune_s']:.0f} | {r['prune_peak_mb']:.0f} | {1000 * r['latency_s']:.0f} | {_fmt(ratio, '.3f')} "
            f"| {note} |"
        )
    recovered = report.get("recovered") or []
    if recovered:
        base = next((r for r in recovered if r["row"] == "dense" and r["status"] == "ok"), None)
        ref = base["recovery"]["instr_ppl_after"] if base else None
        lines += [
            "",
            f"After the same LoRA recovery (r={s['rank']} on {s['lora_targets']}, lr {s['lr']:g}, {s['epochs']:g} "
            f"epoch on {s['train_limit']} Alpaca training records, max length {s['max_length']}, batch "
            f"{s['batch_size']}; instruction hold-out: {s['eval_limit']} records) of the best model of each family"
            + (", the pruned ones also distilled from the model before pruning (loss 0.5 task + 0.5 KL over the "
               "answer tokens, as apt --distill-teacher dense --distill-layers 0):"
               if s.get("recover_teacher") == "dense" else ":"),
            "",
            "| keep | method | instr. ppl before | instr. ppl after LoRA | x unpruned LoRA | article ppl after "
            "| train s | train peak MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in recovered:
            name = label(r["row"], scorer)
            if r["status"] != "ok":
                lines.append(_failed_row(r, [name], 5))
                continue
            rc = r["recovery"]
            rel = rc["instr_ppl_after"] / ref if ref else None
            lines.append(f"| {r['keep']:g} | {name} | {rc['instr_ppl_before']:.2f} | {rc['instr_ppl_after']:.2f} "
                         f"| {_fmt(rel, '.2f')} | {rc['ppl_after']:.2f} | {rc['train_s']:.0f} "
                         f"| {rc['train_peak_mb']:.0f} |")
    lines += ["", *verdict(report, keeps)]
    if report["notes"]:
        lines += ["", *[f"Note: {n}." for n in report["notes"]]]
    lines.append(f"\nTotal wall time {report['total_wall_s'] / 60:.0f} min.")
    return "\n".join(lines) + "\n"


def verdict(report: dict, keeps: list[float]) -> list[str]:
    """The issue's Done-when, line by line: met, not met, or not measurable from this run."""
    scorer = report["default_scorer"]
    row = f"prunetune:{scorer}"
    out = [f"Done-when (prunetune default decoder scorer: {scorer}):"]
    for keep in keeps:
        ours = next((r for r in report["rows"] if r["row"] == row and math.isclose(r["keep"], keep)
                     and r["status"] == "ok"), None)
        peers = [r for r in report["rows"] if family(r["row"]) not in ("prunetune", "dense")
                 and math.isclose(r["keep"], keep) and r["status"] == "ok"]
        failed = [label(r["row"]) for r in report["rows"] if family(r["row"]) not in ("prunetune", "dense")
                  and math.isclose(r["keep"], keep) and r["status"] != "ok"]
        if ours is None or not peers:
            out.append(f"- keep {keep:g}: not measurable (no {row} result or no peer result)")
            continue
        best = min(peers, key=lambda r: r["ppl"])
        ok = ours["ppl"] < best["ppl"]
        tail = f"; peers that did not run: {', '.join(failed)}" if failed else ""
        out.append(f"- keep {keep:g}: {ours['ppl']:.2f} vs best peer {label(best['row'])} {best['ppl']:.2f}: "
                   f"{'met' if ok else 'NOT met'}{tail}")
    rec = report.get("recovered") or []
    base = next((r for r in rec if r["row"] == "dense" and r["status"] == "ok"), None)
    low = min(keeps)
    ours = next((r for r in rec if family(r["row"]) == "prunetune" and math.isclose(r["keep"], low)
                 and r["status"] == "ok"), None)
    if base and ours:
        rel = ours["recovery"]["instr_ppl_after"] / base["recovery"]["instr_ppl_after"]
        out.append(f"- after recovery at keep {low:g} ({label(ours['row'], scorer)}): {rel:.2f}x unpruned LoRA's "
                   f"instruction perplexity: {'met' if rel <= 1.5 else 'NOT met'} (target <= 1.5x)")
    else:
        out.append(f"- after recovery at keep {low:g}: not measured (run with --recover)")
    return out
