"""Peer suite: PyTorch's own cross-entropy test cases, transliterated (issue 11 item 7).

Sources (only facts carry over - inputs, expected values, formulas; every line of code here is ours):

* torch 2.13.0+cpu wheel, git commit cf30153c4c131c8164ee7798e5022d810682e2cb
  (``torch.version.git_version``), read in the installed package:
  - ``torch/testing/_internal/common_nn.py``: ``nlllossNd_reference``, ``nllloss_reference``,
    ``cross_entropy_loss_prob_target_reference``, ``cross_entropy_loss_indices_target_reference``,
    ``cross_entropy_loss_reference`` (L2742-2890): the label-smoothing, ignore_index and weighted-mean
    conventions (the smoothing term of a weighted mean is divided by sum w[y] - "TODO #61309").
  - ``torch/testing/_internal/common_modules.py``: ``module_inputs_torch_nn_CrossEntropyLoss`` (L1597):
    shapes 2d/3d/4d/higher-dim/no-batch x {plain, weights, ignore_index=1, label_smoothing=0.15,
    ignore_index + label_smoothing} x every reduction, plus probability targets.
  - ``torch/testing/_internal/common_methods_invocations.py``: ``sample_inputs_cross_entropy`` (L6911):
    the OpInfo grid (shapes (2,3), (2,3,1), (2,3,1,2), (2,3,1,2,3); reductions; weight; ignore_index=1;
    every sample also with a probability target).
* pytorch/pytorch ``test/test_nn.py`` at commit 74f2fa66feec00335f72813782f4802e80bff4cb
  (``TestNNDeviceType``), the targeted tests listed in /work/shared/reference/bad-inputs.md section 2.1:
  ``test_nll_loss_empty_tensor_reduction_{none,mean,sum}``, ``test_nll_loss_total_weight_is_zero``,
  ``test_nll_loss_all_ignored``, ``test_nll_loss_byte_target_matches_long``,
  ``test_nll_loss_out_of_bounds_ignore_index``, ``test_nll_loss_mismatched_batch``,
  ``test_nll_loss_invalid_target_dim``, ``test_nll_loss_invalid_weights``,
  ``test_cross_entropy_loss_prob_target_all_reductions``, ``..._prob_target_unit_weights``,
  ``..._prob_target_no_batch_dim``, ``..._index_target_unit_weights``, ``..._one_hot_target``,
  ``test_cross_entropy_label_smoothing_errors``,
  ``test_cross_entropy_label_smoothing_consistent_index_target_and_probs``,
  ``test_cross_entropy_label_smoothing_with_probs``,
  ``test_cross_entropy_label_smoothing_weight_ignore_indices``.

How a torch call maps to xseqloss: torch's class-at-dim-1 tensors (N, C, d1, ..., dk) become
``layout="NCT"`` with d1..dk flattened into T (a reshape; "none" results are reshaped back), (N, C) is
``layout="NC"`` and an unbatched (C,) is ``layout="C"``; ``F.cross_entropy(..., weight=w,
ignore_index=i, reduction=r, label_smoothing=e)`` is ``dict(presets.TORCH, ignore_index=i, reduction=r)``
with ``class_weights=w, label_smoothing=e``, and ``F.nll_loss`` is the same with ``inputs="log_probs"``.
Every case runs on NumPy, PyTorch, TensorFlow and JAX (the ``backend`` fixture); on JAX and TensorFlow,
which compile once per shape and option set, a test's inner loops (shapes, k extra dimensions,
reductions, eps values) run a subset of their cells (``_pick``), all of them on NumPy and PyTorch; the
grids compare JAX/TensorFlow values, and gradients where the peer test is about backward. Where torch
gives the expected number it is checked twice: against ``F.cross_entropy`` / ``F.nll_loss`` (float64)
and against our own NumPy transliteration of the common_nn reference formula (which must itself agree
with torch); the peer's identities (unit weights, one-hot, smoothing) are checked as identities too.

Left out on purpose (xseqloss differs by design, API.md section 2):
* negative class weights: ``make_tensor`` draws OpInfo/ModuleInfo weights from [-9, 9]; xseqloss rejects
  negative class weights (asserted in ``test_negative_class_weights_are_refused``), so weights here are
  drawn from [0, 9).
* negative soft targets: test_nn's probability-target tests use ``torch.randn`` (or ``log_softmax``)
  targets, entries < 0; xseqloss refuses negative soft-target mass, so those tests use |randn| (resp.
  softmax) targets - the identities they check do not depend on the sign.
* float16/bfloat16 OpInfo dtypes: xseqloss returns float32 for them (torch keeps the input dtype); the
  low-precision contract is covered by tests/test_precision.py.
* ``test_cross_entropy_loss_2d_out_of_bounds_class_index`` (a CUDA device assert in a subprocess),
  ``test_cross_entropy_large_tensor`` / ``test_nll_loss_large_tensor`` / ``test_cross_entropy_64bit``
  (CUDA-only, tens of GB); test_nn's error-message regexes (xseqloss has its own catalogue,
  tests/test_errors.py: here only that both sides refuse the input).
* A probability target with ignore_index, a ModuleInfo error input: legal in xseqloss (ignore_index
  applies to index targets only), asserted as such.
"""

