"""token_stats / linear_token_stats compiled (API.md 11, 11.3): torch.compile(fullgraph=True), jax.jit
and jax.vmap, tf.function(jit_compile=True) with a GradientTape, each against the float64 formula
of tests/test_token_stats.py (and eager); a bad target or id under tracing (or with validate=False)
gives NaN exactly at its token's float outputs and gradient rows, argmax still the argmax, correct
False. Kept apart from test_token_stats.py so that the two files share the workers of a run.
"""

import numpy as np
import pytest

from helpers.support import assert_close, get_backend, require_or_skip
from test_token_stats import ALL_OUTPUTS, FIELDS, check_against_ref, ref_stats, ref_vjp, run

def _bad_problem(seed=15):
    """A problem with a target = C at (1, 2) and an id = C + 1 at (0, 1): under tracing (or with
    validate=False) every float output of those tokens is NaN, their gradient rows NaN, argmax
    still the argmax, correct False; everything else as the reference."""
    rng = np.random.default_rng(seed)
    N, T, C = 2, 3, 5
    z = rng.normal(size=(N, T, C)) * 2
    y = rng.integers(0, C, (N, T))
    ids = rng.integers(0, C, (N, T, 2))
    y[1, 2] = C
    ids[0, 1, 1] = C + 1
    temp = rng.choice([0.5, 1.5], size=(N, T))
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    return z, y, ids, temp, cts


def check_nan_marks(out, g, z, y, ids, temp, cts):
    badtok = np.zeros(y.shape, bool)
    badtok[1, 2] = badtok[0, 1] = True
    ref = ref_stats(z, y, temp, ids)
    for k in ("log_prob", "entropy", "lse", "ids_log_prob"):
        v = out[k]
        vb = v[badtok]
        assert np.all(np.isnan(vb)), (k, v)
        good = v[~badtok]
        assert np.all(np.isfinite(good)), (k, v)
        assert_close(good, ref[k][~badtok], tol=1e-5, what=f"{k} away from the bad tokens")
    assert np.array_equal(out["argmax"], ref["argmax"]), (out["argmax"], ref["argmax"])
    assert not out["correct"][badtok].any()
    assert np.array_equal(out["correct"][~badtok], ref["correct"][~badtok])
    assert np.all(np.isnan(g[badtok])), g[badtok]
    want = ref_vjp(z, cts, y, temp, ids)
    assert_close(g[~badtok], want[~badtok], tol=1e-5, what="gradient away from the bad tokens")


NAN_OUTPUTS = ALL_OUTPUTS + ("ids_log_prob",)


def test_validate_false_marks_bad_tokens_nan(backend):
    """validate=False, eagerly: a bad target and a bad id give NaN exactly at their tokens (outputs
    and gradient rows), argmax still the argmax, correct False."""
    import xseqloss as xsl
    z, y, ids, temp, cts = _bad_problem()
    with pytest.raises(xsl.XSeqLossError):
        run(backend, [z], y, outputs=NAN_OUTPUTS, ids=ids, temperature=temp)
    out, _, g, _ = run(backend, [z], y, cts, outputs=NAN_OUTPUTS, ids=ids, temperature=temp, validate=False)
    check_nan_marks(out, g[0], z, y, ids, temp, cts)


