"""GPU benchmarks and kernel checks, run by ``bash benchmarks/gpu.sh OUTDIR`` (or on its own):

    python benchmarks/gpu.py OUTDIR                      # everything, within --budget seconds
    python benchmarks/gpu.py OUTDIR --tiny --budget 60   # small sizes (a smoke run)

What it measures, each contender in a worker subprocess (a crash or a timeout loses one worker's
remaining rows, never the run; every worker appends its rows to OUTDIR/rows-<worker>.jsonl as it
goes):

* kernel checks: xseqloss's Triton kernel on CUDA against a float64 reference (every option,
  float32/float16/bfloat16, p(y) -> 1 in bfloat16, logits near 1e4, in place and its version bump)
  and past 2**31 elements (64-bit offsets);
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

Every time is a median of CUDA-event timings (setup such as a fresh copy of the logits stays outside
the events) and is also given against the HBM floor measured in the same run: one device-to-device
copy of the logits (``dst.copy_(src)``), i.e. reading the logits once and writing a gradient once,
the least a cross-entropy forward+backward must move. Peak memory is
``torch.cuda.max_memory_allocated()`` above what was allocated before the call (reset before each
contender), in multiples of the logits' size (JAX: the compiled program's temp + output bytes).

Whatever is missing (CUDA, a JAX GPU, triton, optax, liger_kernel, cut_cross_entropy,
xseqloss.linear_cross_entropy, F.linear_cross_entropy, time) is skipped LOUDLY: a "SKIPPED: what:
why" line on stdout and in the summary. Results: OUTDIR/gpu-bench.json and OUTDIR/gpu-bench.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CE_SIZES = ["8192x32000", "8192x128256"]
LCE_SIZE = "8192x4096x128256"
DTYPES = ["float32", "bfloat16"]
KERNELS = ["triton", "chunked", "native"]
TINY_CE_SIZES = ["64x1000"]
TINY_LCE_SIZE = "64x32x1000"

# Workers in priority order: when the budget runs out, the later ones are skipped (loudly).
WORKERS = ["checks", "ce-base", "ce-triton", "ce-chunked", "ce-native", "lce", "jax", "compiled", "sweep"]

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
        _ce_shape(s)
    _lce_shape(args.lce_size)
    if args.reps < 1 or args.warmup < 0 or args.budget <= 0:
        ap.error("--reps must be >= 1, --warmup >= 0 and --budget > 0")
    return args


def _ce_shape(s: str) -> tuple[int, int]:
    try:
        T, C = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"gpu.py: a cross-entropy size is TOKENSxCLASSES (e.g. 8192x32000), got {s!r}")
    return T, C


def _lce_shape(s: str) -> tuple[int, int, int]:
    try:
        T, H, C = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"gpu.py: the fused layer size is TOKENSxHIDDENxCLASSES (e.g. 8192x4096x128256), got {s!r}")
    return T, H, C


# ------------------------------------------------------------------------------ summary (markdown)

def _f(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _cell(v: Any) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def render_markdown(result: dict) -> str:
    """The summary: environment, skips, then one table per benchmark group."""
    env = result.get("environment", {})
    out = ["# xseqloss GPU benchmarks", ""]
    out.append(f"Date {env.get('date', '?')}; GPU: {env.get('gpu') or 'none'}; torch {env.get('torch', '?')}, "
               f"triton {env.get('triton') or 'missing'}, jax {env.get('jax') or 'missing'}, "
               f"liger_kernel {env.get('liger_kernel') or 'missing'}, "
               f"cut_cross_entropy {env.get('cut_cross_entropy') or 'missing'}; "
               f"budget {env.get('budget_s', '?')} s, took {_f(result.get('seconds'), '.0f')} s.")
    out.append("")
    out.append("Times: median of CUDA-event timings in ms. `x floor`: the time over one device-to-device "
               "copy of the logits in the same run (read once + write once, the least a cross-entropy "
               "forward+backward moves). `peak`: max_memory_allocated above the inputs, in multiples of "
               "the logits' size. `vs ref`: time over the group's reference row.")
    out.append("")
    skipped = result.get("skipped", [])
    out.append("## Skipped")
    out.append("")
    if skipped:
        out.extend(f"- SKIPPED: {s['what']}: {s['why']}" for s in skipped)
    else:
        out.append("Nothing was skipped.")
    out.append("")
    checks = [r for r in result.get("rows", []) if r.get("bench") == "check"]
    if checks:
        out += ["## Triton kernel checks on the GPU", "", "| check | result | detail |", "|---|---|---|"]
        out += [f"| {_cell(r['name'])} | {'pass' if r['ok'] else '**FAIL**'} | {_cell(r.get('detail', ''))} |"
                for r in checks]
        out.append("")
    groups: dict[tuple, list[dict]] = {}
    for r in result.get("rows", []):
        if r.get("bench") in ("ce", "lce", "sweep"):
            groups.setdefault((r["bench"], r["size"], r["dtype"]), []).append(r)
    titles = {"ce": "Cross-entropy forward+backward", "lce": "Fused output layer forward+backward",
              "sweep": "Triton launch configurations (kernel alone, loss + gradient)"}
    for (bench, size, dtype), rows in groups.items():
        ref = next((r for r in rows if r.get("reference")), None)
        out += [f"## {titles[bench]}, {size}, {dtype}", ""]
        extra = " | x matmuls" if bench == "lce" else ""
        out += [f"| contender | ms | x floor{extra} | peak (x logits) | vs ref | loss | note |",
                "|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
        for r in rows:
            vs = r["ms"] / ref["ms"] if ref and r.get("ms") and ref.get("ms") else None
            cells = [r["contender"] + (" (ref)" if r.get("reference") else ""), _f(r.get("ms")), _f(r.get("x_floor"))]
            if extra:
                cells.append(_f(r.get("x_matmuls")))
            cells += [_f(r.get("peak_x_logits")), _f(vs), _f(r.get("loss"), ".6g"), r.get("note", "")]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    errors = result.get("errors", [])
    if errors:
        out += ["## Errors", ""]
        out += [f"- {e['what']}: {e['error']}" for e in errors]
        out.append("")
    return "\n".join(out)


def write_outputs(result: dict, outdir: str) -> tuple[str, str]:
    os.makedirs(outdir, exist_ok=True)
    jpath = os.path.join(outdir, "gpu-bench.json")
    mpath = os.path.join(outdir, "gpu-bench.md")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(mpath, "w") as f:
        f.write(render_markdown(result))
    return jpath, mpath


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
        return _worker_main(args)
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
        skip(skipped, "every PyTorch benchmark and the kernel checks", "torch is not installed")
    elif not cuda:
        if args.allow_cpu:
            skip(skipped, "CUDA", "CUDA is not available: the PyTorch workers run on the CPU (--allow-cpu; "
                                  "their times mean nothing and there are no CUDA events or CUDA memory stats)")
        else:
            skip(skipped, "every PyTorch CUDA benchmark and the Triton kernel checks",
                 "CUDA is not available on this machine (torch.cuda.is_available() is False)")
    for mod, what in (("liger_kernel", "Liger-Kernel contenders (LigerCrossEntropyLoss, "
                                       "LigerFusedLinearCrossEntropyLoss)"),
                      ("cut_cross_entropy", "Cut Cross-Entropy contender (linear_cross_entropy)")):
        if env[mod] is None:
            skip(skipped, what, f"{mod} is not installed (pip install --no-deps its wheel)")
    if torch_device and not env["triton"]:
        skip(skipped, "the Triton kernel (checks, XSEQLOSS_TORCH_KERNEL=triton, the sweep)",
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
        if w in ("checks", "sweep", "ce-triton") and not env["triton"]:
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
        if w in ("checks", "sweep") and torch_device == "cpu":
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
        got = _read_rows(rows_path)
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


def _read_rows(path: str) -> list[dict]:
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


# ---------------------------------------------------------------------------------------- workers

class Worker:
    """One worker process: appends rows to its JSON-lines file as it goes (a kill loses nothing
    already measured) and stops starting contenders after the deadline."""

    def __init__(self, name: str, spec: dict) -> None:
        self.name, self.spec = name, spec
        self.path = spec["rows_path"]
        self.deadline = spec["deadline"]
        self.device = spec.get("device")

    def emit(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        if row.get("bench") in ("ce", "lce", "sweep"):
            mem = row.get("peak_x_logits")
            peak = "" if mem is None else f", peak {_f(mem)} x logits"
            note = f" ({row['note']})" if row.get("note") else ""
            print(f"  {row['bench']} {row['size']} {row['dtype']} {row['contender']}: {_f(row.get('ms'))} ms{peak}{note}",
                  flush=True)
        elif row.get("bench") == "check":
            print(f"  check {row['name']}: {'pass' if row['ok'] else 'FAIL'} {row.get('detail', '')}", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.emit({"bench": "skip", "what": what, "why": why})

    def error(self, what: str, exc: BaseException) -> None:
        self.emit({"bench": "error", "what": what,
                   "error": f"{type(exc).__name__}: {exc}"[:800] + " | " + traceback.format_exc()[-700:]})

    def time_left(self, what: str, need: float = 5.0) -> bool:
        if time.time() + need > self.deadline:
            self.skip(what, "out of time (the benchmark's budget)")
            return False
        return True


def _worker_main(args: argparse.Namespace) -> int:
    spec = json.loads(args.spec)
    w = Worker(args.worker, spec)
    fn = {"checks": _w_checks, "ce-base": _w_ce_base, "ce-triton": _w_ce_xseqloss, "ce-chunked": _w_ce_xseqloss,
          "ce-native": _w_ce_xseqloss, "lce": _w_lce, "jax": _w_jax, "compiled": _w_compiled,
          "sweep": _w_sweep}[args.worker]
    try:
        fn(w)
    except Exception as exc:  # report, never hide
        w.error(f"worker {args.worker}", exc)
        return 1
    return 0


# ---- torch helpers (imported inside the workers only)

def _torch_dtype(name: str) -> Any:
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def measure(w: Worker, fn: Callable[[Any], Any], setup: Callable[[], Any] | None = None,
            reps: int | None = None, warmup: int | None = None, memory: bool = True) -> dict:
    """Median ms of ``fn(setup())`` timed with CUDA events (setup outside them; perf_counter on the
    CPU) and the peak memory above what was allocated just before the call, from one more call."""
    import torch
    dev = w.device
    reps = w.spec["reps"] if reps is None else reps
    warmup = w.spec["warmup"] if warmup is None else warmup
    times = []
    out = None
    for i in range(warmup + reps):
        state = setup() if setup else None
        _sync(dev)
        if dev == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn(state)
            e1.record()
            torch.cuda.synchronize()
            t = e0.elapsed_time(e1)
        else:
            t0 = time.perf_counter()
            out = fn(state)
            t = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(t)
        del state
        if i < warmup + reps - 1:
            out = None
    res = {"ms": statistics.median(times), "ms_all": times}
    loss = _scalar(out)
    if loss is not None:
        res["loss"] = loss
    out = None
    if memory and dev == "cuda":
        state = setup() if setup else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(state)
        torch.cuda.synchronize()
        res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        del out, state
    return res


def _scalar(out: Any) -> float | None:
    try:
        import torch
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            return float(out.detach().float().item())
    except Exception:
        pass
    return None


def _row(w: Worker, bench: str, size: str, dtype: str, contender: str, res: dict, logits_bytes: int,
         **extra: Any) -> dict:
    row = {"bench": bench, "size": size, "dtype": dtype, "contender": contender, "device": w.device,
           "ms": res.get("ms"), "ms_all": res.get("ms_all"), "loss": res.get("loss")}
    if res.get("peak_bytes") is not None:
        row["peak_x_logits"] = res["peak_bytes"] / logits_bytes
    row.update(extra)
    return row


def _ce_data(size: str, dtype: str, device: str) -> tuple[Any, Any, int]:
    import torch
    T, C = _ce_shape(size)
    g = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn((1, T, C), generator=g, device=device) * 2).to(_torch_dtype(dtype))
    y = torch.randint(0, C, (1, T), generator=g, device=device)
    return z, y, z.numel() * z.element_size()


def _fresh(z: Any) -> Callable[[], Any]:
    """Setup of one timed call: a fresh leaf copy of the logits (in-place contenders overwrite them)."""
    return lambda: z.detach().clone().requires_grad_(True)


def _ce_fwd_bwd(loss_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(zg: Any) -> Any:
        loss = loss_fn(zg)
        if isinstance(loss, (tuple, list)):
            loss = loss[0]
        loss.backward()
        return loss.detach()
    return run


def _w_ce_base(w: Worker) -> None:
    """The copy floor, F.cross_entropy eager and Liger's LigerCrossEntropyLoss."""
    import torch
    import torch.nn.functional as F

    liger = None
    if importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
            liger = LigerCrossEntropyLoss()
        except Exception as exc:
            w.error("import liger_kernel.transformers.LigerCrossEntropyLoss", exc)
    w.skip("Cut Cross-Entropy on logits", "cut_cross_entropy has no logits-input loss (only linear_cross_entropy, "
                                          "measured in the fused output layer group)")
    for size in w.spec["sizes"]:
        T, C = _ce_shape(size)
        for dtype in w.spec["dtypes"]:
            if not w.time_left(f"ce-base {size} {dtype}"):
                return
            z, y, nb = _ce_data(size, dtype, w.device)
            dst = torch.empty_like(z)
            res = measure(w, lambda _: dst.copy_(z), memory=False)
            w.emit(_row(w, "ce", size, dtype, "floor: copy of the logits", res, nb,
                        note=f"{2 * nb / res['ms'] / 1e6:.0f} GB/s read+write"))
            del dst
            try:
                res = measure(w, _ce_fwd_bwd(lambda zg: F.cross_entropy(zg.view(-1, C), y.view(-1))), _fresh(z))
                w.emit(_row(w, "ce", size, dtype, "F.cross_entropy eager", res, nb, reference=True))
            except Exception as exc:
                w.error(f"F.cross_entropy {size} {dtype}", exc)
            if liger is not None:
                try:
                    res = measure(w, _ce_fwd_bwd(lambda zg: liger(zg.view(-1, C), y.view(-1))), _fresh(z))
                    w.emit(_row(w, "ce", size, dtype, "Liger LigerCrossEntropyLoss", res, nb,
                                note="writes its gradient into the logits"))
                except Exception as exc:
                    w.error(f"Liger CE {size} {dtype}", exc)
            del z, y
            torch.cuda.empty_cache() if w.device == "cuda" else None