import zlib

import numpy as np
import pytest

from helpers.support import assert_close, required_backends, round_to

from xseqloss import XSeqLossError, XSeqLossTypeError, presets

# torch gives the expected numbers for every backend: required (an error when missing) where
# XSEQLOSS_REQUIRE_BACKENDS names it, else the module is skipped
torch = __import__("torch") if "torch" in required_backends() else pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------------------ helpers

def _pick(backend, items, key, k=1, k_tf=None):
    """The cells of a test's inner loop that run on ``backend``: all of them on NumPy and PyTorch; on JAX
    (a compile per shape and option set, ~0.15 s each here) ``k`` of them and on TensorFlow (~0.04 s)
    ``k_tf`` (default ``k``), starting at ``key`` (an int: that offset; anything else: its hash), as
    helpers.support.reductions_for does. Every test (every peer case) runs on every backend; the cells left
    out on JAX/TensorFlow are repeats of the same case (another k-dimensional shape, the other eps value,
    another reduction), and the ModuleInfo grid rotates them so that each shape and reduction runs there."""
    items = list(items)
    n = {"jax": k, "tensorflow": k if k_tf is None else k_tf}.get(backend.name, len(items))
    if len(items) <= n:
        return items
    start = key if isinstance(key, int) else zlib.crc32(str(key).encode())
    return [items[(start + i) % len(items)] for i in range(n)]


def _with_grad(backend):
    """JAX and TensorFlow compile a value-and-gradient program per shape and option set (~0.3 s and
    ~0.1 s here): the grids compare their values, and their gradients where the peer test is about the
    backward pass (empty input, byte targets, out-of-range ignore_index, all ignored); their gradients are
    checked against the float64 reference for every option by tests/test_options.py and test_gradients.py."""
    return backend.name in ("numpy", "torch")


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _log_softmax(x, axis):
    m = x.max(axis, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis, keepdims=True))