def test_torch_compile_fullgraph_equals_eager_and_reference():
    """One torch.compile(fullgraph=True) function (a graph break would raise): token_stats with a
    per-token temperature, ids, mask and shift; linear_token_stats; and a call whose target and id
    are out of range (NaN marks: tracing never raises). Backward of all of them; equal to eager
    and to the float64 formula."""
    require_or_skip("torch")
    import torch
    import xseqloss as xsl
    rng = np.random.default_rng(16)
    N, T, C, H = 2, 4, 5, 3
    z = rng.normal(size=(N, T, C)) * 2
    y = rng.integers(0, C, (N, T))
    temp = rng.choice([0.5, 0.75, 1.5], size=(N, T)).astype(np.float32)
    ids = rng.integers(0, C, (N, T, 2))
    mask = rng.random((N, T)) > 0.2
    h, W, b = rng.normal(size=(N, T, H)), rng.normal(size=(C, H)), rng.normal(size=C)
    zb, yb, idsb, tempb, ctsb = _bad_problem()
    names = ALL_OUTPUTS + ("ids_log_prob",)
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    f32 = (lambda a: torch.tensor(np.asarray(a, np.float32)))

    def make(validate):  # eagerly the bad call needs validate=False; traced, validate=True marks NaN
        def fn(z_, y_, t_, i_, m_, h_, w_, b_, zb_, yb_, ib_, tb_):
            s1 = xsl.token_stats(z_, y_, outputs=names, temperature=t_, ids=i_, mask=m_, shift=1)
            s2 = xsl.linear_token_stats(h_, w_, y_, bias=b_, outputs=("log_prob", "entropy", "lse"), temperature=t_,
                                        chunk_size=3)
            s3 = xsl.token_stats(zb_, yb_, outputs=names, temperature=tb_, ids=ib_, validate=validate)
            return s1, s2, s3
        return fn

    def go(f):
        leaves = [f32(a).requires_grad_(True) for a in (z, h, W, b, zb)]
        s1, s2, s3 = f(leaves[0], torch.tensor(y), torch.tensor(temp), torch.tensor(ids), torch.tensor(mask),
                       leaves[1], leaves[2], leaves[3], leaves[4], torch.tensor(yb), torch.tensor(idsb),
                       torch.tensor(tempb, dtype=torch.float32))
        total = 0
        for s, c in ((s1, cts), (s2, cts), (s3, ctsb)):
            total = total + sum((getattr(s, k) * f32(v)).sum() for k, v in c.items())
        total.backward()
        return [s1, s2, s3], [x.grad for x in leaves]

    torch._dynamo.reset()
    eager, geager = go(make(False))
    comp, gcomp = go(torch.compile(make(True), fullgraph=True))
    host = (lambda s: {k: None if getattr(s, k) is None else getattr(s, k).detach().double().numpy()
                       if getattr(s, k).is_floating_point() else getattr(s, k).numpy() for k in FIELDS})
    for se, sc in zip(eager, comp):
        for k in FIELDS:
            a, c = getattr(se, k), getattr(sc, k)
            assert (a is None) == (c is None), k
            if a is not None:
                assert a.dtype == c.dtype, (k, a.dtype, c.dtype)
                assert_close(host(sc)[k].astype(float), host(se)[k].astype(float), tol=1e-5,
                             what=f"compiled vs eager {k}")
    for ge, gc in zip(geager, gcomp):
        assert_close(gc.double().numpy(), ge.double().numpy(), tol=1e-5, what="compiled vs eager gradient")
    # against the reference
    keep = np.zeros((N, T), bool)
    keep[:, :-1] = mask[:, 1:]
    ref = ref_stats(z[:, :-1], y[:, 1:], temp[:, 1:].astype(float), ids[:, 1:])
    ref = {k: np.concatenate([v, np.zeros_like(v[:, :1])], 1) for k, v in ref.items() if k in names}
    check_against_ref(host(comp[0]), ref, keep, names, 1e-5, "compiled token_stats")
    want = np.zeros_like(z)
    want[:, :-1] = ref_vjp(z[:, :-1], {k: v[:, :-1] for k, v in cts.items()}, y[:, 1:], temp[:, 1:], ids[:, 1:])
    assert_close(gcomp[0].double().numpy(), want * keep[..., None], tol=1e-5, what="compiled gradient")
    zl = h @ W.T + b
    refl = ref_stats(zl, y, temp.astype(float))
    check_against_ref(host(comp[1]), refl, np.ones((N, T), bool), ("log_prob", "entropy", "lse"), 1e-5,
                      "compiled fused")
    gz = ref_vjp(zl, cts, y, temp)
    assert_close(gcomp[1].double().numpy(), gz @ W, tol=1e-5, what="compiled d hidden")
    assert_close(gcomp[2].double().numpy(), gz.reshape(-1, C).T @ h.reshape(-1, H), tol=1e-5, what="compiled dW")
    check_nan_marks(host(comp[2]), gcomp[4].double().numpy(), zb, yb, idsb, tempb, ctsb)


