"""``xseqloss.pool`` against its own float64 reference (API.md 4 and 7.4), on every backend.

The reference walks each sequence with plain loops: it picks the counted steps (t < lengths[n] and
mask[n, t]), and for "attention" takes the softmax of their scores by hand. The gradient of
sum(cotangent * pooled) with respect to the hidden states (and the scores) is written out
analytically. Padding holds NaN in the hidden states and the scores: it must never reach the
result or the gradient. Each case also runs with the hidden states as a list of (length, H)
arrays (and on PyTorch as a PackedSequence), which mean the same padded batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .checks import _short, metric, record
from .cases import TOLERANCE

POOL_CASES = [
    dict(name="pool_attention", N=3, T=5, H=4, method="attention"),
    dict(name="pool_attention_mask", N=3, T=5, H=4, method="attention", mask=True),
    dict(name="pool_attention_empty", N=2, T=4, H=3, method="attention", empty=True),
    dict(name="pool_last", N=3, T=5, H=4, method="last"),
    dict(name="pool_mean_mask", N=3, T=5, H=4, method="mean", mask=True),
    dict(name="pool_max", N=2, T=6, H=3, method="max"),
]
FORMS = ("padded", "list", "packed")


def make(spec: dict) -> dict:
    rng = np.random.default_rng(len(spec["name"]) * 31 + spec["T"])
    N, T, H = spec["N"], spec["T"], spec["H"]
    lengths = rng.integers(1, T + 1, size=N)
    lengths[-1] = T
    if spec.get("empty"):
        lengths[0] = 0
    h = rng.normal(size=(N, T, H))
    scores = rng.normal(size=(N, T)) * 2.0
    mask = rng.uniform(size=(N, T)) > 0.3 if spec.get("mask") else None
    real = np.arange(T)[None, :] < lengths[:, None]
    counted = real if mask is None else real & mask
    h = np.where(real[..., None], h, np.nan)  # padding holds garbage
    scores = np.where(real, scores, np.nan)
    ct = rng.integers(-4, 5, size=(N, H)) / 4.0
    return dict(h=h, scores=scores, lengths=lengths.astype(np.int64), mask=mask, counted=counted, ct=ct)


def reference(spec: dict, arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pooled (N, H), d sum(ct * pooled) / d hidden, d ... / d scores)."""
    h, s, counted, ct = arrays["h"], arrays["scores"], arrays["counted"], arrays["ct"]
    N, T, H = h.shape
    out = np.zeros((N, H))
    gh = np.zeros((N, T, H))
    gs = np.zeros((N, T))
    for n in range(N):
        steps = [t for t in range(T) if counted[n, t]]
        if not steps:
            continue
        method = spec["method"]
        if method == "attention":
            m = max(float(s[n, t]) for t in steps)
            e = {t: math.exp(float(s[n, t]) - m) for t in steps}
            z = math.fsum(e.values())
            a = {t: e[t] / z for t in steps}
            for j in range(H):
                out[n, j] = math.fsum(a[t] * float(h[n, t, j]) for t in steps)
            for t in steps:
                gh[n, t] = a[t] * ct[n]
                # d out_j / d s_t = a_t (h_tj - out_j)
                gs[n, t] = math.fsum(ct[n, j] * a[t] * (float(h[n, t, j]) - out[n, j]) for j in range(H))
        elif method in ("last", "first"):
            t = steps[-1] if method == "last" else steps[0]
            out[n] = h[n, t]
            gh[n, t] = ct[n]
        elif method == "mean":
            for j in range(H):
                out[n, j] = math.fsum(float(h[n, t, j]) for t in steps) / len(steps)
            for t in steps:
                gh[n, t] = ct[n] / len(steps)
        else:  # max, one winner per feature (the inputs are continuous: no ties)
            for j in range(H):
                t = max(steps, key=lambda t: h[n, t, j])
                out[n, j] = h[n, t, j]
                gh[n, t, j] = ct[n, j]
    return out, gh, gs


