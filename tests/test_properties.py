"""Property-based invariants (bad-inputs.md section 5) under hypothesis, on every
backend.  Shapes: N in [1, 3], T in [1, 5], C in [1, 7]; float64 unless said.
Example counts per backend are in helpers.support.HYP_EXAMPLES (TF eager is slow)."""

import math
import os

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers.inputs import from_ntc, from_nt
from helpers.reference64 import reference
from helpers.support import HYP_EXAMPLES, assert_close, reductions_for, rel_err

# drawn logits can look like probability rows (e.g. all zeros and ones) and
# trigger the "did you pass softmax outputs?" warning; it is not under test here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_property(backend, test, scale=1.0):
    """Run a @given test with this backend's example budget.  Shrinking is
    kept for NumPy only: on JAX every new shape or option set compiles, on TF
    eager every call is slow, and an unshrunk counterexample is still exact."""
    scale *= float(os.environ.get("XSEQLOSS_HYPOTHESIS_SCALE", "1"))  # deeper local runs
    n = max(1, int(HYP_EXAMPLES[backend.name] * scale))
    phases = list(Phase) if backend.name == "numpy" else [
        Phase.explicit, Phase.reuse, Phase.generate]
    settings(max_examples=n, deadline=None, database=None, phases=phases,
             report_multiple_bugs=False, print_blob=True)(test)()


def weights_strategy(shape):
    """0 or in [1e-3, 3]: no subnormals (TF and XLA flush them to zero)."""
    return hnp.arrays(np.float64, shape,
                      elements=st.one_of(st.just(0.0), st.floats(1e-3, 3.0)))


# JAX compiles (jax.jit) and TensorFlow traces (tf.function) the loss once per
# shape and option set (0.1-0.5 s each on this machine), so on those two the
# properties explore values on a few fixed shapes, while NumPy and PyTorch
# also explore every shape in the N, T, C ranges.
FIXED_SHAPES = {"jax": [(2, 4, 5), (3, 2, 1)],
                "tensorflow": [(2, 4, 5), (3, 2, 1), (1, 5, 7), (2, 1, 2)]}


@st.composite
def problems(draw, backend, min_N=1, max_N=3, min_T=1, max_T=5, min_C=1, max_C=7,
             scale=30.0):
    if backend.name in FIXED_SHAPES:
        N, T, C = draw(st.sampled_from([s for s in FIXED_SHAPES[backend.name]
                                        if s[0] >= min_N]))
    else:
        N = draw(st.integers(min_N, max_N))
        T = draw(st.integers(min_T, max_T))
        C = draw(st.integers(min_C, max_C))
    x = draw(hnp.arrays(np.float64, (N, T, C),
                        elements=st.floats(-scale, scale, allow_nan=False, width=64)))
    y = draw(hnp.arrays(np.int64, (N, T), elements=st.integers(0, C - 1)))
    m = draw(hnp.arrays(np.bool_, (N, T)))
    m.flat[draw(st.integers(0, N * T - 1))] = True
    return x, y, m


def eq_tol(x):
    """Tolerance of "these two calls must agree" properties: rounding of
    intermediates of the logits' magnitude (a C = 1 loss of exactly 0 can come
    out as -1e-14 when lse and z are ~26), relative to 1 + |ref|."""
    return 1e-14 * (1.0 + float(np.abs(x).max(initial=0.0))) * (x.shape[-1] + 1)


def out(backend, x, y, **opts):
    return backend.float_out(backend.loss(x, y, **opts))


def vg(backend, x, y, **opts):
    o, g = backend.loss_and_grad(x, y, **opts)
    return backend.float_out(o), backend.float_out(g)


# --------------------------------------------------------------------------

