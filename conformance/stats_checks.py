"""The "stats" checks: ``token_stats`` and ``linear_token_stats`` (API.md 11) against the float64
reference of stats_reference.py, on one backend and device.

Expected use, once the package has the API (these functions cannot run before it does):

    from .adapters import ADAPTERS
    from .stats_checks import run_stats
    results += run_stats(ADAPTERS[backend], device)          # every stats and fused-layer case

or one case at a time, ``check_stats(adapter, case, device)`` for a case from
``stats_cases.expand_stats()`` (``check_stats`` sends a fused-layer case to
``check_linear_stats``).  The records have the format of checks.py ``record`` and the metric of
checks.py ``metric``; the check names are:

* "stats": every output asked for and "counted" in one record.  Float outputs ("log_prob",
  "entropy", "lse", "ids_log_prob") within the case's dtype tolerance (cases.TOLERANCE, on
  |x - ref| / (1 + |ref|), NaN against NaN counting as equal), and float32 for 16-bit and float32
  inputs, float64 for float64; "argmax" (int64; int32 on JAX without x64), "correct" and
  "counted" (bool) exactly; the fields not asked for must be None.
* "stats_vjp": d sum_k sum(cotangent_k * output_k) under the case's random cotangents for every
  differentiable output at once, with respect to the logits (or hidden, weight and bias), in the
  input's dtype.  Through the framework's autodiff (torch autograd, ``jax.vjp``,
  ``tf.GradientTape``); NumPy through ``xsl.token_stats_vjp`` / ``xsl.linear_token_stats_vjp``.
* "stats_errors": a case with a value problem (``bad``) must raise ``XSeqLossError`` eagerly;
  with ``validate=False`` its "stats" and "stats_vjp" records compare with the reference's
  ``nan_marks=True`` result (NaN at exactly the bad tokens, gradient rows NaN there).
* "stats_compiled": for ``jit`` cases on a backend with a compiler (jax.jit,
  tf.function(jit_compile=True), torch.compile(fullgraph=True) for float32): the compiled outputs
  and VJP against the reference (a bad case: the NaN marks, since tracing never raises).

adapters.py's ``Adapter.run`` takes the gradient of one array-valued function of the logits and
needs targets; a token_stats call returns a named tuple, may have no targets, and the fused layer
has three differentiable inputs, so the VJP is taken by the small self-contained ``_vjp`` below
(adapters.py is used for putting arrays on devices, bringing them back, and its context).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .adapters import ADAPTERS, Adapter
from .checks import _short, expected_dtype, metric, record
from .stats_cases import StatsCase, expand_linear_stats, expand_stats
from .stats_reference import (FLOAT_OUTPUTS, OUTPUTS, linear_stats_reference,
                              linear_stats_vjp_reference, stats_reference, stats_vjp_reference)

FIELDS = OUTPUTS + ("counted",)


# --------------------------------------------------------------------------- the reference

def stats_reference_of(case: StatsCase, nan_marks: bool = False) -> tuple[dict, list | None]:
    """(outputs, gradients) of the float64 reference: gradients is [d logits] or [d hidden, d weight,
    d bias or None] under the case's cotangents (None when the case has none)."""
    kw = case.kwargs()
    a = case.arrays
    if case.linear:
        out = linear_stats_reference(a["hidden"], a["weight"], case.targets, **case.linear_kwargs(), **kw,
                                     nan_marks=nan_marks)
        grads = None
        if case.cotangents:
            grads = list(linear_stats_vjp_reference(a["hidden"], a["weight"], case.targets, case.cotangents,
                                                    **case.linear_kwargs(), **kw, nan_marks=nan_marks))
        return out, grads
    out = stats_reference(a["logits"], case.targets, layout=case.layout, **kw, nan_marks=nan_marks)
    grads = None
    if case.cotangents:
        grads = [stats_vjp_reference(a["logits"], case.targets, case.cotangents, layout=case.layout, **kw,
                                     nan_marks=nan_marks)]
    return out, grads


# --------------------------------------------------------------------------- calling the package

