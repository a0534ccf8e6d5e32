"""Benchmark of the per-token outputs (API.md 11): ``xsl.token_stats`` and ``xsl.linear_token_stats``
against what users write today, forward+backward of "log_prob" and "entropy" at a temperature with
both upstream gradients at once (a PPO step with an entropy bonus), ratios taken in one run.

* ``logits``: tokens x classes (8,192 x 32,000 float32). The contender is the composition users
  write in each framework, the pattern of TRL's ``selective_log_softmax`` + ``entropy_from_logits``
  (log_softmax, gather, exp, product, sum; the logits divided by T first), under the framework's
  autodiff (NumPy: the same composition with its analytic gradient written out). PyTorch also
  against TRL's own chunked helpers as published, and the composition under ``torch.compile``;
  JAX and TensorFlow under ``jax.jit`` / ``tf.function``.
* ``linear``: tokens x hidden x classes (8,192 x 1,024 x 32,000 float32) against the naive
  materialised computation (``h @ w.T``, then the composition) and, on PyTorch, Liger-Kernel's
  fused linear scaled cross-entropy (its chunked torch fallback: it runs on CPU) when importable
  (``--liger PATH`` adds a folder holding ``liger_kernel`` to the path).
* memory: peak extra memory of forward+backward in multiples of the logits' size L, in a fresh
  process (peak RSS after ``clear_refs``; TensorFlow's allocator's own peak), reported both in total
  and beyond the returned gradients (the gradient of the logits is itself 1.0 L).

    python benchmarks/stats_bench.py                          # both parts, every backend
    python benchmarks/stats_bench.py --parts logits --backends torch jax --reps 5

Nothing here is a test: it prints a table and writes JSON (benchmarks/results/stats-cpu.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import harness  # noqa: E402
import xseqloss as xsl  # noqa: E402

TEMP = 0.7


def _logits_data(T: int, C: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((T, C), dtype=np.float32) * 2
    y = rng.integers(0, C, (T,))
    g1 = rng.standard_normal(T).astype(np.float32)  # the upstream gradients of log_prob and entropy
    g2 = rng.standard_normal(T).astype(np.float32)
    return z, y, g1, g2


def _linear_data(T: int, H: int, C: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, H), dtype=np.float32)
    w = rng.standard_normal((C, H), dtype=np.float32) * np.float32(1.0 / np.sqrt(H))
    y = rng.integers(0, C, (T,))
    g1 = rng.standard_normal(T).astype(np.float32)
    g2 = rng.standard_normal(T).astype(np.float32)
    return h, w, y, g1, g2


# ------------------------------------------------------------------------- the compositions

def numpy_composition(z: np.ndarray, y: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> tuple[Any, ...]:
    """log_softmax, gather, exp, product, sum, and the gradient of g1 . log_prob + g2 . entropy
    written out: d u = g1 (onehot - p) - g2 p (log p + H); d z = d u / T."""
    u = z / np.float32(TEMP)
    lp = u - u.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    log_prob = np.take_along_axis(lp, y[:, None], -1)[:, 0]
    p = np.exp(lp)
    entropy = -(p * lp).sum(-1)
    du = -(g2[:, None] * p) * (lp + entropy[:, None]) - g1[:, None] * p
    du[np.arange(y.size), y] += g1
    return log_prob, entropy, du / np.float32(TEMP)


def numpy_linear_naive(h: np.ndarray, w: np.ndarray, y: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> tuple[Any, ...]:
    lp, ent, dz = numpy_composition(h @ w.T, y, g1, g2)
    return lp, ent, dz @ w, dz.T @ h


def torch_composition(torch: Any, z: Any, y: Any) -> tuple[Any, Any]:
    lp = torch.log_softmax(z / TEMP, -1)
    return lp.gather(-1, y[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


def torch_trl(torch: Any, z: Any, y: Any) -> tuple[Any, Any]:
    """TRL's published helpers (trl/trainer/utils.py), logits divided by T first as its trainers do:
    ``selective_log_softmax`` (float32: gather, then a logsumexp row by row) and
    ``entropy_from_logits`` (chunks of 128 rows: log_softmax, exp, product, sum)."""
    u = z / TEMP
    selected = torch.gather(u, -1, y[:, None]).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, -1) for row in u])
    ents = []
    for chunk in u.split(128, 0):
        logps = torch.log_softmax(chunk, -1)
        ents.append(-(torch.exp(logps) * logps).sum(-1))
    return selected - lse, torch.cat(ents)


# ---------------------------------------------------------------------- logits: contenders

def torch_logits(T: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    import torch
    zn, yn, g1n, g2n = _logits_data(T, C)
    z = torch.tensor(zn, requires_grad=True)
    y, g1, g2 = torch.tensor(yn), torch.tensor(g1n), torch.tensor(g2n)

    def step(outs: Callable[[], tuple[Any, Any]]) -> Callable[[], Any]:
        def run() -> Any:
            lp, ent = outs()
            torch.autograd.backward([lp, ent], [g1, g2])
            g, z.grad = z.grad, None
            return g
        return run

    fns = {"composition": step(lambda: torch_composition(torch, z, y)),
           "trl_helpers": step(lambda: torch_trl(torch, z, y))}
    if compiled:
        comp = torch.compile(lambda a, b: torch_composition(torch, a, b), fullgraph=True)
        fns["composition_torch_compile"] = step(lambda: comp(z, y))
    fns["xseqloss"] = step(lambda: tuple(xsl.token_stats(z, y, temperature=TEMP, layout="NC"))[:2])
    return fns


def jax_logits(T: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp
    zn, yn, g1n, g2n = _logits_data(T, C)
    z, y, g1, g2 = jnp.asarray(zn), jnp.asarray(yn, jnp.int32), jnp.asarray(g1n), jnp.asarray(g2n)

    def comp(z: Any) -> Any:
        lp = jax.nn.log_softmax(z / TEMP, -1)
        return jnp.take_along_axis(lp, y[:, None], -1)[:, 0], -(jnp.exp(lp) * lp).sum(-1)

    def ours(z: Any) -> Any:
        s = xsl.token_stats(z, y, temperature=TEMP, layout="NC")
        return s.log_prob, s.entropy

    def make(f: Callable) -> Callable[[], Any]:
        @jax.jit
        def step(z: Any) -> Any:
            out, vjp = jax.vjp(f, z)
            return out, vjp((g1, g2))[0]
        return lambda: jax.block_until_ready(step(z))

    return {"composition": make(comp), "xseqloss": make(ours)}


def tf_logits(T: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    import tensorflow as tf
    zn, yn, g1n, g2n = _logits_data(T, C)
    z, y, g1, g2 = tf.constant(zn), tf.constant(yn), tf.constant(g1n), tf.constant(g2n)

    def comp(z: Any) -> Any:
        lp = tf.nn.log_softmax(z / TEMP, -1)
        return tf.gather(lp, y, batch_dims=1), -tf.reduce_sum(tf.exp(lp) * lp, -1)

    def ours(z: Any) -> Any:
        s = xsl.token_stats(z, y, temperature=TEMP, layout="NC")
        return s.log_prob, s.entropy

    def make(f: Callable, jit: bool = False) -> Callable[[], Any]:
        @tf.function(jit_compile=jit)
        def step(z: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(z)
                lp, ent = f(z)
            return tape.gradient([lp, ent], z, output_gradients=[g1, g2])

        def run() -> Any:
            g = step(z)
            _ = g[0, 0].numpy()  # one element: .numpy() of the whole would copy
            return g
        return run

    return {"composition": make(comp), "xseqloss": make(ours), "composition_xla": make(comp, True),
            "xseqloss_xla": make(ours, True)}


def numpy_logits(T: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    z, y, g1, g2 = _logits_data(T, C)

    def ours() -> Any:
        s = xsl.token_stats(z, y, temperature=TEMP, layout="NC")
        return s, xsl.token_stats_vjp(z, y, {"log_prob": g1, "entropy": g2}, temperature=TEMP, layout="NC")

    return {"composition": lambda: numpy_composition(z, y, g1, g2), "xseqloss": ours}


# ---------------------------------------------------------------------- linear: contenders

def torch_linear(T: int, H: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    import torch
    hn, wn, yn, g1n, g2n = _linear_data(T, H, C)
    h, w = torch.tensor(hn, requires_grad=True), torch.tensor(wn, requires_grad=True)
    y, g1, g2 = torch.tensor(yn), torch.tensor(g1n), torch.tensor(g2n)

    def step(outs: Callable[[], tuple[Any, Any]]) -> Callable[[], Any]:
        def run() -> Any:
            lp, ent = outs()
            torch.autograd.backward([lp, ent], [g1, g2])
            g = (h.grad, w.grad)
            h.grad = w.grad = None
            return g
        return run

    fns = {"naive": step(lambda: torch_composition(torch, h @ w.t(), y)),
           "xseqloss": step(lambda: tuple(xsl.linear_token_stats(h, w, y, temperature=TEMP, layout="NH"))[:2])}
    try:
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction as L

        def liger() -> tuple[Any, Any]:
            nll, ent = L.apply(h, w, y, temperature=TEMP, return_entropy=True)
            return -nll, ent
        fns["liger_fallback"] = step(liger)
    except ImportError as exc:
        print(f"  liger-kernel is not importable ({exc}): its row is left out")
    return fns


def jax_linear(T: int, H: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp
    hn, wn, yn, g1n, g2n = _linear_data(T, H, C)
    h, w, y = jnp.asarray(hn), jnp.asarray(wn), jnp.asarray(yn, jnp.int32)
    g1, g2 = jnp.asarray(g1n), jnp.asarray(g2n)

    def naive(h: Any, w: Any) -> Any:
        lp = jax.nn.log_softmax((h @ w.T) / TEMP, -1)
        return jnp.take_along_axis(lp, y[:, None], -1)[:, 0], -(jnp.exp(lp) * lp).sum(-1)

    def ours(h: Any, w: Any) -> Any:
        s = xsl.linear_token_stats(h, w, y, temperature=TEMP, layout="NH")
        return s.log_prob, s.entropy

    def make(f: Callable) -> Callable[[], Any]:
        @jax.jit
        def step(h: Any, w: Any) -> Any:
            out, vjp = jax.vjp(f, h, w)
            return out, vjp((g1, g2))
        return lambda: jax.block_until_ready(step(h, w))

    return {"naive": make(naive), "xseqloss": make(ours)}


def tf_linear(T: int, H: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    import tensorflow as tf
    hn, wn, yn, g1n, g2n = _linear_data(T, H, C)
    h, w, y, g1, g2 = (tf.constant(a) for a in (hn, wn, yn, g1n, g2n))

    def naive(h: Any, w: Any) -> Any:
        lp = tf.nn.log_softmax(tf.matmul(h, w, transpose_b=True) / TEMP, -1)
        return tf.gather(lp, y, batch_dims=1), -tf.reduce_sum(tf.exp(lp) * lp, -1)

    def ours(h: Any, w: Any) -> Any:
        s = xsl.linear_token_stats(h, w, y, temperature=TEMP, layout="NH")
        return s.log_prob, s.entropy

    def make(f: Callable) -> Callable[[], Any]:
        @tf.function
        def step(h: Any, w: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch([h, w])
                lp, ent = f(h, w)
            return tape.gradient([lp, ent], [h, w], output_gradients=[g1, g2])

        def run() -> Any:
            g = step(h, w)
            _ = g[0][0, 0].numpy(), g[1][0, 0].numpy()
            return g
        return run

    return {"naive": make(naive), "xseqloss": make(ours)}


def numpy_linear(T: int, H: int, C: int, compiled: bool) -> dict[str, Callable[[], Any]]:
    h, w, y, g1, g2 = _linear_data(T, H, C)

    def ours() -> Any:
        s = xsl.linear_token_stats(h, w, y, temperature=TEMP, layout="NH")
        return s, xsl.linear_token_stats_vjp(h, w, y, {"log_prob": g1, "entropy": g2}, temperature=TEMP, layout="NH")

    return {"naive": lambda: numpy_linear_naive(h, w, y, g1, g2), "xseqloss": ours}


CONTENDERS = {
    "logits": {"numpy": numpy_logits, "torch": torch_logits, "tensorflow": tf_logits, "jax": jax_logits},
    "linear": {"numpy": numpy_linear, "torch": torch_linear, "tensorflow": tf_linear, "jax": jax_linear},
}
REFERENCE = {"logits": "composition", "linear": "naive"}


# ----------------------------------------------------------------------------------- memory

MEMORY_SNIPPET = r"""
import sys, json, gc
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
part, backend, which, sizes = {args!r}
from harness import rss_peak, tf_allocator_peak, tf_allocator_start
import stats_bench as sb
if part == 'logits':
    T, C = sizes
    small = sb.CONTENDERS[part][backend](64, C, False)[which]
    full = sb.CONTENDERS[part][backend](T, C, False)[which]
    grad_bytes = T * C * 4
