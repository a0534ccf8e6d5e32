"""The second batch of the adversarial hunt (issue 17): each item reproduced on the old code, fixed
on every backend, and tested here (each test fails before its fix):

1. the eager probability check and the traced NaN mark disagreed at the 1 +- 1e-3 boundary;
2. token_count with soft targets and class weights (no token weights) crashed;
3. the options cache let a rejected ignore_index through once an equal good one had been used;
4. `xseqloss crosscheck`: `--ignore-index -100,2` was refused, and a NaN value was not flagged;
5. inplace_backward=True on a tensor whose elements share memory failed inside PyTorch;
6. zero target mass at a -inf logit gave NaN (0 log 0 = 0 now);
7. the soft-target message stated a rule ([0, 1]) that was not the one enforced.
"""

import numpy as np
import pytest

from support import assert_close, get_backend, require_or_skip

import xseqloss as xsl


# ------------------------------------------------------------------ 1. probs at the boundary

# INSIDE sums to 1.000999995 (its float32 values, exactly): within 1 +- 1e-3, but a float32 sum in
# some orders of addition rounds to 1.0010000 > 1.001; the old eager check summed in float64 on the
# host (accepted, loss 7.467) while the traced mark summed in float32 (NaN). OUTSIDE sums to
# 1.001001, past the boundary in any order. One rule, one precision: float64 on every path.
INSIDE = [0.000767, 0.3, 0.700233]
OUTSIDE = [0.000768, 0.3, 0.700233]


def _probs(row):
    return np.array([[row, [0.25, 0.25, 0.5]]], np.float32), np.array([[2, 1]])


def test_probs_boundary_eager_check_and_validate_false_agree(backend):
    p, y = _probs(INSIDE)
    out = backend.float_out(backend.loss(p, y, dtype="float32", inputs="probs", reduction="none"))
    unchecked = backend.float_out(backend.loss(p, y, dtype="float32", inputs="probs", validate=False,
                                               reduction="none"))
    assert np.isfinite(out).all() and np.array_equal(out, unchecked)
    p, y = _probs(OUTSIDE)
    with pytest.raises(xsl.XSeqLossError, match=r"logits\[0, 0, :\] sums to 1.0010009\d* in float64"):
        backend.loss(p, y, dtype="float32", inputs="probs")
    out = backend.float_out(backend.loss(p, y, dtype="float32", inputs="probs", validate=False, reduction="none"))
    assert np.isnan(out[0, 0]) and np.isfinite(out[0, 1])


def test_probs_boundary_under_jit_and_tf_function():
    require_or_skip("jax")
    require_or_skip("tensorflow")
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    f = lambda a, b: xsl.sequence_cross_entropy(a, b, inputs="probs", reduction="none")  # noqa: E731
    for row, bad in ((INSIDE, False), (OUTSIDE, True)):
        p, y = _probs(row)
        eager = np.asarray(xsl.sequence_cross_entropy(p, y, inputs="probs", reduction="none", validate=False))
        for out in (np.asarray(jax.jit(f)(jnp.asarray(p), jnp.asarray(y))),
                    tf.function(f, jit_compile=True)(tf.constant(p), tf.constant(y)).numpy(),
                    tf.function(f)(tf.constant(p), tf.constant(y)).numpy()):
            assert np.isnan(out[0, 0]) == bad and np.isfinite(out[0, 1]), (row, out)
            assert np.isnan(eager[0, 0]) == bad


# ------------------------------------------------------------------ 2. token_count, soft + class weights

def test_token_count_soft_targets_with_class_weights(backend, xsl):
    """It returned array(None, dtype=object) on NumPy and crashed elsewhere; class weights do not
    enter W for soft targets (decisions.md item 7), so it is the number of counted tokens."""
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(4), size=(2, 3))
    m = np.array([[1, 1, 0], [1, 0, 1]], bool)
    cw = np.array([1.0, 2.0, 3.0, 0.5])
    n = xsl.token_count(backend.array(q), mask=backend.array(m), class_weights=backend.array(cw))
    assert float(backend.float_out(n)) == 4.0
    z = rng.normal(size=(2, 3, 4))
    mean = float(backend.float_out(backend.loss(z, q, mask=m, class_weights=cw)))
    total = float(backend.float_out(backend.loss(z, q, mask=m, class_weights=cw, reduction="sum")))
    assert_close(mean * 4.0, total)


# ------------------------------------------------------------------ 3. the options cache

@pytest.mark.parametrize("bad", [(1.0, 2.0), (True, 2), (1, 2.0)])
def test_options_cache_rejects_what_a_fresh_process_rejects(bad):
    z, y = np.zeros((1, 2, 3)), np.array([[1, 2]])
    xsl.sequence_cross_entropy(z, y, ignore_index=(1, 2))  # the good value first: it is cached
    with pytest.raises(xsl.XSeqLossTypeError, match="ignore_index"):
        xsl.sequence_cross_entropy(z, y, ignore_index=bad)
    xsl.sequence_cross_entropy(z, y, label_smoothing=1)  # 1 == 1.0 == True: equal, not the same
    with pytest.raises(xsl.XSeqLossTypeError, match="label_smoothing"):
        xsl.sequence_cross_entropy(z, y, label_smoothing=True)