def _inputs(adapter: Adapter, case: StatsCase, device: str) -> tuple[list, Any, dict]:
    """(differentiable inputs, targets or None, side arrays) on ``device``: floats in the case's
    dtype (bias None stays None), a temperature array in float32 (float64 for float64 cases),
    integer and bool arrays as they are."""
    dt = case.dtype
    a = case.arrays
    if case.linear:
        params = [adapter.put(a["hidden"], dt, device), adapter.put(a["weight"], dt, device),
                  adapter.put(a["bias"], dt, device) if "bias" in a else None]
    else:
        params = [adapter.put(a["logits"], dt, device)]
    t = None if case.targets is None else adapter.put(case.targets, None, device)
    side = {}
    for k in ("mask", "lengths", "segment_ids", "ids", "temperature"):
        if k in a:
            side[k] = adapter.put(a[k], expected_dtype(dt) if k == "temperature" else None, device)
    return params, t, side


def _options(case: StatsCase, validate: bool) -> dict:
    opts = {k: v for k, v in case.options.items() if k != "layout"}
    opts["layout"] = case.layout
    if case.linear:
        opts["weight_layout"] = case.weight_layout
        if case.chunk_size is not None:
            opts["chunk_size"] = case.chunk_size
    if not validate:
        opts["validate"] = False
    return opts


def _stats_fn(case: StatsCase, validate: bool) -> Callable:
    """fn(params, targets, side) -> xsl.TokenStats, params = [logits] or [hidden, weight, bias or None].
    Targets and side arrays are arguments (under jax.jit / tf.function they are traced like the
    logits, never constants the package could read), but they are not differentiated."""
    import xseqloss as xsl
    opts = _options(case, validate)
    if case.linear:
        def fn(params, t, side):
            h, w, b = params
            return xsl.linear_token_stats(h, w, t, bias=b, **side, **opts)
        return fn

    def fn(params, t, side):
        return xsl.token_stats(params[0], t, **side, **opts)
    return fn


def _vjp(adapter: Adapter, case: StatsCase, fn: Callable, params: list, t: Any, side: dict, *,
         compiled: bool, validate: bool) -> tuple[Any, list | None]:
    """(TokenStats, [gradient per element of ``params``, None for an absent bias] or None): the
    outputs and d sum_k sum(ct_k * output_k) by the framework's own autodiff (NumPy: the package's
    *_vjp functions).  ``compiled``: the whole thing under the backend's compiler."""
    cts = case.cotangents
    live = [p for p in params if p is not None]
    keys = list(cts)
    be = adapter.name

    def fill(grads):  # back to one entry per element of ``params``
        it = iter(grads)
        return [None if p is None else next(it) for p in params]

    if be == "numpy":
        import xseqloss as xsl
        stats = fn(params, t, side)
        if not keys:
            return stats, None
        opts = {k: v for k, v in _options(case, validate).items() if k != "outputs"}
        if case.linear:
            g = xsl.linear_token_stats_vjp(params[0], params[1], t, cts, bias=params[2], **side, **opts)
            return stats, list(g)
        return stats, [xsl.token_stats_vjp(params[0], t, cts, **side, **opts)]

    if be == "torch":
        import torch
        if compiled:
            torch._dynamo.reset()
        f = torch.compile(fn, fullgraph=True, dynamic=False) if compiled else fn
        for p in live:
            p.requires_grad_(bool(keys))
        stats = f(params, t, side)
        if not keys:
            return stats, None
        total = sum((getattr(stats, k) * torch.as_tensor(np.asarray(cts[k]), device=getattr(stats, k).device)
                     .to(getattr(stats, k).dtype)).sum() for k in keys)
        return stats, fill(torch.autograd.grad(total, live))

    if be == "jax":
        import jax
        import jax.numpy as jnp
        if not keys:
            f = jax.jit(fn) if compiled else fn
            return f(params, t, side), None

        def g(live_ps, t, side):
            s = fn(fill(live_ps), t, side)
            return tuple(getattr(s, k) for k in keys), s
        f = jax.jit(g) if compiled else g
        outs, pullback, stats = jax.vjp(lambda *ps: f(list(ps), t, side), *live, has_aux=True)
        grads = pullback(tuple(jnp.asarray(np.asarray(cts[k]), dtype=o.dtype) for k, o in zip(keys, outs)))
        return stats, fill(grads)

    if be == "tensorflow":
        import tensorflow as tf

        def both(live_ps, t, side):
            with tf.GradientTape() as tape:
                for p in live_ps:
                    tape.watch(p)
                s = fn(fill(live_ps), t, side)
                total = tf.constant(0.0, dtype=tf.float64 if case.dtype == "float64" else tf.float32)
                for k in keys:
                    o = getattr(s, k)
                    total += tf.reduce_sum(o * tf.constant(np.asarray(cts[k]), dtype=o.dtype))
            return s, (tape.gradient(total, list(live_ps)) if keys else None)
        if compiled:
            tf.get_logger().setLevel("ERROR")
        f = tf.function(both, jit_compile=True) if compiled else both
        stats, grads = f(live, t, side)  # on the device of the caller's adapter.context
        return stats, None if grads is None else fill(grads)
    raise ValueError(f"unknown backend {be!r}")


