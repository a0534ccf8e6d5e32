"""Benchmark harness: xseqloss against each framework's own call for the same semantics.

For each installed backend and size it times, alternating the contenders inside one process and
reporting medians and ratios (the machines are shared and noisy; only ratios taken in one run mean
anything; the timing, memory and JSON machinery is benchmarks/harness.py's):

* the floors: one copy of the logits and one ``exp`` pass over them, by the same framework;
* forward and forward+backward, xseqloss (default options) against the native call
  (PyTorch ``F.cross_entropy``; TensorFlow ``sparse_softmax_cross_entropy_with_logits`` in a
  ``tf.function``; optax under ``jax.jit``; a careful NumPy implementation with an analytic gradient),
  eager and compiled where that applies;
* per-call overhead at tiny sizes (1 x 8 x 128, and 4 x 16 x 10: the LSTM case), with validation on
  and off, also after 50 us of other Python work;
* PyTorch on a padded batch (4 x 2,048 x 32,000, -100 on the last 50 steps of each row) with other
  calls on the same logits in between (F.cross_entropy, and a second head with other options), and
  the same call alone in a loop: the reusable gradient buffer must serve both;
* peak extra memory of forward+backward in multiples of the logits' size (peak RSS, or CUDA's
  max_memory_allocated on a GPU), each in a fresh subprocess.

    python benchmarks/bench.py                       # every installed backend, every size
    python benchmarks/bench.py --backends torch --sizes 8192x32000 --json out.json

Nothing here is a test: it prints a table and writes JSON (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# XSEQLOSS_BENCH_ROOT: the package tree to measure (benchmarks/ab.py times two trees alternately)
sys.path.insert(0, os.environ.get("XSEQLOSS_BENCH_ROOT", os.path.dirname(HERE)))

import harness  # noqa: E402
import xseqloss as xsl  # noqa: E402

SIZES = {"8192x32000": (1, 8192, 32000), "2048x128000": (1, 2048, 128000),
         "4x2048x32000_padded": (4, 2048, 32000), "tiny": (1, 8, 128), "4x16x10": (4, 16, 10)}
TINY = ("tiny", "4x16x10")          # per-call overhead: many reps, also timed after a gap
PADDED = {"4x2048x32000_padded": 50}  # -100 on the last 50 steps of each row (a padded batch)


def _data(shape: tuple[int, int, int], seed: int = 0, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    N, T, C = shape
    z = rng.standard_normal((N, T, C), dtype=np.float32) * 2
    y = rng.integers(0, C, (N, T))
    if pad:
        y[:, -pad:] = -100
    return z, y


# ------------------------------------------------------------------------------------ backends

def torch_contenders(shape: tuple[int, int, int], device: str, pad: int = 0) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    z_np, y_np = _data(shape, pad=pad)
    z = torch.tensor(z_np, device=device)
    y = torch.tensor(y_np, device=device)
    C = shape[-1]
    exp_buf = torch.empty_like(z)

    def sync(x: Any) -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return x

    zg = z.clone().requires_grad_(True)

    # the gradient is handed to the harness, which releases it after the clock stops: freeing a
    # fresh 1 GB gradient (munmap, tens of ms) is then charged to no contender
    def native_fb() -> Any:
        loss = F.cross_entropy(zg.view(-1, C), y.view(-1))
        loss.backward()
        g, zg.grad = zg.grad, None
        return g

    def xsl_fb(**kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            loss = xsl.sequence_cross_entropy(zg, y, **kw)
            loss.backward()
            g, zg.grad = zg.grad, None
            return g
        return run

    def fwd_native() -> Any:
        with torch.no_grad():
            return F.cross_entropy(z.view(-1, C), y.view(-1))

    def fwd_xsl(**kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return xsl.sequence_cross_entropy(z, y, **kw)
        return run

    out = {
        "sync": sync,
        "floors": {"copy": lambda: z.clone(), "exp": lambda: torch.exp(z),
                   "exp_into_existing": lambda: torch.exp(z, out=exp_buf)},
        "forward": {"native": fwd_native, "xseqloss": fwd_xsl(), "xseqloss_novalidate": fwd_xsl(validate=False)},
        "fwd_bwd": {"native": native_fb, "xseqloss": xsl_fb(), "xseqloss_novalidate": xsl_fb(validate=False)},
    }
    if pad:  # a model with two heads, or an A/B test: another loss call on the same logits in between
        out["fwd_bwd"]["xseqloss_second_head"] = xsl_fb(label_smoothing=0.1)
    return out


def torch_compiled(shape: tuple[int, int, int], device: str, pad: int = 0) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    z_np, y_np = _data(shape, pad=pad)
    z = torch.tensor(z_np, device=device).requires_grad_(True)
    y = torch.tensor(y_np, device=device)
    C = shape[-1]
    nat = torch.compile(lambda a, b: F.cross_entropy(a.view(-1, C), b.view(-1)), fullgraph=True)
    ours = torch.compile(lambda a, b: xsl.sequence_cross_entropy(a, b), fullgraph=True)

    def run(f: Any) -> Callable[[], Any]:
        def go() -> Any:
            f(z, y).backward()
            g, z.grad = z.grad, None
            return g
        return go

    def sync(x: Any) -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return x

    return {"sync": sync, "fwd_bwd_compiled": {"native": run(nat), "xseqloss": run(ours)}}


def tf_contenders(shape: tuple[int, int, int], device: str, pad: int = 0) -> dict[str, Any]:
    import tensorflow as tf

    z_np, y_np = _data(shape, pad=pad)
    with tf.device(device):
        z = tf.constant(z_np)
        y = tf.constant(y_np)

    @tf.function
    def native_f(z: Any) -> Any:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))

    @tf.function
    def native_fb(z: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))
        return loss, tape.gradient(loss, z)

    @tf.function
    def xsl_f(z: Any) -> Any:
        return xsl.sequence_cross_entropy(z, y)

    @tf.function
    def xsl_fb_c(z: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = xsl.sequence_cross_entropy(z, y)
        return loss, tape.gradient(loss, z)

    def native_fb_eager() -> Any:  # the native op under an eager tape: like for like with xseqloss's eager row
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))
        return loss, tape.gradient(loss, z)

    def xsl_fb_eager(**kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with tf.GradientTape() as tape:
                tape.watch(z)
                loss = xsl.sequence_cross_entropy(z, y, **kw)
            return loss, tape.gradient(loss, z)
        return run

    exp_f = tf.function(lambda a: tf.exp(a))
    copy_f = tf.function(lambda a: a * 2.0)  # a * 1.0 is folded away by grappler

    def sync(x: Any) -> Any:
        for t in tf.nest.flatten(x):
            _ = t.numpy() if t.shape.rank == 0 else t[(0,) * t.shape.rank].numpy()
        return x

    return {
        "sync": sync,
        "floors": {"copy": lambda: copy_f(z), "exp": lambda: exp_f(z)},
        "forward": {"native": lambda: native_f(z),
                    "native_eager": lambda: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)),
                    "xseqloss": lambda: xsl.sequence_cross_entropy(z, y),
                    "xseqloss_novalidate": lambda: xsl.sequence_cross_entropy(z, y, validate=False),
                    "xseqloss_tf_function": lambda: xsl_f(z)},
        "fwd_bwd": {"native": lambda: native_fb(z), "native_eager": native_fb_eager, "xseqloss": xsl_fb_eager(),
                    "xseqloss_novalidate": xsl_fb_eager(validate=False),
                    "xseqloss_tf_function": lambda: xsl_fb_c(z)},
    }


def jax_contenders(shape: tuple[int, int, int], device: str, pad: int = 0) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    z_np, y_np = _data(shape, pad=pad)
    dev = jax.devices(device)[0]
    z = jax.device_put(jnp.asarray(z_np), dev)
    y = jax.device_put(jnp.asarray(y_np, jnp.int32), dev)

    native_f = jax.jit(lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())
    native_fb = jax.jit(jax.value_and_grad(lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()))
    native_fb_eager = jax.value_and_grad(lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())
    xsl_f = jax.jit(lambda z, y: xsl.sequence_cross_entropy(z, y))
    xsl_fb = jax.jit(jax.value_and_grad(lambda z, y: xsl.sequence_cross_entropy(z, y)))
    exp_f = jax.jit(jnp.exp)
    copy_f = jax.jit(lambda a: a + 0.0)

    def sync(x: Any) -> Any:
        return jax.block_until_ready(x)

    return {
        "sync": sync,
        "floors": {"copy": lambda: copy_f(z), "exp": lambda: exp_f(z)},
        "forward": {"native": lambda: native_f(z, y), "xseqloss": lambda: xsl.sequence_cross_entropy(z, y),
                    "xseqloss_novalidate": lambda: xsl.sequence_cross_entropy(z, y, validate=False),
                    "xseqloss_jit": lambda: xsl_f(z, y)},
        "fwd_bwd": {"native": lambda: native_fb(z, y), "native_eager": lambda: native_fb_eager(z, y),
                    "xseqloss": lambda: xsl.value_and_grad(z, y),
                    "xseqloss_novalidate": lambda: xsl.value_and_grad(z, y, validate=False),
                    "xseqloss_jit": lambda: xsl_fb(z, y)},
    }


def numpy_baseline_fwd(z: np.ndarray, y: np.ndarray) -> Any:
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
    return (lse - np.take_along_axis(z, y[..., None], -1)[..., 0]).mean()


def numpy_baseline_fb(z: np.ndarray, y: np.ndarray) -> Any:
    """A careful NumPy cross-entropy with its analytic gradient (softmax - onehot) / n."""
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(-1, keepdims=True)
    lse = np.log(s[..., 0]) + m[..., 0]
    loss = (lse - np.take_along_axis(z, y[..., None], -1)[..., 0]).mean()
    e /= s
    np.put_along_axis(e, y[..., None], np.take_along_axis(e, y[..., None], -1) - 1.0, -1)
    e /= y.size
    return loss, e


def numpy_contenders(shape: tuple[int, int, int], device: str, pad: int = 0) -> dict[str, Any]:
    z, y = _data(shape, pad=pad)
    exp_buf = np.empty_like(z)
    return {
        "sync": lambda x: x,
        "floors": {"copy": lambda: z.copy(), "exp": lambda: np.exp(z),
                   "exp_into_existing": lambda: np.exp(z, out=exp_buf)},
        "forward": {"native": lambda: numpy_baseline_fwd(z, y), "xseqloss": lambda: xsl.sequence_cross_entropy(z, y),
                    "xseqloss_novalidate": lambda: xsl.sequence_cross_entropy(z, y, validate=False)},
        "fwd_bwd": {"native": lambda: numpy_baseline_fb(z, y), "xseqloss": lambda: xsl.value_and_grad(z, y),
                    "xseqloss_novalidate": lambda: xsl.value_and_grad(z, y, validate=False)},
    }


CONTENDERS = {"numpy": numpy_contenders, "torch": torch_contenders, "tensorflow": tf_contenders,
              "jax": jax_contenders}


def devices_for(backend: str, wanted: list[str] | None) -> list[str]:
    devs = ["cpu"]
    if backend == "torch":
        import torch
        if torch.cuda.is_available():
            devs.append("cuda")
    elif backend == "jax":
        import jax
        try:
            if jax.devices("gpu"):
                devs.append("gpu")
        except RuntimeError:
            pass
    elif backend == "tensorflow":
        import tensorflow as tf
        if tf.config.list_physical_devices("GPU"):
            devs.append("GPU")
    return [d for d in devs if wanted is None or d.lower() in [w.lower() for w in wanted]]


# -------------------------------------------------------------------------------------- memory

MEMORY_SNIPPET = r"""
import sys, json, gc, os
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
import numpy as np
from harness import cuda_peak, rss_peak
backend, which, N, T, C, device, pad = {args!r}
rng = np.random.default_rng(0)
z_np = rng.standard_normal((N, T, C), dtype=np.float32); y_np = rng.integers(0, C, (N, T))
if pad:
    y_np[:, -pad:] = -100
