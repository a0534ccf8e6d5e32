"""token_stats / linear_token_stats and return_stats (API.md 11), one process, every backend.

Every test asserts against something written here, independent of the package: a float64 NumPy
formula (``ref_stats`` / ``ref_vjp``: softmax(z / T) with log1p at p -> 1 and 0 log 0 = 0),
central finite differences of that formula, or an identity with the loss. The published bugs
(API.md 11; the shared reference rl-outputs.md, table 1b) each have a test that would have caught them: a temperature
applied twice or not at all (T = 0.5 and 1.5, never only T = 1), an entropy gradient silently zero
(a cotangent on the entropy alone), entropy NaN at -inf logits, all-negative logits (a max identity
of 0), positive log-probs, an entropy not shifted with the log-probs.

Paths: plain logits on the four backends (the ``backend`` fixture), the fused layer
(``linear_token_stats``), return_stats of both losses (and PyTorch's chunked kernel, whose
per-chunk formula must run once per chunk with or without stats). Compiled (torch.compile,
jax.jit / jax.vmap, tf.function(jit_compile=True)): tests/test_token_stats_compiled.py; classes
split across workers: tests/test_token_stats_split.py.
"""

import numpy as np
import pytest

from helpers.support import assert_close, get_backend, np_dtype, require_or_skip, round_to

FLOAT_OUTPUTS = ("log_prob", "entropy", "lse", "ids_log_prob")
ALL_OUTPUTS = ("log_prob", "entropy", "lse", "argmax", "correct")
FIELDS = ("log_prob", "entropy", "lse", "argmax", "correct", "ids_log_prob", "counted")


# ================================================================== the float64 reference (NumPy)

def _temp(T, shape):
    """A temperature (number, 0-d, or token-shaped array) broadcast to the tokens, float64."""
    T = np.asarray(T, np.float64)
    return np.broadcast_to(T, shape) if T.ndim == 0 else T


