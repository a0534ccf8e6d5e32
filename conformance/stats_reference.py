"""Independent float64 reference for ``token_stats`` and ``linear_token_stats`` (API.md 11).

This module never imports xseqloss.  It is written from the contract text alone, in the
suite's literal style: plain Python loops over the positions (n, t), one class row at a time,
every sum an explicit ``math.fsum`` of Python floats; NumPy vectors only for the per-row maths
(exp, tanh of one row).

Which positions count: this module calls the suite's own loss reference for it,
``reference.counted_positions`` (API.md 1 and 7: mask nonzero, t + shift < lengths[n], target
not in ignore_index, a target never crossing a document boundary, negative segment ids are
padding, the last ``shift`` steps of a sequence never count).  That function is part of the
conformance suite, not of the package.  Without targets it is called with a dummy target array and
``ignore_index=None``, so that only mask, lengths and segment_ids decide (API.md 11.2).
Everything else (the target-side reads at t + shift, the temperature forms, the value checks,
the outputs and their derivatives) is written out here.

Per counted position, with x the logits row (float64):

* z = cap * tanh(x / cap) with ``logit_softcap`` (else z = x); u = z / T, T the position's
  temperature (a number, the sequence's entry of an (N,) array, or the entry at the *target*
  position t + shift of a token-shaped array);
* m = max u at its lowest index k, S = sum_{c != k} exp(u_c - m), log p_c = (u_c - m) - log1p(S)
  (exact small values where p -> 1), lse = m + log1p(S), p_c = exp(log p_c);
* H = -sum over classes with p_c != 0 of p_c log p_c (0 log 0 = 0: a -inf logit adds exactly 0);
* argmax over z (after the softcap), lowest index on ties; correct = argmax == y.

Positions that do not count: 0 for float outputs, -1 for argmax, False for correct, exactly 0
gradient, whatever their logits (NaN, inf).  A target or id outside [0, C), or a temperature
array entry that is not finite and > 0, at a counted position raises ``ValueError``; with
``nan_marks=True`` (what the package gives with ``validate=False`` or under tracing) every float
output of that token is NaN and its gradient row is NaN, argmax stays the argmax, correct is
False.  Values at positions that do not count are never read (no error).

The VJP (``stats_vjp_reference``) is written out analytically per token, with respect to u:
d log p_y = e_y - p, d lse = p, dH_c = -p_c (log p_c + H) (0 where p_c = 0), d log p_ids_j =
e_ids_j - p; then du/dz = 1/T (the temperature is a constant) and dz/dx = 1 - tanh^2(x / cap).
"""

from __future__ import annotations

import math

import numpy as np

from .reference import counted_positions

OUTPUTS = ("log_prob", "entropy", "lse", "argmax", "correct", "ids_log_prob")
DIFFERENTIABLE = ("log_prob", "entropy", "lse", "ids_log_prob")
FLOAT_OUTPUTS = DIFFERENTIABLE


# --------------------------------------------------------------------------- indexing

def _tok(layout, n, t):
    """Index of position (n, t) in an array with the layout's axes minus C."""
    return tuple(n if a == "N" else t for a in layout if a != "C")


def _row(layout, n, t):
    """Index of the class row of position (n, t) in the logits."""
    return tuple(slice(None) if a == "C" else (n if a == "N" else t) for a in layout)


def _is_ignored(y, ignore_index):
    if ignore_index is None:
        return False
    if isinstance(ignore_index, (int, np.integer)):
        return y == int(ignore_index)
    return any(y == int(v) for v in ignore_index)


# --------------------------------------------------------------------------- temperature

def _temperature_reader(temperature, layout, N, tok_shape):
    """A function (n, s_index) -> the float temperature of a step; a number is checked here."""
    arr = np.asarray(temperature)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"temperature must be a number or a floating array, got {arr.dtype}")
    if arr.ndim == 0:
        value = float(arr)
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"temperature = {value} is out of range: it must be finite and > 0")
        return lambda n, si: value, lambda n, si: "temperature"
    arr = arr.astype(np.float64)
    if arr.shape == tok_shape:  # one per token, at the target position (like mask)
        return lambda n, si: float(arr[si]), lambda n, si: f"temperature{list(si)}"
    if "N" in layout and arr.shape == (N,):  # one per sequence
        return lambda n, si: float(arr[n]), lambda n, si: f"temperature[{n}]"
    raise ValueError(f"temperature has shape {arr.shape}; it must be a number, (N,) = ({N},) or the "
                     f"targets' token shape {tok_shape}")


