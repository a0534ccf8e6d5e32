"""Benchmark of the fused output layer: ``xsl.linear_cross_entropy`` against the naive computation
(materialised logits ``h @ w.T`` + the framework's best native loss, forward and backward) and the
peers that run here, with ratios taken in one run (the machines are shared and noisy).

* speed: forward+backward (d hidden and d weight), contenders interleaved round by round (order
  reversed every other round); the ratio is the median of each round's ratio to the naive time
  (the timing, memory and JSON machinery is benchmarks/harness.py's);
  PyTorch also against ``F.linear_cross_entropy`` (reference path, and its chunked path through
  ``LinearCrossEntropyOptions``), ``torch.compile`` of the naive code and Cut Cross-Entropy's
  ``torch_compile`` implementation when the ``cut-cross-entropy`` package is installed;
* memory: peak extra memory of forward+backward beyond the inputs and the returned gradients, in
  multiples of the logits' size L, each in a fresh subprocess (peak RSS after ``clear_refs``), at
  the given token count and at twice it (the fused peak must not grow with the tokens).
  TensorFlow's from its CPU allocator's own peak of bytes in use (``get_memory_info``): that
  allocator keeps freed blocks and hands them out again, which RSS cannot see (its RSS figure,
  which undercounted the peak by 0.06 L, is kept in the JSON as ``rss_x_L``).

    python benchmarks/linear_bench.py                              # 8192 x 1024 x 32000 float32
    python benchmarks/linear_bench.py --backends torch --tokens 2048 --reps 3

Nothing here is a test: it prints a table and writes JSON (benchmarks/results/linear-cpu.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# XSEQLOSS_BENCH_ROOT: the package tree to measure (benchmarks/ab.py times two trees alternately)
sys.path.insert(0, os.environ.get("XSEQLOSS_BENCH_ROOT", ROOT))
sys.path.insert(0, HERE)

import harness  # noqa: E402
import xseqloss as xsl  # noqa: E402


def _data(T: int, H: int, C: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, H), dtype=np.float32)
    w = rng.standard_normal((C, H), dtype=np.float32) * np.float32(1.0 / np.sqrt(H))
    y = rng.integers(0, C, (T,))
    return h, w, y


# ------------------------------------------------------------------------------------ speed

def torch_contenders(T: int, H: int, C: int) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F
    hn, wn, yn = _data(T, H, C)
    h = torch.tensor(hn, requires_grad=True)
    w = torch.tensor(wn, requires_grad=True)
    y = torch.tensor(yn)

    def step(loss_fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            loss_fn().backward()
            g = (h.grad, w.grad)
            h.grad = w.grad = None
            return g
        return run

    naive_c = torch.compile(lambda a, b, c: F.cross_entropy(a @ b.t(), c), fullgraph=True)
    out = {
        "naive": step(lambda: F.cross_entropy(h @ w.t(), y)),
        "xseqloss": step(lambda: xsl.linear_cross_entropy(h, w, y, layout="NH")),
        "torch_compile_naive": step(lambda: naive_c(h, w, y)),
    }
    if hasattr(F, "linear_cross_entropy"):
        out["F.linear_cross_entropy"] = step(lambda: F.linear_cross_entropy(h, w, y))
        opts = torch.nn.LinearCrossEntropyOptions()
        out["F.linear_cross_entropy_chunked"] = step(lambda: F.linear_cross_entropy(h, w, y, options=opts))
        opts_a = torch.nn.LinearCrossEntropyOptions(acc_policy="accurate")
        out["F.linear_cross_entropy_chunked_accurate"] = step(
            lambda: F.linear_cross_entropy(h, w, y, options=opts_a))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        out["cce_torch_compile"] = step(lambda: cce(h, w, y, impl="torch_compile"))
    except ImportError:
        print("  cut-cross-entropy is not installed: its row is left out")
    return out


def jax_contenders(T: int, H: int, C: int) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp
    import optax
    hn, wn, yn = _data(T, H, C)
    h, w, y = jnp.asarray(hn), jnp.asarray(wn), jnp.asarray(yn, jnp.int32)
    naive = jax.jit(jax.value_and_grad(
        lambda h, w: optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean(), argnums=(0, 1)))
    ours = jax.jit(jax.value_and_grad(lambda h, w: xsl.linear_cross_entropy(h, w, y, layout="NH"), argnums=(0, 1)))
    quick = jax.jit(jax.value_and_grad(lambda h, w: xsl.linear_cross_entropy(h, w, y, layout="NH", validate=False),
                                       argnums=(0, 1)))
    return {"naive": lambda: jax.block_until_ready(naive(h, w)),
            "xseqloss": lambda: jax.block_until_ready(ours(h, w)),
            "xseqloss_validate_false": lambda: jax.block_until_ready(quick(h, w))}


def tf_contenders(T: int, H: int, C: int, weight_layout: str = "CH") -> dict[str, Callable[[], Any]]:
    import tensorflow as tf
    hn, wn, yn = _data(T, H, C)
    hc = weight_layout == "HC"  # a Keras Dense kernel's (H, C)
    h, w, y = tf.constant(hn), tf.constant(np.ascontiguousarray(wn.T) if hc else wn), tf.constant(yn)

    def make(loss: Callable[[Any, Any], Any], jit: bool = False) -> Callable[[], Any]:
        @tf.function(jit_compile=jit)
        def f(h: Any, w: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch([h, w])
                value = loss(h, w)
            return tape.gradient(value, [h, w])

        def run() -> Any:
            g = f(h, w)
            _ = g[0][0, 0].numpy(), g[1][0, 0].numpy()  # one element each: .numpy() would copy
            return g
        return run

    naive = lambda h, w: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(  # noqa: E731
        labels=y, logits=tf.matmul(h, w, transpose_b=not hc)))
    ours = lambda h, w: xsl.linear_cross_entropy(h, w, y, layout="NH", weight_layout=weight_layout)  # noqa: E731
    return {"naive": make(naive), "xseqloss": make(ours), "naive_xla": make(naive, True), "xseqloss_xla": make(ours, True)}


def numpy_naive(h: np.ndarray, w: np.ndarray, y: np.ndarray) -> Any:
    """The materialised logits, a careful softmax in place, the analytic gradient, two matmuls."""
    n = y.size
    z = h @ w.T
    zy = z[np.arange(n), y].copy()
    m = z.max(-1, keepdims=True)
    np.subtract(z, m, out=z)
    np.exp(z, out=z)
    s = z.sum(-1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - zy))
    z /= s
    z[np.arange(n), y] -= 1.0
    z /= n
    return loss, z @ w, z.T @ h


def numpy_contenders(T: int, H: int, C: int) -> dict[str, Callable[[], Any]]:
    h, w, y = _data(T, H, C)
    return {"naive": lambda: numpy_naive(h, w, y),
            "xseqloss": lambda: xsl.linear_value_and_grad(h, w, y, layout="NH")}


CONTENDERS = {"numpy": numpy_contenders, "torch": torch_contenders, "tensorflow": tf_contenders,
              "jax": jax_contenders}


# ----------------------------------------------------------------------------------- memory

MEMORY_SNIPPET = r"""
import sys, json, gc
import numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
backend, which, T, H, C, layout = {args!r}
from harness import rss_peak, tf_allocator_peak, tf_allocator_start
from linear_bench import _data, numpy_naive
import xseqloss as xsl
hn, wn, yn = _data(T, H, C)
WARM = 64  # the warm-up (tracing, compiling, one-time set-up) runs on 64 tokens: its buffers are small
if backend == 'torch':
    import torch, torch.nn.functional as F
    h = torch.tensor(hn); w = torch.tensor(wn); y = torch.tensor(yn); del hn, wn
    def make(hh, yy):
        def run():
            a = hh.detach().requires_grad_(True); b = w.detach().requires_grad_(True)
            if which == 'naive':
                F.cross_entropy(a @ b.t(), yy).backward()
            else:
                xsl.linear_cross_entropy(a, b, yy, layout='NH').backward()
            return a.grad, b.grad
        return run
    warm, run = make(h[:WARM], y[:WARM]), make(h, y)
