"""Gradient checks: torch.autograd.gradcheck (float64), jax.test_util.check_grads
(reverse mode), float64 central differences for TensorFlow and NumPy (NumPy via
xseqloss.value_and_grad), and the structure of the hard-target gradient."""

import numpy as np
import pytest

from helpers.inputs import make_case
from helpers.support import get_backend

GRAD_CASES = {
    "mean_mask_lengths_cw_smooth": dict(kw=dict(mask=True, lengths=True, class_weights=True,
                                                label_smoothing=0.1, ignore=-100),
                                        reduction="mean"),
    "none_zloss_softcap": dict(kw=dict(z_loss=0.05, logit_softcap=3.0, weights=True),
                               reduction="none"),
    "per_sequence_soft_others": dict(kw=dict(soft=True, class_weights=True,
                                             label_smoothing=0.2, smoothing="others"),
                                     reduction="per_sequence"),
    "per_position_tokens": dict(kw=dict(mask=True, weights=True), reduction="per_position",
                                denominator="tokens"),
    "sequence_mean_NCT": dict(kw=dict(layout="NCT", mask=True), reduction="sequence_mean"),
    "log_probs_sum": dict(kw=dict(inputs="log_probs", label_smoothing=0.1), reduction="sum"),
}


def _case(name, seed=11):
    spec = GRAD_CASES[name]
    rng = np.random.default_rng(seed)
    logits, targets, opts = make_case(rng, N=2, T=3, C=4, **spec["kw"])
    opts = dict(opts, reduction=spec["reduction"])
    if "layout" in spec["kw"]:
        opts["layout"] = spec["kw"]["layout"]
    if "denominator" in spec:
        opts["denominator"] = spec["denominator"]
    return logits, targets, opts


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_torch_gradcheck(case, xsl):
    be = get_backend("torch")
    torch = be.torch
    logits, targets, opts = _case(case)
    x, t, kw = be.convert_args(logits, targets, "float64", opts)
    x = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: xsl.sequence_cross_entropy(z, t, **kw), (x,), eps=1e-6, atol=1e-7,
        rtol=1e-5)


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_jax_check_grads(case, xsl):
    be = get_backend("jax")
    from jax.test_util import check_grads
    logits, targets, opts = _case(case)
    x, t, kw = be.convert_args(logits, targets, "float64", opts)
    # check_grads evaluates f on NumPy arrays for its finite differences
    check_grads(lambda z: xsl.sequence_cross_entropy(be.jnp.asarray(z), t, **kw), (x,),
                order=1, modes=["rev"])


def _directional_fd_check(backend, logits, targets, opts, n_dirs=4, h=1e-6):
    """<grad, v> against central differences of the backend's own float64
    forward along random directions v (plus one coordinate direction)."""
    _, g = backend.loss_and_grad(logits, targets, "float64", **opts)
    g = backend.float_out(g)
    rng = np.random.default_rng(0)
    dirs = [rng.normal(size=logits.shape) for _ in range(n_dirs)]
    e = np.zeros(logits.shape)
    e.flat[1] = 1.0
    dirs.append(e)

    def f(z):
        return float(np.sum(backend.float_out(backend.loss(z, targets, "float64", **opts))))

    for v in dirs:
        fd = (f(logits + h * v) - f(logits - h * v)) / (2 * h)
        an = float(np.sum(g * v))
        assert abs(fd - an) <= 1e-6 * (1 + abs(an)), (fd, an)


@pytest.mark.parametrize("name", ["numpy", "tensorflow"])
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_finite_differences(name, case):
    backend = get_backend(name)
    logits, targets, opts = _case(case)
    _directional_fd_check(backend, logits, targets, opts)


def test_numpy_gradient_every_coordinate(xsl):
    """Full central-difference Jacobian row for one small case on NumPy."""
    backend = get_backend("numpy")
    logits, targets, opts = _case("mean_mask_lengths_cw_smooth")
    _, g = xsl.value_and_grad(logits, targets, **opts)
    h = 1e-6
    for i in np.ndindex(logits.shape):
        xp, xm = logits.copy(), logits.copy()
        xp[i] += h
        xm[i] -= h
        fd = (float(xsl.sequence_cross_entropy(xp, targets, **opts))
              - float(xsl.sequence_cross_entropy(xm, targets, **opts))) / (2 * h)
        assert abs(fd - g[i]) <= 1e-7, (i, fd, g[i])
    assert backend.is_native(g)


def test_hard_target_gradient_structure(backend, rng):
    """d mean / d x = (softmax - onehot) / n_valid: rows sum to 0, the target
    entry is <= 0, the others >= 0, masked rows exactly 0."""
    logits, targets, opts = make_case(rng, N=3, T=4, C=6, mask=True, scale=4.0)
    out, g = backend.loss_and_grad(logits, targets, "float32", **opts)
    g = backend.float_out(g)
    mask = opts["mask"]
    n_valid = mask.sum()
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(6)[targets]
    expected = np.where(mask[..., None], (p - onehot) / n_valid, 0.0)
    np.testing.assert_allclose(g, expected, atol=1e-6)
    assert np.all(g[~mask] == 0)
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-6)
    tgt = np.take_along_axis(g, targets[..., None], -1)[..., 0]
    assert np.all(tgt[mask] <= 0)
    others = np.where(onehot.astype(bool), 0.0, g)
    assert np.all(others >= 0)


@pytest.mark.parametrize("reduction", ["none", "mean", "per_sequence", "per_position",
                                       "sequence_mean"])
def test_upstream_gradient_is_honoured(backend, reduction):
    """Backward with a random upstream gradient (not just ones): catches a
    fused backward that ignores or mis-scales grad_output."""
    from helpers.reference64 import reference
    from helpers.support import assert_close
    if backend.name == "numpy":
        pytest.skip("value_and_grad returns the gradient of the sum only")
    rng = np.random.default_rng(8)
    logits, targets, opts = make_case(rng, N=2, T=3, C=4, mask=True, weights=True,
                                      label_smoothing=0.1, class_weights=True)
    ref = reference(logits, targets, reduction=reduction, **opts)
    v = rng.normal(size=np.shape(ref))
    _, gref = reference(logits, targets, reduction=reduction, with_grad=True, cotangent=v,
                        **opts)
    x, t, kw = backend.convert_args(logits, targets, "float64", opts)
    import xseqloss as xsl
    if backend.name == "torch":
        x = x.clone().requires_grad_(True)
        out = xsl.sequence_cross_entropy(x, t, reduction=reduction, **kw)
        out.backward(gradient=backend.torch.tensor(v))
        g = x.grad
    elif backend.name == "tensorflow":
        tf = backend.tf
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = xsl.sequence_cross_entropy(x, t, reduction=reduction, **kw)
        g = tape.gradient(out, x, output_gradients=tf.constant(v))
    else:
        out, vjp = backend.jax.vjp(
            lambda z: xsl.sequence_cross_entropy(z, t, reduction=reduction, **kw), x)
        (g,) = vjp(backend.jnp.asarray(v))
    assert_close(backend.float_out(out), ref)
    assert_close(backend.float_out(g), gref, what="gradient with upstream cotangent")


def test_torch_second_backward_with_retain_graph(xsl):
    """Standard autograd: a graph kept with retain_graph=True can be
    differentiated again (gradient penalties, gradcheck, several
    torch.autograd.grad calls)."""
    be = get_backend("torch")
    torch = be.torch
    rng = np.random.default_rng(9)
    x = torch.tensor(rng.normal(size=(2, 3, 4)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 4, size=(2, 3)))
    loss = xsl.sequence_cross_entropy(x, y)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
