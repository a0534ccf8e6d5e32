"""PyTorch's fused forward+backward (xseqloss/backends/torch/fused.py): the gradient is formed during the
forward pass already multiplied by the upstream gradient backward expects, so loss.backward() costs
no pass at all; anything else is rescaled or recomputed. The reusable CPU gradient buffer is handed
out again only when nothing references it. Every path is checked against the float64 reference."""

import numpy as np
import pytest

from helpers.inputs import make_case
from helpers.reference64 import reference
from helpers.support import assert_close, get_backend

OPTION_SETS = {
    "plain": dict(),
    "mask": dict(mask=True, ignore=-100),
    "weights": dict(weights=True, mask=True),
    "lengths_cw": dict(lengths=True, class_weights=True),
    "smoothing_zloss": dict(label_smoothing=0.1, z_loss=1e-2, weights=True),
}


@pytest.fixture
def torch():
    from xseqloss.internals import engine as _engine

    # small default calls run F.cross_entropy itself; here every call takes the fused path, as
    # large inputs do
    with _engine.use("torch", "chunked"):
        yield get_backend("torch").torch


@pytest.fixture
def spy(monkeypatch):
    """Records what each fused backward still had to do (core/backward.py's upstream rule): None
    (the formed gradient was the answer), "scale" or "again"."""
    from xseqloss.internals import core

    seen = []
    real_formed, real_upstream = core.backward.is_formed, core.backward.upstream

    def formed(*a, **k):
        out = real_formed(*a, **k)
        if bool(out):
            seen.append(None)
        return out

    def upstream(*a, **k):
        out = real_upstream(*a, **k)
        seen.append("again" if bool(out.again) else "scale")
        return out

    monkeypatch.setattr(core.backward, "is_formed", formed)
    monkeypatch.setattr(core.backward, "upstream", upstream)
    return seen


def _case(name, rng):
    return make_case(rng, N=3, T=5, C=7, **OPTION_SETS[name])


@pytest.mark.parametrize("reduction", ["mean", "sum", "per_sequence", "sequence_mean", "per_position"])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_backward_of_the_loss_needs_no_pass(xsl, torch, spy, rng, name, reduction):
    be = get_backend("torch")
    logits, targets, opts = _case(name, rng)
    _, t, kw = be.convert_args(logits, targets, "float64", opts)
    x = torch.tensor(logits, requires_grad=True)
    out = xsl.sequence_cross_entropy(x, t, reduction=reduction, **kw)
    out.sum().backward()
    _, gref = reference(logits, targets, reduction=reduction, with_grad=True, **opts)
    assert_close(be.float_out(x.grad), gref, what="gradient")
    assert len(spy) == 1 and spy[0] is None, "the gradient should have been complete after the forward pass"


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_other_upstream_gradients_are_rescaled(xsl, torch, spy, rng, name):
    be = get_backend("torch")
    logits, targets, opts = _case(name, rng)
    _, t, kw = be.convert_args(logits, targets, "float64", opts)
    x = torch.tensor(logits, requires_grad=True)
    (xsl.sequence_cross_entropy(x, t, **kw) * 0.3).backward()
    _, gref = reference(logits, targets, with_grad=True, **opts)
    assert_close(be.float_out(x.grad), 0.3 * gref, what="scaled gradient")
    cot = rng.normal(size=targets.shape)
    x.grad = None
    out = xsl.sequence_cross_entropy(x, t, reduction="none", **kw)
    out.backward(torch.tensor(cot))
    _, gref = reference(logits, targets, reduction="none", with_grad=True, cotangent=cot, **opts)
    assert_close(be.float_out(x.grad), gref, what="gradient under a cotangent")
    assert all(f is not None for f in spy)


def test_float32_gradient_under_a_scaled_loss(xsl, torch, rng):
    """GradScaler-style scaling (a power of 2) and an arbitrary scale keep float32 accuracy."""
    be = get_backend("torch")
    logits, targets, opts = _case("weights", rng)
    _, t, kw = be.convert_args(logits, targets, "float32", opts)
    _, gref = reference(logits.astype(np.float32), targets, with_grad=True, **opts)
    for scale in (65536.0, 0.37):
        x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
        (xsl.sequence_cross_entropy(x, t, **kw) * scale).backward()
        assert_close(be.float_out(x.grad) / scale, gref, "float32", what=f"gradient at scale {scale}")