def _host_dtype(adapter: Adapter, x: Any) -> str:
    """The dtype's name as the suite writes it ("float32", "bfloat16", "int64", "bool")."""
    if adapter.name == "tensorflow":
        return x.dtype.name
    return str(x.dtype).replace("torch.", "")


def _call(adapter: Adapter, case: StatsCase, device: str, *, compiled: bool = False, validate: bool = True):
    """(outputs as host NumPy (float64 for floats) or None per field, dtype names, gradients as host
    float64 or None, gradient dtype names)."""
    with adapter.context(case.dtype, device):
        params, t, side = _inputs(adapter, case, device)
        fn = _stats_fn(case, validate)
        stats, grads = _vjp(adapter, case, fn, params, t, side, compiled=compiled, validate=validate)
        out, dtypes = {}, {}
        for k in FIELDS:
            v = getattr(stats, k)
            out[k] = None if v is None else adapter.host(v)
            dtypes[k] = None if v is None else _host_dtype(adapter, v)
        g_host = None if grads is None else [None if g is None else adapter.host(g) for g in grads]
        g_dtypes = None if grads is None else [None if g is None else _host_dtype(adapter, g) for g in grads]
    return out, dtypes, g_host, g_dtypes


# --------------------------------------------------------------------------- comparing

def _argmax_dtypes(adapter: Adapter, dtype: str) -> tuple:
    if adapter.name == "jax" and dtype != "float64":  # JAX without x64 (API.md 11.1)
        return ("int32",)
    return ("int64",)


def compare_outputs(adapter: Adapter, case: StatsCase, got: dict, dtypes: dict, want: dict) -> tuple[float, str]:
    """(error, detail) of one "stats" record: the max metric of the float outputs; inf when anything
    that must hold exactly does not (a shape, a dtype, argmax, correct, counted, a field that should
    be None or should not)."""
    asked = set(case.options["outputs"]) | {"counted"}
    errs, problems, exact_ok = [], [], True
    for k in FIELDS:
        if k not in asked:
            if got[k] is not None:
                problems.append(f"{k} was not asked for but is not None")
                exact_ok = False
            continue
        if got[k] is None or got[k].shape != want[k].shape:
            problems.append(f"{k} is None" if got[k] is None else f"{k} shape {got[k].shape} != {want[k].shape}")
            exact_ok = False
            continue
        g, w = got[k], want[k]
        if k in FLOAT_OUTPUTS:
            want_dtypes = (expected_dtype(case.dtype),)
            e = metric(g, w)
            errs.append(e)
            if e > case.tolerance:
                problems.append(f"{k} error {e:.3g}")
        else:
            want_dtypes = _argmax_dtypes(adapter, case.dtype) if k == "argmax" else ("bool",)
            same = np.asarray(g).astype(w.dtype) == w
            if not np.all(same):
                problems.append(f"{k} differs at {np.argwhere(~same)[:5].tolist()}")
                exact_ok = False
        if dtypes[k] not in want_dtypes:
            problems.append(f"{k} dtype {dtypes[k]}, expected {' or '.join(want_dtypes)}")
            exact_ok = False
    err = max(errs, default=0.0)
    return (err if exact_ok else math.inf), "; ".join(problems)


def compare_grads(case: StatsCase, got: list | None, dtypes: list | None, want: list | None) -> tuple[float, str]:
    """(error, detail) of one "stats_vjp" record: every differentiable input's gradient."""
    if want is None:
        return 0.0, "no cotangents"
    if got is None:
        return math.inf, "no gradient"
    errs, problems = [], []
    names = ("hidden", "weight", "bias") if case.linear else ("logits",)
    for name, g, dt, w in zip(names, got, dtypes, want):
        if w is None and g is None:
            continue
        if (w is None) != (g is None):
            problems.append(f"d {name}: {'missing' if g is None else 'unexpected'}")
            continue
        if dt != case.dtype:
            problems.append(f"d {name} dtype {dt}, expected {case.dtype}")
        errs.append(metric(g, w))
    err = max(errs, default=0.0)
    return (math.inf if problems else err), "; ".join(problems) or \
        ", ".join(f"d {n} {e:.2g}" for n, e in zip(names, errs))


