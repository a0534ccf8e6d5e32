"""The token_stats reference checks itself (API.md 11), against things nobody here wrote: values
worked out by hand on two classes, the suite's loss reference (reference.py: log_prob is minus the
per-token loss, entropy is the cross-entropy of softmax(z / T) against itself), NumPy's logaddexp,
and float64 central differences for every VJP.  Plain unit tests: no whole-suite fixture, no
xseqloss import, a few seconds in all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from .cases import DTYPES, round_to
from .reference import reference
from .stats_cases import LINEAR_STATS_CASES, STATS_CASES, make_stats_inputs
from .stats_reference import (DIFFERENTIABLE, OUTPUTS, linear_stats_reference, linear_stats_vjp_reference,
                              stats_reference, stats_vjp_reference)

FIVE = ("log_prob", "entropy", "lse", "argmax", "correct")
LOG3 = math.log(3.0)


def _data(seed=0, N=2, T=4, C=5, scale=2.0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (N, T, C)), rng.integers(0, C, (N, T)), rng


def _objective(x, targets, cts, ids=None, **kw):
    """sum_k sum(cts[k] * output_k), in float64 (NaN-free: garbage rows give 0)."""
    outs = tuple(k for k in cts if k != "ids_log_prob") + (("ids_log_prob",) if ids is not None else ())
    out = stats_reference(x, targets, outputs=outs, ids=ids, **kw)
    return math.fsum(float(np.sum(ct * out[k])) for k, ct in cts.items())


def _fd(x, targets, cts, h=1e-6, **kw):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (_objective(xp, targets, cts, **kw) - _objective(xm, targets, cts, **kw)) / (2 * h)
    return g


def _cts(rng, shape, k=None, names=DIFFERENTIABLE, targets=True):
    out = {}
    for name in names:
        if name == "log_prob" and not targets:
            continue
        if name == "ids_log_prob":
            if k is None:
                continue
            out[name] = rng.uniform(-1, 1, shape + (k,))
        else:
            out[name] = rng.uniform(-1, 1, shape)
    return out


# --------------------------------------------------------------------------- by hand

def test_two_classes_by_hand():
    # p = (1/4, 3/4): every output has a closed form
    H = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    for T, scale in ((1.0, 1.0), (0.5, 0.5), (2.0, 2.0), (1.5, 1.5)):
        z = np.array([[[0.0, LOG3 * scale], [0.0, LOG3 * scale]]])  # u = z / T = (0, log 3)
        y = np.array([[0, 1]])
        out = stats_reference(z, y, outputs=FIVE, temperature=T)
        np.testing.assert_allclose(out["log_prob"], [[math.log(0.25), math.log(0.75)]], rtol=1e-15)
        np.testing.assert_allclose(out["entropy"], [[H, H]], rtol=1e-15)
        np.testing.assert_allclose(out["lse"], [[math.log(4.0), math.log(4.0)]], rtol=1e-15)
        assert out["argmax"].tolist() == [[1, 1]] and out["argmax"].dtype == np.int64
        assert out["correct"].tolist() == [[False, True]] and out["counted"].all()
        # d/dz = (1/T) d/du: d log p_0 = (3/4, -3/4), d lse = (1/4, 3/4),
        # dH_c = -p_c (log p_c + H)
        dH = [-0.25 * (math.log(0.25) + H), -0.75 * (math.log(0.75) + H)]
        for name, want in (("log_prob", [0.75, -0.75]), ("lse", [0.25, 0.75]), ("entropy", dH)):
            ct = {name: np.array([[1.0, 0.0]])}
            g = stats_vjp_reference(z, y, ct, temperature=T)
            np.testing.assert_allclose(g[0, 0], np.array(want) / T, rtol=1e-14, atol=1e-16)
            np.testing.assert_array_equal(g[0, 1], 0.0)
        assert abs(dH[0] + dH[1]) < 1e-15  # entropy is shift-invariant: its gradient sums to 0


def test_softcap_by_hand():
    # z' = cap * tanh(x / cap) = (0, log 3) for x = (0, cap * atanh(log 3 / cap))
    cap = 2.0
    x = np.array([0.0, cap * math.atanh(LOG3 / cap)])
    out = stats_reference(x, np.array(1), outputs=FIVE, layout="C", logit_softcap=cap, temperature=0.5)
    # u = (0, 2 log 3): p = (1/10, 9/10)
    np.testing.assert_allclose(out["log_prob"], math.log(0.9), rtol=1e-14)
    np.testing.assert_allclose(out["lse"], math.log(10.0), rtol=1e-14)
    g = stats_vjp_reference(x, np.array(1), {"log_prob": np.array(1.0)}, layout="C", logit_softcap=cap,
                            temperature=0.5)
    dcap = np.array([1.0, 1.0 - (LOG3 / cap) ** 2])  # 1 - tanh^2
    np.testing.assert_allclose(g, np.array([-0.1, 0.1]) / 0.5 * dcap, rtol=1e-13)


def test_one_class():
    out = stats_reference(np.array([[[3.0], [-2.0]]]), np.array([[0, 0]]), outputs=FIVE, temperature=0.5)
    assert out["log_prob"].tolist() == [[0.0, 0.0]] and out["entropy"].tolist() == [[0.0, 0.0]]
    assert not np.signbit(out["entropy"]).any()
    np.testing.assert_allclose(out["lse"], [[6.0, -4.0]])
    assert out["argmax"].tolist() == [[0, 0]] and out["correct"].all()


# --------------------------------------------------------------------------- against the loss reference

LOSS_CONFIGS = [
    dict(),
    dict(mask=np.array([[1, 0, 1, 1], [0, 1, 1, 1]], bool), lengths=np.array([4, 3])),
    dict(ignore_index=(-100, 2)),
    dict(shift=1),
    dict(shift=2, lengths=np.array([4, 3])),
    dict(shift=1, segment_ids=np.array([[0, 0, 1, 1], [3, 3, 3, -1]])),
    dict(logit_softcap=3.0, mask=np.array([[1, 1, 0, 1], [1, 1, 1, 0]], bool)),
]


@pytest.mark.parametrize("i", range(len(LOSS_CONFIGS)))
def test_log_prob_is_minus_the_loss(i):
    x, y, rng = _data(i)
    y[0, 1] = -100
    kw = LOSS_CONFIGS[i]
    out = stats_reference(x, y, outputs=("log_prob",), **kw)
    loss, _ = reference(x, y, reduction="none", **kw)
    np.testing.assert_allclose(out["log_prob"], -loss, rtol=1e-13, atol=1e-15)
    # and the VJP: d sum(ct * log_prob) = -d sum(ct * loss)
    ct = rng.uniform(-1, 1, y.shape)
    _, g_loss = reference(x, y, reduction="none", cotangent=ct, **kw)
    g = stats_vjp_reference(x, y, {"log_prob": ct}, **kw)
    np.testing.assert_allclose(g, -g_loss, rtol=1e-12, atol=1e-15)
    # at a temperature: minus the loss of z / T (softcap first)
    if "logit_softcap" not in kw:
        for T in (0.5, 1.5):
            out = stats_reference(x, y, outputs=("log_prob",), temperature=T, **kw)
            np.testing.assert_allclose(out["log_prob"], -reference(x / T, y, reduction="none", **kw)[0],
                                       rtol=1e-13, atol=1e-15)


def _softmax(u):
    m = np.max(u, -1, keepdims=True)
    e = np.exp(u - m)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("T", [0.5, 1.0, 1.5, "token"])
@pytest.mark.parametrize("cap", [None, 4.0])
def test_entropy_is_the_self_cross_entropy(T, cap):
    x, y, rng = _data(3, C=6)
    x[0, 1, [1, 4]] = -np.inf  # a masked vocabulary: 0 log 0 = 0 in both references
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    temp = rng.choice([0.5, 1.25, 2.0], y.shape) if T == "token" else T
    out = stats_reference(x, y, outputs=("entropy", "lse"), temperature=temp, mask=mask, logit_softcap=cap)
    z = x if cap is None else cap * np.tanh(x / cap)
    u = z / (temp[..., None] if T == "token" else temp)
    q = _softmax(u)
    H, _ = reference(u, q, reduction="none", mask=mask)
    np.testing.assert_allclose(out["entropy"], H, rtol=1e-12, atol=1e-15)
    assert np.all(np.isfinite(out["entropy"]))
    lse = np.where(mask, np.logaddexp.reduce(u, axis=-1), 0.0)
    np.testing.assert_allclose(out["lse"], lse, rtol=1e-13)


# --------------------------------------------------------------------------- ids

@pytest.mark.parametrize("layout,shift", [("NTC", 0), ("NTC", 1), ("TNC", 1)])
def test_ids_equal_to_the_targets_give_log_prob(layout, shift):
    x, y, rng = _data(4)
    y[1, 2] = -100
    if layout == "TNC":
        x, y = x.transpose(1, 0, 2), y.T
    other = rng.integers(0, 5, y.shape)
    ids = np.stack([np.where(y < 0, 0, y), np.where(y < 0, 0, y), other], -1)  # ignore_index is not for ids
    kw = dict(layout=layout, shift=shift, temperature=1.5)
    out = stats_reference(x, y, outputs=("log_prob", "ids_log_prob"), ids=ids, **kw)
    np.testing.assert_array_equal(out["ids_log_prob"][..., 0], out["log_prob"])
    np.testing.assert_array_equal(out["ids_log_prob"][..., 1], out["log_prob"])
    third = stats_reference(x, other, outputs=("log_prob",), ignore_index=None, **kw)["log_prob"]
    np.testing.assert_array_equal(out["ids_log_prob"][..., 2], np.where(out["counted"], third, 0.0))
    ct = rng.uniform(-1, 1, y.shape)
    g_ids = stats_vjp_reference(x, y, {"ids_log_prob": np.stack([ct, 0 * ct, 0 * ct], -1)}, ids=ids, **kw)
    np.testing.assert_allclose(g_ids, stats_vjp_reference(x, y, {"log_prob": ct}, **kw), rtol=1e-14, atol=1e-17)


# --------------------------------------------------------------------------- bounds

def test_bounds():
    for seed, T in ((5, 0.5), (6, 1.0), (7, 1.5)):
        x, y, rng = _data(seed, C=7, scale=4.0)
        ids = rng.integers(0, 7, y.shape + (3,))
        mask = rng.uniform(size=y.shape) > 0.3
        out = stats_reference(x, y, outputs=OUTPUTS, ids=ids, temperature=T, mask=mask)
        assert np.all(out["log_prob"] <= 0.0) and np.all(out["ids_log_prob"] <= 0.0)
        assert np.all(out["entropy"] >= 0.0) and np.all(out["entropy"] <= math.log(7) + 1e-12)
        c = out["counted"]
        np.testing.assert_array_equal(c, mask)
        assert np.all(out["lse"][c] >= x.max(-1)[c] / T)
        assert np.all(out["lse"][c] <= x.max(-1)[c] / T + math.log(7) + 1e-12)
        np.testing.assert_array_equal(out["argmax"][c], np.argmax(x, -1)[c])
        assert np.all(out["argmax"][~c] == -1) and not out["correct"][~c].any()
        np.testing.assert_array_equal(out["correct"], c & (out["argmax"] == y))
        for k in ("log_prob", "entropy", "lse"):
            assert np.all(out[k][~c] == 0.0)


# --------------------------------------------------------------------------- finite differences

FD_CONFIGS = [
    dict(name="t05", temperature=0.5),
    dict(name="t15_ids", temperature=1.5, ids=3),
    dict(name="token_temp_shift_masked", temperature="token", shift=1, mask=True, garbage=True),
    dict(name="sequence_temp_lengths_softcap", temperature="sequence", lengths=np.array([3, 2]), logit_softcap=2.5,
         garbage=True),
    dict(name="nct_softcap_t15_segments", layout="NCT", temperature=1.5, logit_softcap=4.0, shift=1,
         segment_ids=np.array([[0, 0, 0, 1], [2, 2, -1, -1]])),
    dict(name="tnc_no_targets_ids", layout="TNC", targets=False, ids=2, temperature=0.5, mask=True),
    dict(name="c_layout", layout="C", temperature=1.5, ids=1),
    dict(name="neginf_t05", temperature=0.5, neginf=True, ids=1),
    dict(name="neginf_softcap", temperature=1.5, neginf=True, logit_softcap=3.0),
]


def _fd_setup(cfg):
    cfg = dict(cfg)
    cfg.pop("name")
    rng = np.random.default_rng(len(str(cfg)))
    layout = cfg.pop("layout", "NTC")
    C = 4
    x, y, _ = _data(9, N=2, T=4, C=C, scale=1.5)
    if cfg.pop("neginf", False):
        x[..., 2] = -np.inf
        y = np.where(y == 2, 1, y)
    kw = dict(layout=layout)
    if cfg.get("mask"):
        cfg["mask"] = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
    garbage = cfg.pop("garbage", False)
    k = cfg.pop("ids", None)
    if k:
        ids = rng.integers(0, C, y.shape + (k,))
        if np.isneginf(x).any():
            ids = np.where(ids == 2, 3, ids)
        cfg["ids"] = ids
    if cfg.get("temperature") == "token":
        cfg["temperature"] = rng.choice([0.5, 1.0, 1.5], y.shape)
    elif cfg.get("temperature") == "sequence":
        cfg["temperature"] = np.array([0.5, 1.5])
    has_targets = cfg.pop("targets", True)
    perm = {"NTC": (0, 1, 2), "NCT": (0, 2, 1), "TNC": (1, 0, 2)}.get(layout)
    if layout == "C":
        x, y = x[0, 0], y[0, 0]
        if k:
            cfg["ids"] = cfg["ids"][0, 0]
    else:
        x = x.transpose(perm)
        tperm = [p for p in perm if p != 2]
        y = y.transpose(tperm)
        for name in ("mask", "segment_ids"):
            if name in cfg:
                cfg[name] = cfg[name].transpose(tperm)
        if isinstance(cfg.get("temperature"), np.ndarray) and cfg["temperature"].shape == (2, 4):
            cfg["temperature"] = cfg["temperature"].transpose(tperm)
        if k:
            cfg["ids"] = cfg["ids"].transpose(tperm + [2])
    kw.update(cfg)
    targets = y if has_targets else None
    counted = stats_reference(x, targets, outputs=(), **{**kw, "ids": None})["counted"]
    if garbage:  # NaN and inf in the rows that do not count
        c_axis = layout.index("C")
        xl = np.moveaxis(x, c_axis, -1).copy()
        xl[~counted] = np.resize(np.array([np.nan, np.inf, -np.inf]), C)
        x = np.moveaxis(xl, -1, c_axis)
    return x, targets, kw, rng, k, counted


@pytest.mark.parametrize("cfg", FD_CONFIGS, ids=[c["name"] for c in FD_CONFIGS])
def test_vjp_matches_finite_differences(cfg):
    x, targets, kw, rng, k, counted = _fd_setup(cfg)
    shape = counted.shape
    cts = _cts(rng, shape, k, targets=targets is not None)
    g = stats_vjp_reference(x, targets, cts, **kw)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, _fd(x, targets, cts, **kw), rtol=1e-6, atol=2e-7)
    # each output alone too (an upstream gradient that is silently dropped shows here)
    for name in cts:
        one = {name: cts[name]}
        np.testing.assert_allclose(stats_vjp_reference(x, targets, one, **kw), _fd(x, targets, one, **kw),
                                   rtol=1e-6, atol=2e-7)
    # rows that do not count: exactly 0, even with NaN / inf logits there
    c_axis = kw["layout"].index("C")
    np.testing.assert_array_equal(np.moveaxis(g, c_axis, -1)[~counted], 0.0)
    # a missing cotangent counts as zero
    some = dict(list(cts.items())[:1])
    zeros = {**some, **{n: np.zeros_like(v) for n, v in cts.items() if n not in some}}
    np.testing.assert_array_equal(stats_vjp_reference(x, targets, some, **kw),
                                  stats_vjp_reference(x, targets, zeros, **kw))


# --------------------------------------------------------------------------- -inf, p -> 1, all negative

def test_neginf_logits():
    x, y, rng = _data(11, C=6)
    x[..., 1] = -np.inf
    x[0, 0, [3, 4]] = -np.inf
    y = np.where(np.isneginf(np.take_along_axis(x, y[..., None], -1)[..., 0]), 0, y)
    ids = np.array([0, 2, 5])[None, None].repeat(2, 0).repeat(4, 1)
    out = stats_reference(x, y, outputs=OUTPUTS, ids=ids, temperature=0.5)
    assert np.all(np.isfinite(out["entropy"])) and np.all(np.isfinite(out["lse"]))
    # the entropy of the finite classes alone (row n = 1: all but class 1)
    keep = [0, 2, 3, 4, 5]
    sub = stats_reference(x[1][None][..., keep], y[1][None] * 0, outputs=("entropy",), temperature=0.5)
    np.testing.assert_allclose(out["entropy"][1], sub["entropy"][0], rtol=1e-14)
    cts = _cts(rng, y.shape, 3)
    g = stats_vjp_reference(x, y, cts, ids=ids, temperature=0.5)
    assert np.all(np.isfinite(g))
    assert np.all(g[..., 1] == 0.0) and np.all(g[0, 0, [3, 4]] == 0.0)
    for name in cts:
        gi = stats_vjp_reference(x, y, {name: cts[name]}, ids=ids, temperature=0.5)
        assert np.all(np.isfinite(gi)) and np.all(gi[np.isneginf(x)] == 0.0), name
    # a row where every class but one is -inf: p = 1, H = 0 and its gradient 0
    row = np.array([-np.inf, 2.0, -np.inf])
    o = stats_reference(row, np.array(1), outputs=FIVE, layout="C")
    assert o["entropy"] == 0.0 and o["log_prob"] == 0.0 and o["argmax"] == 1
    np.testing.assert_array_equal(stats_vjp_reference(row, np.array(1), {"entropy": np.array(1.0)}, layout="C"), 0.0)
    # with the softcap a -inf logit becomes -cap: it has mass, and its gradient is 0 (tanh' = 0)
    oc = stats_reference(row, np.array(1), outputs=("entropy",), layout="C", logit_softcap=2.0)
    want = stats_reference(np.array([-2.0, 2.0 * math.tanh(1.0), -2.0]), np.array(1), outputs=("entropy",),
                           layout="C")
    np.testing.assert_allclose(oc["entropy"], want["entropy"], rtol=1e-14)
    gc = stats_vjp_reference(row, np.array(1), {"entropy": np.array(1.0)}, layout="C", logit_softcap=2.0)
    assert gc[0] == 0.0 and gc[2] == 0.0 and gc[1] != 0.0


@pytest.mark.parametrize("T", [0.5, 1.0, 1.5])
def test_p_to_one(T):
    # the target 30 above the other three classes: q = e^(-30/T) / (1 + 3 e^(-30/T)) per other class
    C, margin = 4, 30.0
    x = np.zeros((1, 1, C))
    x[0, 0, 2] = margin
    y = np.array([[2]])
    e = math.exp(-margin / T)
    log_p = -math.log1p(3 * e)
    log_q = -margin / T - math.log1p(3 * e)
    H = -(math.exp(log_p) * log_p + 3 * math.exp(log_q) * log_q)
    out = stats_reference(x, y, outputs=FIVE, temperature=T)
    np.testing.assert_allclose(out["log_prob"], log_p, rtol=1e-12)
    np.testing.assert_allclose(out["entropy"], H, rtol=1e-12)
    np.testing.assert_allclose(out["lse"], margin / T + math.log1p(3 * e), rtol=1e-15)
    assert out["log_prob"][0, 0] < 0.0 and out["entropy"][0, 0] > 0.0
    # the entropy gradient is tiny but exact (not zero, not NaN): dH/du_c = -p_c (log p_c + H)
    g = stats_vjp_reference(x, y, {"entropy": np.ones((1, 1))}, temperature=T)
    p, q = math.exp(log_p), math.exp(log_q)
    want = np.full(C, -q * (log_q + H))
    want[2] = -p * (log_p + H)
    np.testing.assert_allclose(g[0, 0], want / T, rtol=1e-10)
    assert g[0, 0, 2] < 0.0 < g[0, 0, 0]
    np.testing.assert_allclose(g, _fd(x, y, {"entropy": np.ones((1, 1))}, h=1e-4, temperature=T),
                               rtol=1e-5, atol=0)


def test_all_negative_logits_shift_invariance():
    x, y, rng = _data(12)
    ids = rng.integers(0, 5, y.shape + (2,))
    cts = _cts(rng, y.shape, 2)
    for T in (0.5, 1.5):
        a = stats_reference(x, y, outputs=OUTPUTS, ids=ids, temperature=T)
        b = stats_reference(x - 100.0, y, outputs=OUTPUTS, ids=ids, temperature=T)
        assert np.all(x - 100.0 < 0)
        for k in ("log_prob", "entropy", "ids_log_prob"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(b["lse"], a["lse"] - 100.0 / T, rtol=1e-13)
        np.testing.assert_array_equal(b["argmax"], a["argmax"])
        np.testing.assert_allclose(stats_vjp_reference(x - 100.0, y, cts, ids=ids, temperature=T),
                                   stats_vjp_reference(x, y, cts, ids=ids, temperature=T), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- argmax

def test_argmax_ties_lowest_index():
    x = np.array([[[1.0, 3.0, 3.0, 0.0], [0.5, 0.5, 0.5, 0.5], [-np.inf, -1.0, -1.0, -np.inf]]])
    y = np.array([[2, 0, 1]])
    out = stats_reference(x, y, outputs=FIVE)
    assert out["argmax"].tolist() == [[1, 0, 1]]
    assert out["correct"].tolist() == [[False, True, True]]
    # after the softcap: 1e4 and 2e4 both become exactly cap, a tie at the lowest index
    z = np.array([1e4, 2e4, -1.0])
    assert stats_reference(z, np.array(1), outputs=("argmax", "correct"), layout="C")["argmax"] == 1
    capped = stats_reference(z, np.array(1), outputs=("argmax", "correct"), layout="C", logit_softcap=5.0)
    assert capped["argmax"] == 0 and not capped["correct"]
    # the temperature never moves the argmax
    for T in (0.5, 1.5):
        assert stats_reference(x, y, outputs=("argmax",), temperature=T)["argmax"].tolist() == [[1, 0, 1]]


# --------------------------------------------------------------------------- temperature forms

def test_temperature_forms_agree():
    x, y, rng = _data(13)
    mask = rng.uniform(size=y.shape) > 0.2
    base = stats_reference(x, y, outputs=OUTPUTS[:5], temperature=1.5, mask=mask)
    for temp in (np.array(1.5), np.full(2, 1.5), np.full(y.shape, 1.5), 1.5):
        got = stats_reference(x, y, outputs=OUTPUTS[:5], temperature=temp, mask=mask)
        for k in base:
            np.testing.assert_array_equal(got[k], base[k])
    per_seq = np.array([0.5, 2.0])
    a = stats_reference(x, y, outputs=("log_prob", "entropy"), temperature=per_seq)
    b = stats_reference(x, y, outputs=("log_prob", "entropy"), temperature=per_seq[:, None].repeat(4, 1))
    for k in ("log_prob", "entropy"):
        np.testing.assert_array_equal(a[k], b[k])
    # one sequence at a time with a number
    for n in range(2):
        one = stats_reference(x[n:n + 1], y[n:n + 1], outputs=("entropy",), temperature=float(per_seq[n]))
        np.testing.assert_array_equal(one["entropy"][0], a["entropy"][n])


@pytest.mark.parametrize("shift", [1, 2])
def test_per_token_temperature_is_read_at_the_target_position(shift):
    x, y, rng = _data(14, T=5)
    temp = rng.choice([0.5, 1.0, 1.5, 2.0], y.shape)
    ids = rng.integers(0, 5, y.shape + (2,))
    cts = _cts(rng, y.shape, 2)
    out = stats_reference(x, y, outputs=OUTPUTS, ids=ids, temperature=temp, shift=shift)
    g = stats_vjp_reference(x, y, cts, ids=ids, temperature=temp, shift=shift)
    # the same without a shift, the target-side arrays moved by hand to the logits' positions
    T = y.shape[1]
    xs = x[:, :T - shift]
    moved = dict(temperature=temp[:, shift:], ids=ids[:, shift:])
    plain = stats_reference(xs, y[:, shift:], outputs=OUTPUTS, **moved)
    g_plain = stats_vjp_reference(xs, y[:, shift:], {k: v[:, :T - shift] for k, v in cts.items()}, **moved)
    for k in OUTPUTS:
        np.testing.assert_array_equal(out[k][:, :T - shift], plain[k])
    assert not out["counted"][:, T - shift:].any() and np.all(out["argmax"][:, T - shift:] == -1)
    np.testing.assert_array_equal(g[:, :T - shift], g_plain)
    np.testing.assert_array_equal(g[:, T - shift:], 0.0)


# --------------------------------------------------------------------------- counting without targets

def test_counting_without_targets():
    x, y, rng = _data(15, T=9)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, -1], [5, 5, 5, 5, 5, 0, 0, -1, -1]])
    lengths = np.array([9, 6])
    mask = rng.uniform(size=y.shape) > 0.2
    for shift in (0, 1, 2):
        kw = dict(mask=mask, lengths=lengths, segment_ids=seg, shift=shift, temperature=0.5)
        with_t = stats_reference(x, y, outputs=("entropy", "lse", "argmax"), ignore_index=None, **kw)
        without = stats_reference(x, None, outputs=("entropy", "lse", "argmax"), **kw)
        for k in with_t:
            np.testing.assert_array_equal(without[k], with_t[k])
        c = without["counted"]
        assert not c[:, 9 - shift:].any()
        for n in range(2):  # a counted step's target step is in the same document, not padding
            for t in range(9):
                if c[n, t]:
                    assert seg[n, t] >= 0 and seg[n, t] == seg[n, t + shift] and mask[n, t + shift]
                    assert t + shift < lengths[n]
                    assert all(seg[n, s] == seg[n, t] for s in range(t, t + shift + 1))


# --------------------------------------------------------------------------- value checks

def test_value_checks_and_nan_marks():
    x, y, rng = _data(16, C=5)
    mask = np.ones(y.shape, bool)
    mask[1, 3] = False
    ids = rng.integers(0, 5, y.shape + (3,))
    cts = _cts(rng, y.shape, 3)
    kw = dict(outputs=OUTPUTS, ids=ids, mask=mask, temperature=1.5)

    # out of range where nothing counts: never read, no error
    yb, ib = y.copy(), ids.copy()
    yb[1, 3], ib[1, 3, 0] = 9, -4
    stats_reference(x, yb, **{**kw, "ids": ib})
    tb = np.full(y.shape, 1.5)
    tb[1, 3] = np.nan
    stats_reference(x, y, **{**kw, "temperature": tb})

    bad_inputs = [
        ("target", dict(targets=(0, 2, 5))),
        ("target", dict(targets=(0, 2, -1))),
        ("id", dict(ids=(1, 1, 2, 7))),
        ("temperature", dict(temperature=(1, 0, 0.0))),
        ("temperature", dict(temperature=(0, 3, -2.0))),
        ("temperature", dict(temperature=(1, 1, np.inf))),
    ]
    for what, edit in bad_inputs:
        yy, ii, tt = y.copy(), ids.copy(), np.full(y.shape, 1.5)
        name, (*where, v) = next(iter(edit.items()))
        {"targets": yy, "ids": ii, "temperature": tt}[name][tuple(where)] = v
        pos = tuple(where[:2])
        args = dict(kw, ids=ii, temperature=tt)
        with pytest.raises(ValueError, match=what):
            stats_reference(x, yy, **args)
        with pytest.raises(ValueError):
            stats_vjp_reference(x, yy, cts, **{k: v for k, v in args.items() if k != "outputs"})
        out = stats_reference(x, yy, nan_marks=True, **args)
        good = stats_reference(x, y, **dict(kw, temperature=np.full(y.shape, 1.5)))
        for k in ("log_prob", "entropy", "lse", "ids_log_prob"):
            nan = np.isnan(out[k]) if k != "ids_log_prob" else np.isnan(out[k]).all(-1)
            assert nan[pos] and nan.sum() == 1, (what, k)
            keep = np.ones(y.shape, bool)
            keep[pos] = False
            np.testing.assert_array_equal(out[k][keep], good[k][keep])
        assert out["argmax"][pos] == np.argmax(x[pos]) and not out["correct"][pos] and out["counted"][pos]
        g = stats_vjp_reference(x, yy, cts, nan_marks=True, **{k: v for k, v in args.items() if k != "outputs"})
        assert np.isnan(g[pos]).all() and np.isnan(g).sum() == 5

    # static problems
    for temp in (0.0, -1.0, np.nan, np.inf, np.array(0.0)):
        with pytest.raises(ValueError, match="temperature"):
            stats_reference(x, y, temperature=temp)
        with pytest.raises(ValueError, match="temperature"):  # even where nothing counts
            stats_reference(x, y, temperature=temp, mask=np.zeros(y.shape, bool), nan_marks=True)
    with pytest.raises(ValueError, match="temperature"):
        stats_reference(x, y, temperature=np.ones(3))
    with pytest.raises(ValueError, match="needs targets"):
        stats_reference(x, None, outputs=("log_prob",))
    with pytest.raises(ValueError, match="needs targets"):
        stats_reference(x, None, outputs=("correct",))
    with pytest.raises(ValueError, match="ids"):
        stats_reference(x, y, outputs=("ids_log_prob",))
    with pytest.raises(ValueError, match="ids"):
        stats_reference(x, y, outputs=("entropy",), ids=ids)
    with pytest.raises(ValueError, match="differentiable"):
        stats_vjp_reference(x, y, {"argmax": np.zeros(y.shape)})


# --------------------------------------------------------------------------- layouts

def test_layout_permutation_invariance():
    x, y, rng = _data(17)
    ids = rng.integers(0, 5, y.shape + (2,))
    temp = rng.choice([0.5, 1.5], y.shape)
    cts = _cts(rng, y.shape, 2)
    kw = dict(shift=1, logit_softcap=3.0)
    base = stats_reference(x, y, outputs=OUTPUTS, ids=ids, temperature=temp, **kw)
    gbase = stats_vjp_reference(x, y, cts, ids=ids, temperature=temp, **kw)
    for layout in ("NCT", "TNC", "CTN", "TCN"):
        perm = ["NTC".index(a) for a in layout]
        tp = [p for p in perm if p != 2]
        got = stats_reference(np.transpose(x, perm), np.transpose(y, tp), outputs=OUTPUTS, layout=layout,
                              ids=np.transpose(ids, tp + [2]), temperature=np.transpose(temp, tp), **kw)
        for k in OUTPUTS:
            want = np.transpose(base[k], tp + [2]) if k == "ids_log_prob" else np.transpose(base[k], tp)
            np.testing.assert_array_equal(got[k], want)
        g = stats_vjp_reference(np.transpose(x, perm), np.transpose(y, tp),
                                {k: np.transpose(v, tp + [2] if v.ndim == 3 else tp) for k, v in cts.items()},
                                layout=layout, ids=np.transpose(ids, tp + [2]), temperature=np.transpose(temp, tp),
                                **kw)
        np.testing.assert_array_equal(g, np.transpose(gbase, perm))


# --------------------------------------------------------------------------- the fused layer

@pytest.mark.parametrize("weight_layout,bias,layout", [("CH", False, "NTH"), ("HC", True, "NTH"),
                                                       ("CH", True, "TNH")])
def test_linear_reference(weight_layout, bias, layout):
    rng = np.random.default_rng(18)
    N, T, H, C = 2, 3, 3, 4
    h = rng.normal(size=(N, T, H))
    W = rng.normal(size=(C, H))
    b = rng.normal(size=C) if bias else None
    y = rng.integers(0, C, (N, T))
    ids = rng.integers(0, C, (N, T, 2))
    mask = np.array([[1, 0, 1], [1, 1, 1]], bool)
    temp = rng.choice([0.5, 1.5], (N, T))
    cts = _cts(rng, (N, T), 2)
    if layout == "TNH":
        h, y, ids, mask, temp = h.transpose(1, 0, 2), y.T, ids.transpose(1, 0, 2), mask.T, temp.T
        cts = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v.T) for k, v in cts.items()}
    w = W if weight_layout == "CH" else W.T.copy()
    kw = dict(ids=ids, mask=mask, temperature=temp, logit_softcap=5.0)
    lin = dict(bias=b, layout=layout, weight_layout=weight_layout)
    z = h @ W.T + (0.0 if b is None else b)
    L = layout.replace("H", "C")
    got = linear_stats_reference(h, w, y, outputs=OUTPUTS, **lin, **kw)
    want = stats_reference(z, y, outputs=OUTPUTS, layout=L, **kw)
    for k in OUTPUTS:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-14)
    dh, dw, db = linear_stats_vjp_reference(h, w, y, cts, **lin, **kw)
    assert (db is None) == (b is None)

    def f(h_, w_, b_):
        out = linear_stats_reference(h_, w_, y, outputs=("log_prob", "entropy", "lse", "ids_log_prob"),
                                     bias=b_, layout=layout, weight_layout=weight_layout, **kw)
        return math.fsum(float(np.sum(ct * out[k])) for k, ct in cts.items())

    eps = 1e-6
    params = [h, w] + ([b] if b is not None else [])
    grads = [dh, dw] + ([db] if b is not None else [])
    for which, (p, g) in enumerate(zip(params, grads)):
        fd = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            pp, pm = [q.copy() for q in params], [q.copy() for q in params]
            pp[which][i] += eps
            pm[which][i] -= eps
            pad = lambda ps: ps + [None] * (3 - len(ps))  # noqa: E731
            fd[i] = (f(*pad(pp)) - f(*pad(pm))) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=2e-7)
    # garbage hidden states at a token that does not count reach nothing
    hg = h.copy()
    masked = tuple(int(v) for v in np.argwhere(~mask)[0])
    hg[masked] = np.nan
    dh2, dw2, db2 = linear_stats_vjp_reference(hg, w, y, cts, **lin, **kw)
    np.testing.assert_array_equal(dh2, dh)
    np.testing.assert_allclose(dw2, dw, rtol=1e-14)
    if b is not None:
        np.testing.assert_array_equal(db2, db)


# --------------------------------------------------------------------------- the cases themselves

def test_cases_build_and_run():
    layouts = set()
    for spec in STATS_CASES + LINEAR_STATS_CASES:
        dtypes = spec.get("dtypes", DTYPES)
        for dt in dtypes:
            case = make_stats_inputs(spec, dt)
            again = make_stats_inputs(spec, dt)
            for k, v in case.arrays.items():  # deterministic, and the floats already in their dtype
                np.testing.assert_array_equal(v, again.arrays[k])
                if k in ("logits", "hidden", "weight", "bias"):
                    np.testing.assert_array_equal(round_to(v, dt), v)
            assert set(case.cotangents) <= set(case.options["outputs"]) & set(DIFFERENTIABLE)
            if dt != dtypes[0]:
                continue
            layouts.add(case.layout)
            kw = case.kwargs()
            a = case.arrays
            if case.linear:
                run = lambda **extra: linear_stats_reference(a["hidden"], a["weight"], case.targets,  # noqa: E731
                                                             **case.linear_kwargs(), **kw, **extra)
                vjp = lambda **extra: linear_stats_vjp_reference(  # noqa: E731
                    a["hidden"], a["weight"], case.targets, case.cotangents, **case.linear_kwargs(), **kw, **extra)[0]
            else:
                run = lambda **extra: stats_reference(a["logits"], case.targets, layout=case.layout,  # noqa: E731
                                                      **kw, **extra)
                vjp = lambda **extra: stats_vjp_reference(a["logits"], case.targets, case.cotangents,  # noqa: E731
                                                          layout=case.layout, **kw, **extra)
            if case.bad:
                with pytest.raises(ValueError):
                    run()
                out = run(nan_marks=True)
                assert any(np.isnan(v).any() for v in out.values() if v.dtype.kind == "f"), case.name
            else:
                out = run()
                for k in case.options["outputs"]:
                    if out[k].dtype.kind == "f":
                        assert not np.isnan(out[k]).any(), (case.name, k)
                for k, ct in case.cotangents.items():
                    assert ct.shape == out[k].shape, (case.name, k)
                assert np.all(np.isfinite(vjp())), case.name
    assert {"NTC", "NCT", "TNC", "NC", "C", "NTH", "TNH", "NH", "H"} <= layouts