def _class_view(w, ndim):
    return np.asarray(w, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def ref_index(x, y, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """common_nn.cross_entropy_loss_indices_target_reference (nll part: nlllossNd_reference), in NumPy.

    x: (N, C, *d) float64 logits, y: (N, *d) class ids."""
    C = x.shape[1]
    logp = _log_softmax(x, 1)
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    keep = y != ignore_index
    ys = np.where(keep, y, 0)
    wy = np.where(keep, w[ys], 0.0)  # norm = 0 at ignored positions, weight[t] elsewhere
    nll = -np.take_along_axis(logp, ys[:, None], 1)[:, 0] * wy
    if reduction == "mean":
        nll_r = nll.sum() / wy.sum()  # output.sum() / total_weight (NaN when 0)
    elif reduction == "sum":
        nll_r = nll.sum()
    else:
        nll_r = nll
    if label_smoothing == 0.0:
        return nll_r
    lp = logp if weight is None else logp * _class_view(w, x.ndim)
    smooth = np.where(keep, -lp.sum(1), 0.0)
    if reduction == "mean":
        if weight is not None:
            ret = smooth.sum() / w[y[keep]].sum()  # "TODO #61309": normalised by the weights, like nll
        else:
            ret = smooth[keep].mean()
    elif reduction == "sum":
        ret = smooth.sum()
    else:
        ret = smooth
    return (1 - label_smoothing) * nll_r + ret * (label_smoothing / C)


def ref_prob(x, q, weight=None, reduction="mean", label_smoothing=0.0):
    """common_nn.cross_entropy_loss_prob_target_reference, in NumPy; x, q: (N, C, *d)."""
    C = x.shape[1]
    logp = _log_softmax(x, 1)
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    if label_smoothing > 0.0:
        q = q * (1 - label_smoothing) + label_smoothing / C
    out = -(logp * q * _class_view(w, x.ndim)).sum(1)
    if reduction == "mean":
        return out.mean()  # every position, class weights not in the denominator
    if reduction == "sum":
        return out.sum()
    return out


def ref_nll(logp, y, weight=None, ignore_index=-100, reduction="mean"):
    """common_nn.nllloss_reference / nlllossNd_reference: F.nll_loss on given log-probabilities."""
    C = logp.shape[1]
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    keep = y != ignore_index
    ys = np.where(keep, y, 0)
    wy = np.where(keep, w[ys], 0.0)
    out = -np.take_along_axis(logp, ys[:, None], 1)[:, 0] * wy
    if reduction == "mean":
        with np.errstate(invalid="ignore"):
            return out.sum() / wy.sum()
    return out.sum() if reduction == "sum" else out


def _torch_ce(x, y, weight=None, grad=True, nll=False, **kw):
    """F.cross_entropy (or F.nll_loss) in float64 and the gradient of its summed output."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    yt = torch.tensor(y) if np.asarray(y).dtype.kind != "f" else torch.tensor(np.asarray(y, np.float64))
    if weight is not None:
        kw["weight"] = torch.tensor(np.asarray(weight, np.float64))
    fn = F.nll_loss if nll else F.cross_entropy
    out = fn(xt, yt, **kw)
    if not grad:
        return out.detach().numpy(), None
    out.sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


def _xsl_layout(x, y):
    """torch's (N, C, d1..dk) arrays -> xseqloss arrays and layout."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 1:
        return x, y, "C"
    if x.ndim == 2:
        return x, y, "NC"
    N, C = x.shape[:2]
    T = int(np.prod(x.shape[2:]))  # explicit: -1 cannot be inferred for an empty array
    return x.reshape(N, C, T), (y.reshape(N, C, T) if y.shape == x.shape else y.reshape(N, T)), "NCT"


def _opts(reduction="mean", weight=None, ignore_index=-100, label_smoothing=0.0, nll=False):
    """The xseqloss keywords for a torch call, through the TORCH preset."""
    kw = dict(presets.TORCH, reduction=reduction, ignore_index=ignore_index)
    if nll:
        kw["inputs"] = "log_probs"
    if weight is not None:
        kw["class_weights"] = np.asarray(weight, np.float64)
    if label_smoothing:
        kw["label_smoothing"] = label_smoothing
    return kw


def _xsl(backend, x, y, dtype="float64", grad=False, **kw):
    """xseqloss on torch-shaped inputs: (output reshaped like torch's, gradient shaped like x or None)."""
    xs, ys, layout = _xsl_layout(x, y)
    tok_shape = np.asarray(x).shape[:1] + np.asarray(x).shape[2:] if np.asarray(x).ndim > 1 else ()
    if grad:
        out, g = backend.loss_and_grad(xs, ys, dtype, layout=layout, **kw)
        g = backend.float_out(g).reshape(np.asarray(x).shape)
    else:
        out, g = backend.loss(xs, ys, dtype, layout=layout, **kw), None
    out = backend.float_out(out)
    if kw.get("reduction") == "none":
        out = out.reshape(tok_shape)
    return out, g


# ---------------------------------------------------------------- common_modules.py: ModuleInfo grid

# (in an order that makes the JAX/TensorFlow rotation below reach every index-target shape)
MODULE_CASES = {
    "plain": {},
    "weights": {"weight": True},
    "ignore_index": {"ignore_index": 1},
    "ignore_index_label_smoothing": {"ignore_index": 1, "label_smoothing": 0.15},
    "label_smoothing": {"label_smoothing": 0.15},
}
MODULE_INDEX_SHAPES = {"4d": (2, 3, 5, 5), "3d": (2, 3, 5), "2d": (2, 3), "higher_dim": (2, 3, 5, 5, 2, 2),
                       "no_batch_dim": (3,)}
MODULE_PROB_SHAPES = {"4d": (5, 3, 4, 2), "3d": (5, 3, 4), "2d": (5, 3), "higher_dim": (2, 3, 5, 5, 2, 2)}
MODULE_GRID = ([(case, "index") for case in MODULE_CASES]
               + [(case, "prob") for case, kw in MODULE_CASES.items() if "ignore_index" not in kw])


def _module_sample(case, kind, shape_name):
    rng = np.random.default_rng(_seed("module", case, kind, shape_name))
    kw = dict(MODULE_CASES[case])
    weight = rng.uniform(0.0, 9.0, 3) if kw.pop("weight", False) else None
    if kind == "index":
        shape = MODULE_INDEX_SHAPES[shape_name]
        x = rng.uniform(-9, 9, shape)  # make_tensor's default range for floats
        y = rng.integers(0, 3, shape[:1] + shape[2:]) if len(shape) > 1 else rng.integers(0, 3, ())
        ign = kw.get("ignore_index")
        if ign is not None and np.all(y == ign):
            y.flat[0] = 0  # at least one target counts (as the OpInfo generator ensures)
    else:
        shape = MODULE_PROB_SHAPES[shape_name]
        x = rng.uniform(-9, 9, shape)
        z = rng.uniform(-9, 9, shape)
        y = np.exp(_log_softmax(z, 1))  # make_input(...).softmax(dim=1)
    return x, y, weight, kw


@pytest.mark.parametrize("i", range(len(MODULE_GRID)), ids=[f"{c}-{k}" for c, k in MODULE_GRID])
def test_module_inputs_cross_entropy_loss(backend, i):
    """Every ModuleInfo input: NumPy and PyTorch run each case on every shape and reduction; JAX and
    TensorFlow one shape and one reduction per case, rotating over the cases (every reduction and every
    index-target shape still runs on each)."""
    case, kind = MODULE_GRID[i]
    shapes = MODULE_INDEX_SHAPES if kind == "index" else MODULE_PROB_SHAPES
    names = [n for n in shapes if not (n == "no_batch_dim" and "ignore_index" in MODULE_CASES[case])]
    grad = _with_grad(backend)
    for shape_name in _pick(backend, names, i):
        x, y, weight, kw = _module_sample(case, kind, shape_name)
        for reduction in _pick(backend, REDUCTIONS, i):
            ign = kw.get("ignore_index", -100)
            eps = kw.get("label_smoothing", 0.0)
            if kind == "index" and x.ndim == 1:  # no_batch_dim_reference_fn: unsqueeze, reference, squeeze
                ref = ref_index(x[None], y[None], weight, ign, reduction, eps)
                ref = ref[0] if reduction == "none" else ref
            elif kind == "index":
                ref = ref_index(x, y, weight, ign, reduction, eps)
            else:
                ref = ref_prob(x, y, weight, reduction, eps)
            tkw = dict(reduction=reduction, label_smoothing=eps)
            if kind == "index":
                tkw["ignore_index"] = ign
            want, want_g = _torch_ce(x, y, weight, **tkw)
            assert_close(ref, want, what=f"our common_nn reference vs torch ({shape_name}, {reduction})")
            got, g = _xsl(backend, x, y, grad=grad, **_opts(reduction, weight, ign, eps))
            assert_close(got, ref, what=f"{case} {kind} {shape_name} {reduction} value")
            if grad:
                assert_close(g, want_g, what=f"{case} {kind} {shape_name} {reduction} gradient")


# --------------------------------------------------- common_methods_invocations.py: OpInfo samples

def _opinfo_samples():
    shape = (2, 3)
    grid = [(shape, {}), ((2, 3, 1), {}), ((2, 3, 1, 2), {}), ((2, 3, 1, 2, 3), {})]
    # (shape, dict(reduction="mean")) repeats (shape, {}) (mean is the default): left out as a duplicate
    grid += [(shape, dict(reduction=r)) for r in REDUCTIONS if r != "mean"]
    grid += [(shape, dict(weight=True, reduction=r)) for r in REDUCTIONS]
    grid += [(shape, dict(ignore_index=1))]
    out = []
    for s, kw in grid:
        for prob in (False, True):
            if prob and "ignore_index" in kw:
                continue  # ignore_index is not supported for probabilities target (the generator skips it)
            name = "x".join(map(str, s)) + "".join(f"-{k}={v}" for k, v in kw.items()) + ("-prob" if prob else "")
            out.append(pytest.param(s, kw, prob, id=name))
    return out


@pytest.mark.parametrize("shape,kw,prob", _opinfo_samples())
def test_opinfo_sample_inputs_cross_entropy_float32(backend, shape, kw, prob):
    """The OpInfo grid in float32 (one of its dtypes); the reference runs in float64 on the rounded inputs."""
    rng = np.random.default_rng(_seed("opinfo", shape, sorted(kw.items()), prob))
    kw = dict(kw)
    x = round_to(rng.uniform(-9, 9, shape), "float32")
    weight = round_to(rng.uniform(0.0, 9.0, 3), "float32") if kw.pop("weight", False) else None
    reduction = kw.get("reduction", "mean")
    ign = kw.get("ignore_index", -100)
    if prob:
        y = round_to(rng.uniform(0, 1, shape), "float32")  # make_tensor(low=0, high=1): not normalised
        ref = ref_prob(x, y, weight, reduction)
        want, want_g = _torch_ce(x, y, weight, reduction=reduction)
    else:
        y = rng.integers(0, 3, shape[:1] + shape[2:])
        if np.all(y == ign):
            y.flat[0] = 0
        ref = ref_index(x, y, weight, ign, reduction)
        want, want_g = _torch_ce(x, y, weight, reduction=reduction, ignore_index=ign)
    assert_close(ref, want, what="our reference vs torch")
    grad = _with_grad(backend)
    got, g = _xsl(backend, x, y, "float32", grad=grad, **_opts(reduction, weight, ign))
    assert_close(got, ref, "float32", "value")
    if grad:
        assert_close(g, want_g, "float32", "gradient")


# module_error_inputs_torch_nn_CrossEntropyLoss (common_modules.py L1685): name -> (logits, targets, layout,
# options); each is an error in torch and in xseqloss
MODULE_ERRORS = {
    "long_target_of_input_shape": ((2, 3), np.zeros((2, 3), np.int64), "NC", {}),
    "float_class_index_target": ((2, 3), np.array([0.0, 1.0]), "NC", {}),
    "batch_size_mismatch": ((2, 3), np.array([0, 1, 2]), "NC", {}),
    "weight_wrong_shape": ((2, 3), np.array([0, 1]), "NC", {"weight": np.ones(2)}),
    "label_smoothing_out_of_range": ((2, 3), np.array([0, 1]), "NC", {"label_smoothing": 1.5}),
    "target_spatial_size_mismatch": ((2, 3, 5), np.zeros((2, 4), np.int64), "NCT", {}),
}


@pytest.mark.parametrize("name", list(MODULE_ERRORS))
def test_module_error_inputs_cross_entropy_loss(backend, name):
    shape, y, layout, kw = MODULE_ERRORS[name]
    x = np.random.default_rng(_seed("error", name)).uniform(-9, 9, shape)
    kw = dict(kw)
    with pytest.raises((ValueError, RuntimeError)):  # torch's own error
        F.cross_entropy(torch.tensor(x), torch.tensor(y), **{k: (torch.tensor(v) if k == "weight" else v)
                                                             for k, v in kw.items()})
    opts = _opts(weight=kw.pop("weight", None), label_smoothing=kw.pop("label_smoothing", 0.0))
    with pytest.raises((XSeqLossError, XSeqLossTypeError)):
        backend.loss(x, y, layout=layout, **opts)


def test_module_error_input_prob_target_with_ignore_index_is_legal(backend):
    """The seventh ModuleInfo error input - a probability target with ignore_index=1 - is legal in
    xseqloss on purpose: ignore_index applies to index targets only (API.md section 1), so the loss is
    torch's loss of the same probability target without ignore_index."""
    rng = np.random.default_rng(_seed("error", "prob_ignore"))
    x = rng.uniform(-9, 9, (2, 3))
    q = np.exp(_log_softmax(rng.uniform(-9, 9, (2, 3)), 1))
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        F.cross_entropy(torch.tensor(x), torch.tensor(q), ignore_index=1)
    got, _ = _xsl(backend, x, q, **_opts(ignore_index=1))
    assert_close(got, _torch_ce(x, q, grad=False)[0], what="probability target, ignore_index=1")


def test_negative_class_weights_are_refused(backend):
    """make_tensor's weights can be negative; xseqloss refuses them on purpose (API.md section 2)."""
    x = np.zeros((2, 3))
    with pytest.raises(XSeqLossError, match="class_weights"):
        backend.loss(x, np.array([0, 1]), layout="NC", **_opts(weight=[1.0, -2.0, 0.5]))


# ------------------------------------------------------------------------ test/test_nn.py: nll_loss

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_empty_tensor_reduction(backend, reduction):
    """test_nll_loss_empty_tensor_reduction_{none,mean,sum}: mean of nothing is NaN, the sum 0, "none"
    is empty of the targets' shape, and backward runs (a gradient of the input's shape)."""
    shapes = [(0, 3), (0, 3, 5, 7), (2, 3, 0, 7), (2, 3, 5, 0), (2, 3, 5, 7, 0)]
    rng = np.random.default_rng(1)
    for shape in _pick(backend, shapes, reduction):
        x = rng.random(shape)
        y = rng.integers(0, 3, shape[:1] + shape[2:])
        got, g = _xsl(backend, x, y, grad=True, **_opts(reduction, nll=True))
        want, _ = _torch_ce(x, y, nll=True, reduction=reduction)
        if reduction == "mean":
            assert np.isnan(got) and np.isnan(want)
        elif reduction == "sum":
            assert got == 0.0 and want == 0.0
        else:
            assert got.shape == want.shape == y.shape
        assert g.shape == x.shape and not np.any(g)


def test_nll_loss_total_weight_is_zero(backend):
    """input ones, targets 0, weight zeros: sum 0, mean NaN, none all zeros."""
    for shape in _pick(backend, [(2, 3), (2, 3, 5, 7), (2, 3, 5, 7, 9)], "total_weight"):
        x = np.ones(shape)
        y = np.zeros(shape[:1] + shape[2:], np.int64)
        w = np.zeros(shape[1])
        s, _ = _xsl(backend, x, y, **_opts("sum", w, nll=True))
        m, _ = _xsl(backend, x, y, **_opts("mean", w, nll=True))
        n, _ = _xsl(backend, x, y, **_opts("none", w, nll=True))
        assert s == 0.0 and np.isnan(m)
        assert n.shape == y.shape and np.all(n == 0)
        assert np.isnan(_torch_ce(x, y, w, nll=True, grad=False)[0])


def test_nll_loss_all_ignored(backend):
    """targets 0 with ignore_index=0: sum 0, mean NaN, none all zeros."""
    for shape in _pick(backend, [(2, 3), (2, 3, 5, 7), (2, 3, 5, 7, 9)], "all_ignored"):
        x = np.ones(shape)
        y = np.zeros(shape[:1] + shape[2:], np.int64)
        s, _ = _xsl(backend, x, y, **_opts("sum", ignore_index=0, nll=True))
        m, gm = _xsl(backend, x, y, grad=True, **_opts("mean", ignore_index=0, nll=True))
        n, _ = _xsl(backend, x, y, **_opts("none", ignore_index=0, nll=True))
        assert s == 0.0 and np.isnan(m) and not np.any(gm)
        assert n.shape == y.shape and np.all(n == 0)


def test_nll_loss_byte_target_matches_long(backend):
    """N, C = 10, 4; NLLLoss on log_softmax(input): uint8 targets give the long targets' value and
    gradient, exactly, for every reduction."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 4))
    y = rng.integers(0, 4, 10)
    logp = _log_softmax(x, 1)
    for reduction in _pick(backend, REDUCTIONS, "byte", k=1, k_tf=3):
        got_long, g_long = _xsl(backend, logp, y.astype(np.int64), grad=True, **_opts(reduction, nll=True))
        got_byte, g_byte = _xsl(backend, logp, y.astype(np.uint8), grad=True, **_opts(reduction, nll=True))
        np.testing.assert_array_equal(got_byte, got_long)
        np.testing.assert_array_equal(g_byte, g_long)
        want, want_g = _torch_ce(logp, y, nll=True, reduction=reduction)
        assert_close(got_long, want, what=f"{reduction} value")
        assert_close(g_long, want_g, what=f"{reduction} gradient")
        assert_close(got_long, ref_nll(logp, y, reduction=reduction), what=f"{reduction} vs reference")


def test_nll_loss_out_of_bounds_ignore_index(backend):
    """ignore_index=255 with C = 3 works in "mean" and "none" (forward and backward)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3))
    y = np.array([0, 1, 255, 0, 1, 2])
    for reduction in _pick(backend, ("mean", "none"), "oob", k=1, k_tf=2):
        got, g = _xsl(backend, x, y, grad=True, **_opts(reduction, ignore_index=255, nll=True))
        want, want_g = _torch_ce(x, y, nll=True, reduction=reduction, ignore_index=255)
        assert_close(got, want, what=f"{reduction} value")
        assert_close(g, want_g, what=f"{reduction} gradient")
        assert_close(got, ref_nll(x, y, ignore_index=255, reduction=reduction), what="reference")


