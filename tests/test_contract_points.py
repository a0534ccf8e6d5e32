"""Contract points made explicit (issue 27 items 4 and 8), each on every backend:

* ``reduction="per_segment"`` has the targets' token axes in their order ((T, N) for "TNC");
* a list of targets whose items all have the logits' full T is a rectangular batch (API.md
  section 1), so a padded nested Python list with ``lengths`` works;
* ``empty="nan"``: the empty part's result is NaN, its gradient exactly 0, and the other parts
  keep their own gradient;
* a probability row whose float64 sum is inside 1 +- 1e-3 but whose float32 sum is outside is
  decided the same way everywhere: JAX without x64 (float32 only) included, under jit too.

Numbers are checked against the float64 softmax formula written here."""

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl

rng0 = np.random.default_rng(8)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _nll(z, y):
    """Per-token -log softmax(z)[y] and its gradient softmax - onehot, float64 (N, T) / (N, T, C)."""
    p = _softmax(z)
    onehot = np.eye(z.shape[-1])[np.where(y < 0, 0, y)]
    loss = -np.log(np.take_along_axis(p, np.where(y < 0, 0, y)[..., None], -1)[..., 0])
    return loss, p - onehot


# ------------------------------------------------------------------ per_segment: token axes in order

def test_per_segment_has_the_targets_token_axes_in_order(backend):
    z = rng0.normal(size=(2, 5, 3))
    y = rng0.integers(0, 3, size=(2, 5))
    seg = np.array([[0, 0, 1, 1, 1], [4, 4, 4, 4, -1]])
    ntc = backend.float_out(backend.loss(z, y, segment_ids=seg, reduction="per_segment"))
    tnc = backend.float_out(backend.loss(z.transpose(1, 0, 2), y.T, segment_ids=seg.T, layout="TNC",
                                         reduction="per_segment"))
    assert ntc.shape == (2, 5) and tnc.shape == (5, 2)
    loss, _ = _nll(z, y)
    want = np.zeros((2, 5))
    want[0, 0], want[0, 1], want[1, 0] = loss[0, :2].mean(), loss[0, 2:].mean(), loss[1, :4].mean()
    assert_close(ntc, want, tol=1e-12, what="per_segment NTC")
    assert_close(tnc, want.T, tol=1e-12, what="per_segment TNC is (T, N)")


# ------------------------------------------------------------------ rectangular lists

def test_padded_nested_list_with_lengths_is_a_rectangular_batch(backend):
    """Every row has the logits' full T: the list means the array, and lengths apply (it used to
    be read as ragged rows of length T, contradicting lengths: an error)."""
    z = rng0.normal(size=(2, 3, 4))
    rows = [[1, 2, 0], [3, 0, 0]]
    lengths = np.array([2, 1])
    got = backend.float_out(xsl.sequence_cross_entropy(backend.array(z), rows, lengths=backend.array(lengths)))
    loss, _ = _nll(z, np.array(rows))
    assert_close(got, (loss[0, :2].sum() + loss[1, 0]) / 3, tol=1e-12, what="nested list with lengths")
    per_item = [backend.array(np.array(r)) for r in rows]  # a list of full-T arrays: the same
    got2 = backend.float_out(xsl.sequence_cross_entropy(backend.array(z), per_item, lengths=backend.array(lengths)))
    assert_close(got2, got, tol=1e-12)
    assert int(backend.float_out(xsl.token_count(per_item, lengths=backend.array(lengths)))) == 3
    # time-major: items are the sequences, each with the full T, lengths per sequence
    got3 = backend.float_out(xsl.sequence_cross_entropy(backend.array(z.transpose(1, 0, 2)), rows, layout="TNC",
                                                        lengths=backend.array(lengths)))
    assert_close(got3, got, tol=1e-12)
    # shorter rows stay ragged: their lengths are the rows', and lengths contradicting them an error
    with pytest.raises(xsl.XSeqLossError, match=r"lengths=\[2, 2\] differ from the lengths of the ragged lists"):
        xsl.sequence_cross_entropy(backend.array(z), [[1, 2], [3]], lengths=backend.array(np.array([2, 2])))


# ------------------------------------------------------------------ empty="nan": 0 gradient there

def _empty_cases():
    z = rng0.normal(size=(3, 4, 5))
    y = rng0.integers(0, 5, size=(3, 4))
    y[1] = -100                      # sequence 1: nothing counts
    seg = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [2, 2, 2, 3]])
    y[2, 3] = -100                   # document 3 of sequence 2: nothing counts
    return z, y, seg


@pytest.mark.parametrize("reduction", ["mean_all_empty", "per_sequence", "sequence_mean", "per_segment",
                                       "segment_mean"])