def _count_triton_launches(call: Callable[[], Any]) -> int | None:
    """How many times xseqloss's Triton kernel was launched during ``call()`` (None: not countable).
    The launcher looks the kernel up on its module at every call, so a counting proxy there sees
    every launch, however the backend reaches the launcher."""
    try:
        from xseqloss.internals import part; K = part("torch", "_triton_kernels")
    except Exception:
        return None
    real = K.token_loss_kernel
    count = [0]

    class Proxy:
        def __getitem__(self, grid: Any) -> Any:
            count[0] += 1
            return real[grid]

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    K.token_loss_kernel = Proxy()
    try:
        call()
    finally:
        K.token_loss_kernel = real
    return count[0]


def _w_ce_xseqloss(w: Worker) -> None:
    """xseqloss.sequence_cross_entropy with XSEQLOSS_TORCH_KERNEL set for this whole process."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    import xseqloss as xsl

    kernel = w.spec["kernel"]
    assert os.environ.get("XSEQLOSS_TORCH_KERNEL") == kernel
    for size in w.spec["sizes"]:
        T, C = _ce_shape(size)
        for dtype in w.spec["dtypes"]:
            if not w.time_left(f"xseqloss[{kernel}] {size} {dtype}"):
                return
            z, y, nb = _ce_data(size, dtype, w.device)
            # which code ran, and whether its gradient matches F.cross_entropy's (untimed)
            note = ""
            try:
                zg = _fresh(z)()
                launches = _count_triton_launches(lambda: xsl.sequence_cross_entropy(zg, y).backward())
                zr = _fresh(z)()
                F.cross_entropy(zr.float().view(-1, C), y.view(-1)).backward()
                gdiff = (zg.grad.float() - zr.grad.float()).abs().max().item()
                note = f"max abs grad diff vs F.cross_entropy(float32) {gdiff:.2g}"
                if launches is not None:
                    note += f"; Triton kernel launches per call: {launches}"
                del zg, zr
            except Exception as exc:
                w.error(f"xseqloss[{kernel}] check {size} {dtype}", exc)
            for label, kw in ((f"xseqloss[{kernel}]", {}), (f"xseqloss[{kernel}] inplace_backward", {"inplace_backward": True})):
                try:
                    res = measure(w, _ce_fwd_bwd(lambda zg: xsl.sequence_cross_entropy(zg, y, **kw)), _fresh(z))
                    w.emit(_row(w, "ce", size, dtype, label, res, nb, note=note, kernel=kernel))
                except Exception as exc:
                    w.error(f"{label} {size} {dtype}", exc)
            del z, y
            torch.cuda.empty_cache() if w.device == "cuda" else None


def _w_compiled(w: Worker) -> None:
    """torch.compile of F.cross_entropy and of matmul + F.cross_entropy (compile time reported apart)."""
    import torch
    import torch.nn.functional as F

    for size in w.spec["sizes"]:
        T, C = _ce_shape(size)
        for dtype in w.spec["dtypes"]:
            if not w.time_left(f"torch.compile(F.cross_entropy) {size} {dtype}", need=40):
                return
            z, y, nb = _ce_data(size, dtype, w.device)
            try:
                f = torch.compile(lambda a, b: F.cross_entropy(a.view(-1, C), b.view(-1)), dynamic=False)
                t0 = time.time()
                _ce_fwd_bwd(lambda zg: f(zg, y))(_fresh(z)())
                _sync(w.device)
                compile_s = time.time() - t0
                res = measure(w, _ce_fwd_bwd(lambda zg: f(zg, y)), _fresh(z))
                w.emit(_row(w, "ce", size, dtype, "torch.compile(F.cross_entropy)", res, nb,
                            note=f"first call (compile) {compile_s:.1f} s"))
            except Exception as exc:
                w.error(f"torch.compile(F.cross_entropy) {size} {dtype}", exc)
            del z, y
    T, H, C = _lce_shape(w.spec["lce_size"])
    for dtype in w.spec["lce_dtypes"]:
        if not w.time_left(f"torch.compile(matmul + F.cross_entropy) {w.spec['lce_size']} {dtype}", need=40):
            return
        h, W, y, nb = _lce_data(w.spec["lce_size"], dtype, w.device)
        try:
            f = torch.compile(lambda a, b, t: F.cross_entropy(a @ b.T, t), dynamic=False)
            t0 = time.time()
            _lce_fwd_bwd(lambda hg, Wg: f(hg, Wg, y))(_lce_setup(h, W)())
            _sync(w.device)
            compile_s = time.time() - t0
            res = measure(w, _lce_fwd_bwd(lambda hg, Wg: f(hg, Wg, y)), _lce_setup(h, W))
            w.emit(_row(w, "lce", w.spec["lce_size"], dtype, "torch.compile(matmul + F.cross_entropy)", res, nb,
                        logits_size=f"{T}x{C}", note=f"first call (compile) {compile_s:.1f} s"))
        except Exception as exc:
            w.error(f"torch.compile(matmul + F.cross_entropy) {dtype}", exc)


def _lce_data(size: str, dtype: str, device: str) -> tuple[Any, Any, Any, int]:
    import torch
    T, H, C = _lce_shape(size)
    g = torch.Generator(device=device).manual_seed(0)
    dt = _torch_dtype(dtype)
    h = torch.randn((T, H), generator=g, device=device).to(dt)
    W = (torch.randn((C, H), generator=g, device=device) / H ** 0.5).to(dt)
    y = torch.randint(0, C, (T,), generator=g, device=device)
    return h, W, y, T * C * h.element_size()


def _lce_setup(h: Any, W: Any) -> Callable[[], Any]:
    return lambda: (h.detach().requires_grad_(True), W.detach().requires_grad_(True))


def _lce_fwd_bwd(loss_fn: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    def run(state: Any) -> Any:
        hg, Wg = state
        loss = loss_fn(hg, Wg)
        if isinstance(loss, (tuple, list)):
            loss = loss[0]
        loss.backward()
        return loss.detach()
    return run


def _w_lce(w: Worker) -> None:
    """The fused output layer against the naive matmul + F.cross_entropy and the fused libraries."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    import xseqloss as xsl

    size = w.spec["lce_size"]
    T, H, C = _lce_shape(size)
    has_xsl = hasattr(xsl, "linear_cross_entropy")
    if not has_xsl:
        w.skip("xseqloss.linear_cross_entropy", "xseqloss has no linear_cross_entropy yet (API.md section 8); "
                                                 "the other fused-layer contenders still run")
    if not hasattr(F, "linear_cross_entropy"):
        w.skip("F.linear_cross_entropy", f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    liger = cce = None
    if importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
        except Exception as exc:
            w.error("import LigerFusedLinearCrossEntropyLoss", exc)
    if importlib.util.find_spec("cut_cross_entropy") is not None and not torch.cuda.is_available():
        w.skip("Cut Cross-Entropy linear_cross_entropy", "its default Triton kernel (impl='cce') needs CUDA")
    elif importlib.util.find_spec("cut_cross_entropy") is not None:
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except Exception as exc:
            w.error("import cut_cross_entropy.linear_cross_entropy", exc)
    for dtype in w.spec["lce_dtypes"]:
        if not w.time_left(f"fused output layer {size} {dtype}", need=15):
            return
        h, W, y, nb = _lce_data(size, dtype, w.device)
        ls = f"{T}x{C}"
        # the matmuls alone (cuBLAS): the forward logits, d hidden, d weight
        try:
            g = torch.randn((T, C), device=w.device).to(h.dtype) * 1e-3
            for label, f in (("matmul alone: h @ W^T (logits)", lambda _: h @ W.T),
                             ("matmul alone: g @ W (d hidden)", lambda _: g @ W),
                             ("matmul alone: g^T @ h (d weight)", lambda _: g.T @ h)):
                res = measure(w, f, memory=False)
                w.emit(_row(w, "lce", size, dtype, label, res, nb, logits_size=ls,
                            note=f"{2 * T * H * C / res['ms'] / 1e9:.3g} TFLOP/s"))
            del g
            dst = torch.empty((T, C), device=w.device, dtype=h.dtype)
            src = torch.empty_like(dst)
            res = measure(w, lambda _: dst.copy_(src), memory=False)
            w.emit(_row(w, "lce", size, dtype, "floor: copy of the logits", res, nb, logits_size=ls))
            del dst, src
        except Exception as exc:
            w.error(f"matmuls alone {dtype}", exc)
        contenders: list[tuple[str, Callable[[Any, Any], Any], dict]] = [
            ("matmul + F.cross_entropy eager", lambda hg, Wg: F.cross_entropy(hg @ Wg.T, y), {"reference": True})]
        if hasattr(F, "linear_cross_entropy"):
            contenders.append(("F.linear_cross_entropy", lambda hg, Wg: F.linear_cross_entropy(hg, Wg, y), {}))
        if liger is not None:
            contenders.append(("Liger LigerFusedLinearCrossEntropyLoss", lambda hg, Wg: liger(Wg, hg, y), {}))
        if cce is not None:
            contenders.append(("Cut Cross-Entropy linear_cross_entropy", lambda hg, Wg: cce(hg, Wg, y), {}))
        if has_xsl:
            kern = os.environ.get("XSEQLOSS_TORCH_KERNEL", "auto")
            contenders.append((f"xseqloss.linear_cross_entropy [{kern}]",
                               lambda hg, Wg: xsl.linear_cross_entropy(hg.unsqueeze(0), Wg, y.unsqueeze(0)), {}))
        for label, fn, extra in contenders:
            if not w.time_left(f"{label} {size} {dtype}"):
                return
            try:
                res = measure(w, _lce_fwd_bwd(fn), _lce_setup(h, W))
                w.emit(_row(w, "lce", size, dtype, label, res, nb, logits_size=ls, **extra))
            except Exception as exc:
                w.error(f"{label} {size} {dtype}", exc)
        del h, W, y
        torch.cuda.empty_cache() if w.device == "cuda" else None


def _w_jax(w: Worker) -> None:
    """optax and xseqloss under jax.jit on the JAX GPU (wall time around block_until_ready)."""
    import jax
    import jax.numpy as jnp

    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError as exc:
        if not w.spec.get("allow_cpu"):
            w.skip("optax / xseqloss under jax.jit on the GPU", f"JAX sees no GPU ({str(exc)[:160]})")
            return
        dev = jax.devices("cpu")[0]
        w.skip("JAX GPU", "JAX sees no GPU: the JAX worker runs on the CPU (--allow-cpu; times mean nothing)")
    sys.path.insert(0, ROOT)
    import xseqloss as xsl

    fns: list[tuple[str, Any, dict]] = []
    if importlib.util.find_spec("optax") is None:
        w.skip("optax under jax.jit", "optax is not installed")
    else:
        import optax
        fns.append(("optax softmax_cross_entropy_with_integer_labels (jax.jit)",
                    jax.jit(jax.value_and_grad(lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())),
                    {"reference": False}))
    fns.append(("xseqloss on JAX (jax.jit)", jax.jit(jax.value_and_grad(lambda z, y: xsl.sequence_cross_entropy(z, y))), {}))
    for size in w.spec["sizes"]:
        T, C = _ce_shape(size)
        for dtype in w.spec["dtypes"]:
            if not w.time_left(f"jax {size} {dtype}", need=10):
                return
            key = jax.random.PRNGKey(0)
            z = jax.device_put((jax.random.normal(key, (1, T, C)) * 2).astype(getattr(jnp, dtype)), dev)
            y = jax.device_put(jax.random.randint(key, (1, T), 0, C), dev)
            nb = z.size * z.dtype.itemsize
            for label, f, extra in fns:
                try:
                    compiled = f.lower(z, y).compile()
                    mem = None
                    try:
                        ma = compiled.memory_analysis()
                        mem = (ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes) / nb
                    except Exception:
                        pass
                    for _ in range(w.spec["warmup"]):
                        jax.block_until_ready(compiled(z, y))
                    times = []
                    for _ in range(w.spec["reps"]):
                        t0 = time.perf_counter()
                        out = jax.block_until_ready(compiled(z, y))
                        times.append((time.perf_counter() - t0) * 1e3)
                    res = {"ms": statistics.median(times), "ms_all": times, "loss": float(out[0])}
                    row = _row(w, "ce", size, dtype, label, res, nb, note="wall time; peak = compiled temp + output",
                               **extra)
                    row["peak_x_logits"] = mem
                    w.emit(row)
                except Exception as exc:
                    w.error(f"{label} {size} {dtype}", exc)
            del z, y


# ---- the Triton kernel on the GPU: checks and a launch-configuration sweep

def _reference64(z: Any, y: Any, keep: Any, cw: Any, scale: Any, eps: float, z_loss: float, cap: Any) -> tuple:
    """The kernel's formula in float64 torch (vectorised), from the spec."""
    import torch
    x = z.double()
    R, C = x.shape
    t = None
    if cap is not None:
        t = torch.tanh(x / cap)
        x = cap * t
    m = x.amax(1, keepdim=True)
    m = torch.where(m == -torch.inf, 0.0, m)
    e = torch.exp(x - m)
    s = e.sum(1, keepdim=True)
    lse_s = torch.log(s)
    lse = lse_s + m
    w = torch.ones(C, dtype=torch.float64, device=z.device) if cw is None else cw.double()
    wy = w[y].unsqueeze(1)
    a = (1 - eps) * wy
    b = eps / C
    q = b * w.unsqueeze(0).expand(R, C).clone()
    q.scatter_add_(1, y.unsqueeze(1), a)
    sumq = a + b * w.sum()
    terms = torch.where(q == 0, 0.0, q * (x - m))
    loss = sumq * lse_s - terms.sum(1, keepdim=True) + z_loss * wy * lse * lse
    g = (sumq + 2 * z_loss * wy * lse) * e / s - q
    if t is not None:
        g = g * (1 - t * t)
    if scale is not None:
        g = g * scale.double().unsqueeze(1)
    loss = loss.squeeze(1)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
        g = torch.where(keep.unsqueeze(1), g, 0.0)
    return loss, g


def _rel(got: Any, ref: Any) -> float:
    import torch
    got, ref = got.double(), ref.double()
    same = (torch.isnan(got) & torch.isnan(ref)) | (torch.isinf(got) & (got == ref))
    err = ((got - ref).abs() / (1 + ref.abs())).nan_to_num(nan=float("inf"))
    err = torch.where(same, 0.0, err)
    return float(err.max()) if err.numel() else 0.0


def _w_checks(w: Worker) -> None:
    import math

    import torch

    sys.path.insert(0, ROOT)
    from xseqloss.internals import part; tt = part("torch", "triton")

    dev = w.device  # "cpu" only with --allow-cpu, through Triton's interpreter (smaller sizes)
    gpu = dev == "cuda"
    tol = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}
    gen = torch.Generator(device=dev).manual_seed(0)

    def check(name: str, fn: Callable[[], str]) -> None:
        if not w.time_left(f"check {name}", need=3):
            return
        try:
            w.emit({"bench": "check", "name": name, "ok": True, "detail": fn()})
        except Exception as exc:
            w.emit({"bench": "check", "name": name, "ok": False,
                    "detail": f"{type(exc).__name__}: {str(exc)[:600]}".replace("|", "/").replace("\n", " ")})

    def options() -> str:
        # each (variant, dtype, BLOCK) is one Triton compile (~1 s): every dtype with no option and
        # with all of them, float32 also with a few subsets; C = 7 (one partial block), 4097 and
        # 32000 (blocks of 4096 with a partial last one), C = 1 once
        worst: dict[str, float] = {}
        for C in ((1, 7, 4097, 32000) if gpu else (1, 7, 65, 200)):
            R = 37 if gpu else 7
            for dt in (("float32",) if C == 1 else ("float32", "float16", "bfloat16")):
                z = (torch.randn((R, C), generator=gen, device=dev) * 3).to(_torch_dtype(dt))
                y = torch.randint(0, C, (R,), generator=gen, device=dev)
                keep = torch.rand((R,), generator=gen, device=dev) > 0.3
                zg = z.clone()
                zg[~keep] = float("nan")  # garbage in the rows that do not count
                cw = torch.rand((C,), generator=gen, device=dev) + 0.1
                cw[::5] = 0
                scale = torch.randn((R,), generator=gen, device=dev)
                sets = [dict(keep=keep, cw=cw, scale=scale, eps=0.1, z_loss=0.01, cap=5.0)]
                if C > 1:
                    sets.append(dict())
                if dt == "float32" and C > 1:
                    sets += [dict(eps=0.2), dict(cw=cw, z_loss=1e-3)]
                for opts in sets:
                    kw = dict(keep=None, cw=None, scale=None, eps=0.0, z_loss=0.0, cap=None)
                    kw.update(opts)
                    zz = zg if kw["keep"] is not None else z
                    out = torch.empty_like(zz)
                    loss = tt.token_loss_triton(zz, y, kw["keep"], kw["cw"], kw["scale"], eps=kw["eps"],
                                                z_loss=kw["z_loss"], cap=kw["cap"], out=out)
                    rl, rg = _reference64(zz, y, **kw)
                    e = max(_rel(loss, rl), _rel(out, rg))
                    worst[dt] = max(worst.get(dt, 0.0), e)
                    assert e <= tol[dt], f"C={C} {dt} {sorted(opts)}: err {e:.3g} > {tol[dt]}"
        return "max err " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items())

    def true_class() -> str:
        C, out = (32000 if gpu else 200), []
        block = tt.launch_config(C, dev)[0]
        for p in (0.9, 0.99, 0.999):
            L = math.log(p * (C - 1) / (1 - p))
            z = torch.zeros((4, C), device=dev)
            y = torch.tensor([0, block - 1, block, C - 1], device=dev)
            z[torch.arange(4), y] = L
            zb = z.bfloat16()
            g = torch.empty_like(zb)
            tt.token_loss_triton(zb, y, None, None, None, eps=0.0, z_loss=0.0, cap=None, out=g)
            _, rg = _reference64(zb, y, None, None, None, 0.0, 0.0, None)
            got, want = g.double()[torch.arange(4), y], rg[torch.arange(4), y]
            rel = float(((got - want).abs() / want.abs()).max())
            assert rel <= 0.01, f"p={p}: {rel:.3g}"
            out.append(f"p={p}: {rel:.2g}")
        return "true-class gradient relative error " + ", ".join(out)

    def large() -> str:
        z = torch.tensor([[10000.0, 9999.0, -10000.0]], device=dev)
        loss = tt.token_loss_triton(z, torch.tensor([0], device=dev), None, None, None, eps=0.0, z_loss=0.0,
                                    cap=None, out=None)
        exact = math.log1p(math.exp(-1.0))
        first = loss.item()
        assert abs(first - exact) <= 1.2e-7, f"{first!r} vs {exact!r}"
        zc = 3e4 + torch.randn((64, 32000) if gpu else (8, 200), generator=gen, device=dev)
        y = zc.argmax(1)
        out = torch.empty_like(zc)
        loss = tt.token_loss_triton(zc, y, None, None, None, eps=0.1, z_loss=0.0, cap=None, out=out)
        rl, rg = _reference64(zc, y, None, None, None, 0.1, 0.0, None)
        e = max(_rel(loss, rl), _rel(out, rg))
        assert e <= 1e-5, f"3e4 rows: {e:.3g}"
        return f"[1e4, 9999, -1e4] -> {first:.7f} (exact {exact:.7f}); rows near 3e4 (eps 0.1): err {e:.2g}"

    def inplace() -> str:
        R, C = (33, 5000) if gpu else (5, 300)
        z = torch.randn((R, C), generator=gen, device=dev).bfloat16()
        y = torch.randint(0, C, (R,), generator=gen, device=dev)
        g = torch.empty_like(z)
        l1 = tt.token_loss_triton(z, y, None, None, None, eps=0.1, z_loss=0.0, cap=None, out=g)
        v0 = z._version
        l2 = tt.token_loss_triton(z, y, None, None, None, eps=0.1, z_loss=0.0, cap=None, out=z)
        assert torch.equal(z, g) and torch.equal(l1, l2), "in place differs from out of place"
        assert z._version > v0, "version counter not bumped"
        h = torch.randn((4, 9), device=dev, requires_grad=True)
        p = torch.softmax(h, -1)
        tt.token_loss_triton(p.detach(), torch.zeros(4, dtype=torch.int64, device=dev), None, None, None, eps=0.0,
                             z_loss=0.0, cap=None, out=p.detach())
        try:
            p.sum().backward()
        except RuntimeError as exc:
            assert "inplace" in str(exc)
        else:
            raise AssertionError("Liger #272 pattern: backward did not raise")
        return "equal to out of place; version bumped; Liger #272 pattern raises"

    def offsets64(C: int = 32000, R: int = (1 << 31) // 32000 + 4) -> str:
        # R x C past 2**31 elements: the last rows start beyond int32 offsets
        z = torch.empty((R, C), device=dev, dtype=torch.bfloat16)
        z[:-8].zero_()
        tail = (torch.randn((8, C), generator=gen, device=dev) * 3).bfloat16()
        z[-8:] = tail
        y = torch.zeros(R, dtype=torch.int64, device=dev)
        y[-8:] = torch.randint(0, C, (8,), generator=gen, device=dev)
        loss = tt.token_loss_triton(z, y, None, None, None, eps=0.0, z_loss=0.0, cap=None, out=z)  # in place
        rl, rg = _reference64(tail, y[-8:], None, None, None, 0.0, 0.0, None)
        e = max(_rel(loss[-8:], rl), _rel(z[-8:], rg))
        assert e <= 2e-2, f"rows past 2**31 elements: err {e:.3g}"
        first = loss[0].item()
        assert abs(first - math.log(C)) < 1e-3, first
        del z
        if gpu:
            torch.cuda.empty_cache()
        return f"{R} x {C} = {R * C / 2**31:.3f} * 2**31 elements (in place): last rows err {e:.2g}"

    for name, fn in (("options vs float64", options), ("true class p -> 1 bfloat16", true_class),
                     ("large logits", large), ("in place + version counter", inplace)):
        check(name, fn)
    if gpu:
        check("64-bit offsets past 2**31 elements", offsets64)
    else:
        w.skip("check 64-bit offsets past 2**31 elements", "not on the CPU (8 GB through the interpreter); "
                                                            "its code runs at 40 x 50 instead")
        check("offsets check, code path only (40 x 50, CPU)", lambda: offsets64(50, 40))


def _w_sweep(w: Worker) -> None:
    """The Triton kernel alone (loss + gradient into a buffer) over a few (BLOCK, num_warps)."""
    import torch

    sys.path.insert(0, ROOT)
    from xseqloss.internals import part; tt = part("torch", "triton")

    size = w.spec["sizes"][-1]
    T, C = _ce_shape(size)
    configs = [(1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (16384, 32)]
    for dtype in w.spec["dtypes"]:
        z, y, nb = _ce_data(size, dtype, w.device)
        z2 = z.view(T, C)
        y2 = y.view(T)
        out = torch.empty_like(z2)
        for block, warps in configs:
            if not w.time_left(f"sweep {size} {dtype} BLOCK={block} warps={warps}", need=8):
                return
            tt.CONFIG_OVERRIDE = (block, warps)
            try:
                res = measure(w, lambda _: tt.token_loss_triton(z2, y2, None, None, None, eps=0.0, z_loss=0.0,
                                                                 cap=None, out=out), memory=False)
                w.emit(_row(w, "sweep", size, dtype, f"BLOCK={block} num_warps={warps}", res, nb,
                            note="default" if (block, warps) == _default_config(tt, C) else ""))
            except Exception as exc:
                w.error(f"sweep BLOCK={block} warps={warps} {dtype}", exc)
            finally:
                tt.CONFIG_OVERRIDE = None
        dst = torch.empty_like(z2)
        res = measure(w, lambda _: dst.copy_(z2), memory=False)
        w.emit(_row(w, "sweep", size, dtype, "floor: copy of the logits", res, nb))
        del z, y, out, dst


def _default_config(tt: Any, C: int) -> tuple[int, int]:
    saved, tt.CONFIG_OVERRIDE = tt.CONFIG_OVERRIDE, None
    try:
        return tt.launch_config(C, "cuda")
    finally:
        tt.CONFIG_OVERRIDE = saved


if __name__ == "__main__":
    sys.exit(main())
