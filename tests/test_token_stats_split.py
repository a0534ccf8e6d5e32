"""token_stats and linear_token_stats with the classes split across workers (API.md 11.4, 9.2).

This file is also the script of its workers (tests/helpers/spawn.py), each launch under one
timeout so that a hung collective fails the test:

* PyTorch: ONE launch of 3 gloo processes: C = 7 over 2 ranks (a subgroup, slices [3, 4]) and
  over 3 ranks (slices [2, 1, 4]); every output on every rank against the single-process values
  and the float64 formula; argmax over global indices (the maximum on a later rank, ties across
  ranks to the lowest global index); each rank's gradient its slice of the single-process one
  (the fused layer: d hidden equal on every rank, d weight and d bias its slices); the
  collectives of one call counted and sized: O(tokens x (k + a few)) bytes, the same at C = 12 and
  C = 50,257.
* JAX: one process with 4 host devices: shard_map with class_parallel="tp" (outputs typed
  replicated: out_specs P()), the padded-vocabulary rule (num_classes < padded width), the fused
  layer, and plain jax.jit over a class-sharded NamedSharding whose compiled program gathers no
  logits.
"""

import json
import os
import re

import numpy as np
import pytest

from helpers.spawn import main, spawn, torch_launch
from helpers.support import assert_close, require_or_skip

TIMEOUT = 120
TOL = 1e-9
N, T, C, H, K = 2, 4, 7, 3, 2
SPLITS = {"w2": (3, 4), "w3": (2, 1, 4)}
ALL = ("log_prob", "entropy", "lse", "argmax", "correct", "ids_log_prob")
DIFF = ("log_prob", "entropy", "lse", "ids_log_prob")
FIELDS = ALL + ("counted",)
BYTES = {"small": (12, (5, 1, 6)), "big": (50257, (25086, 1, 25170))}
ARGMAX_ROW0 = [6, 2, 3, 1]   # the planted maxima of row 0 (see problem())


# ================================================================== the problem and its reference

