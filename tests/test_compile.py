"""Compiled and transformed calls give the eager result, value and gradient (API.md sections 2 and 3):
jax.jit, jax.vmap, jax.grad; tf.function(jit_compile=True); torch.compile(fullgraph=True).
Static errors keep their class and message under torch.compile(fullgraph=True), and a process
whose first call is compiled loads the backend (issue 11).

Option combinations: plain; smoothing + class weights + mask + lengths + weights; soft targets with a
mask; reduction="per_sequence". Gradients of non-scalar results are those of their sum. Inputs are
float32, the dtype these paths run in practice, so the tolerance is float32's (API.md section 6).
"""

import numpy as np
import pytest

from helpers.support import assert_close, require_or_skip

import xseqloss as xsl

N, T, C = 3, 5, 6
COMBOS = ("plain", "smooth_cw_mask_lengths", "soft", "per_sequence")


def _problem(combo, seed=0):
    """(logits, targets, array options, static options) as NumPy; float32 logits."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(N, T, C)).astype(np.float32)
    targets = rng.integers(0, C, (N, T))
    targets[1, 2] = -100
    mask = np.ones((N, T), bool)
    mask[0, 1] = False
    mask[2, 3] = False
    if combo == "plain":
        return logits, targets, {}, {}
    if combo == "smooth_cw_mask_lengths":
        arrays = dict(mask=mask, lengths=np.array([5, 3, 4]),
                      weights=rng.uniform(0.5, 2.0, (N, T)).astype(np.float32),
                      class_weights=np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.25], np.float32))
        return logits, targets, arrays, dict(label_smoothing=0.1, z_loss=1e-3)
    if combo == "soft":
        soft = rng.dirichlet(np.ones(C), (N, T)).astype(np.float32)
        return logits, soft, dict(mask=mask), dict(label_smoothing=0.05)
    if combo == "per_sequence":
        return logits, targets, dict(mask=mask), dict(reduction="per_sequence")
    raise AssertionError(combo)


def _eager(combo, to, value_and_grad):
    logits, targets, arrays, static = _problem(combo)
    return value_and_grad(to(logits), to(targets), {k: to(v) for k, v in arrays.items()}, static)


# ---------------------------------------------------------------------------------------------- JAX

@pytest.fixture(scope="module")
def jax_mods():
    require_or_skip("jax")
    import jax
    import jax.numpy as jnp
    return jax, jnp


def _jax_loss(static):
    def f(logits, targets, arrays):
        return xsl.sequence_cross_entropy(logits, targets, **arrays, **static)
    return f


@pytest.mark.parametrize("combo", COMBOS)
def test_jax_jit_and_grad_equal_eager(jax_mods, combo):
    jax, jnp = jax_mods
    logits, targets, arrays, static = _problem(combo)
    x, y = jnp.asarray(logits), jnp.asarray(targets)
    arr = {k: jnp.asarray(v) for k, v in arrays.items()}
    eager_value, eager_grad = xsl.value_and_grad(x, y, **arrays, **static)  # eager call of the package

    f = _jax_loss(static)
    total = lambda z: jnp.sum(f(z, y, arr))  # noqa: E731
    jit_value = jax.jit(f)(x, y, arr)
    grad = jax.grad(total)(x)
    jit_grad = jax.jit(jax.grad(total))(x)
    assert jit_value.shape == eager_value.shape
    assert_close(np.asarray(jit_value), np.asarray(eager_value), "float32", "jit value")
    assert_close(np.asarray(grad), np.asarray(eager_grad), "float32", "grad")
    assert_close(np.asarray(jit_grad), np.asarray(eager_grad), "float32", "jit(grad)")
    assert np.abs(np.asarray(grad)).sum() > 0


@pytest.mark.parametrize("combo", COMBOS)
def test_jax_vmap_over_a_batch_of_problems_equals_a_loop(jax_mods, combo):
    jax, jnp = jax_mods
    problems = [_problem(combo, seed) for seed in range(3)]
    static = problems[0][3]
    xs = jnp.stack([jnp.asarray(p[0]) for p in problems])
    ys = jnp.stack([jnp.asarray(p[1]) for p in problems])
    arrs = {k: jnp.stack([jnp.asarray(p[2][k]) for p in problems]) for k in problems[0][2]}

    f = _jax_loss(static)
    values = jax.vmap(f)(xs, ys, arrs)
    grads = jax.vmap(jax.grad(lambda z, y, a: jnp.sum(f(z, y, a))))(xs, ys, arrs)
    for i, (logits, targets, arrays, _) in enumerate(problems):
        v, g = xsl.value_and_grad(jnp.asarray(logits), jnp.asarray(targets), **arrays, **static)
        assert_close(np.asarray(values[i]), np.asarray(v), "float32", f"vmap value {i}")
        assert_close(np.asarray(grads[i]), np.asarray(g), "float32", f"vmap grad {i}")
    assert not np.allclose(np.asarray(values[0]), np.asarray(values[1]))  # really different problems


def test_jax_jit_keeps_the_nan_contract(jax_mods):
    jax, jnp = jax_mods
    logits, targets, _, _ = _problem("plain")
    targets[0, 4] = C  # out of range
    f = jax.jit(lambda z, y: xsl.sequence_cross_entropy(z, y, reduction="none"))
    out = np.asarray(f(jnp.asarray(logits), jnp.asarray(targets)))
    assert np.isnan(out[0, 4]) and np.isnan(out).sum() == 1
    with pytest.raises(xsl.XSeqLossError, match="out of range"):
        xsl.sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))  # eager raises


# ------------------------------------------------------------------------------------------ TensorFlow

@pytest.fixture(scope="module")
def tf():
    require_or_skip("tensorflow")
    import tensorflow as tf
    return tf


def _tf_value_and_grad(tf, static):
    def vg(logits, targets, arrays):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            out = xsl.sequence_cross_entropy(logits, targets, **arrays, **static)
            total = tf.reduce_sum(out)
        return out, tape.gradient(total, logits)
    return vg


@pytest.mark.parametrize("combo", COMBOS)
def test_tf_function_jit_compile_equals_eager(tf, combo):
    logits, targets, arrays, static = _problem(combo)
    x, y = tf.constant(logits), tf.constant(targets)
    arr = {k: tf.constant(v) for k, v in arrays.items()}
    vg = _tf_value_and_grad(tf, static)
    eager_value, eager_grad = vg(x, y, arr)
    xla_value, xla_grad = tf.function(vg, jit_compile=True)(x, y, arr)
    assert xla_value.shape == eager_value.shape
    assert_close(xla_value.numpy(), eager_value.numpy(), "float32", "XLA value")
    assert_close(xla_grad.numpy(), eager_grad.numpy(), "float32", "XLA gradient")
    assert np.abs(eager_grad.numpy()).sum() > 0


def test_tf_function_with_unknown_batch_and_time_equals_eager(tf):
    logits, targets, arrays, static = _problem("smooth_cw_mask_lengths")
    spec = [tf.TensorSpec([None, None, C], tf.float32), tf.TensorSpec([None, None], tf.int64),
            {"mask": tf.TensorSpec([None, None], tf.bool), "lengths": tf.TensorSpec([None], tf.int64),
             "weights": tf.TensorSpec([None, None], tf.float32), "class_weights": tf.TensorSpec([C], tf.float32)}]
    vg = _tf_value_and_grad(tf, dict(static, reduction="per_sequence"))
    fn = tf.function(vg, input_signature=spec)
    arr = {k: tf.constant(v) for k, v in arrays.items()}
    got_v, got_g = fn(tf.constant(logits), tf.constant(targets), arr)
    want_v, want_g = vg(tf.constant(logits), tf.constant(targets), arr)
    assert_close(got_v.numpy(), want_v.numpy(), "float32", "value")
    assert_close(got_g.numpy(), want_g.numpy(), "float32", "gradient")


def test_tf_xla_keeps_the_nan_contract(tf):
    logits, targets, _, _ = _problem("plain")
    targets[2, 0] = -3  # negative, not ignored: never wraps
    f = tf.function(lambda z, y: xsl.sequence_cross_entropy(z, y, reduction="none"), jit_compile=True)
    out = f(tf.constant(logits), tf.constant(targets)).numpy()
    assert np.isnan(out[2, 0]) and np.isnan(out).sum() == 1


# ---------------------------------------------------------------------------------------------- PyTorch

def test_torch_compile_fullgraph_equals_eager_for_every_combo():
    """One compiled function computes all four combinations (one compilation: seconds, not minutes)."""
    require_or_skip("torch")
    import torch

    problems = [_problem(c) for c in COMBOS]

    def all_losses(xs, ys, arrays):
        return tuple(xsl.sequence_cross_entropy(x, y, **a, **p[3]) for x, y, a, p in zip(xs, ys, arrays, problems))

    def run(fn):
        xs = [torch.tensor(p[0]).requires_grad_(True) for p in problems]
        ys = [torch.as_tensor(p[1]) for p in problems]
        arrays = [{k: torch.as_tensor(v) for k, v in p[2].items()} for p in problems]
        outs = fn(xs, ys, arrays)
        sum(o.sum() for o in outs).backward()  # each combination has its own leaf: separate gradients
        return [o.detach().numpy() for o in outs], [x.grad.numpy() for x in xs]

    torch._dynamo.reset()
    compiled = torch.compile(all_losses, fullgraph=True)  # a graph break would be an error
    eager_values, eager_grads = run(all_losses)
    values, grads = run(compiled)
    for combo, v, ev, g, eg in zip(COMBOS, values, eager_values, grads, eager_grads):
        assert v.shape == ev.shape, combo
        assert_close(v, ev, "float32", f"torch.compile value ({combo})")
        assert_close(g, eg, "float32", f"torch.compile gradient ({combo})")
        assert np.abs(eg).sum() > 0, combo


@pytest.mark.parametrize("normalizer", [6.0, 6], ids=["float", "int"])
def test_torch_compile_fullgraph_with_a_python_number_normalizer(normalizer):
    """A Python-number normalizer under torch.compile(fullgraph=True), in the function, in
    SequenceCrossEntropyLoss(normalizer=...) and in linear_cross_entropy: the call preparation
    used np.ndim / np.asarray on the traced constant (a graph break, an error with fullgraph).
    Value and gradient against torch's own cross-entropy summed and divided by the normalizer.
    backend="aot_eager": dynamo's fullgraph trace and AOT autograd's joint graph are what the bug
    broke; inductor's code generation (~90 s here per run) adds nothing to that."""
    require_or_skip("torch")
    import torch
    import torch.nn.functional as F
    from xseqloss.torch import SequenceCrossEntropyLoss

    logits, targets, _, _ = _problem("plain")
    x = torch.tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(targets)
    xr = x.clone().requires_grad_(True)
    want = F.cross_entropy(xr.reshape(-1, C), y.reshape(-1), reduction="sum") / 6.0
    want.backward()
    torch._dynamo.reset()
    calls = {"function": torch.compile(lambda z, t: xsl.sequence_cross_entropy(z, t, normalizer=normalizer),
                                       fullgraph=True, backend="aot_eager"),
             "module": torch.compile(SequenceCrossEntropyLoss(normalizer=normalizer), fullgraph=True, backend="aot_eager")}
    for what, f in calls.items():
        xc = x.clone().requires_grad_(True)
        got = f(xc, y)
        got.backward()
        assert_close(got.detach().numpy(), want.detach().numpy(), tol=1e-12, what=f"{what} value")
        assert_close(xc.grad.numpy(), xr.grad.numpy(), tol=1e-12, what=f"{what} gradient")
    r = np.random.default_rng(1)
    h, w = torch.tensor(r.normal(size=(N, T, 4))), torch.tensor(r.normal(size=(C, 4)))
    lin = torch.compile(lambda a, b, t: xsl.linear_cross_entropy(a, b, t, normalizer=normalizer), fullgraph=True, backend="aot_eager")
    want = F.cross_entropy((h @ w.T).reshape(-1, C), y.reshape(-1), reduction="sum") / 6.0
    assert_close(lin(h, w, y).numpy(), want.numpy(), tol=1e-12, what="linear_cross_entropy value")