nbytes = z_np.nbytes
import xseqloss as xsl
if backend == 'torch':
    import torch, torch.nn.functional as F
    z = torch.tensor(z_np, device=device); y = torch.tensor(y_np, device=device); del z_np
    def run():
        w = z.detach().requires_grad_(True)
        if which == 'native':
            F.cross_entropy(w.view(-1, C), y.view(-1)).backward()
        elif which == 'xseqloss_inplace':
            # the gradient is written into the logits' own storage (which w.grad then shares)
            xsl.sequence_cross_entropy(w, y, inplace_backward=True).backward()
        else:
            xsl.sequence_cross_entropy(w, y).backward()
        return w.grad
    cuda = device.startswith('cuda')
elif backend == 'jax':
    import jax, jax.numpy as jnp, optax
    z = jnp.asarray(z_np); y = jnp.asarray(y_np, jnp.int32); del z_np
    if which == 'native':
        f = jax.jit(jax.value_and_grad(lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b).mean()))
        run = lambda: f(z, y)[1].block_until_ready()
    else:
        run = lambda: xsl.value_and_grad(z, y)[1].block_until_ready()
    cuda = False
elif backend == 'tensorflow':
    import tensorflow as tf
    z = tf.constant(z_np); y = tf.constant(y_np); del z_np
    @tf.function
    def nat(a, b):
        with tf.GradientTape() as t:
            t.watch(a); l = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=b, logits=a))
        return t.gradient(l, a)
    def ours(a, b):
        with tf.GradientTape() as t:
            t.watch(a); l = xsl.sequence_cross_entropy(a, b)
        return t.gradient(l, a)
    f = nat if which == 'native' else ours
    run = lambda: f(z, y)[0, 0, 0].numpy()  # one element read: .numpy() of the whole would copy
    # TensorFlow's CPU allocator keeps what a warm-up step allocated and RSS cannot see its reuse
    # (a warmed-up step shows ~0), so the warm-up runs the same code path on a slice just large
    # enough for xseqloss's XLA kernel (16 MB here): tracing, compiling and the runtime's one-time
    # set-up stay out of the measured step, and at most that slice's memory hides in the pools
    from xseqloss.internals import engine as _engine
    rows = min(T, -(-_engine.Engine().xla_min_elements // (N * C)) + 1)
    f(z[:, :rows], y[:, :rows])[0, 0, 0].numpy(); gc.collect()
    cuda = False
else:
    z = z_np; y = y_np
    from bench import numpy_baseline_fb
    run = (lambda: numpy_baseline_fb(z, y)[1]) if which == 'native' else (lambda: xsl.value_and_grad(z, y)[1])
    cuda = False
if backend != 'tensorflow':
    g = run(); del g; gc.collect()  # warm-up (compilation, allocator pools)
if backend == 'torch':
    # xseqloss keeps its last CPU gradient buffer for reuse (a later step would show 0 extra):
    # release it so the measured step allocates its gradient as a first step does
    import xseqloss.torch
    xseqloss.torch.empty_cache()
g, peak = cuda_peak(run) if cuda else rss_peak(run)
print(json.dumps({{"peak_extra_bytes": peak, "logits_bytes": nbytes}}))
"""


def measure_memory(backend: str, which: str, shape: tuple[int, int, int], device: str, pad: int = 0) -> float | None:
    code = MEMORY_SNIPPET.format(root=os.path.dirname(HERE), here=HERE, args=(backend, which, *shape, device, pad))
    d, why = harness.python_json(["-c", code], timeout=600, require_success=False)
    if d is None:  # report, never hide
        print(f"  memory {backend}/{which}: failed ({why})")
        return None
    return d["peak_extra_bytes"] / d["logits_bytes"]


# ----------------------------------------------------------------------------------------- main

def _alternate(fns: dict[str, Any], sync: Any, reps: int, tiny: bool, gap: float = 0.0) -> dict[str, float]:
    """Median seconds per contender, alternated. At the tiny sizes the order is reversed every other
    round, and the slow eager references (``*_eager``: hundreds of op dispatches, milliseconds) run
    in an alternation of their own beside ``native``: a call right after one of them paid 3-4x its
    cost back to back (JAX: 209 us of overhead for the contender that always followed eager optax,
    53 us in the same run's order without it), which measured the neighbour, not the call."""
    if not tiny:
        return harness.alternate(fns, sync, reps)
    fast = {k: v for k, v in fns.items() if not k.endswith("_eager")}
    slow = {k: v for k, v in fns.items() if k.endswith("_eager")}
    med = harness.alternate(fast, sync, reps, warmup=3, gap=gap, reverse_odd=True)
    if slow:
        own = harness.alternate({"native": fns["native"], **slow}, sync, max(reps // 10, 5), warmup=3, gap=gap,
                                reverse_odd=True)
        med.update({k: own[k] for k in slow})
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--devices", nargs="*", default=None)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tiny-reps", type=int, default=300)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-compiled", action="store_true", help="skip torch.compile (slow to compile)")
    ap.add_argument("--jax-sync-dispatch", action="store_true",
                    help="jax.config jax_cpu_enable_async_dispatch=False for every JAX contender: each call "
                         "runs in the calling thread (no wake-up of XLA's worker thread)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    args = ap.parse_args(argv)
    if args.jax_sync_dispatch:
        import jax
        jax.config.update("jax_cpu_enable_async_dispatch", False)

    avail = xsl.available_backends()
    backends = [b for b in (args.backends or list(CONTENDERS)) if b in avail]
    env = harness.environment(processor=True)
    env.update(backends={b: avail[b] for b in backends}, xseqloss=xsl.__version__,
               jax_sync_dispatch=bool(args.jax_sync_dispatch))
    try:
        import torch
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    results: list[dict[str, Any]] = []
    for be in backends:
        for dev in devices_for(be, args.devices):
            for size in args.sizes:
                shape = SIZES[size]
                pad = PADDED.get(size, 0)
                if pad and be != "torch":  # the other natives have no ignore value to pad with
                    continue
                print(f"[{be} {dev} {size}]", flush=True)
                c = CONTENDERS[be](shape, dev, pad)
                sync = c["sync"]
                tiny = size in TINY
                reps = args.tiny_reps if tiny else args.reps
                row: dict[str, Any] = {"backend": be, "device": dev, "size": size, "shape": shape}
                if not tiny:
                    row["floors_ms"] = harness.ms(harness.alternate(c["floors"], sync, reps))
                for phase in ("forward", "fwd_bwd"):
                    med = _alternate(c[phase], sync, reps, tiny)
                    row[phase + "_ms"] = harness.ms(med)
                    row[phase + "_ratio"] = harness.ratios(med, "native")
                    row[phase + "_overhead_us"] = {k: (v - med["native"]) * 1e6 for k, v in med.items() if k != "native"}
                    if tiny:
                        # Back to back, a call starts a microsecond after the previous one ended. JAX's
                        # CPU runtime keeps its worker thread spinning for a few microseconds after a
                        # call; any Python work longer than that before the next dispatch (xseqloss's
                        # checks, or the user's own code) meets a sleeping thread, and waking it costs
                        # ~45 us. So the tiny size is also timed with the same 50 us of Python work
                        # before every contender's call, outside the clock: what a call costs in a
                        # program that does anything between two calls.
                        med = _alternate(c[phase], sync, reps, tiny, gap=50e-6)
                        row[phase + "_after_gap_ms"] = harness.ms(med)
                        row[phase + "_after_gap_overhead_us"] = {k: (v - med["native"]) * 1e6
                                                                 for k, v in med.items() if k != "native"}
                if pad:
                    # the same call alone in a loop (nothing else allocating between steps), against
                    # its median above, where F.cross_entropy and a second head ran in between
                    med = harness.alternate({"xseqloss": c["fwd_bwd"]["xseqloss"]}, sync, reps)
                    row["fwd_bwd_alone_ms"] = harness.ms(med)
                if be == "torch" and not args.no_compiled and not tiny:
                    cc = torch_compiled(shape, dev, pad)
                    med = harness.alternate(cc["fwd_bwd_compiled"], cc["sync"], reps)
                    row["fwd_bwd_compiled_ms"] = harness.ms(med)
                if not tiny:
                    exp = row["floors_ms"]["exp"]
                    row["fwd_bwd_over_exp"] = {k: v / exp for k, v in row["fwd_bwd_ms"].items()}
                    if "exp_into_existing" in row["floors_ms"]:
                        e2 = row["floors_ms"]["exp_into_existing"]
                        row["fwd_bwd_over_exp_into_existing"] = {k: v / e2 for k, v in row["fwd_bwd_ms"].items()}
                if not tiny and not args.no_memory:
                    mem = {}
                    for which in ("native", "xseqloss") + (("xseqloss_inplace",) if be == "torch" else ()):
                        mem[which] = measure_memory(be, which, shape, dev if be == "torch" else "cpu", pad)
                    row["peak_extra_memory_x_logits"] = mem
                results.append(row)
                _print_row(row)
    harness.write_json(args.json, {"environment": env, "results": results})
    print(f"\nwrote {args.json}")
    return 0


def _fmt(d: dict[str, float], unit: str = "") -> str:
    return ", ".join(f"{k}={v:.3g}{unit}" for k, v in d.items())


def _print_row(row: dict[str, Any]) -> None:
    if "floors_ms" in row:
        print(f"  floors ms:        {_fmt(row['floors_ms'])}")
    for phase in ("forward", "fwd_bwd"):
        print(f"  {phase:8s} ms:      {_fmt(row[phase + '_ms'])}")
        print(f"  {phase:8s} ratio:   {_fmt(row[phase + '_ratio'])}  (xseqloss / native)")
        if row["size"] in TINY:
            print(f"  {phase:8s} overhead: {_fmt(row[phase + '_overhead_us'], ' us')}")
            print(f"  {phase:8s} after a 50 us gap ms: {_fmt(row[phase + '_after_gap_ms'])}")
            print(f"  {phase:8s} after a 50 us gap overhead: {_fmt(row[phase + '_after_gap_overhead_us'], ' us')}")
    if "fwd_bwd_alone_ms" in row:
        print(f"  fwd_bwd alone ms: {_fmt(row['fwd_bwd_alone_ms'])} (interleaved above: "
              f"{row['fwd_bwd_ms']['xseqloss']:.3g})")
    if "fwd_bwd_compiled_ms" in row:
        print(f"  fwd_bwd compiled ms: {_fmt(row['fwd_bwd_compiled_ms'])}")
    if "fwd_bwd_over_exp" in row:
        print(f"  fwd_bwd / exp pass: {_fmt(row['fwd_bwd_over_exp'])}")
    if "fwd_bwd_over_exp_into_existing" in row:
        print(f"  fwd_bwd / exp pass into an existing buffer: {_fmt(row['fwd_bwd_over_exp_into_existing'])}")
    if "peak_extra_memory_x_logits" in row:
        print(f"  peak extra memory (x logits): {row['peak_extra_memory_x_logits']}")


if __name__ == "__main__":
    sys.exit(main())
