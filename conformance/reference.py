"""Independent float64 reference for ``sequence_cross_entropy``.

This module never imports xseqloss.  It is written on purpose in a different
style from the package: it walks the positions one by one with plain Python
loops, builds the smoothed target distribution q of every token explicitly, and
keeps every numerator and denominator as an explicit Python float.  Only the
per-row maths (a logsumexp with max subtraction, a dot product) uses NumPy
vectors, so that a vocabulary of 32,000 classes stays quick.

It returns the value and the analytic gradient of ``sum(output)`` with respect
to the first argument (docs/decisions.md item 2), both in float64.
"""

from __future__ import annotations

import math

import numpy as np

PROBS_EPSILON = 1e-7  # Keras' epsilon: log(max(p, 1e-7)) for inputs="probs"

REDUCTIONS = ("none", "sum", "mean", "per_sequence", "per_position", "sequence_mean")
DENOMINATORS = ("weights", "tokens", "positions")


def _token_index(layout, n, t):
    """Index of position (n, t) in an array with the layout's axes minus C."""
    return tuple(n if a == "N" else t for a in layout if a != "C")


def _row_index(layout, n, t):
    """Index of the class row of position (n, t) in the logits."""
    return tuple(slice(None) if a == "C" else (n if a == "N" else t) for a in layout)


def _ignored(y, ignore_index):
    if ignore_index is None:
        return False
    if isinstance(ignore_index, (int, np.integer)):
        return int(y) == int(ignore_index)
    return any(int(y) == int(i) for i in ignore_index)


def _target_distribution(C, y=None, soft=None, eps=0.0, smoothing="uniform"):
    """The explicit target distribution q of one token (a length-C vector)."""
    q = np.zeros(C, dtype=np.float64)
    if soft is not None:
        if smoothing == "others":
            # "others" equals "uniform" with eps * C / (C - 1) (API.md 1)
            eps = eps * C / (C - 1) if C > 1 else 0.0
        for c in range(C):
            q[c] = (1.0 - eps) * float(soft[c]) + eps / C
        return q
    if smoothing == "uniform":
        for c in range(C):
            q[c] = eps / C
        q[y] += 1.0 - eps
    else:  # "others": the target keeps 1 - eps, the other C - 1 classes share eps
        if C == 1:
            q[0] = 1.0
        else:
            for c in range(C):
                q[c] = eps / (C - 1)
            q[y] = 1.0 - eps
    return q


def _token_loss(row, a, inputs, z_loss, cap, z_weight=1.0):
    """Loss of one token, -sum_c a[c] log p[c] (+ z-loss), and d loss / d row.

    ``a`` is class_weights * q.  Classes with a[c] == 0 are skipped so that a
    -inf logit (vocabulary masking) at a class the target gives no mass to
    contributes nothing instead of 0 * inf (0 log 0 = 0).  The z-loss term
    z_loss * lse**2 is weighted like the token: ``z_weight`` is cw[y] for an
    index target and 1 for a soft target (API.md 1, changed 2026-12).
    """
    C = row.shape[0]
    used = [c for c in range(C) if a[c] != 0.0]
    if inputs == "log_probs":
        logp = row
        loss = -math.fsum(a[c] * logp[c] for c in used)
        return loss, -a.copy()
    if inputs == "probs":
        loss = 0.0
        grad = np.zeros(C)
        terms = []
        for c in used:
            p = float(row[c])
            if p > PROBS_EPSILON:
                terms.append(-a[c] * math.log(p))
                grad[c] = -a[c] / p
            else:  # the clamp is active: constant, zero derivative
                terms.append(-a[c] * math.log(PROBS_EPSILON))
        loss = math.fsum(terms)
        return loss, grad
    # inputs == "logits"
    if cap is not None:
        th = np.tanh(row / cap)
        z = cap * th
        dz_dx = 1.0 - th * th
    else:
        z = row
        dz_dx = None
    m = float(np.max(z))
    lse = m + math.log(float(np.sum(np.exp(z - m))))
    p = np.exp(z - lse)
    loss = -math.fsum(a[c] * (float(z[c]) - lse) for c in used)
    grad = -a + math.fsum(a) * p  # d/dz of -sum a log softmax(z)
    if z_loss:
        loss += z_loss * z_weight * lse * lse
        grad = grad + 2.0 * z_loss * z_weight * lse * p
    if dz_dx is not None:
        grad = grad * dz_dx
    return loss, grad


def _documents(layout, seg, N, T):
    """Walk each sequence: run[n][t] numbers the runs of equal ids, doc[n][t] the documents (runs
    of non-negative ids; None on padding), n_docs[n] how many there are."""
    run = [[0] * T for _ in range(N)]
    doc = [[None] * T for _ in range(N)]
    n_docs = [0] * N
    if seg is not None:
        for n in range(N):
            r, d, prev = -1, -1, None
            for t in range(T):
                v = int(seg[_token_index(layout, n, t)])
                if t == 0 or v != prev:
                    r += 1
                    if v >= 0:
                        d += 1
                run[n][t] = r
                doc[n][t] = d if v >= 0 else None
                prev = v
            n_docs[n] = d + 1
    return run, doc, n_docs


