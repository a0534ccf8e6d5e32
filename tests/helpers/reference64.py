"""Independent float64 reference for ``xseqloss.sequence_cross_entropy``.

Written from API.md and docs/decisions.md only, deliberately in the slowest,
most literal style: plain Python loops over tokens, an explicit smoothed target
vector per token, explicit denominators.  It shares no code with the package or
with ``conformance/`` (which has its own reference), so that a misreading of the
contract has to be made twice, independently, to go unnoticed.

Everything here is float64 NumPy.  Low-precision callers round their inputs to
the tested dtype first and pass the rounded values in (the reference is always
computed on the already-rounded inputs).
"""

import math

import numpy as np

PROBS_FLOOR = 1e-7  # Keras' epsilon, API.md "inputs='probs'"


# --------------------------------------------------------------------------
# layout handling
# --------------------------------------------------------------------------

def _canon_perm(layout):
    """Axis permutation that takes an array in `layout` to the present letters
    in N, T, C order."""
    order = [a for a in "NTC" if a in layout]
    return [layout.index(a) for a in order]


def _to_ntc(x, layout):
    """Array with axes `layout` -> (N, T, C) with size-1 axes for the missing
    letters."""
    x = np.asarray(x)
    x = np.transpose(x, _canon_perm(layout))
    present = [a for a in "NTC" if a in layout]
    shape = []
    it = iter(x.shape)
    for a in "NTC":
        shape.append(next(it) if a in present else 1)
    return x.reshape(shape)


def _tok_to_nt(x, layout):
    """Token-shaped array (layout minus C) -> (N, T)."""
    tl = layout.replace("C", "")
    x = np.asarray(x)
    if tl == "":
        return x.reshape(1, 1)
    x = np.transpose(x, [tl.index(a) for a in "NT" if a in tl])
    n = x.shape[0] if "N" in tl else 1
    t = x.shape[-1] if "T" in tl else 1
    return x.reshape(n, t)


def _nt_to_tok(x, layout):
    """(N, T) -> token shape in the order of `layout` minus C."""
    tl = layout.replace("C", "")
    if tl == "":
        return np.asarray(x).reshape(())
    present = [a for a in "NT" if a in tl]
    y = np.asarray(x)
    if "N" not in tl:
        y = y[0]
    elif "T" not in tl:
        y = y[:, 0]
    # y now has axes `present` (N before T); move to the order in tl
    return np.transpose(y, [present.index(a) for a in tl])


# --------------------------------------------------------------------------
# per-token pieces
# --------------------------------------------------------------------------

def _logsumexp(z):
    m = max(z)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(v - m) for v in z))


def _smoothed_target(C, y=None, q=None, eps=0.0, smoothing="uniform"):
    """The explicit smoothed target distribution q~ of one token.

    * index target y: q~ = (1 - e) onehot(y) + e / C
    * soft target q:  q~ = (1 - e) q + e / C
    with e = eps ("uniform") or eps * C / (C - 1) ("others": the target keeps
    1 - eps and the other C - 1 classes share eps; C = 1 -> no smoothing,
    decisions.md item 8).
    """
    if smoothing == "others":
        e = 0.0 if C == 1 else eps * C / (C - 1)
    else:
        e = eps
    base = [0.0] * C
    if q is None:
        base[y] = 1.0
    else:
        base = [float(v) for v in q]
    return [(1.0 - e) * base[c] + e / C for c in range(C)]