def test_random_options_match_reference(backend):
    @given(p=problems(backend), data=st.data())
    def check(p, data):
        x, y, m = p
        N, T, C = x.shape
        opts = {}
        if data.draw(st.booleans()):
            opts["mask"] = m
        if data.draw(st.booleans()):
            opts["lengths"] = data.draw(hnp.arrays(np.int64, (N,), elements=st.integers(0, T)))
        if data.draw(st.booleans()):
            opts["weights"] = data.draw(weights_strategy((N, T)))
        if data.draw(st.booleans()):
            opts["class_weights"] = data.draw(weights_strategy((C,)))
        opts["label_smoothing"] = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
        opts["smoothing"] = data.draw(st.sampled_from(["uniform", "others"]))
        opts["z_loss"] = data.draw(st.sampled_from([0.0, 1e-3]))
        opts["logit_softcap"] = data.draw(st.sampled_from([None, 10.0]))
        opts["reduction"] = data.draw(st.sampled_from(
            ["none", "sum", "mean", "per_sequence", "per_position", "sequence_mean"]))
        opts["denominator"] = data.draw(st.sampled_from(["weights", "tokens", "positions"]))
        got, g = vg(backend, x, y, **opts)
        ref, gref = reference(x, y, with_grad=True, **opts)
        assert_close(got, ref, what=f"value {opts}")
        assert_close(g, gref, what=f"gradient {opts}")
    run_property(backend, check)


def test_shift_invariance(backend):
    @given(p=problems(backend), data=st.data())
    def check(p, data):
        x, y, m = p
        N, T, C = x.shape
        c = data.draw(hnp.arrays(np.float64, (N, T, 1), elements=st.floats(-100, 100)))
        eps = data.draw(st.sampled_from([0.0, 0.2]))
        a = out(backend, x, y, mask=m, reduction="none", label_smoothing=eps)
        b = out(backend, x + c, y, mask=m, reduction="none", label_smoothing=eps)
        tol = 1e-13 * (1 + np.abs(x).max() + np.abs(c).max()) * (C + 1)
        assert np.max(np.abs(a - b)) <= tol
    run_property(backend, check)


