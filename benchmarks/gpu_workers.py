"""The workers of benchmarks/gpu.py: each runs in its own process (``python benchmarks/gpu.py OUTDIR
--worker NAME --spec JSON``), appends its rows to OUTDIR/rows-<worker>.jsonl as it measures them and
stops starting contenders at the deadline it was given.

* ``ce-base``: the copy floor, F.cross_entropy eager, Liger's LigerCrossEntropyLoss;
* ``ce-triton``, ``ce-chunked``, ``ce-native``: xseqloss with XSEQLOSS_TORCH_KERNEL set for the process;
* ``lce``: the fused output layer against matmul + F.cross_entropy and the fused libraries, and the
  three matmuls alone;
* ``jax``: optax and xseqloss under jax.jit;
* ``compiled``: torch.compile of F.cross_entropy and of matmul + F.cross_entropy;
* ``sweep``: the Triton kernel alone over a few launch configurations (BLOCK, num_warps).

Times are medians of CUDA-event timings (perf_counter on the CPU); peak memory is
benchmarks/harness.py's ``cuda_peak``. Frameworks are imported inside the workers only.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import harness
from gpu_report import number

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def ce_shape(s: str) -> tuple[int, int]:
    try:
        T, C = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"gpu.py: a cross-entropy size is TOKENSxCLASSES (e.g. 8192x32000), got {s!r}")
    return T, C


def lce_shape(s: str) -> tuple[int, int, int]:
    try:
        T, H, C = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"gpu.py: the fused layer size is TOKENSxHIDDENxCLASSES (e.g. 8192x4096x128256), got {s!r}")
    return T, H, C


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
        harness.append_jsonl(self.path, row)
        if row.get("bench") in ("ce", "lce", "sweep"):
            mem = row.get("peak_x_logits")
            peak = "" if mem is None else f", peak {number(mem)} x logits"
            note = f" ({row['note']})" if row.get("note") else ""
            print(f"  {row['bench']} {row['size']} {row['dtype']} {row['contender']}: "
                  f"{number(row.get('ms'))} ms{peak}{note}", flush=True)

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



def worker_main(name: str, spec: dict) -> int:
    """Run the worker ``name`` with the orchestrator's ``spec``; 1 if it raised (reported as an error row)."""
    w = Worker(name, spec)
    fn = {"ce-base": _w_ce_base, "ce-triton": _w_ce_xseqloss, "ce-chunked": _w_ce_xseqloss,
          "ce-native": _w_ce_xseqloss, "lce": _w_lce, "jax": _w_jax, "compiled": _w_compiled,
          "sweep": _w_sweep}[name]
    try:
        fn(w)
    except Exception as exc:  # report, never hide
        w.error(f"worker {name}", exc)
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
        out, res["peak_bytes"] = harness.cuda_peak(lambda: fn(state))
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
    T, C = ce_shape(size)
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
        T, C = ce_shape(size)
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
        T, C = ce_shape(size)
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
        T, C = ce_shape(size)
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
    T, H, C = lce_shape(w.spec["lce_size"])
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
    T, H, C = lce_shape(size)
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
    T, H, C = lce_shape(size)
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
        T, C = ce_shape(size)
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


# ---- the Triton kernel on the GPU: a launch-configuration sweep

def _w_sweep(w: Worker) -> None:
    """The Triton kernel alone (loss + gradient into a buffer) over a few (BLOCK, num_warps)."""
    import torch

    sys.path.insert(0, ROOT)
    from xseqloss.internals import part; tt = part("torch", "triton")

    size = w.spec["sizes"][-1]
    T, C = ce_shape(size)
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