NLL_ERRORS = {
    # test_nll_loss_mismatched_batch: input (10, 3), target (3,)
    "mismatched_batch": (np.zeros((10, 3)), np.zeros(3, np.int64), {}),
    # test_nll_loss_invalid_target_dim: input (10, 3), target (10, 2)
    "invalid_target_dim": (np.zeros((10, 3)), np.zeros((10, 2), np.int64), {}),
    # test_nll_loss_invalid_weights: weight of 4 classes, or of shape (1, 3), for C = 3
    "invalid_weights_4": (np.zeros((10, 3)), np.zeros(10, np.int64), {"weight": np.ones(4)}),
    "invalid_weights_1x3": (np.zeros((10, 3)), np.zeros(10, np.int64), {"weight": np.ones((1, 3))}),
}


@pytest.mark.parametrize("name", list(NLL_ERRORS))
def test_nll_loss_errors(backend, name):
    x, y, kw = NLL_ERRORS[name]
    with pytest.raises(XSeqLossError):
        backend.loss(x, y, layout="NC", **_opts(nll=True, **kw))
    with pytest.raises((ValueError, RuntimeError)):  # torch refuses them too
        _torch_ce(x, y, nll=True, grad=False, **kw)


# ------------------------------------------------------------------ test/test_nn.py: cross_entropy