def test_masked_equals_removed_with_garbage(backend):
    @given(p=problems(backend), garbage=st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
    def check(p, garbage):
        x, y, m = p
        xg = np.where(m[..., None], x, garbage)
        for reduction in ("sum", "mean"):
            full, g = vg(backend, xg, y, mask=m, reduction=reduction)
            sub, gs = vg(backend, x[m], y[m], layout="NC", reduction=reduction)
            assert_close(full, sub, tol=1e-12)
            assert np.all(np.isfinite(g)) and np.all(g[~m] == 0)
            assert_close(g[m], gs, tol=1e-12)
    run_property(backend, check)


def test_ignore_index_equals_mask(backend):
    @given(p=problems(backend), ign=st.sampled_from([-100, -1, 10**6]))
    def check(p, ign):
        x, y, m = p
        yi = np.where(m, y, ign)
        for reduction in ("none", "mean", "per_sequence"):
            a = out(backend, x, y, mask=m, reduction=reduction)
            b = out(backend, x, yi, ignore_index=ign, reduction=reduction)
            assert_close(a, b, tol=eq_tol(x))
    run_property(backend, check)


def test_lengths_equals_prefix_mask(backend):
    @given(p=problems(backend), data=st.data())
    def check(p, data):
        x, y, _ = p
        N, T, _ = x.shape
        lengths = data.draw(hnp.arrays(np.int64, (N,), elements=st.integers(0, T)))
        prefix = np.arange(T)[None, :] < lengths[:, None]
        for reduction in ("none", "mean", "per_position"):
            a, ga = vg(backend, x, y, lengths=lengths, reduction=reduction)
            b, gb = vg(backend, x, y, mask=prefix, reduction=reduction)
            assert_close(a, b, tol=eq_tol(x))
            assert_close(ga, gb, tol=eq_tol(x))
    run_property(backend, check)


def test_layout_equivalence(backend):
    @given(p=problems(backend), layout=st.permutations("NTC").map("".join))
    def check(p, layout):
        x, y, m = p
        xl, yl, ml = from_ntc(x, layout), from_nt(y, layout), from_nt(m, layout)
        for reduction in ("none", "mean", "per_sequence", "per_position"):
            a, ga = vg(backend, x, y, mask=m, reduction=reduction)
            b, gb = vg(backend, xl, yl, mask=ml, layout=layout, reduction=reduction)
            if reduction == "none":
                b = np.transpose(b, [layout.replace("C", "").index(k) for k in "NT"])
            gb = np.transpose(gb, [layout.index(k) for k in "NTC"])
            assert_close(a, b, tol=eq_tol(x))
            assert_close(ga, gb, tol=eq_tol(x))
    run_property(backend, check)


def test_smoothing_zero_equals_plain(backend):
    @given(p=problems(backend), smoothing=st.sampled_from(["uniform", "others"]),
           cw=st.booleans())
    def check(p, smoothing, cw):
        x, y, m = p
        C = x.shape[-1]
        opts = dict(mask=m, reduction="none")
        if cw:
            opts["class_weights"] = np.linspace(0.5, 2.0, C)
        a, ga = vg(backend, x, y, **opts)
        b, gb = vg(backend, x, y, label_smoothing=0.0, smoothing=smoothing, **opts)
        assert_close(a, b, tol=eq_tol(x))
        assert_close(ga, gb, tol=eq_tol(x))
    run_property(backend, check)


def test_uniform_class_weights(backend):
    @given(p=problems(backend), k=st.floats(0.25, 4.0), eps=st.sampled_from([0.0, 0.1]))
    def check(p, k, eps):
        x, y, m = p
        C = x.shape[-1]
        base = dict(mask=m, label_smoothing=eps)
        for reduction in ("none", "mean", "sum"):
            plain = out(backend, x, y, reduction=reduction, **base)
            ones = out(backend, x, y, reduction=reduction, class_weights=np.ones(C), **base)
            assert_close(ones, plain, tol=eq_tol(x))
        kk = np.full(C, k)
        mean_k = out(backend, x, y, reduction="mean", class_weights=kk, **base)
        sum_k = out(backend, x, y, reduction="sum", class_weights=kk, **base)
        assert_close(mean_k, out(backend, x, y, reduction="mean", **base), tol=1e-12)
        assert_close(sum_k, k * out(backend, x, y, reduction="sum", **base), tol=1e-12)
    run_property(backend, check)


def test_scaling_all_class_weights_leaves_every_mean_unchanged(backend):
    """Index targets: cw -> k cw leaves "mean", "per_sequence", "per_position" and "sequence_mean"
    unchanged with the "weights" denominator, with smoothing (both conventions), z-loss and token
    weights: the z-loss term is weighted like its token (API.md 1, changed 2026-12; before, its
    unweighted term over a weighted denominator made the mean change with k). Gradients too.
    (Soft targets keep class weights out of the denominator, PyTorch's convention, decisions.md
    item 7: there a mean scales with k, by design.)"""
    @given(p=problems(backend), data=st.data())
    def check(p, data):
        x, y, m = p
        N, T, C = x.shape
        k = data.draw(st.sampled_from([0.25, 3.0, 1024.0]))
        cw = data.draw(hnp.arrays(np.float64, (C,), elements=st.floats(0.25, 2.0)))
        w = data.draw(hnp.arrays(np.float64, (N, T), elements=st.floats(0.5, 2.0)))
        t = y
        opts = dict(mask=m, weights=w, z_loss=data.draw(st.sampled_from([0.0, 1e-2])),
                    label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
                    smoothing=data.draw(st.sampled_from(["uniform", "others"])))
        for reduction in reductions_for(backend, ["mean", "per_sequence", "per_position", "sequence_mean"],
                                        (N, T, C, k)):
            a, ga = vg(backend, x, t, reduction=reduction, class_weights=cw, **opts)
            b, gb = vg(backend, x, t, reduction=reduction, class_weights=k * cw, **opts)
            assert_close(b, a, tol=1e-12, what=f"{reduction} with class weights x{k}")
            assert_close(gb, ga, tol=1e-12, what=f"{reduction} gradient with class weights x{k}")
    run_property(backend, check)


def test_mean_times_token_count_is_the_sum(backend, xsl):
    """mean * token_count == sum over the option matrix, index and soft targets: token_count is
    the very D that "mean" divides by (issue 17: soft targets with class weights crashed)."""
    @given(p=problems(backend), data=st.data())
    def check(p, data):
        x, y, m = p
        N, T, C = x.shape
        soft = data.draw(st.booleans())
        t = y
        if soft:
            t = np.exp(x[::-1] / 5.0)
            t = t / t.sum(-1, keepdims=True)
        den = data.draw(st.sampled_from(["weights", "tokens", "positions"]))
        sides = dict(mask=m)
        if data.draw(st.booleans()):
            sides["weights"] = data.draw(hnp.arrays(np.float64, (N, T), elements=st.floats(0.25, 2.0)))
        if data.draw(st.booleans()):
            sides["class_weights"] = data.draw(hnp.arrays(np.float64, (C,), elements=st.floats(0.25, 2.0)))
        if data.draw(st.booleans()):
            sides["lengths"] = data.draw(hnp.arrays(np.int64, (N,), elements=st.integers(0, T)))
        opts = dict(denominator=den, label_smoothing=data.draw(st.sampled_from([0.0, 0.2])),
                    z_loss=data.draw(st.sampled_from([0.0, 1e-2])))
        count = float(backend.float_out(xsl.token_count(
            backend.array(t), num_classes=C, denominator=den,
            **{k: backend.array(v) for k, v in sides.items()})))
        mean = float(out(backend, x, t, reduction="mean", **sides, **opts))
        total = float(out(backend, x, t, reduction="sum", **sides, **opts))
        if count == 0:
            assert mean == 0.0 and total == 0.0
        else:
            assert_close(mean * count, total, tol=1e-12)
    run_property(backend, check)


def test_microbatch_accumulation(backend, xsl):
    """Sum over micro-batches of the loss with normalizer = global token_count
    equals the full-batch mean; gradients concatenate to the full gradient."""
    @given(p=problems(backend, min_N=2), data=st.data())
    def check(p, data):
        x, y, m = p
        N, T, C = x.shape
        split = data.draw(st.integers(1, N - 1))
        denominator = data.draw(st.sampled_from(["weights", "tokens", "positions"]))
        w = data.draw(hnp.arrays(np.float64, (N, T), elements=st.floats(0.5, 2.0)))
        cw = data.draw(hnp.arrays(np.float64, (C,), elements=st.floats(0.5, 2.0)))
        parts = [slice(0, split), slice(split, N)]
        opts = dict(denominator=denominator, class_weights=cw)

        def count(s):
            c = xsl.token_count(backend.array(y[s]), layout="NTC",
                                mask=backend.array(m[s]), weights=backend.array(w[s]),
                                class_weights=backend.array(cw), num_classes=C,
                                denominator=denominator)
            return float(backend.float_out(c))

        total = sum(count(s) for s in parts)
        full, gfull = vg(backend, x, y, mask=m, weights=w, reduction="mean", **opts)
        acc, grads = 0.0, []
        for s in parts:
            v, g = vg(backend, x[s], y[s], mask=m[s], weights=w[s], reduction="mean",
                      normalizer=total, **opts)
            acc += float(v)
            grads.append(g)
        assert_close(acc, full, tol=1e-12)
        assert_close(np.concatenate(grads), gfull, tol=1e-12)
        # the same for sequence_mean with the global number of sequences
        sfull = out(backend, x, y, mask=m, weights=w, reduction="sequence_mean", **opts)
        sacc = sum(float(out(backend, x[s], y[s], mask=m[s], weights=w[s],
                             reduction="sequence_mean", normalizer=N, **opts))
                   for s in parts)
        assert_close(sacc, sfull, tol=1e-12)
    run_property(backend, check)


def test_bounds(backend):
    """0 <= max(x) - x_y <= loss <= max(x) - x_y + log C, per token."""
    @given(p=problems(backend, scale=300.0))
    def check(p):
        x, y, m = p
        C = x.shape[-1]
        loss = out(backend, x, y, reduction="none")
        gap = x.max(-1) - np.take_along_axis(x, y[..., None], -1)[..., 0]
        slack = 1e-12 * (1 + np.abs(x).max())
        assert np.all(gap >= 0)
        assert np.all(loss >= gap - slack)
        assert np.all(loss <= gap + math.log(C) + slack)
    run_property(backend, check)


def test_token_independence(backend):
    """Changing one token's logits changes only that token's loss, bitwise."""
    @given(p=problems(backend), data=st.data())
    def check(p, data):
        x, y, m = p
        N, T, C = x.shape
        n = data.draw(st.integers(0, N - 1))
        t = data.draw(st.integers(0, T - 1))
        x2 = x.copy()
        x2[n, t] = data.draw(hnp.arrays(np.float64, (C,), elements=st.floats(-30, 30)))
        opts = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3)
        a = out(backend, x, y, **opts)
        b = out(backend, x2, y, **opts)
        keep = np.ones((N, T), bool)
        keep[n, t] = False
        assert np.array_equal(a[keep], b[keep])
    run_property(backend, check)


