"""The comparison of the conformance suite across devices (distributed.py): every worker's loss and
its gradient slice against the float64 reference, in the single-device record format."""

from __future__ import annotations

import math
import os
import pickle
from typing import Any, Iterable

import numpy as np

from .cases import Case
from .checks import expected_dtype, metric, record

# The dtypes of the distributed cases (loss and stats); a case's own dtypes are narrowed to them.
DTYPES = ("float64", "float32")


def select_specs(base: list[dict], names: Iterable[str], extra: list[dict],
                 patterns: Iterable[str] | None = None) -> list[dict]:
    """The cases of ``base`` named by ``names``, then ``extra``, each with its dtypes narrowed to
    DTYPES; ``patterns``: fnmatch patterns or substrings of their names, as ``--cases``."""
    import fnmatch
    by_name = {s["name"]: s for s in base}
    out = []
    for s in [by_name[n] for n in names] + list(extra):
        dts = tuple(d for d in s.get("dtypes", DTYPES) if d in DTYPES)
        out.append(dict(s, dtypes=dts or DTYPES))
    if patterns:
        pats = list(patterns)
        out = [s for s in out if any(fnmatch.fnmatchcase(s["name"], p) or p in s["name"] for p in pats)]
    return out


def _at(a: np.ndarray, index: list[tuple[int, int]]) -> np.ndarray:
    return a[tuple(slice(s, e) for s, e in index)]


def _pieces_error(pieces: list, ref_grad: np.ndarray) -> tuple[float, str]:
    """Worst error over the workers' gradient pieces, each against the reference at its index; inf
    when together they leave part of the gradient out (a worker missing)."""
    worst, who = 0.0, ""
    covered = np.zeros(ref_grad.shape, dtype=bool)
    for p in pieces:
        want = _at(ref_grad, p["index"])
        covered[tuple(slice(s, e) for s, e in p["index"])] = True
        err = metric(p["grad"], want)
        if err > worst or not who:
            worst, who = err, f"{p['worker']}, index {_classes(p['index'], ref_grad.ndim)}"
    if not covered.all():
        return math.inf, f"the workers' gradients cover {covered.mean():.0%} of the gradient"
    return worst, who


def _classes(index: list, ndim: int) -> str:
    return " ".join(f"[{s}, {e})" for s, e in index) if ndim else "[]"


def check_sharded(backend: str, device: str, engine: str, case: Case, ref: tuple, out: dict,
                  workers: int | None = None) -> list[dict]:
    """The rows of one case on one multi-worker engine. ``out`` is what the workers gave:

    ``values``: [(worker, loss)], every worker's copy of the (replicated) loss;
    ``pieces``: [{"worker", "index", "grad"}], each worker's gradient with the index of the
    reference gradient it must equal (its slice of the class axis, as (start, stop) per axis);
    ``upstream``: [(cotangent, pieces)]; ``value_dtype``, ``grad_dtype``, ``type_ok``, and
    ``error`` (the call raised) / ``grad_error`` (the gradient did not come). ``workers``: how
    many copies of the loss there must be (None: any).
    """
    dt, tol, name = case.dtype, case.tolerance, case.name
    rows: list[dict] = []
    rec = (lambda check, err, detail="", t=tol:
           rows.append(record(backend, device, dt, name, check, err, t, detail, engine)))
    ref_value, ref_grad = ref
    if out.get("error") or not out.get("values"):
        why = out.get("error") or "no worker returned a result"
        for check in ("value", "grad"):
            rec(check, math.inf, why)
        return rows

    problems, worst, who = [], 0.0, ""
    if workers is not None and len(out["values"]) != workers:
        problems.append(f"{len(out['values'])} of {workers} workers returned a loss")
    for worker, v in out["values"]:
        v = np.asarray(v)
        if v.shape != ref_value.shape:
            problems.append(f"{worker}: shape {v.shape} != {ref_value.shape}")
        err = metric(v, ref_value)
        if err > worst or not who:
            worst, who = err, worker
    if out.get("value_dtype") != expected_dtype(dt):
        problems.append(f"result dtype {out.get('value_dtype')}, expected {expected_dtype(dt)}")
    if not out.get("type_ok", False):
        problems.append("result is not the framework's own array type")
    if out.get("padding_ok") is False:  # shard_map with a padded vocabulary
        problems.append("a padding column's gradient is not exactly 0")
    rec("value", math.inf if problems else worst,
        "; ".join(problems) + (f" (error {worst:.3g})" if problems else f"worst: {who}"))

    first = np.asarray(out["values"][0][1])
    same = all(np.array_equal(np.asarray(v), first, equal_nan=True)
               and np.array_equal(np.signbit(np.asarray(v)), np.signbit(first)) for _, v in out["values"])
    rec("replicated", 0.0 if same else 1.0,
        f"{len(out['values'])} copies bitwise equal" if same else "the workers' losses differ", t=0.0)

    gproblems = [out["grad_error"]] if out.get("grad_error") else []
    pieces = out.get("pieces") or []
    if pieces and out.get("grad_dtype") != dt:
        gproblems.append(f"gradient dtype {out.get('grad_dtype')}, expected {dt}")
    gerr, gwho = _pieces_error(pieces, ref_grad) if pieces else (math.inf, "no gradient")
    rec("grad", math.inf if gproblems else gerr, "; ".join(gproblems) or f"worst: {gwho}")

    ups = out.get("upstream") or []
    if ups:
        worst, why = 0.0, ""
        for ct, upieces in ups:
            if isinstance(upieces, str):  # the call raised
                worst, why = math.inf, upieces
                break
            _, want = reference(case, ct)
            err, uwho = _pieces_error(upieces, want)
            if err > worst or not why:
                worst, why = err, f"upstream {ct if np.ndim(ct) == 0 else 'cotangent'}; worst: {uwho}"
        rec("upstream", worst, why)
    return rows