def _k_dims(rng, k):
    return [int(d) for d in rng.integers(2, 5, k)]  # torch.randint(2, 5, size=(1,)) per extra dim


def test_cross_entropy_loss_prob_target_all_reductions(backend):
    """k-dimensional loss, N, C = 5, 4: probability targets, every reduction, weight None or |randn|,
    equal to the reference."""
    rng = np.random.default_rng(4)
    grad = _with_grad(backend)
    for k in _pick(backend, range(5), "prob_all", k=1, k_tf=2):
        dims = _k_dims(rng, k)
        x = rng.normal(size=(5, 4, *dims))
        q = np.abs(rng.normal(size=(5, 4, *dims)))  # |randn|: xseqloss refuses negative target mass
        weight = np.abs(rng.normal(size=4))
        for reduction in _pick(backend, REDUCTIONS, ("prob_all", k)):
            for w in (None, weight):
                ref = ref_prob(x, q, w, reduction)
                want, want_g = _torch_ce(x, q, w, reduction=reduction)
                assert_close(ref, want, what="reference vs torch")
                got, g = _xsl(backend, x, q, grad=grad, **_opts(reduction, w))
                assert_close(got, ref, what=f"k={k} {reduction} w={w is not None}")
                if grad:
                    assert_close(g, want_g, what=f"k={k} {reduction} gradient")