# --------------------------------------------------------------------------- one row

def _row_stats(x, T, cap):
    """Everything of one class row: z (after the softcap), dz/dx (or None), u, log p, p, lse, H,
    argmax over z.  Plain float64; sums with math.fsum."""
    C = x.shape[0]
    if cap is not None:
        th = np.tanh(x / cap)
        z = cap * th
        dz_dx = 1.0 - th * th
    else:
        z = x.copy()
        dz_dx = None
    best = 0  # argmax over z, lowest index on ties
    for c in range(1, C):
        if z[c] > z[best]:
            best = c
    u = z / T
    k = 0  # the largest u at its lowest index (the same class as ``best``: T > 0)
    for c in range(1, C):
        if u[c] > u[k]:
            k = c
    m = float(u[k])
    rest = math.fsum(math.exp(float(u[c]) - m) for c in range(C) if c != k)
    log_s = math.log1p(rest)
    lse = m + log_s
    logp = np.array([(float(u[c]) - m) - log_s for c in range(C)])  # -inf at a -inf logit
    p = np.array([math.exp(v) for v in logp])                        # exactly 0 there
    H = 0.0 - math.fsum(float(p[c]) * float(logp[c]) for c in range(C) if p[c] != 0.0)  # +0.0 at C = 1
    return dict(z=z, dz_dx=dz_dx, u=u, logp=logp, p=p, lse=lse, H=H, argmax=best)


def _row_grad(r, T, y, ids, ct):
    """d sum_k ct_k * out_k / d x for one counted row: with respect to u, then z, then x."""
    C = r["p"].shape[0]
    p, logp, H = r["p"], r["logp"], r["H"]
    g = np.zeros(C)
    c_lp = ct.get("log_prob", 0.0)
    if c_lp:
        g = g - c_lp * p
        g[y] += c_lp
    c_lse = ct.get("lse", 0.0)
    if c_lse:
        g = g + c_lse * p
    c_h = ct.get("entropy", 0.0)
    if c_h:
        dh = np.zeros(C)
        for c in range(C):
            if p[c] != 0.0:  # 0 log 0 = 0: a class with p = 0 (a -inf logit) has derivative 0
                dh[c] = -float(p[c]) * (float(logp[c]) + H)
        g = g + c_h * dh
    c_ids = ct.get("ids_log_prob")
    if c_ids is not None:
        for j, i in enumerate(ids):
            cj = float(c_ids[j])
            if cj:
                g = g - cj * p
                g[i] += cj
    g = g / T
    if r["dz_dx"] is not None:
        g = g * r["dz_dx"]
    return g


# --------------------------------------------------------------------------- the walk