def test_second_backward_gives_the_same_bits(xsl, torch, rng):
    be = get_backend("torch")
    logits, targets, opts = _case("weights", rng)
    _, t, kw = be.convert_args(logits, targets, "float64", opts)
    x = torch.tensor(logits, requires_grad=True)
    out = xsl.sequence_cross_entropy(x, t, reduction="per_sequence", **kw)
    cot = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    (g1,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, cot)
    assert torch.equal(g1, g2)
    _, gref = reference(logits, targets, reduction="per_sequence", with_grad=True, cotangent=cot.numpy(), **opts)
    assert_close(be.float_out(g1), gref, what="gradient")


def test_bad_token_with_zero_weight_gets_a_nan_row(xsl, torch, rng):
    """validate=False marks a bad label NaN even at weight 0 (its multiplier is 0 * NaN): the fold
    scaled that row to 0, and the NaN upstream gradient must still reach it."""
    be = get_backend("torch")
    logits, targets, _ = _case("plain", rng)
    targets[1, 2] = 99
    w = np.ones(targets.shape)
    w[1, 2] = 0.0
    x = torch.tensor(logits, requires_grad=True)
    loss = xsl.sequence_cross_entropy(x, torch.tensor(targets), weights=torch.tensor(w), validate=False)
    loss.backward()
    assert torch.isnan(loss)
    _, g_generic = xsl.value_and_grad(torch.tensor(logits), torch.tensor(targets), weights=torch.tensor(w),
                                      validate=False)
    g = be.float_out(x.grad)
    assert np.isnan(g[1, 2]).all()
    np.testing.assert_array_equal(np.isnan(g), np.isnan(be.float_out(g_generic)))
    keep = ~np.isnan(g)
    np.testing.assert_allclose(g[keep], be.float_out(g_generic)[keep], rtol=1e-12, atol=1e-15)


def _apply(torch, logits, targets, hint, inplace=False):
    from xseqloss.internals import part, prepare_call

    x = torch.tensor(logits, requires_grad=True)
    call = prepare_call(x, torch.tensor(targets), ignore_index=None, inplace_backward=inplace)
    z = x.clone() if inplace else x
    out = part("torch", "fused").FusedTokenLoss.apply(z, call.y, None, None, None, call.st, torch.float64, call.be,
                                                     torch.tensor(hint))
    return x, z, out


def _softmax_minus_onehot(logits, targets):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.put_along_axis(p, targets[..., None], np.take_along_axis(p, targets[..., None], -1) - 1.0, -1)
    return p


