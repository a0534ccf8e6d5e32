"""The checks: each compares one thing and returns result records.

A record is ``{"backend", "device", "dtype", "case", "check", "error",
"tolerance", "passed", "detail"}``.  ``error`` is the metric
max |x - ref| / (1 + |ref|) over all elements (value and gradient together
where both are compared); NaN against NaN and equal infinities count as 0, a
NaN or infinity against anything else as inf.  ``passed`` is
``error <= tolerance``; checks that must hold exactly (raising the right
error, bitwise determinism) use error 0 or 1 and tolerance 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import errors as catalogue
from .adapters import Adapter, _loss_fn, call
from .cases import TOLERANCE, Case
from .natives import native
from .reference import reference

CHECKS = ("value", "grad", "upstream", "held", "native", "compiled", "deterministic", "errors", "pool", "linear",
          "stats", "stats_vjp", "stats_errors", "stats_compiled")


def metric(got: Any, ref: Any) -> float:
    """max |got - ref| / (1 + |ref|), NaN-aware; inf when the shapes differ."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return math.inf
    if got.size == 0:
        return 0.0
    both_nan = np.isnan(got) & np.isnan(ref)
    same_inf = np.isinf(got) & np.isinf(ref) & (got == ref)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got - ref) / (1.0 + np.abs(ref))
    err = np.where(both_nan | same_inf, 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max())


def record(backend: str, device: str, dtype: str, case: str, check: str, error: float, tolerance: float,
           detail: str = "", engine: str = "auto") -> dict:
    error = float(error)
    return {"backend": backend, "device": device, "engine": engine, "dtype": dtype, "case": case,
            "check": check, "error": error, "tolerance": float(tolerance), "passed": bool(error <= tolerance),
            "detail": detail}


def _short(exc: BaseException) -> str:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
    return msg if len(msg) < 300 else msg[:120] + " ... " + msg[-170:]  # the cause is often at the end


def expected_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


# --------------------------------------------------------------------------- valid cases

def reference_of(case: Case) -> tuple[np.ndarray, np.ndarray]:
    return reference(case.arrays["logits"], case.arrays["targets"], layout=case.layout, **case.kwargs())


# Upstream gradients other than 1 (issue 11): a tiny relative scaling (a backward that compares the
# upstream gradient with the one it expected only approximately keeps the unscaled gradient), a
# loss scale that divides folded zeros (rows whose expected upstream was 0), and for non-scalar
# results a random cotangent with zeros and negatives.
UPSTREAM_SCALES = (1.0 + 1e-4, 0.5)


def cotangents(case: Case, shape: tuple) -> list:
    if shape == ():
        return list(UPSTREAM_SCALES)
    rng = np.random.default_rng(len(case.name) * 7919 + len(shape))
    ct = rng.integers(-4, 5, size=shape) / 4.0
    return [ct]