def problem(C=C, seed=0):
    """Logits (N, T, C) with planted maxima in row 0: t=0 at class 6 (the last rank's), t=1 a tie of
    classes 2 and 5, t=2 a tie of 3 and 6, t=3 a tie of 1 and 4 (across ranks in both splits but
    t=2 of "w3"); targets (one ignored, some at the argmax), mask, per-token temperatures, ids,
    random cotangents; hidden states, weight and bias of the fused layer."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, T, C))
    if C == 7:
        for t, cls in enumerate([(6,), (2, 5), (3, 6), (1, 4)]):
            z[0, t, list(cls)] = 3.0
    y = rng.integers(0, C, (N, T))
    y[0, :] = ARGMAX_ROW0 if C == 7 else y[0, :]
    y[1, 1] = -100
    mask = np.ones((N, T), bool)
    mask[1, 3] = False
    temp = rng.choice([0.5, 0.75, 1.5], size=(N, T))
    ids = rng.integers(0, C, (N, T, K))
    ids[0, 0] = [0, C - 1]
    cts = {k: rng.normal(size=(N, T)) for k in ("log_prob", "entropy", "lse")}
    cts["ids_log_prob"] = rng.normal(size=(N, T, K))
    h, W, b = rng.normal(size=(N, T, H)), rng.normal(size=(C, H)), rng.normal(size=C)
    return dict(z=z, y=y, mask=mask, temp=temp, ids=ids, cts=cts, h=h, W=W, b=b)


def ref_stats(z, y, T, ids):
    u = z / T[..., None]
    m = u.max(-1, keepdims=True)
    e = np.exp(u - m)
    ls = np.log(e.sum(-1))
    logp = u - m - ls[..., None]
    p = np.exp(logp)
    out = dict(entropy=-(p * logp).sum(-1), lse=m[..., 0] + ls, argmax=z.argmax(-1),
               log_prob=np.take_along_axis(logp, np.clip(y, 0, None)[..., None], -1)[..., 0],
               ids_log_prob=np.take_along_axis(logp, ids, -1))
    out["correct"] = out["argmax"] == y
    return out


# ================================================================================ PyTorch

@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    require_or_skip("torch")
    return spawn(__file__, "torch", 3, str(tmp_path_factory.mktemp("ts_torch")), TIMEOUT)


def _of(res, key):
    return {k: (None if v is None else np.asarray(v)) for k, v in res[key].items()}


@pytest.mark.parametrize("tag", ["w2", "w3"])
def test_torch_every_output_equal_on_every_rank(torch_runs, tag):
    p = problem()
    keep = (p["y"] != -100) & p["mask"]
    ref = ref_stats(p["z"], p["y"], p["temp"], p["ids"])
    ranks = [r for r in torch_runs if r["rank"] < len(SPLITS[tag])]
    assert len(ranks) == len(SPLITS[tag])
    for r in ranks:
        got, full = _of(r, f"{tag}/got"), _of(r, f"{tag}/full")
        assert np.array_equal(got["counted"], keep) and np.array_equal(full["counted"], keep)
        for k in ALL:
            assert_close(got[k].astype(float), full[k].astype(float), tol=TOL, what=f"rank {r['rank']} {k} vs 1 proc")
            kk = keep if got[k].ndim == 2 else keep[..., None]
            if k == "argmax":
                want = np.where(keep, ref[k], -1)
            elif k == "correct":
                want = ref[k] & keep
            else:
                want = np.where(kk, ref[k], 0.0)
            assert_close(got[k].astype(float), want.astype(float), tol=TOL, what=f"rank {r['rank']} {k} vs float64")
        # global indices: the maximum on the last rank, ties across ranks to the lowest index
        assert got["argmax"][0].tolist() == ARGMAX_ROW0, got["argmax"][0]
        assert got["correct"][0].all()


@pytest.mark.parametrize("tag", ["w2", "w3"])
def test_torch_gradient_is_the_slice_of_the_single_process_one(torch_runs, tag):
    sizes = SPLITS[tag]
    for r in torch_runs:
        if r["rank"] >= len(sizes):
            continue
        lo, hi = sum(sizes[:r["rank"]]), sum(sizes[:r["rank"] + 1])
        g, gf = np.asarray(r[f"{tag}/grad"]), np.asarray(r[f"{tag}/grad_full"])
        assert g.shape == (N, T, hi - lo)
        assert np.abs(gf).max() > 1e-3
        assert_close(g, gf[..., lo:hi], tol=TOL, what=f"rank {r['rank']} d logits slice")


@pytest.mark.parametrize("tag", ["w2", "w3"])
@pytest.mark.parametrize("wl", ["CH", "HC"])
def test_torch_fused_layer_weight_sharded(torch_runs, tag, wl):
    sizes = SPLITS[tag]
    p = problem()
    keep = (p["y"] != -100) & p["mask"]
    ref = ref_stats(p["h"] @ p["W"].T + p["b"], p["y"], p["temp"], p["ids"])
    for r in torch_runs:
        if r["rank"] >= len(sizes):
            continue
        lo, hi = sum(sizes[:r["rank"]]), sum(sizes[:r["rank"] + 1])
        got, full = _of(r, f"{tag}/lin{wl}/got"), _of(r, f"{tag}/lin{wl}/full")
        assert np.array_equal(got["counted"], keep)
        for k in ALL:
            assert_close(got[k].astype(float), full[k].astype(float), tol=TOL, what=f"fused rank {r['rank']} {k}")
        assert_close(got["entropy"], np.where(keep, ref["entropy"], 0), tol=TOL, what="fused entropy vs float64")
        dh, dw, db = (np.asarray(r[f"{tag}/lin{wl}/{n}"]) for n in ("dh", "dw", "db"))
        dhf, dwf, dbf = (np.asarray(r[f"{tag}/lin{wl}/{n}_full"]) for n in ("dh", "dw", "db"))
        assert_close(dh, dhf, tol=TOL, what=f"rank {r['rank']} d hidden (whole, on every rank)")
        wsl = (slice(lo, hi),) if wl == "CH" else (slice(None), slice(lo, hi))
        assert_close(dw, dwf[wsl], tol=TOL, what=f"rank {r['rank']} d weight slice")
        assert_close(db, dbf[lo:hi], tol=TOL, what=f"rank {r['rank']} d bias slice")


@pytest.mark.parametrize("fn", ["token_stats", "linear_token_stats"])
def test_torch_collectives_are_token_sized(torch_runs, fn):
    """Bytes sent per call are O(tokens x (k + a few)): the same at C = 12 and C = 50,257, at most
    (k + 6) float64 per token in all-reduces, and the small all-gather of the eager checks."""
    tokens = N * T
    for r in torch_runs:
        f = r["facts"]
        small, big = f[f"{fn}/small"], f[f"{fn}/big"]
        assert small == big, (r["rank"], small, big)
        reduce_bytes = sum(b for n, b in small if n == "all_reduce")
        gather_bytes = sum(b for n, b in small if n == "all_gather")
        assert 0 < reduce_bytes <= (K + 6) * 8 * tokens, (r["rank"], small)
        assert gather_bytes <= 64 * 8, (r["rank"], small)
        assert f[f"{fn}/big_ok"], r["rank"]


def _torch_worker(rank, world, init, out):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import xseqloss as xsl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    WORLD = dist.group.WORLD
    g2 = dist.new_group([0, 1])
    res, facts = {"rank": rank}, {}

    def host(s):
        return {k: None if getattr(s, k) is None else getattr(s, k).detach().double().tolist()
                if getattr(s, k).is_floating_point() else getattr(s, k).tolist() for k in FIELDS}

    def backward(s, cts, leaves):
        total = sum((getattr(s, k) * torch.tensor(v)).sum() for k, v in cts.items())
        return torch.autograd.grad(total, leaves)

    p = problem()
    side = dict(mask=torch.tensor(p["mask"]), temperature=torch.tensor(p["temp"]), ids=torch.tensor(p["ids"]),
                outputs=ALL)
    y = torch.tensor(p["y"])
    for tag, group in (("w2", g2), ("w3", WORLD)):
        sizes = SPLITS[tag]
        if rank >= len(sizes):
            continue
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        zf = torch.tensor(p["z"], requires_grad=True)
        full = xsl.token_stats(zf, y, **side)
        (gf,) = backward(full, p["cts"], [zf])
        zl = torch.tensor(p["z"][..., lo:hi], requires_grad=True)
        got = xsl.token_stats(zl, y, class_parallel=group, **side)
        (g,) = backward(got, p["cts"], [zl])
        res[f"{tag}/full"], res[f"{tag}/got"] = host(full), host(got)
        res[f"{tag}/grad"], res[f"{tag}/grad_full"] = g.tolist(), gf.tolist()
        for wl in ("CH", "HC"):
            Wl = p["W"] if wl == "CH" else p["W"].T
            wsl = (slice(lo, hi),) if wl == "CH" else (slice(None), slice(lo, hi))
            hf, wf, bf = (torch.tensor(a, requires_grad=True) for a in (p["h"], Wl, p["b"]))
            full = xsl.linear_token_stats(hf, wf, y, bias=bf, weight_layout=wl, chunk_size=3, **side)
            dfull = backward(full, p["cts"], [hf, wf, bf])
            hl, wloc, bl = (torch.tensor(a, requires_grad=True) for a in (p["h"], Wl[wsl], p["b"][lo:hi]))
            got = xsl.linear_token_stats(hl, wloc, y, bias=bl, weight_layout=wl, chunk_size=3, class_parallel=group,
                                         **side)
            d = backward(got, p["cts"], [hl, wloc, bl])
            key = f"{tag}/lin{wl}"
            res[f"{key}/full"], res[f"{key}/got"] = host(full), host(got)
            for n, a, af in zip(("dh", "dw", "db"), d, dfull):
                res[f"{key}/{n}"], res[f"{key}/{n}_full"] = a.tolist(), af.tolist()
    dist.barrier()

    # ---- the collectives of one call, counted and sized (validate=True: the eager checks included)
    log = []
    real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather")}

    def counting(n):
        def f(t, *a, **k):
            x = a[0] if n == "all_gather" else t
            log.append((n, x.numel() * x.element_size()))
            return real[n](t, *a, **k)
        return f
    for n in real:
        setattr(dist, n, counting(n))
    try:
        for key, (Cb, sizes) in BYTES.items():
            q = problem(C=Cb, seed=3)
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            yq = torch.tensor(q["y"])
            sq = dict(temperature=torch.tensor(q["temp"]), ids=torch.tensor(q["ids"]), outputs=ALL,
                      mask=torch.tensor(q["mask"]))
            log.clear()
            s = xsl.token_stats(torch.tensor(q["z"][..., lo:hi]), yq, class_parallel=WORLD, **sq)
            facts[f"token_stats/{key}"] = list(log)
            ok = s.argmax.tolist() == np.where((q["y"] != -100) & q["mask"], q["z"].argmax(-1), -1).tolist()
            log.clear()
            s = xsl.linear_token_stats(torch.tensor(q["h"]), torch.tensor(q["W"][lo:hi]), yq,
                                       bias=torch.tensor(q["b"][lo:hi]), chunk_size=8, class_parallel=WORLD, **sq)
            facts[f"linear_token_stats/{key}"] = list(log)
            zq = q["h"] @ q["W"].T + q["b"]
            ok2 = s.argmax.tolist() == np.where((q["y"] != -100) & q["mask"], zq.argmax(-1), -1).tolist()
            facts[f"token_stats/{key}_ok"] = facts[f"linear_token_stats/{key}_ok"] = bool(ok and ok2)
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    dist.barrier()
    with open(os.path.join(out, f"{rank}.json"), "w") as fh:
        json.dump(dict(res, facts=facts), fh)
    dist.destroy_process_group()


# ==================================================================================== JAX

@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    require_or_skip("jax")
    return spawn(__file__, "jax", 1, str(tmp_path_factory.mktemp("ts_jax")), TIMEOUT)[0]


def test_jax_shard_map_outputs_replicated_and_gradient(jax_run):
    """shard_map over 4 devices (C = 8, 2 classes each), out_specs P() for every output: equal to the
    single-device values and the float64 formula; argmax over global indices; the gradient (the
    shards put together) equal to the single-device one."""
    assert jax_run["errors"] == {}, jax_run["errors"]
    for name, (got, want) in jax_run["pairs"].items():
        if name.startswith("shard_map/"):
            assert_close(np.asarray(got, float), np.asarray(want, float), tol=TOL, what=name)
    assert jax_run["facts"]["argmax_row0"] == [7, 2, 3, 1], jax_run["facts"]["argmax_row0"]
    assert sum(n.startswith("shard_map/") for n in jax_run["pairs"]) >= 2 * len(ALL)


def test_jax_padded_vocabulary(jax_run):
    """C = 7 padded to 8 over 4 devices, junk (100.0) in the padding column, num_classes=7: the
    unpadded values, argmax never the padding, the padding's gradient exactly 0."""
    for name, (got, want) in jax_run["pairs"].items():
        if name.startswith("padded/"):
            assert_close(np.asarray(got, float), np.asarray(want, float), tol=TOL, what=name)
    assert sum(n.startswith("padded/") for n in jax_run["pairs"]) >= len(ALL) + 1
    assert jax_run["facts"]["padding_gradient_zero"]