# ------------------------------------------------------------------ 4. crosscheck

def test_crosscheck_negative_ignore_list_and_nan_flagged(tmp_path, capsys, monkeypatch):
    from xseqloss.cli import main
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, -100, 2], [2, 4, 0]])
    path = tmp_path / "batch.npz"
    np.savez(path, logits=logits, targets=targets)
    assert main(["crosscheck", str(path), "--ignore-index", "-100,2", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "DISAGREES" not in out

    # a backend that gives NaN where the reference is finite is a disagreement, exit status 1
    from xseqloss.internals import backend
    cls = type(backend("numpy"))
    real = cls.run

    def nan_run(self, fn, st, *arrays):
        out = real(self, fn, st, *arrays)
        if isinstance(out, tuple):  # (loss, value-check flags)
            return (out[0] * np.nan,) + out[1:]
        return out * np.nan if isinstance(out, np.ndarray) and out.dtype.kind == "f" else out
    monkeypatch.setattr(cls, "run", nan_run)
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: None)
    assert main(["crosscheck", str(path), "--backends", "numpy"]) == 1
    assert "DISAGREES" in capsys.readouterr().out


def test_crosscheck_invalid_input_nan_is_flagged(tmp_path, capsys, monkeypatch):
    """The reference cannot compute a bad label; a backend that returns NaN there instead of
    raising is flagged (it did not say the input is bad): JAX under eager jax.grad used to."""
    from xseqloss.cli import main
    logits = np.zeros((1, 2, 3), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, logits=logits, targets=np.array([[1, 7]]))
    assert main(["crosscheck", str(path), "--backends", "numpy", "jax"]) == 1
    assert "numpy/cpu              error: XSeqLossError" in capsys.readouterr().out
    from xseqloss.internals import backend
    cls = type(backend("numpy"))
    monkeypatch.setattr(cls, "run", lambda self, fn, st, *a: (np.asarray(np.nan, np.float32), None))
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: None)
    assert main(["crosscheck", str(path), "--backends", "numpy"]) == 1
    assert "NaN where the reference found the input invalid" in capsys.readouterr().out


# ------------------------------------------------------------------ 5. in place on shared memory

def test_inplace_backward_on_overlapping_memory_is_our_error():
    require_or_skip("torch")
    import torch
    base = torch.randn(1, 1, 5, requires_grad=True)
    z = base.expand(2, 3, 5)  # stride 0: six rows share one row of memory
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(xsl.XSeqLossError, match=r"inplace_backward=True.*share memory"):
        xsl.sequence_cross_entropy(z, y, inplace_backward=True)
    loss = xsl.sequence_cross_entropy(z, y)  # without in place it is fine
    loss.backward()
    assert torch.isfinite(base.grad).all()


# ------------------------------------------------------------------ 6. 0 log 0 at -inf logits

def test_zero_mass_at_minus_inf_logit_is_exactly_zero(backend):
    """optax's safe_softmax_cross_entropy rule: a class with exactly zero target mass adds
    exactly 0 to the loss and the gradient, even at a -inf logit (torch and plain optax give NaN)."""
    z = np.array([[[1.0, -np.inf, 0.0], [-np.inf, 2.0, 0.5]]])
    q = np.array([[[0.5, 0.0, 0.5], [0.0, 0.25, 0.75]]])
    v, g = backend.loss_and_grad(z, q, reduction="none")
    v, g = backend.float_out(v), backend.float_out(g)
    lse0 = np.log(np.exp(1.0) + 1.0)
    lse1 = np.log(np.exp(2.0) + np.exp(0.5))
    assert_close(v, [[lse0 - 0.5, lse1 - (0.5 + 0.375)]])
    assert g[0, 0, 1] == 0.0 and g[0, 1, 0] == 0.0 and np.isfinite(g).all()
    # a class weight of 0 at a -inf logit, the target's too
    cw = np.array([0.0, 1.0, 1.0])
    v2, g2 = backend.loss_and_grad(np.array([[[-np.inf, 1.0, 0.0]]]), np.array([[0]]), class_weights=cw,
                                   reduction="sum")
    assert float(backend.float_out(v2)) == 0.0 and np.all(backend.float_out(g2) == 0.0)
    # with smoothing every class has mass: +inf, as documented
    v3 = backend.float_out(backend.loss(z, np.array([[0, 1]]), label_smoothing=0.1, reduction="none"))
    assert np.isposinf(v3).all()


# ------------------------------------------------------------------ 7. the soft-target message

def test_soft_target_message_states_the_enforced_rule():
    z = np.zeros((1, 1, 3))
    ok = xsl.sequence_cross_entropy(z, np.array([[[2.0, 0.0, 0.0]]]))  # 2.0 is allowed: finite, >= 0
    assert np.isfinite(ok)
    with pytest.raises(xsl.XSeqLossError, match=r"finite and >= 0, i.e. in \[0, inf\)"):
        xsl.sequence_cross_entropy(z, np.array([[[-0.5, 1.0, 0.5]]]))


def test_get_backend_is_importable():
    assert get_backend("numpy").name == "numpy"