def test_index_target_equals_one_hot(backend):
    @given(p=problems(backend), eps=st.sampled_from([0.0, 0.1, 0.3]),
           smoothing=st.sampled_from(["uniform", "others"]), cw=st.booleans())
    def check(p, eps, smoothing, cw):
        x, y, m = p
        C = x.shape[-1]
        onehot = np.eye(C)[y]
        opts = dict(mask=m, label_smoothing=eps, smoothing=smoothing)
        if cw:
            opts["class_weights"] = np.linspace(0.5, 2.0, C)
        reductions = ("none", "sum") if cw else ("none", "sum", "mean", "per_sequence")
        for reduction in reductions_for(backend, reductions, eps):
            a, ga = vg(backend, x, y, reduction=reduction, **opts)
            b, gb = vg(backend, x, onehot, reduction=reduction, **opts)
            assert_close(a, b, tol=1e-12)
            assert_close(ga, gb, tol=1e-12)
    run_property(backend, check)


def test_reduction_consistency(backend, xsl):
    @given(p=problems(backend), denominator=st.sampled_from(["weights", "tokens", "positions"]),
           weighted=st.booleans())
    def check(p, denominator, weighted):
        x, y, m = p
        N, T, C = x.shape
        opts = dict(mask=m, denominator=denominator)
        if weighted:
            opts["weights"] = np.linspace(0.5, 1.5, N * T).reshape(N, T)
        none = out(backend, x, y, reduction="none", **opts)
        total = out(backend, x, y, reduction="sum", **opts)
        mean = out(backend, x, y, reduction="mean", **opts)
        per_seq = out(backend, x, y, reduction="per_sequence", **opts)
        seq_mean = out(backend, x, y, reduction="sequence_mean", **opts)
        assert_close(total, none.sum(), tol=eq_tol(x))
        side = {k: backend.array(v) for k, v in opts.items() if k != "denominator"}
        D = float(backend.float_out(xsl.token_count(backend.array(y), layout="NTC",
                                                    denominator=denominator,
                                                    num_classes=C, **side)))
        assert_close(mean, total / D if D else 0.0, tol=eq_tol(x))
        assert_close(seq_mean, per_seq.mean(), tol=eq_tol(x))
    run_property(backend, check)


def test_float32_matches_reference(backend):
    @given(p=problems(backend, scale=10.0), soft=st.booleans())
    def check(p, soft):
        x, y, m = p
        if soft:
            C = x.shape[-1]
            y = np.eye(C)[y] * 0.5 + 0.5 / C
        x32 = x.astype(np.float32).astype(np.float64)
        y32 = y.astype(np.float32).astype(np.float64) if soft else y
        for reduction in ("none", "mean"):
            o, g = backend.loss_and_grad(x32, y32, "float32", mask=m, reduction=reduction,
                                         label_smoothing=0.1)
            ref, gref = reference(x32, y32, mask=m, reduction=reduction, label_smoothing=0.1,
                                  with_grad=True)
            assert rel_err(backend.float_out(o), ref) <= 1e-5
            assert rel_err(backend.float_out(g), gref) <= 1e-5
    run_property(backend, check, scale=0.5)
