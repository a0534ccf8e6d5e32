"""``linear_cross_entropy`` (API.md 8) against the float64 reference, on every backend.

A case gives hidden states, an output weight (either layout), maybe a bias, and the options of a
``sequence_cross_entropy`` case. The inputs are rounded to the case's dtype first; the reference
then forms the logits itself, in float64, from the rounded values (h @ W^T + b), runs the
independent reference on them, and takes the gradients by the chain rule in float64:
d hidden = G W, d weight = G^T h, d bias = sum G, with G the reference's gradient of the logits.
Chunk sizes that split sequences (and a chunk of one token) are part of the cases, so a bug at a
chunk boundary shows; bfloat16 at p(y) -> 1 checks the true-class gradient of the fused kernel.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from .cases import TOLERANCE, round_to
from .checks import _short, metric, record
from .reference import reference

# name, hidden layout, weight layout, bias, chunk, dtypes, options, extras
LINEAR_CASES = [
    dict(name="lin_plain", layout="NTH", chunk=3),
    dict(name="lin_bias_hc", layout="NTH", weight_layout="HC", bias=True, chunk=4),
    dict(name="lin_tnh_mix", layout="TNH", bias=True, chunk=5, mask=0.25, lengths=True, weights=True,
         class_weights=True, options=dict(label_smoothing=0.1)),
    dict(name="lin_nh_others_zloss_cap", layout="NH", shape=dict(N=9, H=6, C=7), chunk=2,
         options=dict(label_smoothing=0.2, smoothing="others", z_loss=1e-2, logit_softcap=5.0)),
    dict(name="lin_h_single", layout="H", shape=dict(H=6, C=7), chunk=1),
    dict(name="lin_soft", layout="NTH", soft=True, chunk=4, options=dict(label_smoothing=0.05)),
    dict(name="lin_none_per_sequence", layout="NTH", chunk=5, ignore=0.2,
         options=dict(reduction="per_sequence", denominator="tokens")),
    dict(name="lin_none", layout="NTH", chunk=2, weights=True, options=dict(reduction="none")),
    dict(name="lin_shift_segments", layout="NTH", shape=dict(N=2, T=9, H=5, C=6), chunk=4, segments=True,
         options=dict(shift=1, reduction="segment_mean")),
    dict(name="lin_normalizer_empty", layout="NTH", chunk=3, ignore=1.0, options=dict(empty="nan")),
    dict(name="lin_normalizer", layout="NTH", chunk=4, options=dict(normalizer=7.0, reduction="mean")),
    dict(name="lin_positions_per_position", layout="NTH", chunk=3, mask=0.3,
         options=dict(denominator="positions", reduction="per_position")),
    dict(name="lin_confident_bf16", layout="NTH", chunk=4, confident=True, dtypes=("bfloat16",)),
    # NaN and inf hidden states at the tokens that do not count (masked, ignored, past a length):
    # not used (docs/semantics.md section 9, decision 55), where autograd through the materialised
    # logits would put 0 x NaN into d weight
    dict(name="lin_garbage_uncounted", layout="NTH", shape=dict(N=3, T=6, H=5, C=7), chunk=4, mask=0.2,
         ignore=0.2, lengths=True, bias=True, garbage=True, options=dict(label_smoothing=0.1)),
]
DTYPES = ("float64", "float32", "float16", "bfloat16")


def make(spec: dict, dtype: str) -> dict:
    """The case's arrays (NumPy, rounded to ``dtype``; side arrays as the loss takes them)."""
    rng = np.random.default_rng(zlib.crc32(spec["name"].encode()))
    sizes = {**dict(N=2, T=5, H=6, C=7), **spec.get("shape", {})}
    hl = spec["layout"]
    tok = hl.replace("H", "")
    tok_shape = tuple(sizes[a] for a in tok)
    H, C = sizes["H"], sizes["C"]
    h = rng.normal(size=tuple(sizes[a] for a in hl))
    W = rng.normal(size=(C, H)) * 0.7
    b = rng.normal(size=C) if spec.get("bias") else None
    y = rng.integers(0, C, size=tok_shape)
    if spec.get("confident"):
        # p(y) near 0.9, 0.99, 0.999 (C = 7): each token its own hidden coordinate, and the weight
        # puts a margin log(p (C - 1) / (1 - p)) on the target's logit only
        n_tok = int(np.prod(tok_shape))
        hh = np.eye(n_tok)
        W = np.zeros((C, n_tok))
        W[y.reshape(-1), np.arange(n_tok)] = np.resize(np.array([4.2, 6.6, 8.9]), n_tok)
        h = hh.reshape(*tok_shape, n_tok)
        if hl.index("H") != len(hl) - 1:
            h = np.moveaxis(h, -1, hl.index("H"))
        b = None
    ignore = spec.get("ignore")
    if ignore:
        y = np.where(rng.uniform(size=tok_shape) < ignore, -100, y)
    arrays: dict[str, Any] = dict(hidden=round_to(h, dtype), weight=round_to(W, dtype))
    if b is not None:
        arrays["bias"] = round_to(b, dtype)
    if spec.get("soft"):
        q = rng.dirichlet(np.ones(C), size=tok_shape)
        arrays["targets"] = round_to(q if hl.index("H") == len(hl) - 1 else np.moveaxis(q, -1, hl.index("H")),
                                     dtype)
    else:
        arrays["targets"] = y
    if spec.get("mask"):
        arrays["mask"] = rng.uniform(size=tok_shape) >= spec["mask"]
    if spec.get("lengths"):
        arrays["lengths"] = rng.integers(1, sizes["T"] + 1, size=sizes["N"]).astype(np.int64)
    if spec.get("weights"):
        arrays["weights"] = rng.integers(0, 9, size=tok_shape) / 4.0
    if spec.get("class_weights"):
        arrays["class_weights"] = rng.integers(1, 9, size=C) / 4.0
    if spec.get("segments"):
        seg = np.zeros(tok_shape, np.int64)
        seg[:, 4:] = 1
        seg[0, 7:] = -1
        arrays["segment_ids"] = seg
    if spec.get("garbage"):  # token layout (N, T): the tokens that certainly do not count
        off = y == -100
        if "mask" in arrays:
            off = off | ~arrays["mask"]
        if "lengths" in arrays:
            off = off | (np.arange(sizes["T"])[None, :] >= arrays["lengths"][:, None])
        junk = np.where(np.arange(H) % 2, np.inf, np.nan)
        arrays["hidden"] = np.where(off[..., None], junk, arrays["hidden"])
        arrays["_not_counted"] = off  # the reference's, never passed to the loss
    if spec.get("weight_layout") == "HC":
        arrays["weight"] = arrays["weight"].T.copy()
    return arrays