def _token_loss_and_grad(x, qt, cw, inputs, z_loss, cap, z_weight=1.0):
    """Loss l and dl/dx for one token.

    x: the C raw input values at this position (float64 list)
    qt: smoothed target vector, cw: class weights (list)
    l = -sum_c cw[c] qt[c] log p[c]  (+ z_loss * z_weight * lse^2 for logits, z_weight = cw[y] for
    index targets and 1 for soft targets: the z-loss term is weighted like the token, API.md 1)
    """
    C = len(x)
    if inputs == "logits":
        if cap is not None:
            z = [cap * math.tanh(v / cap) for v in x]
            dz = [1.0 - math.tanh(v / cap) ** 2 for v in x]
        else:
            z = list(x)
            dz = [1.0] * C
        lse = _logsumexp(z)
        logp = [v - lse for v in z]
        p = [math.exp(v) for v in logp]
        loss = 0.0
        for c in range(C):
            coef = cw[c] * qt[c]
            if coef != 0.0:
                loss -= coef * logp[c]
        s = sum(cw[c] * qt[c] for c in range(C))
        g = [(-cw[j] * qt[j] + p[j] * s) for j in range(C)]
        if z_loss:
            loss += z_loss * z_weight * lse * lse
            g = [g[j] + 2.0 * z_loss * z_weight * lse * p[j] for j in range(C)]
        g = [g[j] * dz[j] for j in range(C)]
        return loss, g
    if inputs == "log_probs":
        loss = 0.0
        for c in range(C):
            coef = cw[c] * qt[c]
            if coef != 0.0:
                loss -= coef * x[c]
        return loss, [-cw[j] * qt[j] for j in range(C)]
    if inputs == "probs":
        loss = 0.0
        g = [0.0] * C
        for c in range(C):
            coef = cw[c] * qt[c]
            if coef != 0.0:
                loss -= coef * math.log(max(x[c], PROBS_FLOOR))
            if x[c] > PROBS_FLOOR:
                g[c] = -coef / x[c]
        return loss, g
    raise ValueError(inputs)


# --------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------

def _as_ignore_set(ignore_index):
    if ignore_index is None:
        return set()
    if isinstance(ignore_index, (int, np.integer)):
        return {int(ignore_index)}
    return {int(v) for v in ignore_index}


