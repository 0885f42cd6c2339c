"""Build the SST-2 sample bundled in src/prunetune/data/sst2 from a GLUE copy of SST-2.

The dev file is copied byte for byte; train.tsv keeps the header and a seeded random sample of rows,
in their original order and with their original bytes.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "src" / "prunetune" / "data" / "sst2"


def find_sst2(src: Path) -> Path:
    """Accept either the data root (holding glue/SST-2) or the SST-2 directory itself."""
    for folder in (src, src / "SST-2", src / "glue" / "SST-2"):
        if (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file():
            return folder
    raise SystemExit(f"no SST-2 train.tsv/dev.tsv under {src}")


def sample_train(source: Path, target: Path, rows: int, seed: int) -> None:
    """Write the header plus `rows` randomly chosen data lines of `source`, in file order."""
    header, *lines = source.read_bytes().splitlines(keepends=True)
    chosen = sorted(random.Random(seed).sample(range(len(lines)), rows))
    target.write_bytes(header + b"".join(lines[i] for i in chosen))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="data root holding glue/SST-2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    sst2 = find_sst2(args.src)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sst2 / "dev.tsv", args.out / "dev.tsv")
    sample_train(sst2 / "train.tsv", args.out / "train.tsv", args.rows, args.seed)
    print(f"wrote {args.out / 'train.tsv'} ({args.rows} rows, seed {args.seed}) and {args.out / 'dev.tsv'}")


if __name__ == "__main__":
    main()