def test_empty_nan_part_has_exactly_zero_gradient_and_the_others_keep_theirs(backend, reduction):
    z, y, seg = _empty_cases()
    loss, g = _nll(z, y)
    counted = y >= 0
    kw = dict(empty="nan")
    want_g = np.zeros_like(z)
    if reduction == "mean_all_empty":
        y = np.full_like(y, -100)
        kw.update(reduction="mean")
        want = np.nan
    elif reduction in ("per_sequence", "sequence_mean"):
        kw.update(reduction=reduction)
        per = np.array([loss[n][counted[n]].mean() if counted[n].any() else np.nan for n in range(3)])
        for n in (0, 2):
            want_g[n] = g[n] * counted[n][:, None] / counted[n].sum()
        want = per if reduction == "per_sequence" else np.nan  # the mean over sequences holds a NaN
        if reduction == "sequence_mean":
            want_g /= 3
    else:
        kw.update(reduction=reduction, segment_ids=seg)
        docs = [(0, [0, 1]), (0, [2, 3]), (1, [0, 1, 2, 3]), (2, [0, 1, 2]), (2, [3])]
        per = np.zeros((3, 4))
        slot = {0: 0, 1: 0, 2: 0}
        for n, ts in docs:
            c = counted[n, ts]
            per[n, slot[n]] = loss[n, ts][c].mean() if c.any() else np.nan
            slot[n] += 1
            if c.any():
                for t in ts:
                    want_g[n, t] = g[n, t] * counted[n, t] / c.sum()
        want = per if reduction == "per_segment" else np.nan
        if reduction == "segment_mean":
            want_g /= len(docs)
    out, grad = backend.loss_and_grad(z, y, **kw)
    out, grad = backend.float_out(out), backend.float_out(grad)
    assert np.array_equal(np.isnan(out), np.isnan(want)), (out, want)
    assert_close(np.nan_to_num(out), np.nan_to_num(want), tol=1e-12, what="finite parts")
    empty = ~counted if reduction != "mean_all_empty" else np.ones_like(counted)
    assert (grad[empty] == 0).all(), grad[empty]   # exactly 0, not NaN
    assert_close(grad, want_g, tol=1e-12, what="the other parts keep their gradient")


# ------------------------------------------------------------------ probability rows at 1 +- 1e-3

# float32 values whose exact (float64) sum is 1.000999995: inside 1 +- 1e-3, but the float32
# nearest to it is 1.0010000467, outside: a float32 sum lands there in the usual orders.
INSIDE = [0.000767, 0.3, 0.700233]
OUTSIDE = [0.000768, 0.3, 0.700233]   # 1.001001: outside in any precision
# 999 x 1e-4 and 0.9011: the exact sum is 1.001 - 2.3e-8 (inside); a running float32 sum drifts to
# 1.0010011 (outside), a pairwise one stays inside: float32 decides by the order of the additions
MANY = np.concatenate([np.full(999, 1e-4, np.float32), [np.float32(0.9011)]]).astype(np.float32)


def _rows():
    """(probabilities (1, 3, C) float32, targets, which rows the float64 rule rejects)."""
    C = MANY.size
    p = np.zeros((1, 3, C), np.float32)
    p[0, 0, :3], p[0, 1, :3], p[0, 2] = INSIDE, OUTSIDE, MANY
    bad = [abs(float(np.sum(r.astype(np.float64))) - 1.0) > 1e-3 for r in p[0]]
    return p, np.array([[2, 1, 0]]), bad


def test_the_crafted_rows_straddle_the_float32_boundary():
    p, _, bad = _rows()
    assert bad == [False, True, False]
    nearest = np.float32(np.sum(p[0, 0].astype(np.float64)))  # a correctly rounded float32 sum
    assert nearest - np.float32(1.0) > np.float32(1e-3)
    running = np.float32(0.0)
    for v in p[0, 2]:
        running = np.float32(running + v)
    assert running - np.float32(1.0) > np.float32(1e-3)


def test_probs_rows_at_the_boundary_decided_alike_on_every_backend(backend):
    p, y, bad = _rows()
    out = backend.float_out(backend.loss(p, y, dtype="float32", inputs="probs", validate=False, reduction="none"))
    assert list(np.isnan(out[0])) == bad, out


def test_probs_rows_at_the_boundary_on_jax_without_x64():
    """JAX without x64 has no float64: its sum is a compensated float32 pair that decides as the
    float64 sum does, eagerly (the check raises for the OUTSIDE row only) and under jit (NaN marks)."""
    require_or_skip("jax")
    from test_backends import run_python
    out = run_python("""
        import jax, jax.numpy as jnp, numpy as np
        assert not jax.config.jax_enable_x64
        import xseqloss as xsl
        from test_contract_points import _rows
        p, y, bad = _rows()
        f = lambda a, b: xsl.sequence_cross_entropy(a, b, inputs="probs", reduction="none")
        for run in (jax.jit(f), lambda a, b: xsl.sequence_cross_entropy(a, b, inputs="probs", reduction="none",
                                                                         validate=False)):
            out = np.asarray(run(jnp.asarray(p), jnp.asarray(y)))
            assert list(np.isnan(out[0])) == bad, out
        ok = np.asarray(xsl.sequence_cross_entropy(jnp.asarray(p[:, [0, 2]]), jnp.asarray(y[:, [0, 2]]),
                                                   inputs="probs", reduction="none"))
        assert np.isfinite(ok).all(), ok
        try:
            xsl.sequence_cross_entropy(jnp.asarray(p), jnp.asarray(y), inputs="probs")
        except xsl.XSeqLossError as e:
            assert "logits[0, 1, :] sums to" in str(e), str(e)
        else:
            raise AssertionError("the OUTSIDE row was accepted")
        print("ok")
    """, env={"JAX_ENABLE_X64": "0"})
    assert "ok" in out