def reference(logits, targets, *, layout="NTC", mask=None, lengths=None,
              ignore_index=-100, weights=None, class_weights=None,
              inputs="logits", label_smoothing=0.0, smoothing="uniform",
              z_loss=0.0, logit_softcap=None, reduction="mean",
              denominator="weights", normalizer=None, empty="zero",
              with_grad=False, return_count=False, cotangent=None):
    """Float64 reference loss (and, with ``with_grad``, the gradient of the
    *sum* of the output with respect to ``logits``, decisions.md item 2; with
    ``cotangent`` (the output's shape) the gradient of sum(cotangent * output)).

    Returns ``loss`` or ``(loss, grad)``; with ``return_count`` also the
    denominator D that reduction="mean" divides by.
    """
    x = _to_ntc(np.asarray(logits, dtype=np.float64), layout)
    N, T, C = x.shape
    targets = np.asarray(targets)
    soft = targets.dtype.kind == "f"
    if soft:
        q = _to_ntc(targets.astype(np.float64), layout)
    else:
        y = _tok_to_nt(targets, layout).astype(np.int64)
    m = (np.ones((N, T), bool) if mask is None
         else _tok_to_nt(np.asarray(mask), layout) != 0)
    w = (np.ones((N, T)) if weights is None
         else _tok_to_nt(np.asarray(weights, dtype=np.float64), layout))
    cw = ([1.0] * C if class_weights is None
          else [float(v) for v in np.asarray(class_weights, np.float64)])
    ign = _as_ignore_set(ignore_index)

    # which tokens count
    counted = np.zeros((N, T), bool)
    for n in range(N):
        for t in range(T):
            ok = bool(m[n, t])
            if lengths is not None and not t < int(np.asarray(lengths)[n]):
                ok = False
            if not soft and int(y[n, t]) in ign:
                ok = False
            counted[n, t] = ok

    # per-token loss (token weight applied), its W and its gradient
    tok = np.zeros((N, T))
    W = np.zeros((N, T))
    gtok = np.zeros((N, T, C))
    for n in range(N):
        for t in range(T):
            if not counted[n, t]:
                continue
            if soft:
                qt = _smoothed_target(C, q=q[n, t], eps=label_smoothing,
                                      smoothing=smoothing)
                W[n, t] = w[n, t]
            else:
                yy = int(y[n, t])
                assert 0 <= yy < C, "reference called with an invalid label"
                qt = _smoothed_target(C, y=yy, eps=label_smoothing,
                                      smoothing=smoothing)
                W[n, t] = w[n, t] * cw[yy]
            l, g = _token_loss_and_grad(list(x[n, t]), qt, cw, inputs,
                                        z_loss, logit_softcap,
                                        1.0 if soft else cw[yy])
            tok[n, t] = w[n, t] * l
            gtok[n, t] = [w[n, t] * v for v in g]

    # denominators
    def D_of(sel):
        """D over the positions selected by the boolean (N, T) array `sel`."""
        if denominator == "weights":
            return float(sum(W[n, t] for n in range(N) for t in range(T)
                             if sel[n, t] and counted[n, t]))
        if denominator == "tokens":
            return float(sum(1 for n in range(N) for t in range(T)
                             if sel[n, t] and counted[n, t]))
        if denominator == "positions":
            return float(sum(1 for n in range(N) for t in range(T) if sel[n, t]))
        raise ValueError(denominator)

    def divide(num, den):
        """num / den with the empty rule; also returns the gradient scale."""
        if den == 0:
            return (0.0 if empty == "zero" else math.nan), 0.0
        return num / den, 1.0 / den

    if cotangent is None:
        v = np.ones(())
    else:
        v = np.asarray(cotangent, np.float64)

    allsel = np.ones((N, T), bool)
    D_mean = D_of(allsel)
    grad = np.zeros((N, T, C))
    if reduction == "none":
        out = _nt_to_tok(tok, layout)
        vv = (np.ones((N, T)) if cotangent is None
              else _tok_to_nt(np.broadcast_to(v, out.shape), layout))
        grad = gtok * vv[:, :, None]
    elif reduction == "sum":
        out = np.float64(tok.sum())
        grad = gtok * float(v)
    elif reduction == "mean":
        den = D_mean if normalizer is None else float(normalizer)
        out, s = divide(float(tok.sum()), den)
        out = np.float64(out)
        grad = gtok * (s * float(v))
    elif reduction in ("per_sequence", "sequence_mean"):
        per = np.zeros(N)
        scale = np.zeros(N)
        for n in range(N):
            sel = np.zeros((N, T), bool)
            sel[n, :] = True
            per[n], scale[n] = divide(float(tok[n].sum()), D_of(sel))
        if reduction == "per_sequence":
            out = per
            grad = gtok * (scale * np.broadcast_to(v, (N,)))[:, None, None]
        else:
            den = float(N) if normalizer is None else float(normalizer)
            out, s = divide(float(per.sum()), den)
            out = np.float64(out)
            grad = gtok * (scale * s * float(v))[:, None, None]
    elif reduction == "per_position":
        per = np.zeros(T)
        scale = np.zeros(T)
        for t in range(T):
            sel = np.zeros((N, T), bool)
            sel[:, t] = True
            per[t], scale[t] = divide(float(tok[:, t].sum()), D_of(sel))
        out = per
        grad = gtok * (scale * np.broadcast_to(v, (T,)))[None, :, None]
    else:
        raise ValueError(reduction)

    # gradient back to the logits' layout
    perm = _canon_perm(layout)
    present = [a for a in "NTC" if a in layout]
    g = grad.reshape([grad.shape["NTC".index(a)] for a in present])
    g = np.transpose(g, np.argsort(perm))
    res = [np.asarray(out, dtype=np.float64)]
    if with_grad:
        res.append(g)
    if return_count:
        res.append(D_mean)
    return res[0] if len(res) == 1 else tuple(res)


def reference_pool(hidden, *, layout="NTH", lengths=None, mask=None,
                   method="last"):
    """Loop reference of ``xseqloss.pool``: (N, H) from counted steps."""
    h = np.asarray(hidden, np.float64)
    h = np.transpose(h, [layout.index(a) for a in "NTH"])
    N, T, H = h.shape
    out = np.zeros((N, H))
    for n in range(N):
        steps = []
        for t in range(T):
            ok = True
            if lengths is not None and not t < int(lengths[n]):
                ok = False
            if mask is not None:
                mm = np.transpose(np.asarray(mask), [layout.replace("H", "").index(a)
                                                     for a in "NT"])
                if not mm[n, t]:
                    ok = False
            if ok:
                steps.append(t)
        assert steps, "reference_pool: empty sequence"
        for k in range(H):
            vals = [h[n, t, k] for t in steps]
            if method == "last":
                out[n, k] = vals[-1]
            elif method == "first":
                out[n, k] = vals[0]
            elif method == "mean":
                out[n, k] = sum(vals) / len(vals)
            elif method == "max":
                out[n, k] = max(vals)
            else:
                raise ValueError(method)
    return out