def _exists(seg, run, doc, T, shift):
    def exists(n, t):
        """Is step t a position: its target step exists, in the same document."""
        s = t + shift
        if s >= T:
            return False
        if seg is not None:
            return doc[n][t] is not None and run[n][t] == run[n][s]
        return True
    return exists


def _divide(num, den, empty):
    """num / den with the empty rule; also returns the derivative factor 1/den."""
    if den == 0:
        return (0.0 if empty == "zero" else math.nan), 0.0
    return num / den, 1.0 / den


def reference(logits, targets, *, layout="NTC", mask=None, lengths=None,
              ignore_index=-100, weights=None, class_weights=None,
              inputs="logits", label_smoothing=0.0, smoothing="uniform",
              z_loss=0.0, logit_softcap=None, reduction="mean",
              denominator="weights", normalizer=None, empty="zero", num_classes=None,
              cotangent=None, shift=0, segment_ids=None):
    """Float64 loss and d sum(cotangent * loss) / d logits for valid inputs.

    Returns ``(value, grad)``: value has the shape of the reduction (API.md 1),
    grad has logits' shape.  ``cotangent`` (a number or an array of the value's
    shape; default 1) is the upstream gradient of the value.  Only valid inputs
    are supported: this is the reference for what the package must compute,
    not a validator.

    ``shift`` (API.md 7.2): the logits at step t are scored against the target
    at step s = t + shift, and every target-side array (targets, mask, weights,
    soft targets) is read at s; the step is a position only when s < T and,
    with ``segment_ids`` (7.3), s lies in the same document as t.  A document
    is found by walking each sequence and starting a new one wherever the id
    changes; a negative id is padding (no document, no position).
    """
    x = np.asarray(logits, dtype=np.float64)
    tg = np.asarray(targets)
    assert x.ndim == len(layout) and "C" in layout
    C = x.shape[layout.index("C")]
    assert num_classes is None or num_classes == C
    has_n, has_t = "N" in layout, "T" in layout
    N = x.shape[layout.index("N")] if has_n else 1
    T = x.shape[layout.index("T")] if has_t else 1
    soft = tg.dtype.kind == "f" and tg.shape == x.shape
    cw = np.ones(C) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    m_arr = None if mask is None else np.asarray(mask)
    w_arr = None if weights is None else np.asarray(weights, dtype=np.float64)
    len_arr = None if lengths is None else np.asarray(lengths)
    eps = float(label_smoothing)
    seg = None if segment_ids is None else np.asarray(segment_ids)

    run, doc, n_docs = _documents(layout, seg, N, T)
    exists = _exists(seg, run, doc, T, shift)

    # One pass over the positions: per-token loss, its gradient row, and what
    # the token adds to the three denominators.
    tokens = {}  # (n, t) -> dict(loss, grad, W, counted, position)
    for n in range(N):
        for t in range(T):
            s = t + shift
            position = exists(n, t)
            counted = position
            si = _token_index(layout, n, s) if position else None
            if counted and m_arr is not None and not m_arr[si]:
                counted = False
            if counted and len_arr is not None and not s < int(len_arr[n]):
                counted = False
            y = None
            if counted and not soft:
                y = int(tg[si])
                if _ignored(y, ignore_index):
                    counted = False
            if not counted:
                tokens[n, t] = dict(loss=0.0, grad=None, W=0.0, counted=False, position=position)
                continue
            w = 1.0 if w_arr is None else float(w_arr[si])
            ri = _row_index(layout, n, t)
            row = x[ri]
            q = _target_distribution(C, y=y, soft=None if not soft else tg[_row_index(layout, n, s)],
                                     eps=eps, smoothing=smoothing)
            a = np.array([cw[c] * q[c] for c in range(C)])
            loss, grad = _token_loss(row, a, inputs, float(z_loss), logit_softcap,
                                     1.0 if soft else float(cw[y]))
            W = w if soft else w * float(cw[y])
            tokens[n, t] = dict(loss=w * loss, grad=w * grad, W=W, counted=True, position=True)

    def denom(keys):
        if denominator == "weights":
            return math.fsum(tokens[k]["W"] for k in keys if tokens[k]["counted"])
        if denominator == "tokens":
            return float(sum(1 for k in keys if tokens[k]["counted"]))
        # "positions": every position, counted or not (with shift / segment_ids: the steps
        # whose target exists in the same sequence and document)
        return float(sum(1 for k in keys if tokens[k]["position"]))

    all_keys = [(n, t) for n in range(N) for t in range(T)]
    factor = {}  # (n, t) -> d sum(output) / d token loss
    if reduction == "none":
        value = np.zeros(tuple(s for a, s in zip(layout, x.shape) if a != "C"))
        for (n, t), tok in tokens.items():
            value[_token_index(layout, n, t)] = tok["loss"]
            factor[n, t] = 1.0
    elif reduction == "sum":
        value = math.fsum(tok["loss"] for tok in tokens.values())
        factor = {k: 1.0 for k in all_keys}
    elif reduction == "mean":
        num = math.fsum(tok["loss"] for tok in tokens.values())
        den = float(normalizer) if normalizer is not None else denom(all_keys)
        value, f = _divide(num, den, empty)
        factor = {k: f for k in all_keys}
    elif reduction in ("per_sequence", "sequence_mean"):
        per_seq = np.zeros(N)
        for n in range(N):
            keys = [(n, t) for t in range(T)]
            num = math.fsum(tokens[k]["loss"] for k in keys)
            per_seq[n], f = _divide(num, denom(keys), empty)
            for k in keys:
                factor[k] = f
        if reduction == "per_sequence":
            value = per_seq
        else:
            den = float(normalizer) if normalizer is not None else float(N)
            value, f = _divide(math.fsum(per_seq), den, empty)
            factor = {k: v * f for k, v in factor.items()}
    elif reduction in ("per_segment", "segment_mean"):
        per_doc = np.zeros((N, T))
        for n in range(N):
            for j in range(n_docs[n]):
                keys = [(n, t) for t in range(T) if doc[n][t] == j]
                num = math.fsum(tokens[k]["loss"] for k in keys)
                per_doc[n, j], f = _divide(num, denom(keys), empty)
                for k in keys:
                    factor[k] = f
        for k in all_keys:
            factor.setdefault(k, 0.0)
        if reduction == "per_segment":
            value = per_doc if layout.replace("C", "") != "TN" else per_doc.T
            if "N" not in layout:
                value = per_doc[0]
        else:
            total = math.fsum(per_doc[n, j] for n in range(N) for j in range(n_docs[n]))
            den = float(normalizer) if normalizer is not None else float(sum(n_docs))
            value, f = _divide(total, den, empty)
            factor = {k: v * f for k, v in factor.items()}
    elif reduction == "per_position":
        value = np.zeros(T)
        for t in range(T):
            keys = [(n, t) for n in range(N)]
            num = math.fsum(tokens[k]["loss"] for k in keys)
            value[t], f = _divide(num, denom(keys), empty)
            for k in keys:
                factor[k] = f
    else:
        raise ValueError(f"unknown reduction {reduction!r}")

    value = np.asarray(value, dtype=np.float64)
    ct = np.broadcast_to(np.asarray(1.0 if cotangent is None else cotangent, dtype=np.float64), value.shape)

    def upstream(n, t):
        """The cotangent of the output element token (n, t) feeds."""
        if reduction == "none":
            return float(ct[_token_index(layout, n, t)])
        if reduction == "per_sequence":
            return float(ct[n])
        if reduction == "per_position":
            return float(ct[t])
        if reduction == "per_segment":
            j = doc[n][t]
            return float(ct[_token_index(layout, n, j)]) if "N" in layout else float(ct[j])
        return float(ct[()])

    grad = np.zeros(x.shape)
    for (n, t), tok in tokens.items():
        if tok["counted"] and factor[n, t] != 0.0:
            grad[_row_index(layout, n, t)] = upstream(n, t) * factor[n, t] * tok["grad"]
    return value, grad


