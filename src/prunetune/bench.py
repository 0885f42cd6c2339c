"""Honest inference measurements: latency, peak memory above a pre-load baseline, each model in a fresh process.

Memory. On a GPU the meter reads the CUDA caching allocator (``max_memory_allocated`` above the allocation
before the model was loaded; the CUDA context itself is not counted). On the CPU it reads the process's
resident set: the baseline is the RSS just before the model is loaded and the peak is the RSS high-water mark.

A process's high-water mark never goes down by itself, so a CPU peak is only attributable to one model when
nothing bigger ran earlier in the same process. What makes it hold here:

* on Linux the meter restarts the mark at ``start()`` (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``;
  process-wide: another peak reader in the same process loses its history);
* :func:`compare_inference` measures every model in its own fresh interpreter (:func:`run_isolated`), so the
  baseline is not inflated by memory an earlier model left in the allocator either;
* the memory run compacts glibc's heap first (:func:`compact_heap`), else the peak depends on the heap's
  history and identical runs differ by 15-20%.

``VmHWM`` is read rather than ``getrusage().ru_maxrss``: across ``vfork``+``exec`` (what ``subprocess`` uses)
the kernel carries the *parent's* peak into the child's ``ru_maxrss``, so a child started by a process that
once held 1.6 GB reports 1.6 GB whatever it does. ``ru_maxrss`` is the fallback off Linux.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_PROC = Path("/proc/self")
_MB = 2**20


# ---------------------------------------------------------------------------------------------------------
# Process memory
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmHWM, VmRSS), or None off Linux."""
    try:
        with open(_PROC / "status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB (since exec, or since the last :func:`reset_peak_rss`)."""
    hwm = _status_kib("VmHWM")
    # ru_maxrss also holds the peak of the process we were exec'd from (see the module docstring)
    return hwm / 1024 if hwm is not None else _ru_maxrss_mb()


def current_rss_mb() -> float:
    """The process's resident set size now, in MiB (falls back to the peak where /proc is missing)."""
    try:
        resident_pages = int((_PROC / "statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB


def reset_peak_rss() -> bool:
    """Restart the peak RSS at the current RSS (Linux >= 4.0). False where the kernel does not allow it."""
    try:
        with open(_PROC / "clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def compact_heap(mmap_threshold: int = 64 * 1024) -> bool:
    """glibc only: give freed heap memory back to the OS and serve blocks >= `mmap_threshold` by mmap from now on.

    Under glibc's default (a dynamic mmap threshold that grows up to 32 MiB), freed activations stay in the heap,
    and the peak RSS of identical runs differs by 15-20% with the order the threads allocated and freed them.
    After this call the peak RSS follows the live tensors. It lasts for the process: call it in a fresh one.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
    return ok


class MemoryMeter:
    """Peak memory above a baseline: the CUDA allocator peak on a GPU, the peak RSS on the CPU.

    Call :meth:`start` just before the model is loaded (entering the context starts it if not yet started);
    :meth:`reset_peak` restarts the peak, keeping the baseline, e.g. to leave out the transient of loading.
    :attr:`exact` is False on a CPU where the peak could not be restarted and a higher peak was already
    recorded: the reading is then a bound from above, meaningful only in a fresh process (:func:`run_isolated`).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.baseline_mb = 0.0
        self.peak_mb: float | None = None  # frozen on exit
        self.exact = True
        self._started = False

    def _current(self) -> float:
        return torch.cuda.memory_allocated(self.device) / _MB if self.cuda else current_rss_mb()

    def _peak(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / _MB if self.cuda else peak_rss_mb()

    def reset_peak(self) -> bool:
        """Restart the peak at the current usage. False (and the meter inexact) where that is impossible."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        gc.collect()
        if reset_peak_rss():
            return True
        # ru_maxrss cannot be restarted: anything below the peak already recorded is invisible
        self.exact = self.exact and _ru_maxrss_mb() <= current_rss_mb() + 1.0
        return False

    def start(self) -> MemoryMeter:
        """Take the baseline now and restart the peak."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        else:
            gc.collect()
        self.baseline_mb = self._current()
        self.reset_peak()
        self._started = True
        self.peak_mb = None
        return self

    def read(self) -> float:
        """The peak so far above the baseline, in MiB (never negative)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return max(0.0, self._peak() - self.baseline_mb)

    def __enter__(self) -> MemoryMeter:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = self.read()


# ---------------------------------------------------------------------------------------------------------
# Fresh processes
# ---------------------------------------------------------------------------------------------------------

# The child writes its result to a file, not stdout, so library chatter on stdout cannot corrupt it.
_CHILD = """
import importlib, json, sys
module, _, name = sys.argv[1].partition(":")
result = getattr(importlib.import_module(module), name)(**json.loads(sys.argv[2]))
if not isinstance(result, dict):
    raise TypeError(f"{sys.argv[1]} returned {type(result).__name__}, not a dict")
with open(sys.argv[3], "w") as f:
    json.dump(result, f)
"""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output on stderr)"


def run_isolated(
    fn_path: str, kwargs: dict, timeout: float | None = None, *, env: dict[str, str] | None = None
) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh interpreter and return the dict it returns.

    `kwargs` must be JSON-serialisable; `env` adds variables to the child's environment. A failing or
    timed-out child raises RuntimeError carrying the last line of its stderr (the exception, for a traceback).
    """
    if ":" not in fn_path:
        raise ValueError(f"expected 'module:function', got {fn_path!r}")
    with tempfile.TemporaryDirectory(prefix="prunetune-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", _CHILD, fn_path, json.dumps(kwargs), str(out)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
            )
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise RuntimeError(f"{fn_path} timed out after {timeout} s: {_last_line(stderr)}") from None
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{fn_path} failed (exit {proc.returncode}): {_last_line(proc.stderr)}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers narrow), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _import_model_code(model_dir: str, auto_class: str) -> None:
    """Build the model weightless once, so importing its modelling code is not charged to the model's memory."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        getattr(transformers, auto_class).from_config(config)


def inference_task(model_dir: str, task: str | None = None):
    """The task whose model class and example inputs a benchmark of MODEL_DIR uses: `task`, else the one the
    export records (prunetune_task), else classification (a text-to-text classifier on an encoder-decoder)."""
    import json

    from prunetune import tasks

    if task is None:
        config = Path(model_dir) / "config.json"
        record = json.loads(config.read_text()).get(tasks.TASK_ATTR) if config.is_file() else None
        task = (record or {}).get("name") or "classify"
    return tasks.for_model(task, model_dir)


def _layer_params(model) -> int | None:
    """Parameters of the prunable layers when prunetune knows the family, else None."""
    from prunetune.errors import PrunetuneError
    from prunetune.plan import layer_param_count

    try:
        return layer_param_count(model)
    except PrunetuneError:
        return None


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, restoring the caller's setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _time_passes(model, inputs: dict, warmup: int, repeats: int, threads: int) -> tuple[list[float], list[float]]:
    """Wall time of each timed forward pass, and the share of its threads' CPU time the process got."""
    device = next(model.parameters()).device
    times, shares = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            if i >= warmup:
                times.append(wall)
                # below 1: the pass shared the cores with another process, and a parallel GEMM waits for its
                # slowest thread, so losing half the CPU costs ~3x the time: such passes do not time the model
                shares.append((time.process_time() - c0) / (wall * threads))
    return times, shares


def measure_inference(
    model_dir: str,
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    warmup: int = 2,
    repeats: int = 10,
    threads: int | None = None,
    task: str | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    compact: bool = True,
) -> dict:
    """Load MODEL_DIR here and time forward passes on random token ids; peak memory above the pre-load baseline.

    Run it through :func:`run_isolated` (as :func:`compare_inference` does) for a CPU memory figure that
    belongs to this model alone. The task (default: the one the export records) gives the model class and the
    shape of the inputs (an encoder-decoder also decodes). `peak_mem_mb` covers the weights and inference, not
    the load transient (reported apart as `load_peak_mem_mb`) where the peak can be restarted. On glibc it comes
    from one pass after :func:`compact_heap` (the timed passes' peak, which varies with the heap's history, is
    `peak_mem_mb_timed`); call it in a process of its own there. `cpu_share` (CPU only) is the
    median share of its threads' CPU time a pass got: well below 1, other processes slowed the timings.
    """
    import transformers

    import prunetune  # noqa: F401  (registers the prunetune_<family> types, so exports load)

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = threads or usable_cores()
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    the_task = inference_task(model_dir, task)
    auto_class = the_task.auto_class
    _import_model_code(model_dir, auto_class)
    heap = "compact" if device.type == "cpu" and compact and compact_heap() else "default"
    with torch_threads(threads):
        meter = MemoryMeter(device).start()
        model = getattr(transformers, auto_class).from_pretrained(model_dir, **kw).to(device).eval()
        load_peak = meter.read()
        meter.reset_peak()  # the load transient is not inference; the weights stay above the baseline
        inputs = {k: v.to(device) for k, v in the_task.example_inputs(model.config, batch_size, seq_len,
                                                                        seed=seed).items()}
        with meter:
            times, shares = _time_passes(model, inputs, warmup, repeats, threads)
    return {
        "latency_s_median": statistics.median(times),
        "latency_s_min": min(times),
        "latencies_s": times,
        "peak_mem_mb": meter.peak_mb,
        "heap": heap,
        "load_peak_mem_mb": load_peak,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / _MB,
        "mem_exact": meter.exact,
        "cpu_share": statistics.median(shares) if device.type == "cpu" else None,
        "params": sum(p.numel() for p in model.parameters()),
        "layer_params": _layer_params(model),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": threads,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "task": the_task.name,
    }


_MEASURE = "prunetune.bench:measure_inference"


def _uncontended(run: dict, min_cpu_share: float) -> bool:
    return run.get("cpu_share") is None or run["cpu_share"] >= min_cpu_share


def _timing_rounds(
    dirs: dict[str, str], rounds: int, max_rounds: int, min_cpu_share: float, timeout: float | None, kw: dict
) -> dict[str, list[dict]]:
    """Every model once a round, in alternating order; after `rounds`, again the ones never measured alone."""
    names = list(dirs)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(max(rounds, max_rounds)):
        todo = names if r < rounds else [n for n in names if not any(_uncontended(x, min_cpu_share) for x in runs[n])]
        if not todo:
            break
        for name in todo if r % 2 == 0 else reversed(todo):
            runs[name].append(run_isolated(_MEASURE, {**kw, "model_dir": dirs[name], "compact": False}, timeout))
    return runs


def _summarise(runs: list[dict], memory: dict, min_cpu_share: float) -> dict:
    """The best uncontended run's timings, with the memory run's peak and the per-round figures."""
    clean = [x for x in runs if _uncontended(x, min_cpu_share)]
    best = dict(min(clean or runs, key=lambda x: x["latency_s_median"]))
    best.update(
        contended=not clean,
        rounds=len(runs),
        latency_s_min=min(x["latency_s_min"] for x in runs),
        latency_s_median_rounds=[x["latency_s_median"] for x in runs],
        cpu_share_rounds=[x["cpu_share"] for x in runs],
        peak_mem_mb=memory["peak_mem_mb"],
        heap=memory["heap"],
        # what the same passes reached under the default allocator (varies from run to run; see compact_heap)
        peak_mem_mb_default_heap=statistics.median(x["peak_mem_mb"] for x in runs),
    )
    return best


def compare_inference(
    dirs: dict[str, str],
    *,
    rounds: int = 3,
    max_rounds: int | None = None,
    min_cpu_share: float = 0.9,
    timeout: float | None = None,
    **kw,
) -> dict:
    """Measure each model in fresh processes: latency interleaved over `rounds`, memory once; ratios to the first.

    CPU speed drifts (other processes, frequency, caches), so the models take turns, in alternating order, and
    each keeps its best per-round median latency among the runs that had the CPU to themselves (median CPU
    share >= `min_cpu_share` of their threads); up to `max_rounds`, the models without such a run are measured
    again, and one that never had is flagged `contended`. The timed runs use the default allocator; memory
    comes from one more process per model with a compacted heap (:func:`compact_heap`), where it is
    reproducible to 0.1 MB. `kw` goes to :func:`measure_inference`.
    """
    if not dirs:
        raise ValueError("no models to compare")
    dirs = {n: str(d) for n, d in dirs.items()}
    runs = _timing_rounds(dirs, rounds, max_rounds or rounds, min_cpu_share, timeout, kw)
    memory_kw = {**kw, "warmup": 1, "repeats": 1, "compact": True}
    memory = {n: run_isolated(_MEASURE, {**memory_kw, "model_dir": d}, timeout) for n, d in dirs.items()}
    results = {n: _summarise(runs[n], memory[n], min_cpu_share) for n in dirs}
    ref = results[next(iter(dirs))]
    for res in results.values():
        res["latency_ratio"] = res["latency_s_median"] / ref["latency_s_median"]
        res["latency_ratio_min"] = res["latency_s_min"] / ref["latency_s_min"]
        res["mem_ratio"] = res["peak_mem_mb"] / ref["peak_mem_mb"] if ref["peak_mem_mb"] else None
        res["params_ratio"] = res["params"] / ref["params"]
    return results


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line naming the CPU, its usable cores, the GPU if any, and the torch/transformers versions."""
    import transformers

    parts = [f"{_cpu_model()}, {usable_cores()} usable cores of {os.cpu_count()}"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
    parts.append(f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
    return "; ".join(parts)


__all__ = [
    "MemoryMeter",
    "compact_heap",
    "compare_inference",
    "current_rss_mb",
    "machine_description",
    "measure_inference",
    "peak_rss_mb",
    "reset_peak_rss",
    "run_isolated",
    "torch_threads",
    "usable_cores",
]
