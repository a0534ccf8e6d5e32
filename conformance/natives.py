"""Each framework's own cross-entropy, where its semantics overlap xseqloss'.

``native(backend, case, device)`` returns ``(label, value, grad)`` computed by
the framework's own loss (value and d sum(value) / d logits, float64 NumPy),
or None when no native loss means the same thing for this case.  The mapping
of options is written out per framework; every rule that makes a case
ineligible says which semantics differ (docs/porting.md has the long form).

Natives run in float64 and float32 only: torch and tf.nn reduce in the input
dtype for float16/bfloat16, which is exactly what xseqloss avoids.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cases import Case, counted


def _common(case: Case) -> dict | None:
    """The options when the case is a plain softmax cross-entropy on finite logits, else None."""
    o = dict(case.options)
    z = case.arrays["logits"]
    if case.dtype not in ("float64", "float32"):
        return None
    if o.get("shift") or "segment_ids" in case.arrays or case.ragged:
        return None  # no framework loss shifts, knows documents or takes ragged inputs (API.md 7)
    if o.get("inputs", "logits") != "logits" or o.get("z_loss") or o.get("logit_softcap") is not None:
        return None
    if o.get("reduction", "mean") not in ("none", "sum", "mean") or o.get("normalizer") is not None:
        return None
    if np.isnan(z).any() or np.isposinf(z).any():
        return None  # garbage rows: the natives have no NaN-safe masking
    if case.spec.get("logits") == "masked_vocab":
        return None  # 0 * -inf: the natives give NaN where xseqloss keeps 0 log 0 = 0 (issue 17)
    if o.get("smoothing", "uniform") != "uniform" and o.get("label_smoothing", 0.0):
        return None  # every framework loss smooths uniformly over C
    return o


def _single_ignore(o: dict) -> tuple[bool, int | None]:
    ig = o.get("ignore_index", -100)
    if ig is None or isinstance(ig, int):
        return True, ig
    ig = list(ig)
    return (len(ig) == 1, ig[0] if len(ig) == 1 else None)


def _all_count(case: Case) -> bool:
    return bool(counted(case).all())


def _den_zero(case: Case) -> bool:
    """True when the mean's denominator is 0 (the natives then differ by the empty rule)."""
    c = counted(case)
    o = case.options
    den = o.get("denominator", "weights")
    if den == "positions":
        return c.size == 0
    if den == "tokens":
        return not c.any()
    W = c.astype(float)
    if "weights" in case.arrays:
        W = W * case.arrays["weights"]
    if "class_weights" in case.arrays and not case.soft:
        y = np.where(c, case.arrays["targets"], 0).astype(np.int64)
        W = W * case.arrays["class_weights"][y]
    return float(W.sum()) == 0.0


def _empty_ok(case: Case, native_empty: str) -> bool:
    o = case.options
    if o.get("reduction", "mean") != "mean" or not _den_zero(case):
        return True
    return o.get("empty", "zero") == native_empty


def _onehot_or_soft(case: Case) -> np.ndarray:
    """Soft targets, or one-hot rows for index targets (class axis where the layout has it)."""
    t = case.arrays["targets"]
    if case.soft:
        return t
    C = case.arrays["logits"].shape[case.layout.index("C")]
    oh = (np.asarray(t)[..., None] == np.arange(C)).astype(np.float64)
    return np.moveaxis(oh, -1, case.layout.index("C"))


# ----------------------------------------------------------------------------- PyTorch

def torch_native(case: Case, device: str):
    """torch.nn.functional.cross_entropy (class axis at dim 1, weighted mean)."""
    import torch
    import torch.nn.functional as F
    o = _common(case)
    if o is None or any(k in case.arrays for k in ("mask", "lengths", "weights")):
        return None
    one, ig = _single_ignore(o)
    if not one or o.get("denominator", "weights") != "weights" or not _empty_ok(case, "nan"):
        return None
    k = case.layout.index("C")
    nd = case.arrays["logits"].ndim
    dt = getattr(torch, case.dtype)
    x = torch.as_tensor(case.arrays["logits"], dtype=dt, device=device).requires_grad_(True)
    t = case.arrays["targets"]
    t = torch.as_tensor(t, dtype=dt if case.soft else torch.int64, device=device)
    cw = case.arrays.get("class_weights")
    cw = None if cw is None else torch.as_tensor(cw, dtype=dt, device=device)
    xin = x.movedim(k, 1) if nd >= 2 else x
    if case.soft and nd >= 2:
        t = t.movedim(k, 1)
    if case.soft or ig is None:
        # soft targets: ignore_index does not apply (decisions.md 4) and torch wants a negative one;
        # ignore_index=None: the generated targets never hold -100 then, so -100 ignores nothing
        ig = -100
    out = F.cross_entropy(xin, t, weight=cw, ignore_index=ig, reduction=o.get("reduction", "mean"),
                          label_smoothing=float(o.get("label_smoothing", 0.0)))
    out.sum().backward()
    return ("torch.nn.functional.cross_entropy", out.detach().cpu().double().numpy(),
            x.grad.cpu().double().numpy())


# ----------------------------------------------------------------------------- TensorFlow / Keras

