"""Accuracy over seeds from `compare_methods.py` runs: per method and budget, each seed's main metric, the mean,
and the mean as a share of `full`'s mean (and the difference to `lora`'s).

    python benchmarks/seed_means.py runs/seeds/k40-42 runs/seeds2/k40-43 runs/seeds2/k40-44 runs/seeds2/k25-*

Each run directory holds one sub-directory per method with the `report.json` that `prunetune finetune` writes;
a method's row is keyed by its name and, for the pruning methods, by the budget its report records. Variants
(`apt-distill`, ...) count as their own rows. Nothing is re-run: this only reads reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PRUNED = ("lora-prune", "apt")  # methods whose rows also carry their budget


def collect(dirs: list[Path], rename: dict[str, str]) -> dict[str, dict[int, float]]:
    """{row name: {seed: main metric}} from the reports under `dirs`."""
    rows: dict[str, dict[int, float]] = {}
    for d in dirs:
        for report in sorted(d.glob("*/report.json")):
            r = json.loads(report.read_text())
            name = rename.get(f"{d.name}/{report.parent.name}", report.parent.name)
            if r["method"] in PRUNED:
                name = f"{name} @ {r['layer_params_kept']:.0%}"
            seed = int(r["config"]["seed"])
            if seed in rows.get(name, {}):
                raise SystemExit(f"{name}: seed {seed} twice ({report})")
            rows.setdefault(name, {})[seed] = 100 * r["metrics"]["main"]
    return rows


def table(rows: dict[str, dict[int, float]]) -> str:
    seeds = sorted({s for r in rows.values() for s in r})
    full = statistics.mean(rows["full"].values()) if "full" in rows else None
    lora = statistics.mean(rows["lora"].values()) if "lora" in rows else None
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | of full | vs lora |"
    lines = [head, "|" + "---|" * (len(seeds) + 4)]
    for name, by_seed in rows.items():
        mean = statistics.mean(by_seed.values())
        cells = [f"{by_seed[s]:.2f}" if s in by_seed else "—" for s in seeds]
        of_full = f"{100 * mean / full:.1f}%" if full else "—"
        vs_lora = f"{mean - lora:+.2f}" if lora is not None else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} | {of_full} | {vs_lora} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="compare_methods.py --out directories")
    p.add_argument("--rename", action="append", default=[], metavar="DIR/METHOD=NAME",
                   help="count a run under another row name (e.g. a variant run with today's default flags)")
    args = p.parse_args()
    rename = dict(item.split("=", 1) for item in args.rename)
    print(table(collect(args.dirs, rename)))


if __name__ == "__main__":
    main()
