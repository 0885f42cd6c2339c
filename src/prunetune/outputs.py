"""Output directories: written aside, marked as prunetune's, swapped in only when complete; an earlier good
result is never lost and nothing but a prunetune output is ever replaced.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prunetune.errors import PrunetuneError

# ---------------------------------------------------------------------------------------------------------
# Output directories: written aside, marked as prunetune's, swapped in only when complete
# ---------------------------------------------------------------------------------------------------------

MARKER = ".prunetune-output.json"  # in every directory prunetune writes: what wrote it; --overwrite needs it
OWNER = ".prunetune-owner.json"  # in a temporary directory while it is written: the process writing it


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_writable(directory: Path, shown: Path) -> None:
    """Fail now, in one line, when the output cannot be created: not after minutes of loading and pruning."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PrunetuneError(f"cannot write {shown}: {existing} is not a directory")
    try:  # a real attempt: permission bits say nothing on a read-only file system, or to root
        os.rmdir(tempfile.mkdtemp(prefix=".prunetune-probe.", dir=existing))
    except OSError as e:
        raise PrunetuneError(f"cannot write {shown}: {existing} is not writable ({e.strerror or e})") from e


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Refuse an output path prunetune must not write or replace, before any work is done.

    Refused: a file; the current directory or one of its parents; a directory that is or holds one of the
    `inputs` (model directory, data, plan file); a non-empty directory without `overwrite`, or, with it, one
    that prunetune did not write (no marker); a place that cannot be written. atomic_dir checks again.
    Temporaries that killed runs left next to `out` are removed first (a killed swap puts the previous result
    back, which is then what is checked).
    """
    out = Path(out)
    target = out.resolve()
    if target.parent.is_dir():
        remove_stale_temporaries(target.parent)
    if out.exists() and not out.is_dir():
        raise PrunetuneError(f"output path {out} exists and is not a directory")
    if _within(Path.cwd().resolve(), target):
        raise PrunetuneError(f"output directory {out} is the current directory or contains it; choose a new one")
    for given in inputs:
        if given is not None and Path(given).exists() and _within(Path(given).resolve(), target):
            raise PrunetuneError(f"output directory {out} is or contains the input {given}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrunetuneError(f"output directory {out} already exists and is not empty (use --overwrite)")
        if not (out / MARKER).is_file():
            raise PrunetuneError(
                f"output directory {out} was not written by prunetune (no {MARKER}): --overwrite only replaces "
                "prunetune's own results; remove it yourself or choose another --out"
            )
    _check_writable(target.parent, out)
    return out


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot, Linux): tells a reused process id from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_record(target: Path, role: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "host": socket.gethostname(), "out": target.name, "role": role}


def _owner_alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True  # another machine's (a shared file system): there is no telling, so it stays
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _start_time(record["pid"])
    return not (record.get("start") and now and now != record["start"])


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary directories in `directory` whose writing process is gone (a killed run).

    Only directories holding prunetune's owner record are touched. A killed swap (the previous result moved
    aside, the new one not yet in place) puts the previous result back first.
    """
    removed = []
    directory = Path(directory)
    for path in directory.iterdir() if directory.is_dir() else ():
        if not path.name.startswith(".") or path.is_symlink() or not (path / OWNER).is_file():
            continue
        try:
            record = json.loads((path / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if _owner_alive(record):
            continue
        old, original = path / "old", directory / str(record.get("out", ""))
        if record.get("role") == "old" and old.is_dir() and record.get("out") and not original.exists():
            old.rename(original)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_temporary(target: Path, role: str) -> Path:
    """A hidden sibling of `target` (``.NAME.xxxx``) owned by this process, with the permissions umask gives."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700: an output others cannot read
    (tmp / OWNER).write_text(json.dumps(_owner_record(target, role)))
    return tmp


def _normal_permissions(root: Path) -> None:
    """Files and directories as umask would make them: safetensors writes its files 0600 (via a temporary)."""
    mask = _umask()
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666 | (path.stat().st_mode & 0o111)) & ~mask)


def _write_marker(directory: Path) -> None:
    from prunetune import __version__

    record = {
        "prunetune": __version__,
        "command": shlex.join(sys.argv),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (directory / MARKER).write_text(json.dumps(record, indent=1))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`; a previous result there is deleted only once the new one is in place."""
    if not target.exists():
        tmp.rename(target)
        return
    holder = _new_temporary(target, "old")  # if killed mid-swap, the next run puts the old result back
    try:
        target.rename(holder / "old")
        try:
            tmp.rename(target)
        except BaseException:
            (holder / "old").rename(target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(holder, ignore_errors=True)
        raise
    shutil.rmtree(holder, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Write into a temporary sibling directory and move it to `out` only when everything succeeded.

    The result carries prunetune's marker (what wrote it; only such a directory may be overwritten). A
    previous result at `out` survives any failure before the swap; temporaries of killed runs are removed.
    """
    check_output_dir(out, overwrite=overwrite, inputs=inputs)
    target = Path(out).resolve()  # a symlinked --out keeps pointing at the new result
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(target, "new")
    try:
        yield tmp
        _write_marker(tmp)
        (tmp / OWNER).unlink()
        _normal_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)