def tensorflow_native(case: Case, device: str):
    """tf.nn.*softmax_cross_entropy_with_logits, Keras (Sparse)CategoricalCrossentropy."""
    import tensorflow as tf
    o = _common(case)
    if o is None or any(k in case.arrays for k in ("mask", "lengths")):
        return None
    k = case.layout.index("C")
    nd = case.arrays["logits"].ndim
    red = o.get("reduction", "mean")
    den = o.get("denominator", "weights")
    eps = float(o.get("label_smoothing", 0.0))
    has_w = "weights" in case.arrays
    has_cw = "class_weights" in case.arrays
    perm = [i for i in range(nd) if i != k] + [k]  # class axis last
    tfdev = "/CPU:0" if device == "cpu" else "/GPU:" + device.split(":")[1]
    with tf.device(tfdev):
        x = tf.constant(case.arrays["logits"].astype(case.dtype))
        w = tf.constant(case.arrays["weights"].astype(case.dtype)) if has_w else None

        def reduce(l):
            if red == "none":
                return l
            return tf.reduce_sum(l) if red == "sum" else tf.reduce_mean(l)

        if not has_w and not has_cw and eps == 0.0 and _all_count(case):
            # tf.nn: per-token loss; every position counts, so mean = reduce_mean for every denominator
            if case.soft:
                label = "tf.nn.softmax_cross_entropy_with_logits"
                q = tf.constant(case.arrays["targets"].astype(case.dtype))
                f = lambda x: reduce(tf.nn.softmax_cross_entropy_with_logits(labels=q, logits=x, axis=k))
            else:
                label = "tf.nn.sparse_softmax_cross_entropy_with_logits"
                y = tf.constant(case.arrays["targets"].astype(np.int64))
                f = lambda x: reduce(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=tf.transpose(x, perm)))
        elif case.dtype == "float32" and not has_cw and nd >= 2 and case.arrays["logits"].shape[k] > 1:
            import keras
            one, ig = _single_ignore(o)
            ignore_hit = not _all_count(case)
            if not _empty_ok(case, "zero"):
                return None
            if red in ("none", "sum"):
                kred = red
            elif den == "weights" and has_w:
                kred = "mean_with_sample_weight"   # sum(l s m) / sum(s m)
            elif den == "positions" and ignore_hit:
                return None                        # Keras divides by the counted tokens when it masks
            else:
                kred = "sum_over_batch_size"       # sum(l s m) / sum(m), or / numel without a mask
            sw = {} if w is None else {"sample_weight": w}
            if eps == 0.0 and not case.soft and one:
                label = "keras.losses.SparseCategoricalCrossentropy"
                loss = keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, ignore_class=ig if ignore_hit else None, reduction=kred)
                y = tf.constant(case.arrays["targets"].astype(np.int64))
                f = lambda x: loss(y, tf.transpose(x, perm), **sw)
            elif not ignore_hit:
                label = "keras.losses.CategoricalCrossentropy"
                loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps,
                                                            reduction=kred)
                q = tf.constant(np.moveaxis(_onehot_or_soft(case), k, -1).astype(case.dtype))
                f = lambda x: loss(q, tf.transpose(x, perm), **sw)
            else:
                return None
        else:
            return None
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = f(x)
            total = tf.reduce_sum(out)
        g = tape.gradient(total, x)
    return label, tf.cast(out, tf.float64).numpy(), tf.cast(g, tf.float64).numpy()


# ----------------------------------------------------------------------------- JAX / optax

def jax_native(case: Case, device: str):
    """optax.softmax_cross_entropy_with_integer_labels / softmax_cross_entropy (+ smooth_labels)."""
    import jax
    import jax.numpy as jnp
    import optax
    o = _common(case)
    if o is None or "weights" in case.arrays or "class_weights" in case.arrays:
        return None
    if case.dtype == "float32" and case.spec.get("logits", "normal").endswith("_near_max"):
        # optax forms log_softmax = x - logsumexp(x), each rounded at ulp(1e4) ~ 1e-3 in float32,
        # before it picks x[y]: at a loss near log(1 + e^-1) that is off by ~1e-3 (a precision
        # gap, not a difference of meaning; xseqloss works in the max-shifted frame, issue 11)
        return None
    red = o.get("reduction", "mean")
    if red == "mean" and o.get("denominator", "weights") == "positions" and not _all_count(case):
        return None
    if not _empty_ok(case, "nan"):
        return None
    k = case.layout.index("C")
    eps = float(o.get("label_smoothing", 0.0))
    c = counted(case)
    dev = jax.devices("cpu")[0] if device == "cpu" else jax.devices("gpu")[int(device.split(":")[1])]
    with jax.enable_x64(case.dtype == "float64"):
        x = jax.device_put(case.arrays["logits"].astype(case.dtype), dev)
        keep = jax.device_put(c, dev)
        if case.soft or eps:
            label = "optax.softmax_cross_entropy" + (" + optax.smooth_labels" if eps else "")
            q = jnp.asarray(_onehot_or_soft(case).astype(case.dtype))
            if eps:
                q = optax.smooth_labels(q, eps, axis=k)
            q = jax.device_put(q, dev)
            per_token = lambda x: optax.softmax_cross_entropy(x, q, axis=k)
        else:
            label = "optax.softmax_cross_entropy_with_integer_labels"
            y = jax.device_put(np.where(c, case.arrays["targets"], 0).astype(np.int32), dev)
            per_token = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y, axis=k)

        def f(x):
            l = jnp.where(keep, per_token(x), 0.0)
            if red == "none":
                return l
            return l.sum() if red == "sum" else l.sum() / keep.sum()

        def total(x):
            out = f(x)
            return out.sum(), out

        # one compiled function: op-by-op dispatch would compile every primitive for every new shape
        (_, out), g = jax.jit(jax.value_and_grad(total, has_aux=True))(x)
        return label, np.asarray(out, dtype=np.float64), np.asarray(g, dtype=np.float64)


NATIVES = {"torch": torch_native, "tensorflow": tensorflow_native, "jax": jax_native}


def native(backend: str, case: Case, device: str) -> Any:
    fn = NATIVES.get(backend)
    return None if fn is None else fn(case, device)