def test_jax_shard_map_fused_layer(jax_run):
    for name, (got, want) in jax_run["pairs"].items():
        if name.startswith("linear/"):
            assert_close(np.asarray(got, float), np.asarray(want, float), tol=TOL, what=name)
    assert {"linear/dh", "linear/dw", "linear/db", "linear/entropy"} <= set(jax_run["pairs"])


def test_jax_jit_named_sharding_never_gathers_the_logits(jax_run):
    """Plain jax.jit over logits sharded along C by a NamedSharding, no option: right values and
    gradient, and no all-gather in the compiled program as large as the logits (token-sized ones
    are allowed)."""
    for name, (got, want) in jax_run["pairs"].items():
        if name.startswith("jit/"):
            assert_close(np.asarray(got, float), np.asarray(want, float), tol=1e-6, what=name)
    f = jax_run["facts"]
    assert f["jit_grad_sharded"], f
    big = [g for g in f["jit_all_gathers"] if g[1] >= f["jit_C"]]
    assert not big, big


def _jax_worker(out):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import xseqloss as xsl

    mesh = Mesh(np.array(jax.devices()), ("tp",))
    pairs, facts, errors = {}, {}, {}

    def record(name, got, want):
        pairs[name] = (np.asarray(got).astype(float).tolist(), np.asarray(want).astype(float).tolist())

    def guarded(name, f):
        try:
            f()
        except Exception as exc:  # noqa: BLE001 - recorded, asserted on in the parent
            import traceback
            errors[name] = f"{type(exc).__name__}: {exc}"[:2000] + traceback.format_exc()[-2000:]

    Cj = 8
    p = problem(C=Cj, seed=5)
    z = p["z"]
    for t, cls in enumerate([(7,), (2, 5), (3, 6), (1, 4)]):   # 2 classes a device: ties across devices
        z[0, t, list(cls)] = 3.0
    y = p["y"]
    y[0] = [7, 2, 3, 1]
    zspec = P(None, None, "tp")
    cts = {k: jnp.asarray(v) for k, v in p["cts"].items()}
    args = (jnp.asarray(y), jnp.asarray(p["mask"]), jnp.asarray(p["temp"]), jnp.asarray(p["ids"]))

    def stats(zv, yv, mv, tv, iv, **kw):
        return xsl.token_stats(zv, yv, mask=mv, temperature=tv, ids=iv, outputs=ALL, **kw)

    def pullback(fn, zz):
        def f(v):
            s = fn(v)
            return tuple(getattr(s, k) for k in DIFF), s
        outs, pull, s = jax.vjp(f, zz, has_aux=True)
        return s, pull(tuple(cts[k] for k in DIFF))[0]

    def shard_map_case():
        sm = jax.shard_map(lambda zv, yv, mv, tv, iv: stats(zv, yv, mv, tv, iv, class_parallel="tp"), mesh=mesh,
                           in_specs=(zspec, P(), P(), P(), P()), out_specs=P())
        s, g = pullback(jax.jit(lambda v: sm(v, *args)), jnp.asarray(z))
        sf, gf = pullback(lambda v: stats(v, *args), jnp.asarray(z))
        ref = ref_stats(z, y, p["temp"], p["ids"])
        keep = (y != -100) & p["mask"]
        for k in ALL:
            record(f"shard_map/{k}", getattr(s, k), getattr(sf, k))
            want = ref[k]
            if k == "argmax":
                want = np.where(keep, want, -1)
            elif k == "correct":
                want = want & keep
            else:
                want = np.where(keep if want.ndim == 2 else keep[..., None], want, 0.0)
            record(f"shard_map/{k}/float64", getattr(s, k), want)
        record("shard_map/counted", s.counted, keep)
        record("shard_map/grad", g, gf)
        facts["argmax_row0"] = np.asarray(s.argmax)[0].tolist()
    guarded("shard_map", shard_map_case)

    def padded_case():
        Cr = 7
        zr = z[..., :Cr].copy()
        zr[0, 0, 6] = 3.0
        yr = np.where(y >= Cr, 6, y)
        ir = np.minimum(p["ids"], Cr - 1)
        a = (jnp.asarray(yr), args[1], args[2], jnp.asarray(ir))
        zp = np.concatenate([zr, np.full((N, T, 1), 100.0)], -1)
        sm = jax.shard_map(lambda zv, yv, mv, tv, iv: stats(zv, yv, mv, tv, iv, class_parallel="tp", num_classes=Cr),
                           mesh=mesh, in_specs=(zspec, P(), P(), P(), P()), out_specs=P())
        s, g = pullback(jax.jit(lambda v: sm(v, *a)), jnp.asarray(zp))
        sf, gf = pullback(lambda v: stats(v, *a), jnp.asarray(zr))
        for k in ALL + ("counted",):
            record(f"padded/{k}", getattr(s, k), getattr(sf, k))
        record("padded/grad", np.asarray(g)[..., :Cr], gf)
        facts["padding_gradient_zero"] = bool((np.asarray(g)[..., Cr:] == 0).all())
    guarded("padded", padded_case)

    def linear_case():
        h, W, b = (jnp.asarray(p[k]) for k in ("h", "W", "b"))

        def lin(hh, ww, bb, **kw):
            return xsl.linear_token_stats(hh, ww, args[0], bias=bb, mask=args[1], temperature=args[2], ids=args[3],
                                          outputs=ALL, chunk_size=3, **kw)
        sm = jax.shard_map(lambda hh, ww, bb: lin(hh, ww, bb, class_parallel="tp"), mesh=mesh,
                           in_specs=(P(), P("tp"), P("tp")), out_specs=P())

        def vjp3(fn):
            def f(hh, ww, bb):
                s = fn(hh, ww, bb)
                return tuple(getattr(s, k) for k in DIFF), s
            outs, pull, s = jax.vjp(f, h, W, b, has_aux=True)
            return s, pull(tuple(cts[k] for k in DIFF))
        s, (dh, dw, db) = vjp3(jax.jit(sm))
        sf, (dhf, dwf, dbf) = vjp3(lin)
        for k in ALL:
            record(f"linear/{k}", getattr(s, k), getattr(sf, k))
        record("linear/dh", dh, dhf)
        record("linear/dw", dw, dwf)
        record("linear/db", db, dbf)
    guarded("linear", linear_case)

    def jit_case():
        Nb, Tb, Cb = 2, 8, 4096
        rng = np.random.default_rng(6)
        zb = rng.normal(size=(Nb, Tb, Cb))
        yb = jnp.asarray(rng.integers(0, Cb, (Nb, Tb)))
        ib = jnp.asarray(rng.integers(0, Cb, (Nb, Tb, K)))
        sh = NamedSharding(mesh, zspec)

        def f(v):
            s = xsl.token_stats(v, yb, ids=ib, temperature=0.7, outputs=ALL)
            tot = sum(jnp.sum(getattr(s, k)) for k in DIFF)
            return tot, s
        zs = jax.device_put(jnp.asarray(zb), sh)
        fn = jax.jit(jax.value_and_grad(f, has_aux=True))
        (tot, s), g = fn(zs)
        (tot_f, sf), gf = jax.value_and_grad(f, has_aux=True)(jnp.asarray(zb))
        for k in ALL:
            record(f"jit/{k}", getattr(s, k), getattr(sf, k))
        record("jit/grad", g, gf)
        facts["jit_grad_sharded"] = str(g.sharding.spec) == str(zspec)
        hlo = fn.lower(zs).compile().as_text()
        gathers = []
        for ln in hlo.splitlines():
            if "all-gather(" in ln or "all-gather-start(" in ln:
                lhs = ln.split("=", 1)[1] if "=" in ln else ln
                dims = [int(d) for shp in re.findall(r"\[([\d,]*)\]", lhs.split("all-gather")[0])
                        for d in shp.split(",") if d]
                gathers.append([ln.strip()[:200], max(dims, default=0), int(np.prod(dims or [0]))])
        facts["jit_all_gathers"] = gathers
        facts["jit_C"] = Cb
    guarded("jit", jit_case)

    with open(os.path.join(out, "0.json"), "w") as fh:
        json.dump(dict(rank=0, pairs=pairs, facts=facts, errors=errors), fh)


if __name__ == "__main__":
    main(__file__, {"torch": lambda n, init, out: torch_launch(__file__, _torch_worker, n, init, out),
                    "torch-rank": _torch_worker,
                    "jax": lambda n, init, out: _jax_worker(out)})
