"""Why TensorFlow's fused output layer needs 1,024-token chunks (docs/performance.md, issue 13,
decision 58): a ``tf.while_loop`` of only the three chunk matmuls and the in-place d weight add,
no loss at all, against the naive forward+backward of linear_bench.py, at several chunk sizes, ratios per round.

    python benchmarks/linear_tf_probe.py                 # 8192 x 1024 x 32000 float32, chunks 512 1024 8192

If the bare matmuls at the fused layer's chunk size already take more than the naive computation,
no change to the loss itself can meet the goal at that chunk size. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402
from linear_bench import _data, tf_contenders  # noqa: E402


def matmuls_only(T: int, H: int, C: int, chunk: int) -> Callable[[], Any]:
    import tensorflow as tf
    hn, wn, _ = _data(T, H, C)
    h, w = tf.constant(hn), tf.constant(wn)
    n = T // chunk

    @tf.function
    def f(h: Any, w: Any) -> Any:
        dw0 = tf.raw_ops.Empty(shape=tf.shape(w), dtype=tf.float32, init=True)
        dhs = tf.TensorArray(tf.float32, size=n)

        def body(i: Any, dhs: Any, dw: Any) -> Any:
            hc = h[i * chunk:(i + 1) * chunk]
            g = tf.matmul(hc, w, transpose_b=True)  # the logits, standing in for their gradient
            dhs = dhs.write(i, tf.matmul(g, w))
            dw = tf.raw_ops.InplaceAdd(x=dw, i=tf.range(C), v=tf.matmul(g, hc, transpose_a=True))
            return i + 1, dhs, dw
        _, dhs, dw = tf.while_loop(lambda i, *_: i < n, body, (0, dhs, dw0), parallel_iterations=1)
        return dhs.concat(), dw

    def run() -> Any:
        g = f(h, w)
        return g[0][0, 0].numpy(), g[1][0, 0].numpy()
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--chunks", type=int, nargs="*", default=[512, 1024, 8192])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    T, H, C = args.tokens, args.hidden, args.classes
    fns = {"naive": tf_contenders(T, H, C)["naive"]}
    fns.update({f"matmuls_only@{c}": matmuls_only(T, H, C, c) for c in args.chunks if T % c == 0})
    times = harness.rounds(fns, reps=args.reps, reverse_odd=True)
    ratio = dict(harness.round_ratios(times, "naive"), naive=1.0)
    print(f"[tensorflow] {T} x {H} x {C} float32: ratio to the naive fwd+bwd (median of each round's)")
    for k, v in times.items():
        print(f"  {k:22s} {statistics.median(v) * 1e3:8.0f} ms   {ratio[k]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
