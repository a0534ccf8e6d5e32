"""Input builders shared by the test modules (NumPy only, no xseqloss)."""

import itertools

import numpy as np

REDUCTIONS = ("none", "sum", "mean", "per_sequence", "per_position",
              "sequence_mean")
DENOMINATORS = ("weights", "tokens", "positions")

# every order of every subset of N, T that keeps C
ALL_LAYOUTS = tuple("".join(p) for k in (1, 2, 3)
                    for p in itertools.permutations("NTC", k) if "C" in p)


def valid_reductions(layout):
    out = ["none", "sum", "mean"]
    if "N" in layout:
        out += ["per_sequence", "sequence_mean"]
    if "T" in layout:
        out.append("per_position")
    return out


def from_ntc(x, layout):
    """(N, T, C) canonical array -> array with axes `layout` (missing letters
    must have size 1 and are dropped)."""
    x = np.asarray(x)
    for i, a in enumerate("NTC"):
        if a not in layout:
            assert x.shape[i] == 1
    x = x.reshape([s for a, s in zip("NTC", x.shape) if a in layout])
    present = [a for a in "NTC" if a in layout]
    return np.transpose(x, [present.index(a) for a in layout])


def from_nt(x, layout):
    """(N, T) canonical token array -> token array for `layout` (minus C)."""
    tl = layout.replace("C", "")
    x = np.asarray(x)
    for i, a in enumerate("NT"):
        if a not in tl:
            assert x.shape[i] == 1
    x = x.reshape([s for a, s in zip("NT", x.shape) if a in tl])
    present = [a for a in "NT" if a in tl]
    return np.transpose(x, [present.index(a) for a in tl])


def shape_for(layout, N, T, C):
    return tuple({"N": N, "T": T, "C": C}[a] for a in layout)


def token_shape(layout, N, T):
    return tuple({"N": N, "T": T}[a] for a in layout if a != "C")


def softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def dyadic(rng, shape, lo, hi, denom=8):
    """Random values that are exact in float16 (multiples of 1/denom)."""
    return rng.integers(int(lo * denom), int(hi * denom) + 1, size=shape) / denom


def make_case(rng, *, N=2, T=4, C=5, layout="NTC", soft=False, scale=2.0,
              **flags):
    """Build (logits, targets, options) in canonical NTC then move to layout.

    flags (all optional): mask, mask_numeric, lengths, ignore (value put into
    some targets), weights, neg_weights, class_weights, inputs, smoothing, ...
    Anything not recognised is passed through as an option.
    """
    logits = rng.normal(0.0, scale, size=(N, T, C))
    if soft:
        q = rng.dirichlet(np.ones(C), size=(N, T)) if C > 1 else np.ones((N, T, 1))
        targets = q
    else:
        targets = rng.integers(0, C, size=(N, T))
    opts = {}
    tok_nt = (N, T)
    if flags.pop("mask", False):
        m = rng.random(tok_nt) < 0.7
        m.flat[0] = True
        if N > 1 and T > 1:
            m[-1, -1] = False
        opts["mask"] = from_nt(m, layout)
    if flags.pop("mask_numeric", False):
        m = rng.choice([0.0, 1.0, 0.5, 2.0], size=tok_nt)
        m.flat[0] = 1.0
        opts["mask"] = from_nt(m, layout)
    if flags.pop("lengths", False):
        lengths = rng.integers(0, T + 1, size=N)
        lengths[0] = T
        if N > 1:
            lengths[-1] = max(1, T // 2)
        opts["lengths"] = lengths.astype(np.int64)
    ignore = flags.pop("ignore", None)
    if ignore is not None and not soft:
        put = rng.random(tok_nt) < 0.3
        put.flat[0] = False
        if N * T > 1:
            put.flat[-1] = True
        vals = list(ignore) if isinstance(ignore, (list, tuple, set)) else [ignore]
        targets = np.where(put, rng.choice(vals, size=tok_nt), targets)
    if flags.pop("weights", False):
        opts["weights"] = from_nt(dyadic(rng, tok_nt, 0.25, 2.0), layout)
    if flags.pop("neg_weights", False):
        w = dyadic(rng, tok_nt, -1.0, 2.0)
        w.flat[0] = 3.0
        opts["weights"] = from_nt(w, layout)
    if flags.pop("class_weights", False):
        opts["class_weights"] = dyadic(rng, (C,), 0.25, 3.0)
    inputs = flags.pop("inputs", "logits")
    if inputs == "log_probs":
        logits = log_softmax(logits)
    elif inputs == "probs":
        # probabilities that are exact in every float dtype (multiples of 1/64
        # summing to 1, some exactly 0 to exercise the 1e-7 floor)
        k = rng.multinomial(64, softmax(logits).reshape(-1, C)).reshape(N, T, C)
        logits = k / 64.0
    if inputs != "logits":
        opts["inputs"] = inputs
    opts.update(flags)
    return from_ntc(logits, layout), (from_ntc(targets, layout) if soft
                                      else from_nt(targets, layout)), opts
