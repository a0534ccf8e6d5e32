"""GPU benchmarks, run by ``bash benchmarks/gpu.sh OUTDIR`` (or on its own):

    python benchmarks/gpu.py OUTDIR                      # everything, within --budget seconds
    python benchmarks/gpu.py OUTDIR --tiny --budget 60   # small sizes (a smoke run)

What it measures, each contender in a worker subprocess (benchmarks/gpu_workers.py; a crash or a
timeout loses one worker's remaining rows, never the run; every worker appends its rows to
OUTDIR/rows-<worker>.jsonl as it goes):

* cross-entropy forward+backward (``sequence_cross_entropy``, mean over tokens) at 8,192 x 32,000 and
  8,192 x 128,256 in float32 and bfloat16: F.cross_entropy eager, torch.compile of it, Liger-Kernel's
  LigerCrossEntropyLoss, optax under jax.jit (and xseqloss on JAX), and xseqloss for each torch kernel
  (XSEQLOSS_TORCH_KERNEL = triton, chunked, native, set in a fresh worker process each; with
  ``inplace_backward`` too);
* the fused output layer ``xseqloss.linear_cross_entropy`` at 8,192 x 4,096 x 128,256 (when it
  exists) against matmul + F.cross_entropy, torch.compile of that, F.linear_cross_entropy, Liger's
  LigerFusedLinearCrossEntropyLoss, Cut Cross-Entropy's linear_cross_entropy, and its three matmuls
  alone (h @ W^T, g @ W, g^T @ h);
* a small launch-configuration sweep of the Triton kernel (BLOCK, num_warps), for the lead's tuning.

The Triton kernel's correctness on CUDA (every option against a float64 reference, past 2**31
elements, in place) is not measured here: it is tests/test_triton_cuda.py, which gpu.sh runs with
pytest as a step of its own.

Every time is a median of CUDA-event timings (setup such as a fresh copy of the logits stays outside
the events) and is also given against the HBM floor measured in the same run: one device-to-device
copy of the logits (``dst.copy_(src)``), i.e. reading the logits once and writing a gradient once,
the least a cross-entropy forward+backward must move. Peak memory is
``torch.cuda.max_memory_allocated()`` above what was allocated before the call (reset before each
contender), in multiples of the logits' size (JAX: the compiled program's temp + output bytes).

Whatever is missing (CUDA, a JAX GPU, triton, optax, liger_kernel, cut_cross_entropy,
xseqloss.linear_cross_entropy, F.linear_cross_entropy, time) is skipped LOUDLY: a "SKIPPED: what:
why" line on stdout and in the summary. Results: OUTDIR/gpu-bench.json and OUTDIR/gpu-bench.md
(benchmarks/gpu_report.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # its sibling modules, also when this file is loaded from elsewhere
    sys.path.insert(0, HERE)

import harness  # noqa: E402
from gpu_report import write_outputs  # noqa: E402
from gpu_workers import ce_shape, lce_shape, worker_main  # noqa: E402

CE_SIZES = ["8192x32000", "8192x128256"]
LCE_SIZE = "8192x4096x128256"
DTYPES = ["float32", "bfloat16"]
KERNELS = ["triton", "chunked", "native"]
TINY_CE_SIZES = ["64x1000"]
TINY_LCE_SIZE = "64x32x1000"

# Workers in priority order: when the budget runs out, the later ones are skipped (loudly).
WORKERS = ["ce-base", "ce-triton", "ce-chunked", "ce-native", "lce", "jax", "compiled", "sweep"]

# In the worker processes: no JAX preallocation of 75% of the GPU (torch shares the device).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ------------------------------------------------------------------------------------ arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="folder for gpu-bench.json, gpu-bench.md and the worker rows")
    ap.add_argument("--sizes", nargs="+", default=None, metavar="TxC",
                    help=f"cross-entropy sizes (default {' '.join(CE_SIZES)})")
    ap.add_argument("--lce-size", default=None, metavar="TxHxC", help=f"fused output layer size (default {LCE_SIZE})")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lce-dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS,
                    help="XSEQLOSS_TORCH_KERNEL values to measure, each in a fresh process")
    ap.add_argument("--workers", nargs="+", default=list(WORKERS), choices=WORKERS,
                    help="which parts to run (default: all, in priority order)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per contender (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=330.0,
                    help="seconds for the whole benchmark; workers that no longer fit are skipped loudly")
    ap.add_argument("--tiny", action="store_true",
                    help=f"tiny sizes ({TINY_CE_SIZES[0]}, {TINY_LCE_SIZE}), 2 reps: a smoke run")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile contenders (slow to compile)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run the torch and JAX workers on the CPU when there is no GPU (tests of this script "
                         "only: the times mean nothing)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one worker
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes = args.sizes or list(TINY_CE_SIZES)
        args.lce_size = args.lce_size or TINY_LCE_SIZE
        if "--reps" not in (argv if argv is not None else sys.argv[1:]):
            args.reps = 2
        args.warmup = min(args.warmup, 1)
    args.sizes = args.sizes or list(CE_SIZES)
    args.lce_size = args.lce_size or LCE_SIZE
    for s in args.sizes:
        ce_shape(s)
    lce_shape(args.lce_size)
    if args.reps < 1 or args.warmup < 0 or args.budget <= 0:
        ap.error("--reps must be >= 1, --warmup >= 0 and --budget > 0")
    return args




# ---------------------------------------------------------------------------------- orchestrator

def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib import metadata
        dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}.get(module, module)
        return metadata.version(dist)
    except Exception:
        return "installed"


def skip(skipped: list, what: str, why: str) -> None:
    """A loud skip: one line on stdout now, and one in the summary."""
    print(f"SKIPPED: {what}: {why}", flush=True)
    skipped.append({"what": what, "why": why})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.spec))
    t_start = time.time()
    deadline = t_start + args.budget
    os.makedirs(args.outdir, exist_ok=True)
    skipped: list[dict] = []
    errors: list[dict] = []
    rows: list[dict] = []
    env: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
                           "budget_s": args.budget, "argv": list(argv if argv is not None else sys.argv[1:])}
    for m in ("torch", "triton", "jax", "optax", "liger_kernel", "cut_cross_entropy"):
        env[m] = _version(m)
    cuda = False
    if env["torch"]:
        import torch
        env["torch"] = torch.__version__
        cuda = torch.cuda.is_available()
        if cuda:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    print(f"[gpu.py] torch {env['torch']}, CUDA {'available: ' + env.get('gpu', '') if cuda else 'NOT available'}, "
          f"triton {env['triton']}, jax {env['jax']}, optax {env['optax']}, liger_kernel {env['liger_kernel']}, "
          f"cut_cross_entropy {env['cut_cross_entropy']}", flush=True)

    torch_device = "cuda" if cuda else ("cpu" if args.allow_cpu and env["torch"] else None)
    if not env["torch"]:
        skip(skipped, "every PyTorch benchmark", "torch is not installed")
    elif not cuda:
        if args.allow_cpu:
            skip(skipped, "CUDA", "CUDA is not available: the PyTorch workers run on the CPU (--allow-cpu; "
                                  "their times mean nothing and there are no CUDA events or CUDA memory stats)")
        else:
            skip(skipped, "every PyTorch CUDA benchmark",
                 "CUDA is not available on this machine (torch.cuda.is_available() is False)")
    for mod, what in (("liger_kernel", "Liger-Kernel contenders (LigerCrossEntropyLoss, "
                                       "LigerFusedLinearCrossEntropyLoss)"),
                      ("cut_cross_entropy", "Cut Cross-Entropy contender (linear_cross_entropy)")):
        if env[mod] is None:
            skip(skipped, what, f"{mod} is not installed (pip install --no-deps its wheel)")
    if torch_device and not env["triton"]:
        skip(skipped, "the Triton kernel (XSEQLOSS_TORCH_KERNEL=triton, the sweep)",
             "triton is not installed")

    spec_base = {"reps": args.reps, "warmup": args.warmup, "dtypes": args.dtypes, "lce_dtypes": args.lce_dtypes,
                 "sizes": args.sizes, "lce_size": args.lce_size, "device": torch_device, "tiny": args.tiny,
                 "no_compile": args.no_compile, "allow_cpu": args.allow_cpu}
    plan: list[tuple[str, dict]] = []
    for w in WORKERS:
        if w not in args.workers:
            continue
        if w == "jax":
            if not env["jax"]:
                skip(skipped, "optax / xseqloss under jax.jit on the GPU", "jax is not installed")
                continue
            plan.append((w, dict(spec_base)))
            continue
        if not torch_device:
            continue
        if w in ("sweep", "ce-triton") and not env["triton"]:
            continue
        if w == "compiled" and args.no_compile:
            skip(skipped, "torch.compile contenders", "--no-compile")
            continue
        if w.startswith("ce-") and w != "ce-base":
            k = w[3:]
            if k not in args.kernels:
                continue
            plan.append((w, dict(spec_base, kernel=k)))
            continue
        plan.append((w, dict(spec_base)))

    for i, (w, spec) in enumerate(plan):
        left = deadline - time.time()
        if left < 15:
            for w2, _ in plan[i:]:
                skip(skipped, f"worker {w2!r}", f"out of time (budget {args.budget:.0f} s; raise --budget)")
            break
        spec["deadline"] = deadline - 5  # a worker stops starting contenders after this
        rows_path = os.path.join(args.outdir, f"rows-{w}.jsonl")
        if os.path.exists(rows_path):
            os.remove(rows_path)
        spec["rows_path"] = rows_path
        print(f"[gpu.py] worker {w} ({left:.0f} s left)", flush=True)
        env_w = dict(os.environ)
        if "kernel" in spec:
            env_w["XSEQLOSS_TORCH_KERNEL"] = spec["kernel"]
        if w == "sweep" and torch_device == "cpu":
            env_w["TRITON_INTERPRET"] = "1"  # --allow-cpu: the kernel on CPU tensors, interpreted
        cmd = [sys.executable, os.path.abspath(__file__), args.outdir, "--worker", w, "--spec", json.dumps(spec)]
        t0 = time.time()
        err_path = os.path.join(args.outdir, f"stderr-{w}.txt")
        # stdout streams through (progress while it runs); stderr is kept for the error report
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, env=env_w, stdout=None, stderr=err)
            try:
                rc = proc.wait(timeout=max(10.0, left))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
        with open(err_path, errors="replace") as err:
            err_tail = err.read()[-1500:]
        got = harness.read_jsonl(rows_path)
        for r in got:
            if r.get("bench") == "skip":
                skip(skipped, r["what"], r["why"])
            elif r.get("bench") == "error":
                print(f"ERROR: {r['what']}: {r['error']}", flush=True)
                errors.append({"what": r["what"], "error": r["error"]})
            else:
                rows.append(r)
        if rc != 0:
            why = "timed out (out of budget)" if rc == "timeout" else f"exited with status {rc}"
            errors.append({"what": f"worker {w}", "error": f"{why}; stderr tail: {err_tail}"})
            print(f"ERROR: worker {w} {why}\n{err_tail}", flush=True)
        print(f"[gpu.py] worker {w}: {len(got)} rows in {time.time() - t0:.0f} s", flush=True)

    _relate_to_floors(rows)
    result = {"environment": env, "skipped": skipped, "errors": errors, "rows": rows,
              "seconds": time.time() - t_start}
    jpath, mpath = write_outputs(result, args.outdir)
    print(f"[gpu.py] wrote {jpath} and {mpath}; {len(rows)} rows, {len(skipped)} skipped, {len(errors)} errors",
          flush=True)
    return 0


def _relate_to_floors(rows: list[dict]) -> None:
    """x_floor for every timed row (the copy floor of its size and dtype, from the ce-base worker, or
    the worker's own), and x_matmuls for the fused layer (the three matmuls alone)."""
    floors: dict[tuple, float] = {}
    for r in rows:  # the first copy floor of each logits size and dtype (ce-base runs first)
        if r.get("contender") == "floor: copy of the logits" and r.get("ms"):
            floors.setdefault((r.get("logits_size", r["size"]), r["dtype"]), r["ms"])
    mats: dict[tuple, float] = {}
    for r in rows:
        if r.get("bench") == "lce" and r.get("contender", "").startswith("matmul alone") and r.get("ms"):
            mats[(r["size"], r["dtype"])] = mats.get((r["size"], r["dtype"]), 0.0) + r["ms"]
    for r in rows:
        key = (r.get("logits_size", r.get("size")), r.get("dtype"))
        if r.get("ms") and key in floors and "x_floor" not in r:
            r["x_floor"] = r["ms"] / floors[key]
        if r.get("bench") == "lce" and r.get("ms") and (r["size"], r["dtype"]) in mats:
            r["x_matmuls"] = r["ms"] / mats[(r["size"], r["dtype"])]


if __name__ == "__main__":
    sys.exit(main())