def _walk(logits, targets, *, temperature, ids, layout, mask, lengths, ignore_index, shift,
          segment_ids, logit_softcap, nan_marks):
    """One pass over the positions.  Returns (info, rows) where info has the shapes and the counted
    array, and rows maps each counted (n, t) to dict(r=row stats, y, ids, T, bad)."""
    x = np.asarray(logits, dtype=np.float64)
    if not isinstance(layout, str) or "C" not in layout or len(set(layout)) != len(layout) \
            or set(layout) - set("NTC"):
        raise ValueError(f"bad layout {layout!r}")
    if x.ndim != len(layout):
        raise ValueError(f"logits have {x.ndim} axes but layout {layout!r} names {len(layout)}")
    C = x.shape[layout.index("C")]
    if C == 0:
        raise ValueError("logits have C = 0 classes")
    tok_shape = tuple(s for a, s in zip(layout, x.shape) if a != "C")
    N = x.shape[layout.index("N")] if "N" in layout else 1
    T = x.shape[layout.index("T")] if "T" in layout else 1
    shift = int(shift)
    if shift < 0:
        raise ValueError(f"shift = {shift} must be >= 0")
    if shift and "T" not in layout:
        raise ValueError("shift needs a time axis (T) in the layout")
    if logit_softcap is not None and not (math.isfinite(float(logit_softcap)) and float(logit_softcap) > 0):
        raise ValueError(f"logit_softcap = {logit_softcap} must be finite and > 0")
    cap = None if logit_softcap is None else float(logit_softcap)

    tg = None
    if targets is not None:
        tg = np.asarray(targets)
        if tg.dtype.kind not in "iu":
            raise TypeError(f"targets must be integer class ids, got {tg.dtype}")
        if tg.shape != tok_shape:
            raise ValueError(f"targets have shape {tg.shape}, expected {tok_shape}")
    id_arr = None
    if ids is not None:
        id_arr = np.asarray(ids)
        if id_arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integer class ids, got {id_arr.dtype}")
        if id_arr.ndim != len(tok_shape) + 1 or id_arr.shape[:-1] != tok_shape:
            raise ValueError(f"ids have shape {id_arr.shape}, expected {tok_shape} + (k,)")
    for name, arr in (("mask", mask), ("segment_ids", segment_ids)):
        if arr is not None and np.shape(arr) != tok_shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, expected {tok_shape}")
    if lengths is not None:
        if "N" not in layout or "T" not in layout:
            raise ValueError("lengths needs N and T in the layout")
        if np.shape(lengths) != (N,):
            raise ValueError(f"lengths has shape {np.shape(lengths)}, expected ({N},)")
    temp_of, temp_name = _temperature_reader(temperature, layout, N, tok_shape)

    if tg is not None:
        counted = counted_positions(tg, layout=layout, mask=mask, lengths=lengths, ignore_index=ignore_index,
                                    shift=shift, segment_ids=segment_ids)
    else:  # only mask, lengths and segment_ids decide (API.md 11.2)
        counted = counted_positions(np.zeros(tok_shape, np.int64), layout=layout, mask=mask, lengths=lengths,
                                    ignore_index=None, shift=shift, segment_ids=segment_ids)

    rows = {}
    for n in range(N):
        for t in range(T):
            if not counted[_tok(layout, n, t)]:
                continue
            si = _tok(layout, n, t + shift)  # the target position: targets, ids, temperature
            problems = []
            y = None
            if tg is not None:
                y = int(tg[si])
                assert not _is_ignored(y, ignore_index)  # counted
                if not 0 <= y < C:
                    problems.append(f"targets{list(si)} = {y} is out of range: valid class ids are [0, {C})")
            row_ids = None
            if id_arr is not None:
                row_ids = [int(v) for v in id_arr[si]]
                for j, v in enumerate(row_ids):
                    if not 0 <= v < C:
                        problems.append(f"ids{list(si) + [j]} = {v} is out of range: valid class ids are [0, {C})")
            Tv = temp_of(n, si)
            if not (math.isfinite(Tv) and Tv > 0.0):
                problems.append(f"{temp_name(n, si)} = {Tv} is out of range: it must be finite and > 0")
            if problems and not nan_marks:
                raise ValueError("; ".join(problems))
            bad = bool(problems)
            xr = x[_row(layout, n, t)]
            if bad:  # only the argmax is still defined (over z, which needs no temperature)
                r = _row_stats(xr, 1.0, cap)
            else:
                r = _row_stats(xr, Tv, cap)
            rows[n, t] = dict(r=r, y=y, ids=row_ids, T=Tv, bad=bad)
    info = dict(x=x, C=C, N=N, T=T, tok_shape=tok_shape, counted=counted, layout=layout,
                k=None if id_arr is None else id_arr.shape[-1])
    return info, rows


def _check_outputs(outputs, targets, ids):
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    for o in outputs:
        if o not in OUTPUTS:
            raise ValueError(f"unknown output {o!r}; choose from {OUTPUTS}")
    if targets is None:
        for o in ("log_prob", "correct"):
            if o in outputs:
                raise ValueError(f"output {o!r} needs targets")
    if ("ids_log_prob" in outputs) != (ids is not None):
        raise ValueError("ids: 'ids_log_prob' is in outputs exactly when ids is given")
    return outputs


# --------------------------------------------------------------------------- public