def test_the_trace_time_raiser_is_marked_as_dynamo_marks_it():
    """backends/torch/ops.py marks its trace-time raiser constant without importing torch._dynamo
    (1.2 s on the first torch call); the mark must be the one dynamo's own decorator sets."""
    require_or_skip("torch")
    import torch._dynamo

    from xseqloss.internals import part

    def probe():
        return None
    torch._dynamo.assume_constant_result(probe)
    marks = {k for k in vars(probe)}
    assert marks == {"_dynamo_marked_constant"}, marks
    assert part("torch", "ops").raise_at_trace_time._dynamo_marked_constant is True


# ------------------------------- PyTorch: static errors and the first call, compiled (issue 11)

@pytest.fixture
def torch_mod():
    require_or_skip("torch")
    import torch
    return torch


@pytest.mark.parametrize("kind, call", [
    ("XSeqLossError", lambda xsl, x, y: xsl.sequence_cross_entropy(x, y, mask=x.new_ones(2, 4).bool())),
    ("XSeqLossTypeError", lambda xsl, x, y: xsl.sequence_cross_entropy(x, y.float())),
    ("XSeqLossError", lambda xsl, x, y: xsl.sequence_cross_entropy(x, y, reduction="bogus")),
    ("XSeqLossError", lambda xsl, x, y: xsl.sequence_cross_entropy(x, y, label_smoothing=1.5)),
    ("XSeqLossTypeError", lambda xsl, x, y: xsl.sequence_cross_entropy(x.long(), y)),
    ("XSeqLossError", lambda xsl, x, y: xsl.pool(x, method="median")),
    ("XSeqLossError", lambda xsl, x, y: xsl.sequence_cross_entropy(x, y, normalizer=-1.0)),
], ids=["mask_shape", "float_targets", "unknown_reduction", "smoothing_range", "integer_logits", "pool_method",
        "negative_normalizer"])