else:
    T, H, C = sizes
    small = sb.CONTENDERS[part][backend](64, H, C, False)[which]
    full = sb.CONTENDERS[part][backend](T, H, C, False)[which]
    grad_bytes = T * H * 4 + C * H * 4
out = small(); out = full(); del out; gc.collect()   # warm-up: tracing, compiling, allocator pools
if backend == 'torch':
    import xseqloss.torch
    xseqloss.torch.empty_cache()   # the reusable gradient buffer: the measured step allocates it
start = {{}}
before = (lambda: start.update(alloc0=tf_allocator_start())) if backend == 'tensorflow' else None
grads, rss_extra = rss_peak(full, before)
res = {{"rss_peak_extra_bytes": rss_extra, "grad_bytes": grad_bytes, "logits_bytes": T * C * 4}}
if backend == 'tensorflow':
    res["allocator_peak_extra_bytes"] = tf_allocator_peak() - start["alloc0"]
res["peak_extra_bytes"] = res.get("allocator_peak_extra_bytes", res["rss_peak_extra_bytes"])
print(json.dumps(res))
"""


def measure_memory(part: str, backend: str, which: str, sizes: tuple[int, ...]) -> dict | None:
    code = MEMORY_SNIPPET.format(root=ROOT, here=HERE, args=(part, backend, which, sizes))
    d, why = harness.python_json(["-c", code], timeout=900)
    if d is None:  # reported, never hidden
        print(f"  memory {part}/{backend}/{which}: failed ({why})")
    return d


# ------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["logits", "linear"], choices=["logits", "linear"])
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compiled", action="store_true", help="skip torch.compile of the composition")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--liger", default=None, help="a folder holding the liger_kernel package")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "stats-cpu.json"))
    args = ap.parse_args(argv)
    if args.liger:
        sys.path.insert(0, args.liger)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (args.liger, os.environ.get("PYTHONPATH")) if p)
    T, H, C = args.tokens, args.hidden, args.classes
    avail = xsl.available_backends()
    env = harness.environment()
    env.update(backends={b: avail[b] for b in avail}, xseqloss=xsl.__version__, temperature=TEMP,
               size={"tokens": T, "hidden": H, "classes": C})
    results: list[dict[str, Any]] = []
    for part in args.parts:
        for be in [b for b in (args.backends or list(CONTENDERS[part])) if b in avail]:
            sizes = (T, C) if part == "logits" else (T, H, C)
            print(f"[{part} {be}] " + " x ".join(map(str, sizes)) + " float32", flush=True)
            fns = CONTENDERS[part][be](*sizes, not args.no_compiled)
            ref = REFERENCE[part]
            times = harness.rounds(fns, reps=args.reps, reverse_odd=True)
            med = harness.medians(times)
            row: dict[str, Any] = {"part": part, "backend": be, "sizes": sizes,
                                   "fwd_bwd_ms": harness.ms(med),
                                   "fwd_bwd_ms_rounds": {k: [round(x * 1e3) for x in v] for k, v in times.items()},
                                   "ratio_to_" + ref: harness.round_ratios(times, ref)}
            print("  fwd+bwd ms: " + ", ".join(f"{k}={v * 1e3:.0f}" for k, v in med.items()))
            print(f"  / {ref}: " + ", ".join(f"{k}={v:.3f}" for k, v in row["ratio_to_" + ref].items())
                  + "   (median of each round's ratio)")
            if ref in med and "xseqloss" in med:
                print(f"  {ref} / xseqloss: {med[ref] / med['xseqloss']:.2f}x")
            del fns
            if not args.no_memory:
                mem = {}
                for which in (ref, "xseqloss"):
                    d = measure_memory(part, be, which, sizes)
                    if d is not None:
                        L = d["logits_bytes"]
                        mem[which] = {"x_L": d["peak_extra_bytes"] / L,
                                      "beyond_grads_x_L": (d["peak_extra_bytes"] - d["grad_bytes"]) / L,
                                      "measured_by": "allocator" if "allocator_peak_extra_bytes" in d else "rss"}
                row["peak_extra_memory"] = mem
                print("  peak extra memory (x L): " + ", ".join(
                    f"{k}={v['x_L']:.3f} ({v['beyond_grads_x_L']:.3f} beyond the gradients)" for k, v in mem.items()),
                    flush=True)
            results.append(row)
    harness.write_json(args.json, {"environment": env, "results": results})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