def test_rows_the_fold_zeroed_are_recomputed(torch, spy, rng):
    """An upstream gradient that is nonzero where the hint was 0 (impossible through the public
    function) recomputes the unscaled gradient instead of returning zeros."""
    logits, targets, _ = _case("plain", rng)
    hint = np.full(targets.shape, 0.25)
    hint[0, 1] = 0.0
    dl = rng.normal(size=targets.shape)
    x, z, out = _apply(torch, logits, targets, hint)
    (g,) = torch.autograd.grad(out, z, torch.tensor(dl))
    expect = _softmax_minus_onehot(logits, targets) * dl[..., None]
    np.testing.assert_allclose(g.numpy(), expect, rtol=1e-12, atol=1e-15)
    assert spy == ["again"]
    x, z, out = _apply(torch, logits, targets, hint, inplace=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True"):
        torch.autograd.grad(out, z, torch.tensor(dl))


# ------------------------------------------------------------------------ the reusable buffer

@pytest.fixture
def small_cache(torch):
    from xseqloss.internals import engine as _engine
    from xseqloss.internals import part

    buffers = part("torch", "buffers")
    buffers.empty_cache()
    with _engine.use("torch", buffer_min_bytes=0):
        yield buffers
    buffers.empty_cache()


def _step(xsl, torch, x, targets):
    x.grad = None
    xsl.sequence_cross_entropy(x, torch.tensor(targets)).backward()
    return x.grad


def test_buffer_is_reused_only_when_free(xsl, torch, rng, small_cache):
    logits, targets, _ = _case("plain", rng)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    _, gref = reference(logits.astype(np.float32), targets, with_grad=True)
    p1 = _step(xsl, torch, x, targets).data_ptr()
    assert _step(xsl, torch, x, targets).data_ptr() == p1  # the first grad was dropped: reused
    held = x.grad                                           # the user keeps this one
    copy = held.clone()
    g3 = _step(xsl, torch, x, targets)
    assert g3.data_ptr() != held.data_ptr()
    assert torch.equal(held, copy), "a gradient the user holds was overwritten"
    held_view = g3.view(-1)  # a view of the newest buffer also pins it
    del g3
    g4 = _step(xsl, torch, x, targets)
    assert g4.data_ptr() != held_view.data_ptr()
    for g in (held, held_view.view(x.shape), g4):
        assert_close(g.numpy(), gref, "float32", what="gradient")
    small_cache.empty_cache()
    assert all(raw is None for raw in small_cache._BUFFERS.raws)


def test_two_live_gradients_alternate_between_two_buffers(xsl, torch, rng, small_cache):
    """The previous step's gradient still held while the next one forms (zero_grad after the
    forward, two heads, an A/B comparison): the two slots serve both in turn, never a fresh buffer
    per step; a third live gradient gets a buffer of its own, which is not kept."""
    logits, targets, _ = _case("plain", rng)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    _, gref = reference(logits.astype(np.float32), targets, with_grad=True)
    ptrs = []
    for _ in range(6):
        loss = xsl.sequence_cross_entropy(x, torch.tensor(targets))
        x.grad = None  # the previous gradient was alive during this forward
        loss.backward()
        ptrs.append(x.grad.data_ptr())
        assert_close(x.grad.numpy(), gref, "float32", what="gradient")
    assert len(set(ptrs)) == 2 and ptrs[0::2] == [ptrs[0]] * 3 and ptrs[1::2] == [ptrs[1]] * 3
    held = [x.grad]
    for _ in range(2):  # two more alive at once: one slot is held, the other is free, then none
        x.grad = None
        xsl.sequence_cross_entropy(x, torch.tensor(targets)).backward()
        held.append(x.grad)
    assert len({g.data_ptr() for g in held}) == 3
    assert {raw.data_ptr() for raw in small_cache._BUFFERS.raws} == set(ptrs)


def test_pending_backwards_never_share_a_buffer(xsl, torch, rng, small_cache):
    """Two losses computed before one backward (micro-batches): each keeps its own gradient."""
    logits, targets, _ = _case("plain", rng)
    targets2 = np.roll(targets, 1)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    for _ in range(2):  # the second round starts with a free cached buffer
        x.grad = None
        l1 = xsl.sequence_cross_entropy(x, torch.tensor(targets))
        l2 = xsl.sequence_cross_entropy(x, torch.tensor(targets2))
        (l1 + l2).backward()
        _, g1 = reference(logits.astype(np.float32), targets, with_grad=True)
        _, g2 = reference(logits.astype(np.float32), targets2, with_grad=True)
        assert_close(x.grad.numpy(), g1 + g2, "float32", what="summed gradient")


def test_small_default_calls_run_the_native_loss(xsl, monkeypatch, rng):
    """The shortcut for the default call (F.cross_entropy itself) against the reference, with an
    ignore value, none, an empty mean, C at dim 1, and a bad label (still our error)."""
    be = get_backend("torch")
    torch = be.torch
    from xseqloss.internals import backend

    calls = []
    cls = type(backend("torch"))
    real = cls.default_token_loss
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: calls.append(1) or real(self, *a))
    logits, targets, _ = _case("plain", rng)
    targets[0, :2] = -100
    for reduction in ("mean", "sum", "none"):
        for ignore in (-100, 3, None):
            tg = targets.copy()
            tg[tg == -100] = 2 if ignore is None else ignore
            x = torch.tensor(logits, requires_grad=True)
            out = xsl.sequence_cross_entropy(x, torch.tensor(tg), reduction=reduction, ignore_index=ignore)
            out.sum().backward()
            ref, gref = reference(logits, tg, reduction=reduction, ignore_index=ignore, with_grad=True)
            assert_close(be.float_out(out), ref)
            assert_close(be.float_out(x.grad), gref, what="gradient")
    n = len(calls)
    assert n > 0
    x = torch.tensor(np.moveaxis(logits, 2, 1))  # NCT
    assert_close(be.float_out(xsl.sequence_cross_entropy(x, torch.tensor(targets), layout="NCT")),
                 reference(logits, targets))
    empty = torch.full(targets.shape, -100)
    assert float(xsl.sequence_cross_entropy(torch.tensor(logits), empty)) == 0.0
    assert np.isnan(float(xsl.sequence_cross_entropy(torch.tensor(logits), empty, empty="nan")))
    bad = targets.copy()
    bad[1, 3] = 7
    with pytest.raises(ValueError, match=r"targets\[1, 3\] = 7 is out of range"):
        xsl.sequence_cross_entropy(torch.tensor(logits), torch.tensor(bad))
    bad[1, 3] = -2
    with pytest.raises(ValueError, match=r"targets\[1, 3\] = -2 is out of range"):
        xsl.sequence_cross_entropy(torch.tensor(logits), torch.tensor(bad))
    assert len(calls) == n + 5