def read_outcomes(out: str, engine: str) -> dict:
    """What the workers of one engine wrote, merged per case: {case name: outcome}."""
    found = os.listdir(out) if os.path.isdir(out) else []
    parts = sorted(f for f in found if f.startswith(engine + ".") and f.endswith(".pkl"))
    merged: dict[str, dict] = {}
    for f in parts:
        with open(os.path.join(out, f), "rb") as fh:
            per_case = pickle.load(fh)
        for key, o in per_case.items():
            if key.startswith("stats:"):  # a token_stats case (distributed_stats.py)
                merged[key] = merge_stats(merged.get(key), o)
                continue
            m = merged.setdefault(key, {"values": [], "pieces": [], "upstream": []})
            if o.get("error") and not m.get("error"):
                m["error"] = o["error"]
            for k in ("value_dtype", "grad_dtype", "type_ok", "grad_error"):
                if k in o and (k not in m or (k == "type_ok" and not o[k]) or (k == "grad_error" and o[k])):
                    m[k] = o[k]
            m["values"] += o.get("values", [])
            m["pieces"] += o.get("pieces", [])
            for i, (ct, pcs) in enumerate(o.get("upstream", [])):
                if i == len(m["upstream"]):
                    m["upstream"].append((ct, pcs if isinstance(pcs, str) else list(pcs)))
                elif isinstance(pcs, str) or isinstance(m["upstream"][i][1], str):
                    m["upstream"][i] = (ct, pcs if isinstance(pcs, str) else m["upstream"][i][1])
                else:
                    m["upstream"][i][1].extend(pcs)
    return merged


def merge_stats(m: dict | None, o: dict) -> dict:
    """Two workers' (or files') outcomes of one token_stats case (distributed_stats.py) as one."""
    m = m or {"copies": [], "pieces": []}
    if o.get("error") and not m.get("error"):
        m["error"] = o["error"]
    if "padding_ok" in o:
        m["padding_ok"] = m.get("padding_ok", True) and o["padding_ok"]
    m["copies"] = m["copies"] + list(o.get("copies", []))
    m["pieces"] = m["pieces"] + list(o.get("pieces", []))
    return m


def reference(case: Case, cotangent: Any = None) -> tuple[np.ndarray, np.ndarray]:
    from .reference import reference as ref
    return ref(case.arrays["logits"], case.arrays["targets"], layout=case.layout, cotangent=cotangent,
               **case.kwargs())