def test_jax_jit_and_vmap_over_a_batch_of_problems():
    """jax.jit of token_stats and linear_token_stats with their VJP, and jax.vmap over a batch of
    3 problems (per-token temperatures, ids): equal to the float64 formula per problem; a traced
    bad target and id give the NaN marks."""
    require_or_skip("jax")
    import jax
    import jax.numpy as jnp
    import xseqloss as xsl
    rng = np.random.default_rng(17)
    B, N, T, C, H = 3, 2, 3, 5, 4
    z = rng.normal(size=(B, N, T, C)) * 2
    y = rng.integers(0, C, (B, N, T))
    temp = rng.choice([0.5, 1.5], size=(B, N, T))
    ids = rng.integers(0, C, (B, N, T, 2))
    h, W = rng.normal(size=(B, N, T, H)), rng.normal(size=(C, H))
    cts = {k: rng.normal(size=(B, N, T)) for k in ("log_prob", "entropy")}
    names = ("log_prob", "entropy", "lse", "argmax", "ids_log_prob")

    def one(zz, yy, tt, ii):
        s = xsl.token_stats(zz, yy, outputs=names, temperature=tt, ids=ii)
        return (s.log_prob, s.entropy), s

    def one_lin(hh, ww, yy, tt):
        s = xsl.linear_token_stats(hh, ww, yy, outputs=("log_prob", "entropy"), temperature=tt, chunk_size=4)
        return (s.log_prob, s.entropy), s

    ct = (jnp.asarray(cts["log_prob"]), jnp.asarray(cts["entropy"]))
    yj, tj, ij = jnp.asarray(y), jnp.asarray(temp), jnp.asarray(ids)
    vm = jax.jit(jax.vmap(one))
    outs, pull, s = jax.vjp(lambda v: vm(v, yj, tj, ij), jnp.asarray(z), has_aux=True)
    g = pull(ct)[0]
    for i in range(B):
        ref = ref_stats(z[i], y[i], temp[i], ids[i])
        out = {k: None if getattr(s, k) is None else np.asarray(getattr(s, k))[i] for k in FIELDS}
        check_against_ref(out, ref, np.ones((N, T), bool), names, 1e-10, f"vmap problem {i}")
        want = ref_vjp(z[i], {k: v[i] for k, v in cts.items()}, y[i], temp[i], ids[i])
        assert_close(np.asarray(g)[i], want, tol=1e-10, what=f"vmap gradient {i}")
    # the fused layer under jit and vmap, d hidden and d weight (summed over the problems)
    vl = jax.jit(jax.vmap(one_lin, in_axes=(0, None, 0, 0)))
    outs, pull, s = jax.vjp(lambda a, w_: vl(a, w_, yj, tj), jnp.asarray(h), jnp.asarray(W), has_aux=True)
    dh, dw = pull(ct)
    dw_want = np.zeros_like(W)
    for i in range(B):
        zi = h[i] @ W.T
        ref = ref_stats(zi, y[i], temp[i])
        out = {k: None if getattr(s, k) is None else np.asarray(getattr(s, k))[i] for k in FIELDS}
        check_against_ref(out, ref, np.ones((N, T), bool), ("log_prob", "entropy"), 1e-10, f"vmap fused {i}")
        gz = ref_vjp(zi, {k: v[i] for k, v in cts.items()}, y[i], temp[i])
        assert_close(np.asarray(dh)[i], gz @ W, tol=1e-10, what=f"vmap fused d hidden {i}")
        dw_want += gz.reshape(-1, C).T @ h[i].reshape(-1, H)
    assert_close(np.asarray(dw), dw_want, tol=1e-10, what="vmap fused d weight")
    # a traced bad target and id: NaN marks
    zb, yb, idsb, tempb, ctsb = _bad_problem()

    def bad(zz, yy, ii, tt):
        s = xsl.token_stats(zz, yy, outputs=NAN_OUTPUTS, ids=ii, temperature=tt)
        return tuple(getattr(s, k) for k in ctsb), s
    jb = jax.jit(bad)
    outs, pull, s = jax.vjp(lambda v: jb(v, jnp.asarray(yb), jnp.asarray(idsb), jnp.asarray(tempb)), jnp.asarray(zb),
                            has_aux=True)
    gb = pull(tuple(jnp.asarray(ctsb[k]) for k in ctsb))[0]
    check_nan_marks({k: None if getattr(s, k) is None else np.asarray(getattr(s, k)) for k in FIELDS},
                    np.asarray(gb), zb, yb, idsb, tempb, ctsb)