def stats_reference(logits, targets=None, *, outputs=("log_prob", "entropy"), temperature=1.0, ids=None,
                    layout="NTC", mask=None, lengths=None, ignore_index=-100, shift=0, segment_ids=None,
                    logit_softcap=None, nan_marks=False):
    """Float64 outputs of ``token_stats`` (API.md 11.1): a dict with each name of ``outputs`` and
    "counted".  Float outputs are float64 (0 where not counted), "argmax" int64 (-1), "correct" and
    "counted" bool; every output has the targets' token shape, "ids_log_prob" adds the k axis."""
    outputs = _check_outputs(outputs, targets, ids)
    info, rows = _walk(logits, targets, temperature=temperature, ids=ids, layout=layout, mask=mask,
                       lengths=lengths, ignore_index=ignore_index, shift=shift, segment_ids=segment_ids,
                       logit_softcap=logit_softcap, nan_marks=nan_marks)
    shape = info["tok_shape"]
    out = {}
    for o in outputs:
        if o == "argmax":
            out[o] = np.full(shape, -1, dtype=np.int64)
        elif o == "correct":
            out[o] = np.zeros(shape, dtype=bool)
        elif o == "ids_log_prob":
            out[o] = np.zeros(shape + (info["k"],), dtype=np.float64)
        else:
            out[o] = np.zeros(shape, dtype=np.float64)
    for (n, t), row in rows.items():
        ti = _tok(layout, n, t)
        r, y, bad = row["r"], row["y"], row["bad"]
        for o in outputs:
            if o == "argmax":
                out[o][ti] = r["argmax"]
            elif o == "correct":
                out[o][ti] = (not bad) and r["argmax"] == y
            elif bad:  # every float output of a bad token is NaN
                out[o][ti] = math.nan
            elif o == "log_prob":
                out[o][ti] = r["logp"][y]
            elif o == "entropy":
                out[o][ti] = r["H"]
            elif o == "lse":
                out[o][ti] = r["lse"]
            elif o == "ids_log_prob":
                for j, i in enumerate(row["ids"]):
                    out[o][ti + (j,)] = r["logp"][i]
    out["counted"] = np.asarray(info["counted"], dtype=bool).copy()
    return out


def stats_vjp_reference(logits, targets, cotangents, *, temperature=1.0, ids=None, layout="NTC", mask=None,
                        lengths=None, ignore_index=-100, shift=0, segment_ids=None, logit_softcap=None,
                        nan_marks=False, outputs=None):
    """d sum_k sum(cotangents[k] * output_k) / d logits, float64 with logits' shape.

    ``cotangents`` maps differentiable output names ("log_prob", "entropy", "lse", "ids_log_prob")
    to arrays of those outputs' shapes; a missing name counts as zero.  ``outputs`` is accepted and
    ignored (the keys say what is differentiated), so a case's options can be passed unchanged.
    Rows that do not count get exactly 0; with ``nan_marks`` a bad token's row is NaN."""
    grad, _ = _vjp(logits, targets, cotangents, temperature=temperature, ids=ids, layout=layout, mask=mask,
                   lengths=lengths, ignore_index=ignore_index, shift=shift, segment_ids=segment_ids,
                   logit_softcap=logit_softcap, nan_marks=nan_marks)
    return grad


def _vjp(logits, targets, cotangents, *, layout, ids, **walk):
    """(d logits, the counted array): the work of ``stats_vjp_reference``."""
    cts = dict(cotangents or {})
    for name in cts:
        if name not in DIFFERENTIABLE:
            raise ValueError(f"cotangent for {name!r}: only {DIFFERENTIABLE} are differentiable")
    if "log_prob" in cts and targets is None:
        raise ValueError("a 'log_prob' cotangent needs targets")
    if "ids_log_prob" in cts and ids is None:
        raise ValueError("an 'ids_log_prob' cotangent needs ids")
    info, rows = _walk(logits, targets, ids=ids, layout=layout, **walk)
    shape = info["tok_shape"]
    arrs = {}
    for name, v in cts.items():
        v = np.asarray(v, dtype=np.float64)
        want = shape + (info["k"],) if name == "ids_log_prob" else shape
        if v.shape != want:
            raise ValueError(f"cotangent {name!r} has shape {v.shape}, expected {want}")
        arrs[name] = v
    grad = np.zeros(info["x"].shape)
    for (n, t), row in rows.items():
        ti = _tok(layout, n, t)
        ri = _row(layout, n, t)
        if row["bad"]:
            grad[ri] = math.nan
            continue
        ct = {name: float(v[ti]) for name, v in arrs.items() if name != "ids_log_prob"}
        if "ids_log_prob" in arrs:
            ct["ids_log_prob"] = arrs["ids_log_prob"][ti]
        grad[ri] = _row_grad(row["r"], row["T"], row["y"], row["ids"], ct)
    return grad, info["counted"]


