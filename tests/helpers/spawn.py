"""Multi-process test plumbing (tests/test_distributed.py, tests/test_class_parallel.py): a test
module is also the script of its workers (``python <module> <mode> <n> <init> <out>``); ``spawn``
runs it under one timeout, so a hung collective fails the test instead of hanging it, and reads
rank r's results from out/<r>.json."""

import json
import os
import signal
import subprocess
import sys
import traceback

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


def env():
    """The workers' environment: the repository and tests/ on the path (``import xseqloss``,
    ``from helpers.spawn import ...``), one thread per framework, no backend preset."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + TESTS + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTEROP_THREADS="1",
             TF_NUM_INTRAOP_THREADS="1")
    e.pop("XSEQLOSS_BACKEND", None)
    return e


def error_of(f):
    """[exception type name, message] of calling ``f``, or ["no error", ""]: what a worker records
    of a call that must fail (the test asserts on it in the parent)."""
    try:
        f()
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        return [type(exc).__name__, str(exc)]
    return ["no error", ""]


def spawn(script, mode, n, tmp, timeout):
    """Run ``script`` in ``mode`` as one process (for torch modes it forks the ``n`` ranks after
    importing torch once: n imports of torch would cost more than all the arithmetic); rank r
    writes tmp/<r>.json. On timeout the whole process group is killed."""
    init = os.path.join(tmp, "init")
    proc = subprocess.Popen([sys.executable, os.path.abspath(script), mode, str(n), init, tmp], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{mode}: the {n} worker(s) did not finish in {timeout} s (a hung collective?)\n{log[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{mode} exited with {proc.returncode}:\n{log[-6000:]}")
    results = []
    for r in range(n):
        with open(os.path.join(tmp, f"{r}.json")) as f:
            results.append(json.load(f))
    return results


def torch_launch(script, worker, world, init, out):
    """Fork the ``world`` ranks after one import of torch and xseqloss (shared by the children);
    each runs ``worker(rank, world, init, out)``."""
    import torch  # noqa: F401

    import xseqloss.torch  # noqa: F401  (imports xseqloss.backends.torch too)

    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX: one interpreter per rank
        procs = [subprocess.Popen([sys.executable, os.path.abspath(script), "torch-rank", str(r), str(world),
                                   init, out]) for r in range(world)]
        return 1 if any(p.wait() for p in procs) else 0
    pids = []
    for r in range(world):
        pid = os.fork()
        if pid == 0:
            run_rank(worker, r, world, init, out)
        pids.append(pid)
    failed = [r for r, pid in enumerate(pids) if os.waitpid(pid, 0)[1] != 0]
    if failed:
        print(f"ranks {failed} failed", flush=True)
    return 1 if failed else 0


def run_rank(worker, rank, world, init, out):
    code = 0
    try:
        worker(rank, world, init, out)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never run the parent's exit handlers, never wait on a collective at exit


def main(script, modes):
    """The script entry: ``modes`` maps a mode to ``fn(n, init, out) -> exit code``; "torch-rank"
    runs one rank of the mode's worker (``modes["torch-rank"]``)."""
    mode = sys.argv[1]
    try:
        if mode == "torch-rank":
            run_rank(modes["torch-rank"], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
        code = modes[mode](int(sys.argv[2]), sys.argv[3], sys.argv[4]) or 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_pairs(runs, prefix, ranks, tol):
    """Every (got, want) pair whose name starts with ``prefix`` in the results of ``ranks``, compared
    within ``tol``; returns how many were compared (a test asserts the count, so none is skipped)."""
    import numpy as np

    from helpers.support import assert_close
    seen = 0
    for res in runs:
        if res["rank"] not in ranks:
            continue
        for name, (got, want) in res["pairs"].items():
            if name.startswith(prefix):
                assert_close(np.asarray(got, dtype=float), np.asarray(want, dtype=float), tol=tol,
                             what=f"rank {res['rank']}: {name}")
                seen += 1
    return seen