def test_tensorflow_function_jit_compile_with_gradient_tape():
    """tf.function(jit_compile=True) around token_stats, linear_token_stats and a GradientTape
    (targets, temperature and ids are traced arguments): equal to the float64 formula; a bad target
    and id give the NaN marks."""
    require_or_skip("tensorflow")
    import tensorflow as tf
    import xseqloss as xsl
    rng = np.random.default_rng(18)
    N, T, C, H = 2, 4, 5, 3
    z = rng.normal(size=(N, T, C)) * 2
    y = rng.integers(0, C, (N, T))
    temp = rng.choice([0.5, 1.5], size=(N, T))
    ids = rng.integers(0, C, (N, T, 2))
    mask = rng.random((N, T)) > 0.2
    h, W = rng.normal(size=(N, T, H)), rng.normal(size=(H, C))
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    names = ALL_OUTPUTS + ("ids_log_prob",)

    @tf.function(jit_compile=True)
    def f(z_, y_, t_, i_, m_, h_, w_):
        with tf.GradientTape() as tape:
            tape.watch(z_)
            s1 = xsl.token_stats(z_, y_, outputs=names, temperature=t_, ids=i_, mask=m_, shift=1)
            tot1 = sum(tf.reduce_sum(getattr(s1, k) * tf.constant(v)) for k, v in cts.items())
        with tf.GradientTape() as tape2:
            tape2.watch([h_, w_])
            s2 = xsl.linear_token_stats(h_, w_, y_, weight_layout="HC", outputs=("log_prob", "entropy", "lse"),
                                        temperature=t_, chunk_size=3)
            tot2 = sum(tf.reduce_sum(getattr(s2, k) * tf.constant(v)) for k, v in cts.items())
        return s1, s2, tape.gradient(tot1, z_), tape2.gradient(tot2, [h_, w_])

    c = tf.constant
    s1, s2, g1, (gh, gw) = f(c(z), c(y), c(temp), c(ids), c(mask), c(h), c(W))
    host = (lambda s: {k: None if getattr(s, k) is None else get_backend("tensorflow").to_numpy(getattr(s, k))
                       for k in FIELDS})
    keep = np.zeros((N, T), bool)
    keep[:, :-1] = mask[:, 1:]
    ref = ref_stats(z[:, :-1], y[:, 1:], temp[:, 1:], ids[:, 1:])
    ref = {k: np.concatenate([v, np.zeros_like(v[:, :1])], 1) for k, v in ref.items() if k in names}
    check_against_ref(host(s1), ref, keep, names, 1e-10, "tf.function token_stats")
    want = np.zeros_like(z)
    want[:, :-1] = ref_vjp(z[:, :-1], {k: v[:, :-1] for k, v in cts.items()}, y[:, 1:], temp[:, 1:], ids[:, 1:])
    assert_close(g1.numpy(), want * keep[..., None], tol=1e-10, what="tf.function gradient")
    zl = h @ W
    check_against_ref(host(s2), ref_stats(zl, y, temp), np.ones((N, T), bool), ("log_prob", "entropy", "lse"),
                      1e-10, "tf.function fused")
    gz = ref_vjp(zl, cts, y, temp)
    assert_close(gh.numpy(), gz @ W.T, tol=1e-10, what="tf.function d hidden")
    assert_close(gw.numpy(), h.reshape(-1, H).T @ gz.reshape(-1, C), tol=1e-10, what="tf.function d weight (HC)")

    zb, yb, idsb, tempb, ctsb = _bad_problem()

    @tf.function(jit_compile=True)
    def fb(z_, y_, i_, t_):
        with tf.GradientTape() as tape:
            tape.watch(z_)
            s = xsl.token_stats(z_, y_, outputs=NAN_OUTPUTS, ids=i_, temperature=t_)
            tot = sum(tf.reduce_sum(getattr(s, k) * tf.constant(v)) for k, v in ctsb.items())
        return s, tape.gradient(tot, z_)
    s, gb = fb(c(zb), c(yb), c(idsb), c(tempb))
    check_nan_marks(host(s), gb.numpy(), zb, yb, idsb, tempb, ctsb)


def test_tensorflow_linear_token_stats_persistent_tape_under_jit_compile():
    require_or_skip("tensorflow")
    import tensorflow as tf
    import xseqloss as xsl
    rng = np.random.default_rng(20)
    h, W = rng.normal(size=(2, 4, 3)), rng.normal(size=(5, 3))
    y = rng.integers(0, 5, (2, 4))

    @tf.function(jit_compile=True)
    def f(h_, w_, y_):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([h_, w_])
            s = xsl.linear_token_stats(h_, w_, y_, outputs=("entropy",), temperature=0.5, chunk_size=3)
            tot = tf.reduce_sum(s.entropy)
        return s.entropy, tape.gradient(tot, h_)
    ent, gh = f(tf.constant(h), tf.constant(W), tf.constant(y))
    z = h @ W.T
    assert_close(ent.numpy(), ref_stats(z, y, 0.5)["entropy"], tol=1e-10, what="entropy")
    gz = ref_vjp(z, {"entropy": np.ones((2, 4))}, y, 0.5)
    assert_close(gh.numpy(), gz @ W, tol=1e-10, what="d hidden")