# --------------------------------------------------------------------------- the fused layer

def _linear_logits(hidden, weight, bias, layout, weight_layout):
    """(logits in the layout with H -> C, hidden with H last, W as (C, H), the H axis)."""
    h = np.asarray(hidden, dtype=np.float64)
    if "H" not in layout or len(layout) != h.ndim:
        raise ValueError(f"hidden has shape {h.shape}, layout {layout!r}")
    k = layout.index("H")
    w = np.asarray(weight, dtype=np.float64)
    if weight_layout == "CH":
        W = w
    elif weight_layout == "HC":
        W = w.T
    else:
        raise ValueError(f"unknown weight_layout {weight_layout!r}")
    hl = np.moveaxis(h, k, -1)
    if W.ndim != 2 or W.shape[1] != hl.shape[-1]:
        raise ValueError(f"weight has shape {w.shape} ({weight_layout}), hidden has H = {hl.shape[-1]}")
    b = np.zeros(W.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    # one token at a time: z[c] = sum_j h[j] W[c, j] + b[c]
    flat = hl.reshape(-1, hl.shape[-1])
    z = np.zeros((flat.shape[0], W.shape[0]))
    for i in range(flat.shape[0]):
        if np.all(np.isfinite(flat[i])):
            z[i] = W @ flat[i] + b
        else:  # garbage hidden states (padding): the row's logits are garbage too, never read
            z[i] = math.nan
    z = np.moveaxis(z.reshape(*hl.shape[:-1], W.shape[0]), -1, k)
    return z, hl, W, k


def linear_stats_reference(hidden, weight, targets=None, *, bias=None, layout="NTH", weight_layout="CH",
                           **options):
    """``stats_reference`` of logits = hidden @ W^T + b formed here in float64 (W (C, H) for "CH",
    (H, C) for "HC"), with the logits' layout ``layout`` with H -> C."""
    z, _, _, _ = _linear_logits(hidden, weight, bias, layout, weight_layout)
    return stats_reference(z, targets, layout=layout.replace("H", "C"), **options)


def linear_stats_vjp_reference(hidden, weight, targets, cotangents, *, bias=None, layout="NTH",
                               weight_layout="CH", **options):
    """(d hidden, d weight, d bias or None) by the chain rule from the logits' VJP G:
    d hidden = G W, d W = G^T h (transposed for "HC"), d b = sum G over tokens.  The hidden states
    of tokens that do not count are not used (their G rows are 0; garbage there never reaches d W)."""
    z, hl, W, k = _linear_logits(hidden, weight, bias, layout, weight_layout)
    opts = {name: v for name, v in options.items() if name != "outputs"}
    unknown = set(opts) - set(_WALK_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    G, counted = _vjp(z, targets, cotangents, layout=layout.replace("H", "C"),
                      **{name: opts.get(name, default) for name, default in _WALK_DEFAULTS.items()})
    Gl = np.moveaxis(G, k, -1)                  # token axes (in layout order) + C, like hl + H
    d_h = np.moveaxis(Gl @ W, -1, k)
    d_W = np.zeros(W.shape)
    for idx in np.ndindex(counted.shape):       # token by token, counted tokens only
        if counted[idx]:
            d_W += np.outer(Gl[idx], hl[idx])
    if weight_layout == "HC":
        d_W = d_W.T
    d_b = None
    if bias is not None:
        d_b = np.zeros(W.shape[0])
        for idx in np.ndindex(counted.shape):
            if counted[idx]:
                d_b += Gl[idx]
    return d_h, d_W, d_b


_WALK_DEFAULTS = dict(temperature=1.0, ids=None, mask=None, lengths=None, ignore_index=-100, shift=0,
                      segment_ids=None, logit_softcap=None, nan_marks=False)