def test_a_smaller_input_reuses_a_larger_free_buffer(xsl, torch, rng, small_cache):
    logits, targets, _ = _case("plain", rng)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    p = _step(xsl, torch, x, targets).data_ptr()
    x.grad = None
    small = torch.tensor(logits[:2], dtype=torch.float32, requires_grad=True)  # 2/3 of the elements
    g = _step(xsl, torch, small, targets[:2])
    assert g.data_ptr() == p and g.shape == small.shape
    _, gref = reference(logits[:2].astype(np.float32), targets[:2], with_grad=True)
    assert_close(g.numpy(), gref, "float32", what="gradient")
    tiny = torch.tensor(logits[:1, :1], dtype=torch.float32, requires_grad=True)  # under half: not reused
    del g
    small.grad = None
    assert _step(xsl, torch, tiny, targets[:1, :1]).data_ptr() != p


@pytest.mark.parametrize("bad", [7, -2, -100])
def test_small_default_calls_hand_bad_labels_to_the_general_path(xsl, monkeypatch, rng, bad):
    """F.cross_entropy's own bound check (CPU) is the label check of the shortcut: a bad label gives
    None there, and the general path raises our error, or marks the token NaN with validate=False."""
    torch = get_backend("torch").torch
    from xseqloss.internals import backend

    seen = []
    cls = type(backend("torch"))
    real = cls.default_token_loss
    monkeypatch.setattr(cls, "default_token_loss", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    logits, targets, _ = _case("plain", rng)
    ignore = None if bad == -100 else -100  # with no ignore value, -100 is just out of range
    good = xsl.sequence_cross_entropy(torch.tensor(logits), torch.tensor(targets), ignore_index=ignore,
                                      validate=False)
    assert seen[-1] is not None
    assert_close(get_backend("torch").float_out(good), reference(logits, targets, ignore_index=ignore))
    targets[1, 3] = bad
    with pytest.raises(ValueError, match=rf"targets\[1, 3\] = {bad} is out of range"):
        xsl.sequence_cross_entropy(torch.tensor(logits), torch.tensor(targets), ignore_index=ignore)
    x = torch.tensor(logits, requires_grad=True)
    out = xsl.sequence_cross_entropy(x, torch.tensor(targets), ignore_index=ignore, validate=False,
                                     reduction="none")
    out.sum().backward()
    assert torch.isnan(out[1, 3]) and torch.isnan(x.grad[1, 3]).all()
    keep = torch.ones(out.shape, dtype=torch.bool)
    keep[1, 3] = False
    assert torch.isfinite(out[keep]).all() and torch.isfinite(x.grad[keep]).all()
    assert seen[1:] == [None, None]