def check_case(adapter: Adapter, case: Case, device: str, ref: tuple, *, compiled: bool = False,
               deterministic: bool = True, natives: bool = True, engine: str = "auto",
               held: bool = False, upstream: bool = True) -> list[dict]:
    """value, grad, upstream, and where they apply held, native, compiled and deterministic, for
    one case. ``engine``: the kernel the backend was forced to (recorded; the caller forces it)."""
    be, tol, dt, name = adapter.name, case.tolerance, case.dtype, case.name
    out: list[dict] = []
    rec = lambda check, err, detail="", tol=tol: out.append(record(be, device, dt, name, check, err, tol, detail,
                                                                   engine))
    ref_value, ref_grad = ref
    try:
        with adapter.context(dt, device):
            eager = call(adapter, case.arrays, case.options, dt, device, ragged=case.ragged)
    except Exception as exc:  # a crash fails both checks, with the reason
        rec("value", math.inf, _short(exc))
        rec("grad", math.inf, _short(exc))
        return out

    # value: the numbers, and the contract around them (shape, dtype, device, array type)
    problems = []
    if eager.value.shape != ref_value.shape:
        problems.append(f"shape {eager.value.shape} != {ref_value.shape}")
    if eager.value_dtype != expected_dtype(dt):
        problems.append(f"result dtype {eager.value_dtype}, expected {expected_dtype(dt)}")
    if eager.device != device:
        problems.append(f"result on {eager.device}, expected {device}")
    if not eager.type_ok:
        problems.append("result is not the framework's own array type")
    err = metric(eager.value, ref_value)
    rec("value", math.inf if problems else err, "; ".join(problems) + (f" (error {err:.3g})" if problems else ""))

    gproblems = [eager.grad_error] if eager.grad_error else []
    if eager.grad is not None and eager.grad_dtype != dt:
        gproblems.append(f"gradient dtype {eager.grad_dtype}, expected {dt}")
    gerr = math.inf if eager.grad is None else metric(eager.grad, ref_grad)
    rec("grad", math.inf if gproblems else gerr, "; ".join(gproblems))

    if upstream and adapter.upstream and eager.grad is not None:
        worst, why = 0.0, ""
        try:
            for ct in cotangents(case, ref_value.shape):
                _, want = reference(case.arrays["logits"], case.arrays["targets"], layout=case.layout,
                                    cotangent=ct, **case.kwargs())
                with adapter.context(dt, device):
                    got = call(adapter, case.arrays, case.options, dt, device, cotangent=ct, ragged=case.ragged)
                err = metric(got.grad, want) if got.grad is not None else math.inf
                if err > worst:
                    worst, why = err, f"upstream {ct if np.ndim(ct) == 0 else 'cotangent'}"
        except Exception as exc:
            worst, why = math.inf, _short(exc)
        rec("upstream", worst, why)

    if held:
        # a gradient the caller still holds is never overwritten by the next call (the torch
        # backend's reusable buffer must not hand it out again)
        try:
            keep: list = []
            with adapter.context(dt, device):
                first = call(adapter, case.arrays, case.options, dt, device, held=keep, ragged=case.ragged)
                if case.options.get("inputs", "logits") == "logits":  # another gradient
                    other = dict(case.arrays, logits=case.arrays["logits"] * 0.5)
                else:  # probabilities must stay probabilities: other targets instead
                    other = dict(case.arrays, targets=np.flip(case.arrays["targets"], 0).copy())
                call(adapter, other, case.options, dt, device, ragged=case.ragged)
                now = adapter.host(keep[0])
            same = first.grad is not None and np.array_equal(now, first.grad, equal_nan=True)
            rec("held", 0.0 if same else 1.0, "" if same else "a later call overwrote a held gradient", tol=0.0)
        except Exception as exc:
            rec("held", 1.0, _short(exc), tol=0.0)

    if deterministic:
        try:
            with adapter.context(dt, device):
                again = call(adapter, case.arrays, case.options, dt, device, ragged=case.ragged)
            same = (np.array_equal(eager.value, again.value, equal_nan=True)
                    and np.array_equal(np.signbit(eager.value), np.signbit(again.value))
                    and (eager.grad is None or np.array_equal(eager.grad, again.grad, equal_nan=True)))
            rec("deterministic", 0.0 if same else 1.0, "" if same else "two calls differ", tol=0.0)
        except Exception as exc:
            rec("deterministic", 1.0, _short(exc), tol=0.0)

    if natives:
        try:
            got = native(be, case, device)
        except Exception as exc:
            got = None
            rec("native", math.inf, "the native loss failed: " + _short(exc))
        if got is not None and eager.grad is not None:
            label, nv, ng = got
            err = max(metric(eager.value, nv), metric(eager.grad, ng))
            rec("native", err, label)

    if compiled and adapter.compiler:
        try:
            with adapter.context(dt, device):
                comp = call(adapter, case.arrays, case.options, dt, device, compiled=True, ragged=case.ragged)
            err = max(metric(comp.value, eager.value),
                      metric(comp.grad, eager.grad) if eager.grad is not None else 0.0)
            rec("compiled", err, f"{adapter.compiler} vs eager")
        except Exception as exc:
            rec("compiled", math.inf, f"{adapter.compiler}: " + _short(exc))
    return out


# --------------------------------------------------------------------------- bad inputs

def _exception_classes():
    import xseqloss as xsl
    return {"XSeqLossError": xsl.XSeqLossError, "XSeqLossTypeError": xsl.XSeqLossTypeError}


def _other_framework_array(adapter: Adapter, a: np.ndarray) -> Any:
    """``a`` as an array of a framework other than the adapter's (None if none is installed)."""
    from .adapters import ADAPTERS
    for name in ("torch", "jax", "tensorflow"):
        other = ADAPTERS[name]
        if name != adapter.name and other.available():
            return other.put(a, None, "cpu")
    return None


def _raises(adapter: Adapter, entry: dict, arrays: dict, options: dict, device: str,
            compiled: bool = False) -> tuple[float, str]:
    """(0, "") when the call raises the expected class with every expected string; else (1, why)."""
    classes = _exception_classes()
    want = classes[entry["expect"]]
    dt = "float32"
    try:
        with adapter.context(dt, device):
            x = adapter.put(arrays["logits"], None, device)
            t = arrays["targets"] if entry.get("numpy_side") else adapter.put(arrays["targets"], None, device)
            side = {k: adapter.put(v, None, device) for k, v in arrays.items() if k not in ("logits", "targets")}
            if entry.get("other_framework"):
                side[entry["other_framework"]] = _other_framework_array(
                    adapter, np.ones(arrays["targets"].shape, bool))
            fn = _loss_fn(options)
            if compiled:
                adapter.run(fn, arrays, dt, device, compiled=True, grad=False, options=options)
            else:
                fn(x, t, side)
    except want as exc:
        msg = str(exc)
        # quotes are cosmetic: layout='NCT' and layout="NCT" both name the layout
        missing = [m for m in entry["match"] if m.replace('"', "'") not in msg.replace('"', "'")]
        if missing:
            return 1.0, f"{type(exc).__name__} raised but its message lacks {missing}: {msg!r}"
        return 0.0, ""
    except Exception as exc:
        return 1.0, f"expected {entry['expect']}, got {_short(exc)}"
    return 1.0, f"expected {entry['expect']}, nothing was raised"


