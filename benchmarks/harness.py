"""The benchmarks' shared machinery (bench.py, linear_bench.py, class_parallel_bench.py, gpu.py).

* timing: one call timed with its result released after the clock stops (``time_call``), the
  contenders interleaved round by round (``rounds``; ``alternate`` gives the medians), and ratios
  to a reference contender, of the medians (``ratios``) or round by round (``round_ratios``): the
  machines are shared and noisy, so only ratios taken in one run mean anything;
* memory, measured in a fresh process (``python_json`` runs one and reads its JSON line): the peak
  RSS above a base after ``clear_refs`` (``rss_peak``), CUDA's allocator (``cuda_peak``) and
  TensorFlow's CPU allocator (``tf_allocator_start`` / ``tf_allocator_peak``);
* results: the machine's description (``environment``), JSON files (``write_json``) and JSON-lines
  files that a worker appends to as it goes (``append_jsonl`` / ``read_jsonl``).

Only the standard library at import: the memory helpers import their framework when called, so a
measuring process that imports this module holds nothing extra before its base is taken.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def identity(x: Any) -> Any:
    return x


# ----------------------------------------------------------------------------------------- timing

def spin(seconds: float) -> None:
    """Busy Python work for ``seconds`` (a program doing anything between two calls)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any] = identity, gap: float = 0.0) -> float:
    """Seconds of one call; its result (a gradient) is released after the clock stops. With
    ``gap``, the clock starts after that long of busy Python work, as in a program that does
    anything between two calls."""
    if gap:
        spin(gap)
    t0 = time.perf_counter()
    out = sync(fn())
    t = time.perf_counter() - t0
    del out
    return t


def rounds(fns: dict[str, Callable[[], Any]], sync: Callable[[Any], Any] = identity, reps: int = 1,
           warmup: int = 1, gap: float = 0.0, reverse_odd: bool = False) -> dict[str, list[float]]:
    """Seconds per call of every contender, round by round: ``warmup`` untimed calls of each, then
    ``reps`` rounds that run every contender once (``reverse_odd``: in reverse order every other
    round, so that a drift within a round favours no one)."""
    for _ in range(warmup):
        for fn in fns.values():
            sync(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names[::-1] if reverse_odd and r % 2 else names):
            times[name].append(time_call(fns[name], sync, gap))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def alternate(fns: dict[str, Callable[[], Any]], sync: Callable[[Any], Any], reps: int,
              warmup: int = 1, gap: float = 0.0, reverse_odd: bool = False) -> dict[str, float]:
    """Median seconds per contender, the contenders interleaved round by round."""
    return medians(rounds(fns, sync, reps, warmup, gap, reverse_odd))


def ratios(values: dict[str, float], ref: str) -> dict[str, float]:
    """Each contender's value over the reference contender's (the reference left out)."""
    return {k: v / values[ref] for k, v in values.items() if k != ref}


def round_ratios(times: dict[str, list[float]], ref: str) -> dict[str, float]:
    """The median of each round's ratio to the reference's time in the same round: a machine whose
    speed drifts over minutes still compares contenders seconds apart."""
    return {k: statistics.median(a / b for a, b in zip(v, times[ref])) for k, v in times.items() if k != ref}


def ms(values: dict[str, float]) -> dict[str, float]:
    return {k: v * 1e3 for k, v in values.items()}


# ----------------------------------------------------------------------------------------- memory

def rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak(run: Callable[[], Any], before: Callable[[], Any] | None = None) -> tuple[Any, int]:
    """``run()``'s result and the peak RSS during it above the RSS just before (after a garbage
    collection and ``clear_refs``; ``before`` runs after the reset, outside the run). The result is
    still held when the peak is read."""
    gc.collect()
    base, _ = rss()
    reset_peak()
    if before is not None:
        before()
    out = run()
    _, hwm = rss()
    return out, hwm - base


def cuda_peak(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and torch.cuda.max_memory_allocated() during it above what was allocated
    just before."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def tf_allocator_start(device: str = "CPU:0") -> int:
    """TensorFlow's allocator: the bytes in use now, its peak statistic reset. TensorFlow's CPU
    allocator keeps freed blocks and hands them out again, which RSS cannot see."""
    import tensorflow as tf
    current = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    return current


def tf_allocator_peak(device: str = "CPU:0") -> int:
    """TensorFlow's allocator: the peak bytes in use since ``tf_allocator_start``."""
    import tensorflow as tf
    return tf.config.experimental.get_memory_info(device)["peak"]


def python_json(args: list[str], timeout: float | None = None, env: dict[str, str] | None = None,
                require_success: bool = True, tail: int = 600) -> tuple[dict | None, str]:
    """Run ``python *args`` in a fresh process (``["-c", code]`` for a snippet) and read the last
    line of its stdout that is a JSON object. Returns (that object, "") or (None, why): the exit
    status, or the exception, and the last ``tail`` characters of stderr. ``require_success=False`` takes the line
    whatever the exit status. ``env`` defaults to this environment with TensorFlow's start-up lines
    silenced."""
    if env is None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except Exception as exc:  # a timeout: reported, never hidden
        return None, f"{type(exc).__name__}: {exc}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines and (proc.returncode == 0 or not require_success):
        return json.loads(lines[-1]), ""
    return None, f"rc {proc.returncode}; stderr tail: {proc.stderr[-tail:]}"


# ---------------------------------------------------------------------------------------- results

def environment(processor: bool = False) -> dict[str, Any]:
    """Python, machine, (processor,) CPU count and date, for the results' "environment"."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    if processor:
        env["processor"] = platform.processor()
    env.update(cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    return env


def write_json(path: str, obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=default)
    return path


def append_jsonl(path: str, row: dict) -> None:
    """One row appended as it is measured: a process killed later loses nothing already written."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill
    return out