def linear_reference(spec: dict, arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """(value, d hidden, d weight, d bias) in float64, through the logits formed here."""
    hl = spec["layout"]
    wl = spec.get("weight_layout", "CH")
    k = hl.index("H")
    h = np.moveaxis(arrays["hidden"], k, -1)
    if "_not_counted" in arrays:  # the hidden states of tokens that do not count are not used
        h = np.where(arrays["_not_counted"][..., None], 0.0, h)
    W = arrays["weight"] if wl == "CH" else arrays["weight"].T
    z = h @ W.T + (arrays["bias"] if "bias" in arrays else 0.0)
    L = hl.replace("H", "C")
    z = np.moveaxis(z, -1, k)
    kw = {n: arrays[n] for n in ("mask", "lengths", "weights", "class_weights", "segment_ids") if n in arrays}
    value, G = reference(z, arrays["targets"], layout=L, **kw, **spec.get("options", {}))
    G = np.moveaxis(G, k, -1)
    dh = np.moveaxis(G @ W, -1, k)
    Gf, hf = G.reshape(-1, G.shape[-1]), h.reshape(-1, h.shape[-1])
    dW = Gf.T @ hf
    if wl == "HC":
        dW = dW.T
    db = Gf.sum(0) if "bias" in arrays else None
    return value, dh, dW, db


def _call(backend: str, spec: dict, arrays: dict, dtype: str) -> tuple[np.ndarray, list]:
    """value and [d hidden, d weight, d bias or None] as float64 NumPy, by the backend's autodiff
    (NumPy: linear_value_and_grad)."""
    import xseqloss as xsl
    opts = dict(layout=spec["layout"], weight_layout=spec.get("weight_layout", "CH"), chunk_size=spec["chunk"],
                **spec.get("options", {}))
    sides = {n: arrays[n] for n in ("mask", "lengths", "weights", "class_weights", "segment_ids") if n in arrays}
    floats = ("hidden", "weight", "bias")
    if backend == "numpy":
        import ml_dtypes  # noqa: F401  (bfloat16 arrays)
        cast = (lambda a: a.astype(np.float32).astype("bfloat16")) if dtype == "bfloat16" else (lambda a: a.astype(dtype))
        h, w = cast(arrays["hidden"]), cast(arrays["weight"])
        b = cast(arrays["bias"]) if "bias" in arrays else None
        t = cast(arrays["targets"]) if arrays["targets"].dtype.kind == "f" else arrays["targets"]
        with xsl.use_backend("numpy"):
            v, grads = xsl.linear_value_and_grad(h, w, t, bias=b, **sides, **opts)
        return np.asarray(v, np.float64), [None if g is None else np.asarray(g, np.float32 if dtype == "bfloat16"
                                                                                 else None).astype(np.float64)
                                           for g in grads]
    if backend == "torch":
        import torch
        dt = getattr(torch, dtype)
        params = [torch.tensor(arrays[n], dtype=torch.float64).to(dt).requires_grad_(True) if n in arrays else None
                  for n in floats]
        t = arrays["targets"]
        t = torch.tensor(t, dtype=torch.float64).to(dt) if t.dtype.kind == "f" else torch.tensor(t)
        out = xsl.linear_cross_entropy(params[0], params[1], t, bias=params[2],
                                       **{n: torch.tensor(v) for n, v in sides.items()}, **opts)
        out.sum().backward()
        return (out.detach().double().numpy(),
                [None if p is None else p.grad.double().numpy() for p in params])
    if backend == "tensorflow":
        import tensorflow as tf
        dt = getattr(tf, dtype)
        params = [tf.cast(tf.constant(arrays[n]), dt) if n in arrays else None for n in floats]
        t = arrays["targets"]
        t = tf.cast(tf.constant(t), dt) if t.dtype.kind == "f" else tf.constant(t)
        with tf.GradientTape() as tape:
            watched = [p for p in params if p is not None]
            for p in watched:
                tape.watch(p)
            out = xsl.linear_cross_entropy(params[0], params[1], t, bias=params[2],
                                           **{n: tf.constant(v) for n, v in sides.items()}, **opts)
            total = tf.reduce_sum(out)
        g = iter(tape.gradient(total, watched))
        return (tf.cast(out, tf.float64).numpy(),
                [None if p is None else tf.cast(next(g), tf.float64).numpy() for p in params])
    import jax
    import jax.numpy as jnp
    with jax.enable_x64(dtype == "float64"):
        dt = getattr(jnp, dtype)
        params = [jnp.asarray(arrays[n].astype(np.float32 if dtype != "float64" else np.float64)).astype(dt)
                  if n in arrays else None for n in floats]
        t = arrays["targets"]
        t = jnp.asarray(t.astype(np.float32 if dtype != "float64" else np.float64)).astype(dt) if t.dtype.kind == "f" \
            else jnp.asarray(t)
        s = {n: jnp.asarray(v) for n, v in sides.items()}
        f = lambda h, w, b: xsl.linear_cross_entropy(h, w, t, bias=b, **s, **opts)  # noqa: E731
        out, vjp = jax.vjp(f, *params)
        grads = vjp(jnp.ones_like(out))
        return np.asarray(out, np.float64), [None if g is None else np.asarray(g.astype(jnp.float32 if dtype != "float64"
                                                                                          else jnp.float64), np.float64)
                                             for g in grads]


def check_linear(backend: str, device: str) -> list[dict]:
    """One "linear" record per case and dtype: value and the three gradients within the tolerance."""
    out = []
    if device != "cpu":
        return out  # the CUDA path is checked by benchmarks/gpu.py's conformance pass
    for spec in LINEAR_CASES:
        for dtype in spec.get("dtypes", DTYPES):
            arrays = make(spec, dtype)
            want = linear_reference(spec, arrays)
            tol = TOLERANCE[dtype]
            try:
                value, grads = _call(backend, spec, arrays, dtype)
                errs = [metric(value, want[0])]
                for g, r in zip(grads, want[1:]):
                    errs.append(0.0 if r is None and g is None else metric(g, r) if r is not None else math.inf)
                err, detail = max(errs), "value, d hidden, d weight, d bias: " + ", ".join(f"{e:.2g}" for e in errs)
            except Exception as exc:
                err, detail = math.inf, _short(exc)
            out.append(record(backend, device, dtype, f"{spec['name']}/{dtype}", "linear", err, tol, detail))
    return out