def counted_positions(targets, *, layout, mask=None, lengths=None, ignore_index=-100,
                      soft=False, shift=0, segment_ids=None, at_targets=False):
    """Boolean array (the token shape: logits' shape minus C) of the counted positions: the logits'
    steps that count, or with ``at_targets`` the target steps they read (t + shift)."""
    tg = np.asarray(targets)
    shape = tuple(s for a, s in zip(layout, tg.shape) if a != "C") if soft else tg.shape
    tshape = [a for a in layout if a != "C"]
    out = np.zeros(shape, dtype=bool)
    N = shape[tshape.index("N")] if "N" in tshape else 1
    T = shape[tshape.index("T")] if "T" in tshape else 1
    seg = None if segment_ids is None else np.asarray(segment_ids)
    run, doc, _ = _documents(layout, seg, N, T)
    exists = _exists(seg, run, doc, T, shift)
    for n in range(N):
        for t in range(T):
            if not exists(n, t):
                continue
            s = t + shift
            si = _token_index(layout, n, s)
            ok = mask is None or bool(np.asarray(mask)[si])
            ok = ok and (lengths is None or s < int(np.asarray(lengths)[n]))
            if not soft:
                ok = ok and not _ignored(int(tg[si]), ignore_index)
            out[si if at_targets else _token_index(layout, n, t)] = ok
    return out