def _run(backend: str, spec: dict, arrays: dict, form: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """pooled, d/d hidden (padded), d/d scores (padded or None) on one backend."""
    import xseqloss as xsl
    method = spec["method"]
    N, T, H = arrays["h"].shape
    lengths, mask = arrays["lengths"], arrays["mask"]
    att = method == "attention"
    if backend == "numpy":
        raise NotImplementedError
    if backend == "torch":
        import torch
        h = torch.tensor(arrays["h"], requires_grad=True)
        s = torch.tensor(arrays["scores"], requires_grad=True) if att else None
        kw = dict(method=method, mask=None if mask is None else torch.tensor(mask))
        if form == "padded":
            out = xsl.pool(h, lengths=torch.tensor(lengths), scores=s, **kw)
        elif form == "list":
            out = xsl.pool([h[i, :n] for i, n in enumerate(lengths)], scores=None if s is None else
                           [s[i, :n] for i, n in enumerate(lengths)], **kw)
        else:
            from torch.nn.utils.rnn import pack_padded_sequence
            keep = torch.tensor(lengths) > 0
            if not bool(keep.all()):
                raise _NotApplicable("a PackedSequence cannot hold an empty sequence")
            packed = pack_padded_sequence(h, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            out = xsl.pool(packed, scores=s, **kw)
        (out * torch.tensor(arrays["ct"])).sum().backward()
        return out.detach().numpy(), h.grad.numpy(), None if s is None else s.grad.numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def f(h, s):
            kw = dict(method=method, mask=None if mask is None else jnp.asarray(mask))
            if form == "list":
                return xsl.pool([h[i, :n] for i, n in enumerate(lengths)], scores=None if s is None else
                                [s[i, :n] for i, n in enumerate(lengths)], **kw)
            return xsl.pool(h, lengths=jnp.asarray(lengths), scores=s, **kw)
        with jax.enable_x64(True):
            h, s = jnp.asarray(arrays["h"]), jnp.asarray(arrays["scores"]) if att else None
            out, vjp = jax.vjp(f, h, s)
            gh, gs = vjp(jnp.asarray(arrays["ct"]))
            return np.asarray(out), np.asarray(gh), None if gs is None else np.asarray(gs)
    import tensorflow as tf
    h = tf.constant(arrays["h"])
    s = tf.constant(arrays["scores"]) if att else None
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(h)
        if s is not None:
            tape.watch(s)
        kw = dict(method=method, mask=None if mask is None else tf.constant(mask))
        if form == "list":
            out = xsl.pool([h[i, :n] for i, n in enumerate(lengths)], scores=None if s is None else
                           [s[i, :n] for i, n in enumerate(lengths)], **kw)
        else:
            out = xsl.pool(h, lengths=tf.constant(lengths), scores=s, **kw)
        total = tf.reduce_sum(out * arrays["ct"])
    gh = tape.gradient(total, h)
    gs = None if s is None else tape.gradient(total, s)
    return out.numpy(), gh.numpy(), None if gs is None else gs.numpy()


class _NotApplicable(Exception):
    pass


def check_pooling(backend: str, device: str) -> list[dict]:
    """One "pool" record per case and form: value and gradients within the float64 tolerance."""
    if device != "cpu" or backend == "numpy":  # NumPy has no autodiff for the gradient; CPU suffices
        out = []
        if backend == "numpy":
            import xseqloss as xsl
            for spec in POOL_CASES:
                arrays = make(spec)
                want, _, _ = reference(spec, arrays)
                try:
                    got = xsl.pool(arrays["h"], lengths=arrays["lengths"], mask=arrays["mask"],
                                   method=spec["method"], scores=arrays["scores"] if spec["method"] == "attention"
                                   else None)
                    err = metric(got, want)
                    detail = ""
                except Exception as exc:
                    err, detail = math.inf, _short(exc)
                out.append(record(backend, device, "float64", f"{spec['name']}[padded]", "pool", err,
                                  TOLERANCE["float64"], detail))
        return out
    out = []
    for spec in POOL_CASES:
        arrays = make(spec)
        want, wgh, wgs = reference(spec, arrays)
        for form in FORMS:
            if form == "packed" and backend != "torch":
                continue
            try:
                got, gh, gs = _run(backend, spec, arrays, form)
            except _NotApplicable:
                continue
            except Exception as exc:
                out.append(record(backend, device, "float64", f"{spec['name']}[{form}]", "pool", math.inf,
                                  TOLERANCE["float64"], _short(exc)))
                continue
            # the gradients must be exactly 0 at the padding, which holds NaN: a NaN there is inf
            err = max(metric(got, want), metric(gh, wgh), 0.0 if gs is None else metric(gs, wgs))
            out.append(record(backend, device, "float64", f"{spec['name']}[{form}]", "pool", err,
                              TOLERANCE["float64"], "value and gradients (hidden, scores)"))
    return out