@pytest.mark.parametrize("kind", ["prob", "index"])
def test_cross_entropy_loss_unit_weights(backend, kind):
    """test_cross_entropy_loss_{prob,index}_target_unit_weights: a weight of ones equals no weight."""
    rng = np.random.default_rng(5)
    for k in _pick(backend, range(5), ("unit", kind)):
        dims = _k_dims(rng, k)
        x = rng.normal(size=(5, 4, *dims))
        y = (np.abs(rng.normal(size=x.shape)) if kind == "prob" else rng.integers(0, 4, (5, *dims)))
        for reduction in _pick(backend, REDUCTIONS, ("unit", kind, k)):
            plain, _ = _xsl(backend, x, y, **_opts(reduction))
            unit, _ = _xsl(backend, x, y, **_opts(reduction, np.ones(4)))
            assert_close(unit, plain, what=f"k={k} {reduction}")
            ref = ref_prob(x, y, None, reduction) if kind == "prob" else ref_index(x, y, None, -100, reduction)
            assert_close(plain, ref, what=f"k={k} {reduction} reference")


def test_cross_entropy_loss_prob_target_no_batch_dim(backend):
    """C = 5: an unbatched (C,) input equals the batch of one (squeezed for "none"), weighted or not."""
    rng = np.random.default_rng(6)
    x = _log_softmax(rng.normal(size=5), 0)
    q = np.exp(_log_softmax(rng.normal(size=5), 0))
    weight = np.abs(rng.normal(size=5))  # randn in torch: a negative weight is refused here
    for reduction in _pick(backend, REDUCTIONS, "no_batch"):
        for w in _pick(backend, (None, weight), ("no_batch", reduction), k=1, k_tf=2):
            single, _ = _xsl(backend, x, q, **_opts(reduction, w))
            batch, _ = _xsl(backend, x[None], q[None], **_opts(reduction, w))
            if reduction == "none":
                batch = batch[0]
            assert_close(single, batch, what=f"{reduction} w={w is not None}")
            assert_close(single, _torch_ce(x, q, w, grad=False, reduction=reduction)[0], what="torch")