elif backend == 'jax':
    import jax, jax.numpy as jnp, optax
    h = jnp.asarray(hn); w = jnp.asarray(wn); y = jnp.asarray(yn, jnp.int32); del hn, wn
    if which == 'naive':
        f = lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean()
    else:
        f = lambda h, w, y: xsl.linear_cross_entropy(h, w, y, layout='NH')
    g = jax.jit(jax.grad(f, argnums=(0, 1)))
    compiled = g.lower(h, w, y).compile()  # compiled ahead: the compiler's memory is not the loss's
    warm = lambda: jax.block_until_ready(g(h[:WARM], w, y[:WARM]))
    run = lambda: jax.block_until_ready(compiled(h, w, y))
elif backend == 'tensorflow':
    import tensorflow as tf
    h = tf.constant(hn); w = tf.constant(np.ascontiguousarray(wn.T) if layout == 'HC' else wn); y = tf.constant(yn)
    del hn, wn
    @tf.function(reduce_retracing=False)
    def f(h, w, y):
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            if which == 'naive':
                l = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=tf.matmul(h, w, transpose_b=layout == 'CH')))
            else:
                l = xsl.linear_cross_entropy(h, w, y, layout='NH', weight_layout=layout)
        return tape.gradient(l, [h, w])
    f.get_concrete_function(h, w, y)  # traced ahead, like the other backends' compilation
    def call(hh, yy):
        gg = f(hh, w, yy); _ = gg[0][0, 0].numpy(), gg[1][0, 0].numpy(); return gg
    warm, run = (lambda: call(h[:WARM], y[:WARM])), (lambda: call(h, y))
