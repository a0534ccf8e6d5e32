"""Positions that do not count give exactly 0 loss and exactly 0 gradient even
when their logits are NaN or +-inf (API.md "Which tokens count"), on every
backend, for mask, lengths and ignore_index, with every option that touches the
logits (smoothing, z-loss, softcap, class weights, soft targets, inputs).
Likewise a class with zero target mass adds exactly 0 at a -inf logit (0 log 0 = 0; issue 17)."""

import numpy as np
import pytest

from helpers.inputs import make_case
from helpers.reference64 import reference
from helpers.support import assert_close

N, T, C = 3, 5, 4


def _garbage_case(rng, how, kind, soft=False):
    logits, targets, _ = make_case(rng, N=N, T=T, C=C, soft=soft)
    dead = np.zeros((N, T), bool)
    opts = {}
    if how == "mask":
        dead[0, 1] = dead[1, 0] = dead[2, 3:] = True
        opts["mask"] = ~dead
    elif how == "lengths":
        lengths = np.array([5, 2, 0])
        dead = np.arange(T)[None, :] >= lengths[:, None]
        opts["lengths"] = lengths
    elif how == "ignore_index":
        dead[0, 4] = dead[1, 1:3] = dead[2, 0] = True
        targets = np.where(dead, -100, targets)
    value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "mixed": None}[kind]
    if value is None:
        garbage = np.array([np.nan, np.inf, -np.inf, 1e30])
        logits[dead] = garbage[np.arange(C) % 4]
    else:
        logits[dead] = value
    return logits, targets, opts, dead


OPTION_SETS = {
    "plain": {},
    "smooth_z_cap_cw": dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=5.0,
                            class_weights=np.array([1.0, 2.0, 0.5, 1.5])),
    "others_weights": dict(label_smoothing=0.2, smoothing="others",
                           weights=np.linspace(0.5, 2.0, N * T).reshape(N, T)),
}


def _check(backend, logits, targets, opts, dead):
    ref_logits = np.where(np.isfinite(logits), logits, 0.0)
    for reduction in ("none", "mean", "per_sequence"):
        out, g = backend.loss_and_grad(logits, targets, reduction=reduction, **opts)
        got = backend.float_out(out)
        g = backend.float_out(g)
        ref = reference(ref_logits, targets, reduction=reduction, **opts)
        if reduction == "none":
            assert np.all(got[dead] == 0), f"loss at dead positions: {got[dead]}"
            # and the eager forward (on JAX loss_and_grad runs under jax.vjp)
            eager = backend.float_out(backend.loss(logits, targets, reduction="none", **opts))
            assert np.all(eager[dead] == 0)
            assert_close(eager, got, tol=1e-14)
        assert np.all(np.isfinite(got)), f"{reduction}: {got}"
        assert_close(got, ref, what=f"{reduction} value")
        assert np.all(g[dead] == 0), f"{reduction}: gradient at dead positions {g[dead]}"
        assert np.all(np.isfinite(g)), f"{reduction}: non-finite gradient"
        _, gref = reference(ref_logits, targets, reduction=reduction, with_grad=True, **opts)
        assert_close(g, gref, what=f"{reduction} gradient")


@pytest.mark.parametrize("how", ["mask", "lengths", "ignore_index"])
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "mixed"])
def test_garbage_at_dead_positions(backend, rng, how, kind):
    logits, targets, opts, dead = _garbage_case(rng, how, kind)
    _check(backend, logits, targets, opts, dead)


@pytest.mark.parametrize("how", ["mask", "lengths", "ignore_index"])
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_garbage_with_options(backend, rng, how, options):
    logits, targets, opts, dead = _garbage_case(rng, how, "mixed")
    opts.update(OPTION_SETS[options])
    _check(backend, logits, targets, opts, dead)


@pytest.mark.parametrize("how", ["mask", "lengths"])
def test_garbage_soft_targets(backend, rng, how):
    logits, targets, opts, dead = _garbage_case(rng, how, "mixed", soft=True)
    targets[dead] = np.nan  # garbage targets too: they are not read
    opts["label_smoothing"] = 0.1
    ref_targets = np.where(dead[..., None], 0.25, targets)
    for reduction in ("none", "mean"):
        out, g = backend.loss_and_grad(logits, targets, reduction=reduction, **opts)
        got, g = backend.float_out(out), backend.float_out(g)
        eager = backend.float_out(backend.loss(logits, targets, reduction=reduction, **opts))
        assert_close(eager, got, tol=1e-14)
        ref, gref = reference(np.where(np.isfinite(logits), logits, 0.0), ref_targets,
                              reduction=reduction, with_grad=True, **opts)
        assert_close(got, ref)
        assert np.all(g[dead] == 0) and np.all(np.isfinite(g))
        assert_close(g, gref)


@pytest.mark.parametrize("inputs", ["log_probs", "probs"])
def test_garbage_other_inputs(backend, rng, inputs):
    logits, targets, opts, dead = _garbage_case(rng, "mask", "mixed")
    ok = ~dead
    if inputs == "probs":
        logits[ok] = 0.25
    else:
        logits[ok] = np.log(0.25)
    opts["inputs"] = inputs
    _check(backend, logits, targets, opts, dead)


def test_all_dead_mean_has_zero_gradient(backend, rng):
    logits, targets, opts, dead = _garbage_case(rng, "lengths", "nan")
    opts["lengths"] = np.zeros(N, np.int64)
    for empty in ("zero", "nan"):
        out, g = backend.loss_and_grad(logits, targets, reduction="mean", empty=empty, **opts)
        v = backend.float_out(out)
        assert (np.isnan(v) if empty == "nan" else v == 0)
        assert np.all(backend.float_out(g) == 0)


# 0 log 0 at -inf logits (issue 17, hunt item 6)
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