def test_static_errors_keep_their_type_under_torch_compile(torch_mod, kind, call):
    """torch.compile(fullgraph=True) used to report every static error as
    torch._dynamo.exc.Unsupported; now it is our class, with our message."""
    torch = torch_mod
    want = getattr(xsl, kind)
    x = torch.randn(2, 3, 4)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(want) as eager:
        call(xsl, x, y)
    torch._dynamo.reset()
    with pytest.raises(want) as compiled:
        torch.compile(lambda x, y: call(xsl, x, y), fullgraph=True)(x, y)
    assert str(eager.value).split("\n")[0] in str(compiled.value)


def test_first_call_under_torch_compile_loads_the_backend():
    """A fresh process whose very first call is compiled: loading the backend used a lock and
    importlib, which dynamo cannot trace (fullgraph=True failed with 'Unsupported context manager')."""
    require_or_skip("torch")
    import subprocess
    import sys
    code = ("import torch, xseqloss as xsl\n"
            "f = torch.compile(lambda x, y: xsl.sequence_cross_entropy(x, y), fullgraph=True)\n"
            "x = torch.randn(2, 3, 4); y = torch.zeros(2, 3, dtype=torch.long)\n"
            "v = f(x, y)\n"
            "assert torch.allclose(v, xsl.sequence_cross_entropy(x, y)), v\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
