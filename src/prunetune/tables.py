"""Reading the rows of a data file (CSV, TSV, JSON, JSON Lines, Parquet), finding a directory's split files, and
reading a `datasets` split from the hub: every task reads its data through these.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prunetune.errors import PrunetuneError

Row = Mapping[str, Any]


class Table(list):
    """The rows of a file (a list, indexed like any records) with the file's column names."""

    def __init__(self, rows: Iterable[Row], columns: Sequence[str], source: str = ""):
        super().__init__(rows)
        self.columns = list(columns)
        self.source = source  # the file (or hub split) the rows came from, for error messages

DELIMITED = {".tsv": "\t", ".txt": "\t", ".csv": ","}
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = (*DELIMITED, *JSON_SUFFIXES, *PARQUET_SUFFIXES)

# A directory's split files: <stem>.<suffix>, the first stem found wins.
SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "validation", "valid", "val"),
    "test": ("test",),
}

# What the first line of a headerless file (CoLA) looks like: its column names, or None when it is a header.
Headerless = Callable[[Sequence[str]], "Sequence[str] | None"]


def read_table(path: str | Path, headerless: Headerless | None = None) -> Table:
    """The rows of a data file and its column names, by its suffix (CSV, TSV/TXT, JSON, JSONL, Parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in JSON_SUFFIXES:
            columns, rows = _json_rows(path)
        elif suffix in DELIMITED:
            columns, rows = _delimited_rows(path, DELIMITED[suffix], headerless)
        elif suffix in PARQUET_SUFFIXES:
            columns, rows = _parquet_rows(path)
        else:
            columns = None
    except UnicodeDecodeError as exc:
        raise PrunetuneError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    if columns is not None:
        return Table(rows, columns, str(path))
    raise PrunetuneError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")


def read_json(path: str | Path) -> Any:
    """A JSON document, or the objects of a JSON Lines file as a list."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith(("[", "{")):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        try:
            return json.loads(text)
        except json.JSONDecodeError:  # a .json file holding JSON Lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PrunetuneError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc


def _json_rows(path: Path) -> tuple[list[str], list[Row]]:
    rows = read_json(path)
    if isinstance(rows, dict):
        raise PrunetuneError(f"{path}: expected a list of JSON objects (or one per line), got one object")
    if not rows:
        raise PrunetuneError(f"{path}: the file is empty")
    if not all(isinstance(row, dict) for row in rows):
        raise PrunetuneError(f"{path}: expected one JSON object per line")
    # first-seen order, so error messages list columns as they appear in the file
    return list(dict.fromkeys(key for row in rows for key in row)), rows


def _delimited_rows(path: Path, delimiter: str, headerless: Headerless | None) -> tuple[list[str], list[Row]]:
    # GLUE TSVs contain unbalanced quote characters (QNLI, MRPC) that are part of the text, not CSV quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # utf-8-sig drops the byte-order mark that starts MRPC's header.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        try:
            records = [r for r in csv.reader(handle, delimiter=delimiter, quoting=quoting) if r]
        except csv.Error as exc:
            raise PrunetuneError(f"{path}: malformed {delimiter!r}-separated file: {exc}") from exc
    if not records:
        raise PrunetuneError(f"{path}: the file is empty")
    columns = headerless(records[0]) if headerless else None
    if columns is None:
        columns, records = records[0], records[1:]
    columns = list(columns)
    return columns, [dict(zip(columns, record, strict=False)) for record in records]


def _parquet_rows(path: Path) -> tuple[list[str], list[Row]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for a file that is not Parquet
        raise PrunetuneError(f"{path}: not a Parquet file ({type(exc).__name__}: {exc})") from exc
    if table.num_rows == 0:
        raise PrunetuneError(f"{path}: the file is empty")
    return list(table.column_names), table.to_pylist()


def split_file(directory: Path, split: str, names: Iterable[str] = ()) -> Path | None:
    """A directory's file for `split`: one of `names` (a preset's own file names) first, then
    <train|dev|validation|valid|val|test>.<any supported suffix>; None when it has none."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    for stem in SPLIT_STEMS[split]:
        for suffix in SUFFIXES:
            if (directory / f"{stem}{suffix}").is_file():
                return directory / f"{stem}{suffix}"
    return None


def load_hub(name: str, config: str | None, split: str, *, task: str, given: bool) -> tuple[Table, str]:
    """The rows and the name of a `datasets` split from the hub; one clear error where it cannot be had (offline,
    blocked, or no such data set). `given`: the name came from --data (else it is the task's own data set)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, blocked or unknown to the hub: all mean "bring your own files"
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        if given:
            raise PrunetuneError(f"--data {name}: no such file or directory, and no `datasets` data set of that "
                                 f"name could be loaded ({why})") from exc
        raise PrunetuneError(f"no local data for task {task} and loading the data set {name!r} failed ({why}); "
                             "pass --data with a file or directory") from exc
    label = f"{name}{f'/{config}' if config else ''}:{split}"
    return Table(ds, ds.column_names, label), label


def is_hub_name(data: str) -> bool:
    """Whether a --data value that is no path could name a `datasets` data set (not a mistyped file name)."""
    return (Path(data).suffix.lower() not in SUFFIXES and not data.startswith((".", "/", "~"))
            and data.count("/") <= 1)


def require_columns(wanted: Iterable[str], columns: Sequence[str], source: str) -> None:
    """Raise naming the first wanted column that the rows lack."""
    for column in wanted:
        if column not in columns:
            raise PrunetuneError(
                f"{source}: missing column {column!r} (columns found: {', '.join(map(repr, columns))})"
            )
