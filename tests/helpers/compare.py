"""One checker used by the option, layout and dtype tests: run a backend, run
the reference on the same (already-rounded) inputs, compare value, gradient,
return type, dtype and shape."""

import numpy as np

from .reference64 import reference
from .support import OUT_DTYPE, assert_close, round_to

FLOAT_SIDE = ("weights", "class_weights")


def expected_shape(reduction, layout, logits_shape):
    dims = dict(zip(layout, logits_shape))
    if reduction == "none":
        return tuple(dims[a] for a in layout if a != "C")
    if reduction == "per_sequence":
        return (dims["N"],)
    if reduction == "per_position":
        return (dims["T"],)
    return ()


def check_output_meta(backend, out, dtype, shape, what="loss"):
    assert backend.is_native(out), (
        f"{what}: expected a {backend.name} array, got {type(out)!r}")
    assert backend.dtype_name(out) == OUT_DTYPE[dtype], (
        f"{what}: dtype {backend.dtype_name(out)} for {dtype} input, "
        f"expected {OUT_DTYPE[dtype]}")
    assert tuple(out.shape) == tuple(shape), (
        f"{what}: shape {tuple(out.shape)}, expected {tuple(shape)}")


def rounded_inputs(logits, targets, dtype, opts):
    """Values exactly as the backend will see them (the reference's inputs)."""
    x = round_to(logits, dtype)
    t = np.asarray(targets)
    if t.dtype.kind == "f":
        t = round_to(t, dtype)
    side = "float32" if dtype in ("float16", "bfloat16") else dtype
    ref_opts = dict(opts)
    for k in FLOAT_SIDE:
        if isinstance(ref_opts.get(k), np.ndarray):
            ref_opts[k] = round_to(ref_opts[k], side)
    return x, t, ref_opts


def check_case(backend, logits, targets, *, dtype="float64", grad=True,
               native=True, **opts):
    """Compare one call with the reference; returns (out, ref) as float64."""
    layout = opts.get("layout", "NTC")
    reduction = opts.get("reduction", "mean")
    x, t, ref_opts = rounded_inputs(logits, targets, dtype, opts)
    ref_opts.pop("num_classes", None)
    ref_opts.pop("validate", None)
    ref_opts.pop("backend", None)
    ref, gref = reference(x, t, with_grad=True, **ref_opts)
    if grad:
        out, g = backend.loss_and_grad(x, t, dtype, native=native, **opts)
    else:
        out = backend.loss(x, t, dtype, native=native, **opts)
    shape = expected_shape(reduction, layout, np.shape(logits))
    check_output_meta(backend, out, dtype, shape)
    got = backend.float_out(out)
    assert_close(got, ref, dtype, what=f"{backend.name} {reduction} value")
    if grad:
        assert backend.is_native(g), f"gradient is {type(g)!r}"
        assert backend.dtype_name(g) == dtype, (
            f"gradient dtype {backend.dtype_name(g)}, expected the input's {dtype}")
        assert tuple(g.shape) == tuple(np.shape(logits))
        assert_close(backend.float_out(g), gref, dtype,
                     what=f"{backend.name} {reduction} gradient")
    return got, ref