def _nan_contract(adapter: Adapter, entry: dict, arrays: dict, options: dict, device: str,
                  compiled: bool) -> tuple[float, str]:
    """Loss NaN at exactly the bad tokens, NaN gradient rows there, the rest equal to the reference."""
    dt = "float32"
    bad = catalogue.nan_tokens(entry, arrays, options)
    ref_in = catalogue.reference_inputs(entry, arrays, bad, options.get("shift", 0))
    ref_opts = {k: v for k, v in options.items() if k not in ("layout", "_loss")}
    ref_opts["reduction"] = "none"
    ref_value, ref_grad = reference(ref_in["logits"], ref_in["targets"], layout=options["layout"],
                                    **{k: v for k, v in ref_in.items() if k not in ("logits", "targets")},
                                    **ref_opts)
    opts = dict(options, reduction="none")
    if not compiled:
        opts["validate"] = False
    with adapter.context(dt, device):
        got = call(adapter, arrays, opts, dt, device, compiled=compiled)
        mean = call(adapter, arrays, dict(opts, reduction="mean"), dt, device, compiled=compiled, grad=False)
    why = []
    v, g = got.value, got.grad
    if v.shape != bad.shape:
        return math.inf, f"reduction='none' gave shape {v.shape}, expected {bad.shape}"
    if not np.array_equal(np.isnan(v), bad):
        why.append(f"NaN loss at {np.argwhere(np.isnan(v)).tolist()}, expected at {np.argwhere(bad).tolist()}")
    g_rows_nan = np.isnan(g).all(axis=-1)
    g_rows_any = np.isnan(g).any(axis=-1)
    if not np.array_equal(g_rows_nan, bad) or not np.array_equal(g_rows_any, bad):
        why.append(f"NaN gradient rows at {np.argwhere(g_rows_any).tolist()} (all-NaN at "
                   f"{np.argwhere(g_rows_nan).tolist()}), expected at {np.argwhere(bad).tolist()}")
    if not np.isnan(mean.value).all():
        why.append(f"reduction='mean' gave {float(mean.value)}, expected NaN")
    err = max(metric(np.where(bad, 0.0, v), np.where(bad, 0.0, ref_value)),
              metric(np.where(bad[..., None], 0.0, g), np.where(bad[..., None], 0.0, ref_grad)))
    if why:
        return math.inf, "; ".join(why)
    return err, ""


def check_errors(adapter: Adapter, device: str, *, compiled: bool = True, torch_compile: bool = True,
                 names: list[str] | None = None, linear: bool = False) -> list[dict]:
    """The error catalogue on one backend and device: eager raise, validate=False and traced NaNs.
    ``linear``: through linear_cross_entropy (hidden states = the logits, an identity weight), the
    entries that are not about the logits themselves (catalogue.LINEAR)."""
    out = []
    be = adapter.name
    for entry in catalogue.CATALOGUE:
        if names is not None and entry["name"] not in names:
            continue
        if linear:
            if entry["name"] not in catalogue.LINEAR:
                continue
            entry = dict(entry, name="linear:" + entry["name"], options={**entry.get("options", {}), "_loss": "linear"},
                         torch_compile=False)
        if be in entry.get("skip", ()):
            continue
        if entry.get("other_framework") and _other_framework_array(adapter, np.ones(1, bool)) is None:
            continue  # only one framework installed: nothing to mix (not recorded, not counted as passing)
        arrays, options = catalogue.make(dict(entry, name=entry["name"].replace("linear:", "")))

        def rec(mode, err, detail, tol=0.0):
            case = f"errors:{entry['name']}[{mode}]"
            out.append(record(be, device, "float32", case, "errors", err, tol, detail))

        try:
            err, why = _raises(adapter, entry, arrays, options, device)
        except Exception as exc:
            err, why = 1.0, _short(exc)
        rec("eager", err, why)
        jit_here = compiled and adapter.compiler and (be != "torch" or torch_compile)
        if entry.get("jit") and jit_here and be != "torch":
            err, why = _raises(adapter, entry, arrays, options, device, compiled=True)
            rec("traced", err, why)
        if entry.get("nan") is None:
            continue
        modes = ["validate_false"]
        if jit_here and (be != "torch" or entry.get("torch_compile")):
            modes.append("traced")
        for mode in modes:
            try:
                err, why = _nan_contract(adapter, entry, arrays, options, device, compiled=(mode == "traced"))
            except Exception as exc:
                err, why = math.inf, _short(exc)
            rec(mode, err, why, tol=TOLERANCE["float32"])
    return out