def test_cross_entropy_loss_one_hot_target(backend):
    """Index targets equal one-hot probability targets for "none" and "sum", weighted or not, and for the
    unweighted "mean". The weighted mean is where they differ (torch issue #61309: index targets divide by
    sum w[y], probability targets by the number of positions) - test_nn skips it; here both sides must
    give torch's own (different) numbers."""
    rng = np.random.default_rng(7)
    for k in _pick(backend, range(5), "one_hot"):
        dims = _k_dims(rng, k)
        x = rng.normal(size=(5, 4, *dims))
        y = rng.integers(0, 4, (5, *dims))
        one_hot = np.moveaxis(np.eye(4)[y], -1, 1)
        weight = np.abs(rng.normal(size=4))
        for reduction in _pick(backend, REDUCTIONS, ("one_hot", k), k=1, k_tf=2):
            for w in (None, weight):
                grad = _with_grad(backend)
                idx, g_idx = _xsl(backend, x, y, grad=grad, **_opts(reduction, w))
                hot, g_hot = _xsl(backend, x, one_hot, grad=grad, **_opts(reduction, w))
                if reduction == "mean" and w is not None:
                    assert_close(idx, _torch_ce(x, y, w, grad=False)[0], what="weighted mean, index")
                    assert_close(hot, _torch_ce(x, one_hot, w, grad=False)[0], what="weighted mean, one-hot")
                    assert abs(float(idx) - float(hot)) > 1e-6  # the #61309 difference is really there
                    continue
                assert_close(hot, idx, what=f"k={k} {reduction} w={w is not None}")
                if grad:
                    assert_close(g_hot, g_idx, what=f"k={k} {reduction} gradient")