# --------------------------------------------------------------------------- the checks

def _raises_eagerly(adapter: Adapter, case: StatsCase, device: str) -> tuple[float, str]:
    import xseqloss as xsl
    try:
        _call(adapter, case, device)
    except xsl.XSeqLossError:
        return 0.0, ""
    except Exception as exc:
        return 1.0, f"expected XSeqLossError, got {_short(exc)}"
    return 1.0, "expected XSeqLossError, nothing was raised"


def check_stats(adapter: Adapter, case: StatsCase, device: str, *, compiled: bool | None = None,
                engine: str = "auto") -> list[dict]:
    """"stats" and "stats_vjp" records for one case (plus "stats_errors" for a case with a value
    problem, "stats_compiled" where it applies); a fused-layer case goes to check_linear_stats."""
    if case.linear:
        return check_linear_stats(adapter, case, device, compiled=compiled, engine=engine)
    return _check(adapter, case, device, compiled=compiled, engine=engine)


def check_linear_stats(adapter: Adapter, case: StatsCase, device: str, *, compiled: bool | None = None,
                       engine: str = "auto") -> list[dict]:
    """The same records for a ``linear_token_stats`` case: outputs, and d hidden, d weight, d bias."""
    return _check(adapter, case, device, compiled=compiled, engine=engine)


def _check(adapter: Adapter, case: StatsCase, device: str, *, compiled: bool | None, engine: str) -> list[dict]:
    be, tol, dt = adapter.name, case.tolerance, case.dtype
    out: list[dict] = []

    def rec(check, err, detail="", tol=tol):
        out.append(record(be, device, dt, f"stats:{case.name}", check, err, tol, detail, engine))

    validate = True
    if case.bad:
        err, why = _raises_eagerly(adapter, case, device)
        rec("stats_errors", err, why, tol=0.0)
        validate = False  # the values: NaN exactly at the bad tokens
    try:
        want, want_g = stats_reference_of(case, nan_marks=bool(case.bad))
    except Exception as exc:  # a case the reference cannot run is a bug of the suite: say so
        rec("stats", math.inf, "reference: " + _short(exc))
        return out
    try:
        got, dtypes, g, gdt = _call(adapter, case, device, validate=validate)
    except Exception as exc:
        rec("stats", math.inf, _short(exc))
        if case.cotangents:
            rec("stats_vjp", math.inf, _short(exc))
        return out
    rec("stats", *compare_outputs(adapter, case, got, dtypes, want))
    if case.cotangents:
        rec("stats_vjp", *compare_grads(case, g, gdt, want_g))

    if compiled is None:
        compiled = bool(case.jit and adapter.compiler and be != "numpy"
                        and (be != "torch" or dt == "float32"))
    if compiled:
        try:  # tracing never raises a value problem: a bad case gives its NaN marks (validate on)
            cg, cdt, cgr, cgdt = _call(adapter, case, device, compiled=True)
            e1, d1 = compare_outputs(adapter, case, cg, cdt, want)
            e2, d2 = compare_grads(case, cgr, cgdt, want_g) if case.cotangents else (0.0, "")
            rec("stats_compiled", max(e1, e2), f"{adapter.compiler}: " + "; ".join(d for d in (d1, d2) if d))
        except Exception as exc:
            rec("stats_compiled", math.inf, f"{adapter.compiler}: " + _short(exc))
    return out


def run_stats(adapter: Adapter | str, device: str = "cpu", cases: list[StatsCase] | None = None,
              compiled: bool = True, engine: str = "auto") -> list[dict]:
    """Every stats case (``expand_stats()`` and ``expand_linear_stats()`` by default) on one backend
    and device.  ``compiled=False`` skips the compiled comparisons; ``engine``: the kernel the
    backend was forced to (recorded; the caller forces it)."""
    if isinstance(adapter, str):
        adapter = ADAPTERS[adapter]
    todo = cases if cases is not None else expand_stats() + expand_linear_stats()
    if adapter.name == "numpy":
        from .runner import numpy_accepts_bfloat16
        if not numpy_accepts_bfloat16()[0]:  # as the loss cases: not applicable there
            todo = [c for c in todo if c.dtype != "bfloat16"]
    results = []
    for case in todo:
        results += check_stats(adapter, case, device, compiled=None if compiled else False, engine=engine)
    return results