def ref_stats(z, y=None, T=1.0, ids=None, cap=None):
    """Per-token outputs of softmax(x / T), x = the softcapped logits (classes on the last axis),
    float64, for every position (the caller zeroes the ones that do not count). Also p, log p and H
    for the gradient."""
    z = np.asarray(z, np.float64)
    x = z if cap is None else cap * np.tanh(z / cap)
    Tt = _temp(T, z.shape[:-1])
    u = x / Tt[..., None]
    top = np.argmax(u, -1)[..., None]
    m = np.take_along_axis(u, top, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(u - m)
    rest = e.copy()
    np.put_along_axis(rest, top, 0.0, -1)
    ls = np.log1p(rest.sum(-1))                      # log sum exp(u - m), exact at p -> 1
    lse = m[..., 0] + ls
    logp = (u - m) - ls[..., None]                   # -inf at a -inf logit
    p = e / (1.0 + rest.sum(-1))[..., None]
    with np.errstate(invalid="ignore"):
        H = -np.where(p > 0, p * logp, 0.0).sum(-1)  # 0 log 0 = 0
    out = dict(entropy=H, lse=lse, argmax=np.argmax(x, -1), p=p, logp=logp, H=H, T=Tt)
    if y is not None:
        yc = np.clip(np.asarray(y), 0, z.shape[-1] - 1)
        out["log_prob"] = np.take_along_axis(logp, yc[..., None], -1)[..., 0]
        out["correct"] = out["argmax"] == np.asarray(y)
    if ids is not None:
        out["ids_log_prob"] = np.take_along_axis(logp, np.clip(np.asarray(ids), 0, z.shape[-1] - 1), -1)
    return out


def ref_vjp(z, cts, y=None, T=1.0, ids=None, cap=None):
    """d/dz of sum over outputs of sum(ct * output), analytic, float64, every position:
    d log p_y/du = onehot(y) - p, dH/du_c = -p_c (log p_c + H) (0 where p_c = 0), d lse/du = p;
    then du/dz = 1 / T and the softcap's 1 - tanh^2."""
    z = np.asarray(z, np.float64)
    r = ref_stats(z, y, T, ids, cap)
    p, logp, H = r["p"], r["logp"], r["H"]
    C = z.shape[-1]
    g = np.zeros_like(z)

    def onehot(i):
        return np.eye(C)[np.clip(np.asarray(i), 0, C - 1)]
    if "log_prob" in cts:
        g += np.asarray(cts["log_prob"])[..., None] * (onehot(y) - p)
    if "entropy" in cts:
        with np.errstate(invalid="ignore"):
            dev = np.where(p > 0, logp + H[..., None], 0.0)
        g += np.asarray(cts["entropy"])[..., None] * (-p * dev)
    if "lse" in cts:
        g += np.asarray(cts["lse"])[..., None] * p
    if "ids_log_prob" in cts:
        d = np.asarray(cts["ids_log_prob"])
        for j in range(d.shape[-1]):
            g += d[..., j, None] * (onehot(np.asarray(ids)[..., j]) - p)
    g = g / r["T"][..., None]
    if cap is not None:
        g = g * (1.0 - np.tanh(z / cap) ** 2)
    return g


def fd_vjp(z, cts, eps=1e-6, **kw):
    """The same gradient by central finite differences of ``ref_stats`` (an oracle for the oracle)."""
    z = np.asarray(z, np.float64)

    def f(v):
        r = ref_stats(v, **kw)
        return sum(float((np.asarray(c) * r[k]).sum()) for k, c in cts.items())
    g = np.zeros_like(z)
    it = np.nditer(z, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        if not np.isfinite(z[i]):
            continue
        zp, zm = z.copy(), z.copy()
        zp[i] += eps
        zm[i] -= eps
        g[i] = (f(zp) - f(zm)) / (2 * eps)
    return g


def zero_where(v, keep):
    """``v`` (token-shaped, or with a trailing k axis) with 0 where ``keep`` is False."""
    keep = np.asarray(keep, bool)
    if v.ndim > keep.ndim:
        keep = keep.reshape(keep.shape + (1,) * (v.ndim - keep.ndim))
    return np.where(keep, v, np.zeros_like(v))


# ================================================================== calling the package

def _put(bk, x, dtype=None):
    x = np.asarray(x)
    if dtype is not None:
        x = x.astype(np_dtype(dtype))
    return bk.array(x)


def _sides(bk, opts, dtype):
    kw = dict(opts)
    for k in ("mask", "lengths", "segment_ids", "ids", "temperature"):
        v = kw.get(k)
        if isinstance(v, np.ndarray):
            tdt = dtype if dtype in ("float32", "float64") else "float32"
            kw[k] = _put(bk, v, tdt if k == "temperature" else None)
    return kw


def run(bk, params, y, cts=None, dtype="float64", linear=False, **opts):
    """token_stats (or linear_token_stats: params = [hidden, weight, bias or None]) on backend ``bk``
    with the differentiable inputs in ``dtype``, and d sum_k sum(cts[k] * output_k) by the
    framework's autodiff (NumPy: token_stats_vjp / linear_token_stats_vjp).

    Returns (outputs: field -> host NumPy (floats as float64) or None, dtypes: field -> dtype name,
    grads: one host float64 array per param (None for an absent bias) or None, grad dtype names)."""
    import xseqloss as xsl
    ps = [None if p is None else _put(bk, p, dtype) for p in params]
    t = None if y is None else _put(bk, np.asarray(y))
    kw = _sides(bk, opts, dtype)
    keys = list(cts or {})
    live = [p for p in ps if p is not None]

    def fill(gs):
        it = iter(gs)
        return [None if p is None else next(it) for p in ps]

    def fn(*lv):
        full = fill(lv)
        if linear:
            return xsl.linear_token_stats(full[0], full[1], t, bias=full[2], **kw)
        return xsl.token_stats(full[0], t, **kw)

    grads = None
    if bk.name == "numpy":
        s = fn(*live)
        if keys:
            vkw = {k: v for k, v in kw.items() if k != "outputs"}
            cts = dict(cts)
            if kw.get("ids") is not None and "ids_log_prob" not in cts:
                # the keys say the outputs, and ids_log_prob is an output exactly when ids are given
                # (API.md 11.1, 11.3): a zero cotangent stands for "missing"
                cts["ids_log_prob"] = np.zeros(np.shape(s.ids_log_prob))
            if linear:
                grads = list(xsl.linear_token_stats_vjp(ps[0], ps[1], t, dict(cts), bias=ps[2], **vkw))
            else:
                grads = [xsl.token_stats_vjp(ps[0], t, dict(cts), **vkw)]
    elif bk.name == "torch":
        import torch
        live = [p.requires_grad_(bool(keys)) for p in live]
        s = fn(*live)
        if keys:
            total = sum((getattr(s, k) * torch.as_tensor(np.asarray(cts[k])).to(getattr(s, k).dtype)).sum()
                        for k in keys)
            gs = torch.autograd.grad(total, live, allow_unused=True)
            grads = fill([torch.zeros_like(p) if g is None else g for p, g in zip(live, gs)])
    elif bk.name == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            for p in live:
                tape.watch(p)
            s = fn(*live)
            total = 0.0
            for k in keys:
                o = getattr(s, k)
                total += tf.reduce_sum(o * tf.constant(np.asarray(cts[k]), dtype=o.dtype))
        if keys:
            gs = tape.gradient(total, live)
            grads = fill([tf.zeros_like(p) if g is None else g for p, g in zip(live, gs)])
    else:
        import jax
        import jax.numpy as jnp
        if keys:
            def g(*lv):
                st = fn(*lv)
                return tuple(getattr(st, k) for k in keys), st
            outs, pull, s = jax.vjp(g, *live, has_aux=True)
            grads = fill(pull(tuple(jnp.asarray(np.asarray(cts[k]), dtype=o.dtype) for k, o in zip(keys, outs))))
        else:
            s = fn(*live)
    out = {f: (None if getattr(s, f) is None else bk.to_numpy(getattr(s, f))) for f in FIELDS}
    dts = {f: (None if getattr(s, f) is None else bk.dtype_name(getattr(s, f))) for f in FIELDS}
    gh = None if grads is None else [None if g is None else bk.to_numpy(g) for g in grads]
    gdt = None if grads is None else [None if g is None else bk.dtype_name(g) for g in grads]
    return out, dts, gh, gdt


def out_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def check_against_ref(out, ref, keep, names, tol, what=""):
    """Float outputs within ``tol`` of the reference at counted positions and exactly 0 elsewhere;
    argmax exact (-1 elsewhere), correct exact (False elsewhere), counted exact."""
    keep = np.asarray(keep, bool)
    assert out["counted"] is not None and np.array_equal(out["counted"], keep), (what, out["counted"], keep)
    for k in names:
        assert out[k] is not None, (what, k)
        if k in FLOAT_OUTPUTS:
            assert_close(out[k], zero_where(ref[k], keep), tol=tol, what=f"{what} {k}")
            assert np.all(zero_where(out[k], ~keep) == 0), (what, k, "not 0 where not counted")
        elif k == "argmax":
            assert np.array_equal(out[k], np.where(keep, ref[k], -1)), (what, out[k], ref[k])
        else:
            assert np.array_equal(out[k], ref[k] & keep), (what, k, out[k], ref[k])


def rand(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


# ================================================================== the oracle itself

def test_reference_gradient_matches_finite_differences():
    """The analytic NumPy gradient used below equals central finite differences of the NumPy
    forward (every output, T != 1, softcap, ids, a -inf logit)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 5)) * 2
    z[0, 1, 3] = -np.inf
    y = rng.integers(0, 3, (2, 3))
    ids = rng.integers(0, 3, (2, 3, 2))
    T = np.array([[0.5, 1.5, 0.8], [1.2, 0.7, 2.0]])
    cts = {k: rng.normal(size=(2, 3)) for k in ("log_prob", "entropy", "lse")}
    cts["ids_log_prob"] = rng.normal(size=(2, 3, 2))
    kw = dict(y=y, T=T, ids=ids, cap=4.0)
    g = ref_vjp(z, cts, **kw)
    assert np.all(np.isfinite(g)) and g[0, 1, 3] == 0
    assert_close(g, fd_vjp(z, cts, **kw), tol=1e-7, what="analytic vs finite differences")
    # and a hand value: uniform over 4 classes at T = 2
    r = ref_stats(np.zeros((1, 4)), np.array([0]), T=2.0)
    assert abs(r["entropy"][0] - np.log(4)) < 1e-15 and abs(r["log_prob"][0] + np.log(4)) < 1e-15


# ================================================================== 1. the published failures

@pytest.mark.parametrize("T", [0.5, 1.5, "token"])
def test_temperature_applied_exactly_once(backend, T):
    """log_prob, entropy and lse describe softmax(z / T), and so do their gradients (a cotangent on
    the entropy alone, then on all three): T^2 (RL-Kernel #81) or a missing T (OpenRLHF #1319)
    moves them by ~1 nat at T = 0.5."""
    z = rand(1, 2, 3, 6, scale=2.0)
    y = np.random.default_rng(2).integers(0, 6, (2, 3))
    temp = np.array([[0.5, 1.5, 0.5], [1.5, 0.5, 1.5]]) if T == "token" else T
    ref = ref_stats(z, y, temp)
    # the bugs this must catch really move the numbers
    for wrong in (1.0, np.asarray(temp) ** 2):
        assert np.abs(ref_stats(z, y, wrong)["entropy"] - ref["entropy"]).max() > 0.05
    keep = np.ones((2, 3), bool)
    rng = np.random.default_rng(3)
    for cts in ({"entropy": rng.normal(size=(2, 3))},
                {k: rng.normal(size=(2, 3)) for k in ("log_prob", "entropy", "lse")}):
        out, dts, g, gdt = run(backend, [z], y, cts, outputs=ALL_OUTPUTS, temperature=temp)
        check_against_ref(out, ref, keep, ALL_OUTPUTS, 1e-10, f"T={T}")
        want = ref_vjp(z, cts, y, temp)
        assert np.abs(want).max() > 1e-3
        assert_close(g[0], want, tol=1e-10, what=f"T={T} gradient of {sorted(cts)}")


def test_random_upstream_on_every_differentiable_output_at_once(backend):
    """Random cotangents on log_prob, entropy, lse and ids_log_prob together (a PPO step with an
    entropy bonus and a distillation term), T = 0.7 and a softcap: the gradient against central
    finite differences of the float64 formula."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(2, 3, 5)) * 2
    y = rng.integers(0, 5, (2, 3))
    ids = rng.integers(0, 5, (2, 3, 3))
    cts = {k: rng.normal(size=(2, 3)) for k in ("log_prob", "entropy", "lse")}
    cts["ids_log_prob"] = rng.normal(size=(2, 3, 3))
    kw = dict(y=y, T=0.7, ids=ids, cap=5.0)
    out, _, g, _ = run(backend, [z], y, cts, outputs=FLOAT_OUTPUTS, temperature=0.7, ids=ids, logit_softcap=5.0)
    ref = ref_stats(z, **kw)
    check_against_ref(out, ref, np.ones((2, 3), bool), FLOAT_OUTPUTS, 1e-10, "values")
    assert_close(g[0], fd_vjp(z, cts, **kw), tol=1e-7, what="gradient vs finite differences")
    # each cotangent alone too: none of them may be dropped (TRL PR #6625's zero entropy gradient)
    for k in cts:
        _, _, gk, _ = run(backend, [z], y, {k: cts[k]}, outputs=FLOAT_OUTPUTS, temperature=0.7, ids=ids,
                          logit_softcap=5.0)
        want = ref_vjp(z, {k: cts[k]}, **kw)
        assert np.abs(want).max() > 1e-3, k
        assert_close(gk[0], want, tol=1e-10, what=f"gradient of {k} alone")


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_neg_inf_logits_entropy_and_gradient_finite(backend, T):
    """-inf logits (a masked vocabulary): entropy finite and right (0 log 0 = 0), every gradient
    finite and exactly 0 at the -inf classes (TRL #7221: NaN forward, then NaN gradient)."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(2, 3, 6))
    z[..., 4:] = -np.inf                 # two masked classes everywhere
    z[1, 2, :3] = -np.inf                # a row with one finite class left: p = 1, H = 0
    z[1, 2, 3] = 0.25
    y = rng.integers(0, 4, (2, 3))
    y[1, 2] = 3
    ids = np.array([[[0, 1], [2, 3], [1, 1]], [[3, 0], [2, 2], [3, 3]]])
    cts = {k: rng.normal(size=(2, 3)) for k in ("log_prob", "entropy", "lse")}
    cts["ids_log_prob"] = rng.normal(size=(2, 3, 2))
    out, _, g, _ = run(backend, [z], y, cts, outputs=FLOAT_OUTPUTS, temperature=T, ids=ids)
    ref = ref_stats(z, y, T, ids)
    assert np.all(np.isfinite(out["entropy"])) and out["entropy"][1, 2] == 0.0
    check_against_ref(out, ref, np.ones((2, 3), bool), FLOAT_OUTPUTS, 1e-10, "-inf")
    assert np.all(np.isfinite(g[0])), g[0]
    assert np.all(g[0][np.isneginf(z)] == 0.0)
    assert_close(g[0], ref_vjp(z, cts, y, T, ids), tol=1e-10, what="-inf gradient")
    # the entropy's gradient alone, where the 0 * inf of autodiff would show
    _, _, gh, _ = run(backend, [z], y, {"entropy": np.ones((2, 3))}, outputs=("entropy",), temperature=T)
    assert np.all(np.isfinite(gh[0])) and np.all(gh[0][np.isneginf(z)] == 0.0)
    assert_close(gh[0], ref_vjp(z, {"entropy": np.ones((2, 3))}, y, T), tol=1e-10, what="entropy gradient")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_all_negative_logits(backend, dtype):
    """Every logit near -1000 (verl PR #7439: a max identity of 0 instead of -inf makes every
    exp underflow): values and gradient against the reference, T = 0.5."""
    rng = np.random.default_rng(6)
    z = round_to(-1000.0 + rng.normal(size=(2, 3, 7)) * 3, dtype)
    y = rng.integers(0, 7, (2, 3))
    cts = {k: rng.normal(size=(2, 3)) for k in ("log_prob", "entropy", "lse")}
    out, dts, g, gdt = run(backend, [z], y, cts, dtype=dtype, outputs=ALL_OUTPUTS, temperature=0.5)
    ref = ref_stats(z, y, 0.5)
    tol = 1e-10 if dtype == "float64" else 1e-5
    check_against_ref(out, ref, np.ones((2, 3), bool), ALL_OUTPUTS, tol, "all negative")
    assert dts["entropy"] == out_dtype(dtype) and gdt[0] == dtype
    assert_close(g[0], ref_vjp(z, cts, y, 0.5), tol=tol, what="all-negative gradient")


def _confident(dtype, seed=7, C=8, margin=11.0):
    """(logits rounded to dtype, targets): the target's logit ``margin`` above the others, so
    1 - p(y) ~ 1e-4: p(y) rounds to 1 in bfloat16 and float16, not in float32."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2, 3, C)) * 0.5
    y = rng.integers(0, C, (2, 3))
    np.put_along_axis(z, y[..., None], z.max(-1, keepdims=True) + margin, -1)
    return round_to(z, dtype), y


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_confident_16_bit_logits(backend, dtype):
    """p(y) -> 1 in 16-bit logits: log_prob and entropy float32 (not rounded to 0), and the
    gradient's true-class term 1 - p(y) formed in float32 before the cast (Liger-Kernel PR 1329):
    outputs and each gradient element within 1 % of their own float64 value (of the rounded
    logits), where forming p(y) in 16 bits gives 0."""
    z, y = _confident(dtype)
    ref = ref_stats(z, y)
    one_minus = 1.0 - np.exp(ref["log_prob"])
    assert np.all((one_minus > 2e-5) & (one_minus < 1e-3))                     # the regime meant
    assert np.all(np.exp(ref["log_prob"]).astype(np_dtype(dtype)) == 1.0)     # p(y) is 1 in the dtype
    for cts in ({"log_prob": np.ones((2, 3))}, {"entropy": np.ones((2, 3))}):
        out, dts, g, gdt = run(backend, [z], y, cts, dtype=dtype, outputs=("log_prob", "entropy"))
        assert dts["log_prob"] == "float32" and dts["entropy"] == "float32", dts
        assert gdt[0] == dtype, gdt
        for k in ("log_prob", "entropy"):
            # relative to the value itself (~1e-4): float32's log of 1 + 1e-4 is good to ~1e-3; the
            # value rounded to 16 bits, or p(y) formed in 16 bits, is off by 100 %
            err = np.abs(out[k] - ref[k]) / np.abs(ref[k])
            assert np.all(err < 1e-2), (k, out[k], ref[k])
        want = ref_vjp(z, cts, y)
        err = np.abs(g[0] - want) / np.abs(want)
        assert np.all(err < 1e-2), (sorted(cts), err.max(), g[0][0, 0], want[0, 0])


def test_confident_bfloat16_fused_layer(backend):
    """The same regime through linear_token_stats (bfloat16 hidden and weight, W = I so that the
    logits are the hidden states): float32 outputs, and d hidden (= the logits' gradient) with its
    true-class term formed in float32: each element within 1 % of its float64 value."""
    z, y = _confident("bfloat16", seed=21)
    W = np.eye(z.shape[-1])
    ref = ref_stats(z, y)
    for cts in ({"log_prob": np.ones((2, 3))}, {"entropy": np.ones((2, 3))}):
        out, dts, g, gdt = run(backend, [z, W, None], y, cts, dtype="bfloat16", linear=True, chunk_size=4,
                               outputs=("log_prob", "entropy"))
        assert dts["log_prob"] == "float32" and gdt[:2] == ["bfloat16", "bfloat16"], (dts, gdt)
        for k in ("log_prob", "entropy"):
            assert np.all(np.abs(out[k] - ref[k]) < 1e-2 * np.abs(ref[k])), (k, out[k], ref[k])
        want = ref_vjp(z, cts, y)
        assert np.all(np.abs(g[0] - want) <= 1e-2 * np.abs(want)), (sorted(cts), g[0][0, 0], want[0, 0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [50.0, 3000.0])
def test_log_prob_never_positive_entropy_never_negative(backend, dtype, scale):
    """Random logits of large magnitude (verl #2656 returned log-probs up to +123.7), half the
    targets at the argmax (log p -> 0 from below), T = 0.5 and 1: log_prob <= 0 and entropy >= 0
    everywhere, and both equal to the reference."""
    rng = np.random.default_rng(int(scale))
    z = round_to(rng.normal(size=(3, 4, 9)) * scale, dtype)
    y = rng.integers(0, 9, (3, 4))
    y[:, ::2] = z.argmax(-1)[:, ::2]
    for T in (1.0, 0.5):
        out, *_ = run(backend, [z], y, dtype=dtype, outputs=("log_prob", "entropy", "lse"), temperature=T)
        assert np.all(out["log_prob"] <= 0.0), out["log_prob"].max()
        assert np.all(out["entropy"] >= 0.0), out["entropy"].min()
        ref = ref_stats(z, y, T)
        check_against_ref(out, ref, np.ones((3, 4), bool), ("log_prob", "entropy", "lse"), 1e-5, f"T={T}")


def test_shifted_entropy_aligned_with_shifted_log_probs(backend):
    """shift=1: every output at t is that of the logits at t, log_prob at t scores target t + 1,
    a per-token temperature and the mask given at t + 1 apply to t, and the last step is 0 (prime-rl
    PR #1525: log-probs shifted, entropy not)."""
    rng = np.random.default_rng(8)
    N, T, C = 2, 5, 6
    z = rng.normal(size=(N, T, C)) * 2
    z[0, :, 0] += np.arange(T) * 2.0        # each step's entropy differs from its neighbours'
    y = rng.integers(0, C, (N, T))
    temp = rng.choice([0.5, 1.0, 1.5], size=(N, T))
    mask = np.ones((N, T), bool)
    mask[1, 3] = False                      # the target at 3: position 2 does not count
    ids = rng.integers(0, C, (N, T, 2))
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    out, _, g, _ = run(backend, [z], y, cts, outputs=ALL_OUTPUTS + ("ids_log_prob",), temperature=temp, mask=mask,
                       ids=ids, shift=1)
    # the reference: logits at t, everything else at t + 1
    zs = z[:, :-1]
    ref = ref_stats(zs, y[:, 1:], temp[:, 1:], ids[:, 1:])
    pad = (lambda a, v: np.concatenate([a, np.full(a[:, :1].shape, v, a.dtype)], 1))
    ref = {k: pad(v, 0) for k, v in ref.items() if k in ALL_OUTPUTS + ("ids_log_prob",)}
    keep = pad(mask[:, 1:], False)
    check_against_ref(out, ref, keep, ALL_OUTPUTS + ("ids_log_prob",), 1e-10, "shift=1")
    # not aligned the other way: the unshifted entropy at t differs
    assert np.abs(ref_stats(z, None, temp)["entropy"][:, :-1] - ref["entropy"][:, :-1]).max() > 1e-3
    want = np.zeros_like(z)
    cs = {k: v[:, :-1] for k, v in cts.items()}
    want[:, :-1] = ref_vjp(zs, cs, y[:, 1:], temp[:, 1:]) * keep[:, :-1, None]
    assert_close(g[0], want, tol=1e-10, what="shift=1 gradient")


def test_packed_documents_nothing_crosses_a_boundary(backend):
    """segment_ids with shift=1: the last step of every document does not count (its target is
    the next document's first token), padding (negative ids) never counts; all outputs 0 there."""
    rng = np.random.default_rng(9)
    N, T, C = 2, 8, 5
    segs = np.array([[0, 0, 0, 1, 1, 1, -1, -1], [2, 2, 5, 5, 5, 5, 5, 5]])
    z = rng.normal(size=(N, T, C)) * 2
    y = rng.integers(0, C, (N, T))
    y[1, 5] = -100
    temp = rng.choice([0.5, 1.5], size=(N, T))
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy")}
    out, _, g, _ = run(backend, [z], y, cts, outputs=ALL_OUTPUTS, temperature=temp, segment_ids=segs, shift=1)
    keep = np.zeros((N, T), bool)
    keep[:, :-1] = (segs[:, :-1] == segs[:, 1:]) & (segs[:, :-1] >= 0) & (y[:, 1:] != -100)
    assert keep.tolist() == [[1, 1, 0, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1, 1, 0]]
    ref = ref_stats(z[:, :-1], y[:, 1:], temp[:, 1:])
    ref = {k: np.concatenate([v, np.zeros_like(v[:, :1])], 1) for k, v in ref.items() if k in ALL_OUTPUTS}
    check_against_ref(out, ref, keep, ALL_OUTPUTS, 1e-10, "segments")
    want = np.zeros_like(z)
    want[:, :-1] = ref_vjp(z[:, :-1], {k: v[:, :-1] for k, v in cts.items()}, y[:, 1:], temp[:, 1:])
    assert_close(g[0], want * keep[..., None], tol=1e-10, what="segments gradient")
    # without targets the same positions count (only segments and shift decide)
    out2, *_ = run(backend, [z], None, outputs=("entropy",), temperature=temp, segment_ids=segs, shift=1)
    keep2 = np.zeros((N, T), bool)
    keep2[:, :-1] = (segs[:, :-1] == segs[:, 1:]) & (segs[:, :-1] >= 0)
    check_against_ref(out2, ref, keep2, ("entropy",), 1e-10, "segments, no targets")


@pytest.mark.parametrize("linear", [False, True], ids=["logits", "fused"])
def test_rows_that_do_not_count_are_exactly_zero_with_garbage(backend, linear):
    """Ignored, masked and beyond-length rows hold NaN / +-inf logits (hidden states for the fused
    layer), out-of-range ids and a NaN temperature: every output there is exactly 0 (argmax -1,
    correct False), its gradient rows exactly 0, no error; the rows that count are right."""
    rng = np.random.default_rng(10)
    N, T, C, H = 2, 4, 5, 3
    y = rng.integers(0, C, (N, T))
    y[0, 1] = -100
    mask = np.ones((N, T), bool)
    mask[1, 0] = False
    lengths = np.array([4, 3])
    keep = (y != -100) & mask & (np.arange(T) < lengths[:, None])
    ids = rng.integers(0, C, (N, T, 2))
    temp = rng.choice([0.5, 1.5], size=(N, T))
    bad = ~keep
    ids[bad] = [C + 7, -3]
    temp[bad] = np.nan
    garbage = np.array([np.nan, np.inf, -np.inf])
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    cts["ids_log_prob"] = rng.normal(size=(N, T, 2))
    names = ALL_OUTPUTS + ("ids_log_prob",)
    opts = dict(outputs=names, temperature=temp, ids=ids, mask=mask, lengths=lengths)
    if linear:
        h = rng.normal(size=(N, T, H))
        w, b = rng.normal(size=(C, H)), rng.normal(size=C)
        h[bad] = garbage[: H][None].repeat(bad.sum(), 0)
        out, _, g, _ = run(backend, [h, w, b], y, cts, linear=True, chunk_size=3, **opts)
        z = np.where(bad[..., None], 0.0, h) @ w.T + b
    else:
        z = rng.normal(size=(N, T, C))
        z[bad] = np.resize(garbage, C)
        out, _, g, _ = run(backend, [z], y, cts, **opts)
    zc = np.where(bad[..., None], 0.0, z)
    tc = np.where(bad, 1.0, temp)
    ref = ref_stats(zc, y, tc, ids)
    check_against_ref(out, ref, keep, names, 1e-10, "garbage rows")
    gz = ref_vjp(zc, {k: zero_where(v, keep) for k, v in cts.items()}, y, tc, ids)
    if linear:
        assert np.all(g[0][bad] == 0.0), g[0][bad]
        assert_close(g[0], gz @ w, tol=1e-10, what="d hidden")
        assert_close(g[1], gz.reshape(-1, C).T @ np.where(bad[..., None], 0.0, h).reshape(-1, H), tol=1e-10,
                     what="d weight")
        assert_close(g[2], gz.reshape(-1, C).sum(0), tol=1e-10, what="d bias")
    else:
        assert np.all(g[0][bad] == 0.0), g[0][bad]
        assert_close(g[0], gz, tol=1e-10, what="gradient")


# ================================================================== the fused layer

@pytest.mark.parametrize("weight_layout", ["CH", "HC"])
def test_linear_token_stats_values_and_gradients(backend, weight_layout):
    """linear_token_stats against the float64 formula of hidden @ W^T + b: every output and
    d hidden, d weight, d bias under random cotangents on all four differentiable outputs, with a
    per-token temperature, a softcap, a mask and chunks of 2 tokens (and 5: one ragged chunk)."""
    rng = np.random.default_rng(11)
    N, T, C, H = 2, 3, 6, 4
    h = rng.normal(size=(N, T, H))
    W, b = rng.normal(size=(C, H)), rng.normal(size=C)
    y = rng.integers(0, C, (N, T))
    ids = rng.integers(0, C, (N, T, 2))
    temp = rng.choice([0.5, 0.75, 1.5], size=(N, T))
    mask = np.ones((N, T), bool)
    mask[1, 1] = False
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    cts["ids_log_prob"] = rng.normal(size=(N, T, 2))
    names = ALL_OUTPUTS + ("ids_log_prob",)
    z = h @ W.T + b
    ref = ref_stats(z, y, temp, ids, 4.0)
    gz = ref_vjp(z, {k: zero_where(v, mask) for k, v in cts.items()}, y, temp, ids, 4.0)
    Wl = W if weight_layout == "CH" else W.T
    for chunk in (2, 5):
        out, dts, g, gdt = run(backend, [h, Wl, b], y, cts, linear=True, weight_layout=weight_layout,
                               chunk_size=chunk, outputs=names, temperature=temp, ids=ids, mask=mask,
                               logit_softcap=4.0)
        check_against_ref(out, ref, mask, names, 1e-10, f"fused chunk={chunk}")
        dW = gz.reshape(-1, C).T @ h.reshape(-1, H)
        assert_close(g[0], gz @ W, tol=1e-10, what="d hidden")
        assert_close(g[1], dW if weight_layout == "CH" else dW.T, tol=1e-10, what="d weight")
        assert_close(g[2], gz.reshape(-1, C).sum(0), tol=1e-10, what="d bias")


# ================================================================== 2. identities (properties)

EXAMPLES = {"numpy": 8, "torch": 6, "tensorflow": 3, "jax": 3}


def _hyp(backend):
    pytest.importorskip("hypothesis")
    from hypothesis import settings
    return settings(max_examples=EXAMPLES[backend.name], deadline=None)


def _problem(seed, N, T, C, mask_p, ignore_p):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, T, C)) * 3
    y = rng.integers(0, C, (N, T))
    y[rng.random((N, T)) < ignore_p] = -100
    mask = rng.random((N, T)) >= mask_p
    return rng, z, y, mask


def test_property_log_prob_is_minus_the_per_token_loss(backend):
    """At T = 1: log_prob == -sequence_cross_entropy(..., reduction="none"), with masks, ignored
    targets, shift and softcap (and 0 at the same positions)."""
    from hypothesis import given, strategies as st
    import xseqloss as xsl

    @_hyp(backend)
    @given(seed=st.integers(0, 2**31), N=st.integers(1, 2), T=st.integers(2, 4), C=st.integers(2, 6),
           shift=st.sampled_from([0, 1]), cap=st.sampled_from([None, 2.5]), mask_p=st.sampled_from([0.0, 0.3]),
           ignore_p=st.sampled_from([0.0, 0.3]))
    def check(seed, N, T, C, shift, cap, mask_p, ignore_p):
        _, z, y, mask = _problem(seed, N, T, C, mask_p, ignore_p)
        opts = dict(mask=mask, shift=shift, logit_softcap=cap)
        out, *_ = run(backend, [z], y, outputs=("log_prob",), **opts)
        loss = backend.to_numpy(xsl.sequence_cross_entropy(_put(backend, z), _put(backend, y), reduction="none",
                                                           **_sides(backend, opts, "float64")))
        assert_close(out["log_prob"], -loss, tol=1e-10, what="log_prob vs -loss")
        assert np.array_equal(out["counted"], loss != 0) or np.all(loss[~out["counted"]] == 0)
    check()


def test_property_entropy_is_the_self_cross_entropy_at_temperature(backend):
    """entropy at T == cross-entropy of softmax(z / T) against itself (soft targets through
    sequence_cross_entropy with inputs z / T), with a mask."""
    from hypothesis import given, strategies as st
    import xseqloss as xsl

    @_hyp(backend)
    @given(seed=st.integers(0, 2**31), T=st.sampled_from([0.5, 0.8, 1.5, 3.0]), C=st.integers(2, 7),
           cap=st.sampled_from([None, 3.0]))
    def check(seed, T, C, cap):
        _, z, _, mask = _problem(seed, 2, 3, C, 0.3, 0.0)
        x = z if cap is None else cap * np.tanh(z / cap)
        u = x / T
        q = np.exp(u - u.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        out, *_ = run(backend, [z], None, outputs=("entropy",), temperature=T, mask=mask, logit_softcap=cap)
        ce = backend.to_numpy(xsl.sequence_cross_entropy(_put(backend, u), _put(backend, q), reduction="none",
                                                         mask=_put(backend, mask)))
        assert_close(out["entropy"], ce, tol=1e-10, what="entropy vs self cross-entropy")
    check()


def test_property_ids_equal_to_targets_give_log_prob(backend):
    """ids = the targets (k = 2, both columns) give log_prob, with a temperature and shift; ids at
    ignored positions are the targets' -100 and never read."""
    from hypothesis import given, strategies as st

    @_hyp(backend)
    @given(seed=st.integers(0, 2**31), T=st.sampled_from([0.5, 1.0, 1.5]), shift=st.sampled_from([0, 1]),
           C=st.integers(2, 6))
    def check(seed, T, shift, C):
        _, z, y, mask = _problem(seed, 2, 4, C, 0.2, 0.2)
        ids = np.stack([y, y], -1)
        out, *_ = run(backend, [z], y, outputs=("log_prob", "ids_log_prob"), ids=ids, temperature=T, shift=shift,
                      mask=mask)
        for j in range(2):
            assert_close(out["ids_log_prob"][..., j], out["log_prob"], tol=1e-12, what=f"ids column {j}")
    check()


def test_property_linear_token_stats_is_token_stats_of_the_logits(backend):
    """linear_token_stats(h, W, b) == token_stats(h @ W^T + b) for both weight layouts, float16 and
    bfloat16 inputs: float32 outputs, within float32 rounding of the float64 logits of the rounded
    inputs (matmuls accumulate in float32, the logits are never rounded to 16 bits)."""
    from hypothesis import given, strategies as st

    @_hyp(backend)
    @given(seed=st.integers(0, 2**31), dtype=st.sampled_from(["float16", "bfloat16"]),
           wl=st.sampled_from(["CH", "HC"]), bias=st.booleans(), T=st.sampled_from([0.5, 1.0, 1.5]),
           chunk=st.sampled_from([None, 2]))
    def check(seed, dtype, wl, bias, T, chunk):
        rng = np.random.default_rng(seed)
        N, Tn, C, H = 2, 3, 7, 16
        h = round_to(rng.normal(size=(N, Tn, H)), dtype)
        W = round_to(rng.normal(size=(C, H)) / 2, dtype)
        b = round_to(rng.normal(size=C), dtype) if bias else None
        y = rng.integers(0, C, (N, Tn))
        z = h @ W.T + (0.0 if b is None else b)
        names = ("log_prob", "entropy", "lse")
        out, dts, *_ = run(backend, [h, W if wl == "CH" else W.T, b], y, dtype=dtype, linear=True, weight_layout=wl,
                           chunk_size=chunk, outputs=names, temperature=T)
        ref = ref_stats(z, y, T)
        for k in names:
            assert dts[k] == "float32", (k, dts[k])
        check_against_ref(out, ref, np.ones((N, Tn), bool), names, 2e-5, f"fused {dtype} {wl}")
        # and the package's own token_stats of those logits (float64) says the same
        out2, *_ = run(backend, [z], y, outputs=names, temperature=T)
        for k in names:
            assert_close(out[k], out2[k], tol=2e-5, what=f"fused vs token_stats {k}")
    check()


# ================================================================== 3. return_stats

def _loss_and_grad(bk, fn_of, params):
    """(loss, TokenStats or None, grads of the loss's sum) on ``bk``; fn_of(*params) is the call."""
    if bk.name == "numpy":
        return fn_of(*params), None
    if bk.name == "torch":
        ps = [p.detach().clone().requires_grad_(True) if p is not None else None for p in params]
        res = fn_of(*ps)
        loss = res[0] if isinstance(res, tuple) else res
        loss.sum().backward()
        return res, [None if p is None else p.grad for p in ps]
    if bk.name == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            for p in params:
                if p is not None:
                    tape.watch(p)
            res = fn_of(*params)
            loss = tf.reduce_sum(res[0] if isinstance(res, tuple) else res)
        return res, tape.gradient(loss, [p for p in params if p is not None])
    import jax
    import jax.numpy as jnp
    live = [i for i, p in enumerate(params) if p is not None]

    def f(*lv):
        full = list(params)
        for i, v in zip(live, lv):
            full[i] = v
        res = fn_of(*full)
        return jnp.sum(res[0] if isinstance(res, tuple) else res), res
    (_, res), g = jax.value_and_grad(f, argnums=tuple(range(len(live))), has_aux=True)(*[params[i] for i in live])
    return res, list(g)


@pytest.mark.parametrize("linear", [False, True], ids=["sequence_cross_entropy", "linear_cross_entropy"])
def test_return_stats_values_and_loss_unchanged(backend, linear):
    """return_stats=(every name) gives token_stats at T = 1 after the softcap (mask, shift, label
    smoothing in the loss), against the float64 formula; the loss and its gradient are the same as
    without stats (that they carry no gradient: the next tests)."""
    import xseqloss as xsl
    rng = np.random.default_rng(12)
    N, T, C, H = 2, 4, 6, 3
    y = rng.integers(0, C, (N, T))
    y[0, 2] = -100
    mask = np.ones((N, T), bool)
    mask[1, 3] = False
    opts = dict(logit_softcap=3.0, shift=1, label_smoothing=0.1, reduction="mean")
    bk = backend
    if linear:
        h, W, b = rng.normal(size=(N, T, H)), rng.normal(size=(C, H)), rng.normal(size=C)
        z = h @ W.T + b
        params = [_put(bk, h), _put(bk, W), _put(bk, b)]

        def call(hh, ww, bb, rs=None):
            kw = {} if rs is None else dict(return_stats=rs)
            return xsl.linear_cross_entropy(hh, ww, _put(bk, y), bias=bb, mask=_put(bk, mask), chunk_size=3, **opts,
                                            **kw)
    else:
        z = rng.normal(size=(N, T, C)) * 3
        params = [_put(bk, z)]

        def call(zz, rs=None):
            kw = {} if rs is None else dict(return_stats=rs)
            return xsl.sequence_cross_entropy(zz, _put(bk, y), mask=_put(bk, mask), **opts, **kw)
    (loss, stats), g = _loss_and_grad(bk, lambda *p: call(*p, rs=ALL_OUTPUTS), params)
    loss0, g0 = _loss_and_grad(bk, lambda *p: call(*p), params)
    assert isinstance(stats, xsl.TokenStats) and stats.ids_log_prob is None
    assert_close(bk.to_numpy(loss), bk.to_numpy(loss0), tol=1e-14, what="loss with vs without stats")
    if g is not None:
        for a, a0 in zip(g, g0):
            assert_close(bk.to_numpy(a), bk.to_numpy(a0), tol=1e-14, what="gradient with vs without stats")
    keep = np.zeros((N, T), bool)
    keep[:, :-1] = (y[:, 1:] != -100) & mask[:, 1:]
    ref = ref_stats(z[:, :-1], y[:, 1:], 1.0, cap=3.0)
    ref = {k: np.concatenate([v, np.zeros_like(v[:, :1])], 1) for k, v in ref.items() if k in ALL_OUTPUTS}
    out = {f: None if getattr(stats, f) is None else bk.to_numpy(getattr(stats, f)) for f in FIELDS}
    check_against_ref(out, ref, keep, ALL_OUTPUTS, 1e-10, "return_stats")
    # equal to token_stats of the same logits at T = 1
    if linear:
        ts, *_ = run(bk, [h, W, b], y, linear=True, outputs=ALL_OUTPUTS, mask=mask, logit_softcap=3.0, shift=1)
    else:
        ts, *_ = run(bk, [z], y, outputs=ALL_OUTPUTS, mask=mask, logit_softcap=3.0, shift=1)
    for k in ALL_OUTPUTS + ("counted",):
        assert_close(out[k].astype(float), ts[k].astype(float), tol=1e-12, what=f"return_stats vs token_stats {k}")


def _return_stats_problem(bk, linear):
    import xseqloss as xsl
    rng = np.random.default_rng(19)
    N, T, C, H = 2, 3, 5, 4
    y = _put(bk, rng.integers(0, C, (N, T)))
    if linear:
        params = [_put(bk, rng.normal(size=(N, T, H))), _put(bk, rng.normal(size=(C, H))), _put(bk, rng.normal(size=C))]

        def call(hh, ww, bb):
            return xsl.linear_cross_entropy(hh, ww, y, bias=bb, chunk_size=2, label_smoothing=0.1,
                                            return_stats=("log_prob", "entropy", "lse"))
    else:
        params = [_put(bk, rng.normal(size=(N, T, C)))]

        def call(zz):
            return xsl.sequence_cross_entropy(zz, y, label_smoothing=0.1, return_stats=("log_prob", "entropy", "lse"))
    return params, call


@pytest.mark.parametrize("linear", [False, True], ids=["sequence_cross_entropy", "linear_cross_entropy"])
def test_return_stats_carry_no_gradient(backend, linear):
    """The stats of a loss are metrics (API.md 11.5): jax: a gradient through them is zero; tf: the
    tape gives None (or zeros); torch: a gradient through them is zero (no requires_grad: the next
    test)."""
    bk = backend
    params, call = _return_stats_problem(bk, linear)
    names = ("log_prob", "entropy", "lse")
    if bk.name == "numpy":  # no autodiff: plain float arrays, the loss a plain number
        loss, s = call(*params)
        assert all(type(getattr(s, k)) is np.ndarray and getattr(s, k).dtype == np.float64 for k in names)
        assert np.ndim(loss) == 0
    elif bk.name == "torch":
        ps = [p.requires_grad_(True) for p in params]
        _, s = call(*ps)
        for k in names:
            v = getattr(s, k)
            if v.requires_grad:
                gs = torch_grad(v.sum(), ps)
                assert all(float(g.abs().max()) == 0.0 for g in gs if g is not None), k
    elif bk.name == "tensorflow":
        import tensorflow as tf
        for k in names:  # one (non-persistent) tape per stat: see the persistent-tape test below
            with tf.GradientTape() as tape:
                for p in params:
                    tape.watch(p)
                _, s = call(*params)
                tot = tf.reduce_sum(getattr(s, k))
            assert all(gr is None or float(tf.reduce_max(tf.abs(gr))) == 0.0 for gr in tape.gradient(tot, params)), k
    else:
        import jax
        for k in names:
            gs = jax.grad(lambda *p, k=k: getattr(call(*p)[1], k).sum(), argnums=tuple(range(len(params))))(*params)
            assert all(float(abs(np.asarray(gr)).max()) == 0.0 for gr in gs), k


def test_tensorflow_persistent_tape_around_linear_cross_entropy_with_return_stats():
    """A persistent tape (several gradients of one forward: the loss, then a stat) around the fused
    loss with return_stats: the loss's gradient equals the non-persistent tape's, a stat's is None
    or zero."""
    require_or_skip("tensorflow")
    import tensorflow as tf
    bk = get_backend("tensorflow")
    params, call = _return_stats_problem(bk, True)
    with tf.GradientTape() as tape0:
        tape0.watch(params)
        loss0, _ = call(*params)
    want = tape0.gradient(loss0, params)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(params)
        loss, s = call(*params)
        ent = tf.reduce_sum(s.entropy)
    for g, w in zip(tape.gradient(loss, params), want):
        assert_close(g.numpy(), w.numpy(), tol=1e-12, what="loss gradient, persistent tape")
    assert all(g is None or float(tf.reduce_max(tf.abs(g))) == 0.0 for g in tape.gradient(ent, params))


def torch_grad(total, ps):
    import torch
    return torch.autograd.grad(total, ps, allow_unused=True)


@pytest.mark.parametrize("linear", [False, True], ids=["sequence_cross_entropy", "linear_cross_entropy"])
def test_torch_return_stats_do_not_require_grad(linear):
    """torch: the stats of a loss are plain tensors, no requires_grad and no grad_fn, while the
    inputs require grad (sequence_cross_entropy on every torch kernel)."""
    require_or_skip("torch")
    from xseqloss.internals import engine
    bk = get_backend("torch")
    for kernel in (("auto", "chunked", "native") if not linear else ("auto",)):
        with engine.use("torch", kernel):
            params, call = _return_stats_problem(bk, linear)
            ps = [p.requires_grad_(True) for p in params]
            loss, s = call(*ps)
            assert loss.requires_grad
            for k in ("log_prob", "entropy", "lse"):
                v = getattr(s, k)
                assert not v.requires_grad and v.grad_fn is None, (kernel, k, v.grad_fn)


RETURN_STATS_ERRORS = [
    ("inputs_probs", dict(inputs="probs", return_stats=("entropy",)), "index"),
    ("inputs_log_probs", dict(inputs="log_probs", return_stats=("lse",)), "index"),
    ("log_prob_soft_targets", dict(return_stats=("log_prob",)), "soft"),
    ("correct_soft_targets", dict(return_stats=("correct", "entropy")), "soft"),
    ("unknown_name", dict(return_stats=("entropy", "perplexity")), "index"),
    ("ids_log_prob", dict(return_stats=("ids_log_prob",)), "index"),
]


@pytest.mark.parametrize("name,kw,kind", RETURN_STATS_ERRORS, ids=[e[0] for e in RETURN_STATS_ERRORS])
def test_return_stats_errors_name_the_argument(backend, name, kw, kind):
    import xseqloss as xsl
    rng = np.random.default_rng(13)
    z = rng.normal(size=(2, 3, 4))
    if kw.get("inputs") == "probs":
        z = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    t = rng.integers(0, 4, (2, 3)) if kind == "index" else np.full((2, 3, 4), 0.25)
    with pytest.raises(xsl.XSeqLossError, match="return_stats"):
        xsl.sequence_cross_entropy(_put(backend, z), _put(backend, t), **kw)
    if kind == "index" and "inputs" not in kw:
        with pytest.raises(xsl.XSeqLossError, match="return_stats"):
            xsl.linear_cross_entropy(_put(backend, rng.normal(size=(2, 3, 5))), _put(backend, rng.normal(size=(4, 5))),
                                     _put(backend, t), **kw)


def test_torch_chunked_kernel_runs_the_formula_once_per_chunk_with_or_without_stats(monkeypatch):
    """No second pass (API.md 11.5): with PyTorch's chunked kernel forced and 2 tokens a chunk, the
    per-chunk formula (token_loss, as the fused part imports it) runs once per chunk in forward +
    backward, with and without return_stats; the fused layer's chunk kernel (core.chunks, as
    core.linear imports it) likewise. The stats are still right (chunk by chunk)."""
    require_or_skip("torch")
    import torch
    import xseqloss as xsl
    from xseqloss.internals import core, engine, part

    fused = part("torch", "fused")
    calls = []
    real = fused.token_loss

    def counting(*a, **k):
        calls.append(k.get("collect") is not None)
        return real(*a, **k)
    monkeypatch.setattr(fused, "token_loss", counting)
    rng = np.random.default_rng(14)
    N, T, C = 2, 5, 4                      # 10 tokens, 2 a chunk: 5 chunks
    z = rng.normal(size=(N, T, C))
    y = torch.tensor(rng.integers(0, C, (N, T)))
    ref = ref_stats(z, y.numpy(), cap=3.0)
    for rs in (None, ("log_prob", "entropy", "lse", "argmax", "correct")):
        calls.clear()
        zt = torch.tensor(z, requires_grad=True)
        with engine.use("torch", "chunked", chunk_elements=2 * C):
            res = xsl.sequence_cross_entropy(zt, y, label_smoothing=0.1, logit_softcap=3.0, return_stats=rs)
            loss = res if rs is None else res[0]
            n_fwd = len(calls)
            loss.backward()
        assert n_fwd == 5 and len(calls) == 5, (rs, n_fwd, len(calls))
        assert all(c == (rs is not None) for c in calls), calls
        if rs is not None:
            for k in ("log_prob", "entropy", "lse"):
                assert_close(getattr(res[1], k).numpy(), ref[k], tol=1e-10, what=f"chunked {k}")
            assert np.array_equal(res[1].argmax.numpy(), ref["argmax"])

    # the fused layer: one chunk kernel call per chunk, forward and backward together
    lin = []
    for name in ("chunk_grad", "chunk_loss"):
        realf = getattr(core.linear, name)

        def wrap(*a, _r=realf, _n=name, **k):
            lin.append(_n)
            return _r(*a, **k)
        monkeypatch.setattr(core.linear, name, wrap)
    h, W = rng.normal(size=(N, T, 3)), rng.normal(size=(C, 3))
    counts = []
    for rs in (None, ("entropy", "argmax")):
        lin.clear()
        ht, wt = torch.tensor(h, requires_grad=True), torch.tensor(W, requires_grad=True)
        res = xsl.linear_cross_entropy(ht, wt, y, chunk_size=2, label_smoothing=0.1, return_stats=rs)
        (res if rs is None else res[0]).backward()
        counts.append(len(lin))
        if rs is not None:
            r = ref_stats(h @ W.T, y.numpy())
            assert_close(res[1].entropy.detach().numpy(), r["entropy"], tol=1e-10, what="fused return_stats entropy")
    assert counts == [5, 5], counts
