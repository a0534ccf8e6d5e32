"""The backend contract (xseqloss/plan/ops.py): every backend implements every required op itself,
declares its optional kernels only through the hooks the contract names, and its plain kernel
(``plain_ce``) and autodiff-able per-token loss (``nll``) keep one contract, checked here against
a float64 reference written in plain NumPy (one test for the four backends' versions)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.support import get_backend, require_or_skip

BACKENDS = ["numpy", "torch", "tensorflow", "jax"]


def _backend(name):
    require_or_skip(name)
    from xseqloss import internals
    return internals.backend(name)


@pytest.mark.parametrize("name", BACKENDS)
def test_every_required_op_is_the_backends_own(name):
    from xseqloss.internals import contract
    be = _backend(name)
    missing = [op for op in contract.REQUIRED
               if getattr(type(be), op, None) is None or getattr(type(be), op) is getattr(contract.Backend, op, None)]
    assert not missing, f"{name} does not implement {missing}"
    assert isinstance(be, contract.Backend)


@pytest.mark.parametrize("name", BACKENDS)
def test_hooks_are_declared_by_the_contract(name):
    """A backend offers an optional kernel only through a hook the contract declares (default None),
    and adds no public method the contract does not name."""
    from xseqloss.internals import contract
    be = _backend(name)
    for hook in contract.HOOKS:
        assert getattr(contract.Backend, hook) is None
        assert hasattr(be, hook)
    declared = set(dir(contract.Backend)) | set(contract.ARRAY_OPS)
    extra = {n for n in dir(type(be)) if not n.startswith("_") and n not in declared}
    assert extra <= {"xp"}, f"{name} has methods the contract does not declare: {extra}"


def _reference(z, y, keep, k, scale):
    """lse(z) - z[y] and (softmax - onehot) * scale per token, float64, plain NumPy loops."""
    x = np.moveaxis(np.asarray(z, np.float64), k, -1)
    rows, C = x.reshape(-1, x.shape[-1]), x.shape[-1]
    yy = y.reshape(-1)
    kk = np.ones(yy.shape, bool) if keep is None else keep.reshape(-1)
    ss = None if scale is None else scale.reshape(-1)
    l = np.zeros(len(rows))
    g = np.zeros(rows.shape)
    for r in range(len(rows)):
        if not kk[r]:
            continue
        m = rows[r].max()
        m = 0.0 if m == -np.inf else m
        e = np.exp(rows[r] - m)
        l[r] = np.log(e.sum()) - (rows[r, yy[r]] - m)
        if ss is not None:
            g[r] = e / e.sum() * ss[r]
            g[r, yy[r]] -= ss[r]
    g = np.moveaxis(g.reshape(x.shape), -1, k)
    return l.reshape(y.shape), g


CASES = {
    "rows": dict(shape=(6, 5), k=1),
    "classes_first": dict(shape=(5, 4), k=0),
    "ntc": dict(shape=(2, 3, 7), k=2),
    "big_near_max": dict(shape=(4, 6), k=1, big=True),
}


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", BACKENDS)
def test_plain_kernel_against_the_float64_reference(name, case, dtype, with_scale):
    be, helper = _backend(name), get_backend(name)
    spec = CASES[case]
    rng = np.random.default_rng(len(case))
    shape, k = spec["shape"], spec["k"]
    tok = tuple(d for a, d in enumerate(shape) if a != k)
    z = rng.normal(size=shape) * 3
    y = rng.integers(0, shape[k], size=tok)
    if spec.get("big"):  # logits near 1e4 with the target at the row's maximum: ulp(1e4) would show
        z = z + 1e4
        np.put_along_axis(z, np.expand_dims(y, k), np.take_along_axis(z, np.expand_dims(y, k), k) + 5.0, k)
    z = z.astype(dtype)
    keep = rng.random(tok) > 0.3
    flat = np.moveaxis(z, k, -1).reshape(-1, shape[k]).copy()
    flat[~keep.reshape(-1)] = np.nan  # rows that do not count hold garbage: exactly 0 anyway
    flat[np.flatnonzero(~keep.reshape(-1))[:1], :] = np.inf
    z = np.moveaxis(flat.reshape(np.moveaxis(z, k, -1).shape), -1, k).astype(dtype)
    scale = rng.normal(size=tok) if with_scale else None
    ref_l, ref_g = _reference(np.where(np.isfinite(z), z, 0.0), y, keep, k, scale)
    acc = be.acc_dtype(helper.array(z, dtype))
    args = [helper.array(z, dtype), helper.array(y.astype(np.int64)), helper.array(keep), k, acc]
    if with_scale:
        args.append(helper.array(scale, "float64" if dtype == "float64" else "float32"))
    l, g = be.plain_ce(*args)
    tol = 1e-10 if dtype == "float64" else 1e-5
    got_l = be.to_numpy(l).astype(np.float64)
    np.testing.assert_allclose(got_l, ref_l, rtol=tol, atol=tol)
    assert (got_l[~keep] == 0).all()
    if with_scale:
        got_g = be.to_numpy(g).astype(np.float64)
        assert be.dtype_name(g) == be.dtype_name(helper.array(z, dtype))
        np.testing.assert_allclose(got_g, ref_g, rtol=tol, atol=tol)
    else:
        assert g is None


@pytest.mark.parametrize("name", BACKENDS)
def test_plain_kernel_row_of_minus_infinity(name):
    """A row whose max is -inf gives lse = -inf (the same everywhere), never NaN from -inf - -inf."""
    be, helper = _backend(name), get_backend(name)
    z = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    args = [helper.array(z, "float64"), helper.array(np.array([0, 2])), None, 1, be.acc_dtype(helper.array(z, "float64"))]
    l, _ = be.plain_ce(*args)
    got = be.to_numpy(l)
    assert np.isnan(got[0]), got  # -inf - -inf: the loss of a row with no finite logit is undefined
    np.testing.assert_allclose(got[1], np.log(np.exp([0, 1, 2]).sum()) - 2, rtol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_autodiff_loss_matches_the_plain_kernel(name):
    """``nll`` (differentiable by the framework) means the plain kernel's l, and its gradient is the
    plain kernel's g (scale 1): exactly 0 on rows that do not count, even holding NaN."""
    be, helper = _backend(name), get_backend(name)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5, 6))
    y = rng.integers(0, 6, size=5)
    keep = np.array([True, False, True, True, False])
    z[1] = np.nan
    ref_l, ref_g = _reference(np.where(np.isfinite(z), z, 0.0), y, keep, 1, np.ones(5))
    yy, kk = helper.array(y.astype(np.int64)), helper.array(keep)

    def loss(zz):
        return be.nll(zz, yy, kk, 1, be.acc_dtype(zz))
    if name == "numpy":
        got_l, got_g = loss(z), ref_g  # NumPy has no autodiff: the value is the contract
    else:
        out, grad = helper._vjp(loss, helper.array(z), None, None)
        got_l, got_g = helper.to_numpy(out), helper.to_numpy(grad)
    np.testing.assert_allclose(np.asarray(got_l, np.float64), ref_l, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got_g, np.float64), ref_g, rtol=1e-10, atol=1e-12)