@pytest.mark.parametrize("target", ["index", "prob"])
def test_cross_entropy_label_smoothing_errors(backend, target):
    """label_smoothing=1.2 is refused, for index and probability targets."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4))
    y = np.arange(3) if target == "index" else np.abs(rng.normal(size=(3, 4)))
    with pytest.raises(XSeqLossError, match="label_smoothing"):
        backend.loss(x, y, layout="NC", **_opts(label_smoothing=1.2))


def test_cross_entropy_label_smoothing_consistent_index_target_and_probs(backend):
    """float64, N, C = 10, 4: index targets with label_smoothing equal the probability targets
    (1 - eps + eps / C at the target, eps / C elsewhere), eps in {0.05, 0.15}, every reduction.
    (test_nn's tolerance is rtol=1e-7, atol=1e-5; ours is the float64 1e-10.)"""
    rng = np.random.default_rng(9)
    for k in _pick(backend, range(5), "ls_consistent"):
        dims = _k_dims(rng, k)
        x = rng.normal(size=(10, 4, *dims))
        y = rng.integers(0, 4, (10, *dims))
        hot = np.moveaxis(np.eye(4)[y], -1, 1)
        for reduction in _pick(backend, REDUCTIONS, ("ls_consistent", k)):
            for eps in _pick(backend, (0.05, 0.15), ("ls_consistent", k, reduction)):
                target_proba = np.where(hot == 1, 1 - eps + eps / 4, eps / 4)
                grad = _with_grad(backend)
                with_prob, g_prob = _xsl(backend, x, target_proba, grad=grad, **_opts(reduction))
                with_index, g_index = _xsl(backend, x, y, grad=grad, **_opts(reduction, label_smoothing=eps))
                assert_close(with_index, with_prob, what=f"k={k} {reduction} eps={eps}")
                if grad:
                    assert_close(g_index, g_prob, what=f"k={k} {reduction} eps={eps} gradient")
                want = _torch_ce(x, y, grad=False, reduction=reduction, label_smoothing=eps)[0]
                assert_close(with_index, want, what="torch")


def test_cross_entropy_label_smoothing_with_probs(backend):
    """Probability targets with label_smoothing equal the manually smoothed targets
    q * (1 - eps) + eps / C, eps in {0.05, 0.15}, every reduction (targets: softmax rows; test_nn uses
    log_softmax rows, negative mass that xseqloss refuses)."""
    rng = np.random.default_rng(10)
    for k in _pick(backend, range(5), "ls_probs"):
        dims = _k_dims(rng, k)
        x = rng.normal(size=(10, 4, *dims))
        q = np.exp(_log_softmax(rng.normal(size=(10, 4, *dims)), 1))
        for eps in _pick(backend, (0.05, 0.15), ("ls_probs", k)):
            for reduction in _pick(backend, REDUCTIONS, ("ls_probs", k, eps)):
                smoothed, _ = _xsl(backend, x, q, **_opts(reduction, label_smoothing=eps))
                manual, _ = _xsl(backend, x, q * (1 - eps) + eps / 4, **_opts(reduction))
                assert_close(smoothed, manual, what=f"k={k} {reduction} eps={eps}")
                assert_close(smoothed, ref_prob(x, q, None, reduction, eps), what="reference")


def test_cross_entropy_label_smoothing_weight_ignore_indices(backend):
    """The ignored row never counts: inputs that differ only there give the same loss, and for "mean"
    and "sum" the same as the batch without that row - for the default (-100), a negative (-2) and an
    out-of-range positive (2, C = 2) ignore_index, eps in {0.05, 0.15}, weight None or [0.3, 0.6]."""
    wgt = np.array([0.3, 0.6])
    inp1 = np.array([[0.3, 0.4], [1.0, 2.0]])
    inp2 = np.array([[0.3, 0.6], [1.0, 2.0]])
    targets = {-100: np.array([-100, 1]), -2: np.array([-2, 1]), 2: np.array([2, 1])}
    combos = [(r, eps, w) for r in ("none", "sum", "mean") for eps in (0.05, 0.15) for w in (False, True)]
    for reduction, eps, use_w in _pick(backend, combos, "ls_weight_ignore", k=1, k_tf=4):
        w = wgt if use_w else None
        for ign in _pick(backend, targets, (reduction, eps, use_w)):
            y = targets[ign]
            kw = _opts(reduction, w, ign, eps)
            l1, _ = _xsl(backend, inp1, y, **kw)
            l2, _ = _xsl(backend, inp2, y, **kw)
            np.testing.assert_array_equal(l1, l2)
            want = _torch_ce(inp1, y, w, grad=False, reduction=reduction, label_smoothing=eps, ignore_index=ign)[0]
            assert_close(l1, want, what=f"{reduction} eps={eps} w={use_w} ignore_index={ign}")
            assert_close(l1, ref_index(inp1, y, w, ign, reduction, eps), what="reference")
            if reduction != "none":  # the mean's denominator does not count the ignored row
                l3, _ = _xsl(backend, inp2[1:], y[1:], **kw)
                assert_close(l1, l3, what=f"{reduction} eps={eps} w={use_w} ignore_index={ign}: row removed")