else:
    h, w, y = hn, wn, yn
    def run():
        if which == 'naive':
            return numpy_naive(h, w, y)[1:]
        return xsl.linear_value_and_grad(h, w, y, layout='NH')[1][:2]
    warm = lambda: (numpy_naive(h[:WARM], w, y[:WARM]) if which == 'naive'
                    else xsl.linear_value_and_grad(h[:WARM], w, y[:WARM], layout='NH'))
out = warm(); del out; gc.collect()
start = {{}}
# TensorFlow's CPU allocator caches freed blocks: RSS misses their reuse, its own count does not
before = (lambda: start.update(alloc0=tf_allocator_start())) if backend == 'tensorflow' else None
grads, rss_extra = rss_peak(run, before)
grad_bytes = T * H * 4 + C * H * 4
out = {{"rss_peak_extra_bytes": rss_extra - grad_bytes, "logits_bytes": T * C * 4}}
if backend == 'tensorflow':
    out["allocator_peak_extra_bytes"] = tf_allocator_peak() - start["alloc0"] - grad_bytes
out["peak_extra_bytes"] = out.get("allocator_peak_extra_bytes", out["rss_peak_extra_bytes"])
print(json.dumps(out))
"""


def measure_memory(backend: str, which: str, T: int, H: int, C: int,
                   weight_layout: str = "CH") -> dict[str, float] | None:
    code = MEMORY_SNIPPET.format(root=ROOT, here=HERE, args=(backend, which, T, H, C, weight_layout))
    d, why = harness.python_json(["-c", code], timeout=900)
    if d is None:  # reported, never hidden
        print(f"  memory {backend}/{which}/T={T}: failed ({why})")
    return d


# ------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192],
                    help="token counts, each measured in turn (the goal holds from 2,048 to 16,384)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weight-layout", choices=("CH", "HC"), default="CH",
                    help='"HC" (a Keras Dense kernel): TensorFlow only')
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "linear-cpu.json"))
    args = ap.parse_args(argv)
    H, C = args.hidden, args.classes
    avail = xsl.available_backends()
    backends = [b for b in (args.backends or list(CONTENDERS)) if b in avail]
    if args.weight_layout == "HC" and backends != ["tensorflow"]:
        ap.error('--weight-layout HC is measured for --backends tensorflow only')
    env = harness.environment()
    env.update(backends={b: avail[b] for b in backends}, xseqloss=xsl.__version__,
               size={"tokens": args.tokens, "hidden": H, "classes": C, "weight_layout": args.weight_layout})
    results: list[dict[str, Any]] = []
    for be, T in [(be, T) for be in backends for T in args.tokens]:
        row: dict[str, Any] = {"backend": be, "tokens": T}
        print(f"[{be}] tokens x hidden x classes = {T} x {H} x {C} float32", flush=True)
        if not args.no_speed:
            fns = CONTENDERS[be](T, H, C, **({"weight_layout": "HC"} if args.weight_layout == "HC" else {}))
            times = harness.rounds(fns, reps=args.reps, reverse_odd=True)
            med = harness.medians(times)
            row["fwd_bwd_ms"] = harness.ms(med)
            row["fwd_bwd_ms_rounds"] = {k: [round(x * 1e3) for x in v] for k, v in times.items()}
            # each round's ratio to the naive time of the same round, then their median: the
            # machine's speed drifts by up to 2x over minutes, and a round's contenders are
            # seconds apart
            row["fwd_bwd_ratio"] = harness.round_ratios(times, "naive")
            row["fwd_bwd_ratio_of_medians"] = harness.ratios(med, "naive")
            print("  fwd+bwd ms:    " + ", ".join(f"{k}={v * 1e3:.0f}" for k, v in med.items()))
            print("  / naive:       " + ", ".join(f"{k}={v:.3f}" for k, v in row["fwd_bwd_ratio"].items())
                  + "   (median of each round's ratio)")
            del fns
        if not args.no_memory:
            mem: dict[str, Any] = {}
            for which, tokens in (("naive", T), ("xseqloss", T), ("xseqloss", 2 * T)):
                d = measure_memory(be, which, tokens, H, C, args.weight_layout)
                if d is not None:
                    mem[f"{which}@{tokens}"] = {"peak_extra_MB": d["peak_extra_bytes"] / 2**20,
                                                "x_L": d["peak_extra_bytes"] / (T * C * 4),
                                                "measured_by": "allocator" if "allocator_peak_extra_bytes" in d
                                                else "rss", "rss_x_L": d["rss_peak_extra_bytes"] / (T * C * 4)}
            row["peak_extra_memory"] = mem
            print("  peak extra memory (x L of the %d-token logits): " % T
                  + ", ".join(f"{k}={v['x_L']:.3f} ({v['peak_extra_MB']:.0f} MB)" for k, v in mem.items()),
                  flush=True)
        results.append(row)
    harness.write_json(args.json, {"environment": env, "results": results})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
