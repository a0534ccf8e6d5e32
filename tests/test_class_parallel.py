"""Classes split across workers (API.md 9.2, xseqloss/class_parallel.py).

Every case compares the class-parallel loss (on every rank) and each rank's gradient with the
single-process float64 loss and its slice of the single-process gradient. The multi-worker cases run
in subprocesses (this file is their script), each under one timeout, so a hung collective fails
the test instead of hanging it:

* PyTorch: ONE launch of 3 gloo processes: every option over 3 ranks with uneven slices (one rank
  holding a single class) and over 2 ranks (a subgroup), C = 50,257 over 2 and 3 ranks, the fused
  layer with the weight sharded, a DTensor sharded along C (no option) against PyTorch's own
  ``loss_parallel()``, the collectives of one call counted and sized, and the faults (workers that
  disagree, a bad value in one rank's slice): an error on every rank, never a hang;
* JAX: one process with 4 host devices: ``shard_map`` with ``class_parallel=<axis>`` (loss and
  fused layer), plain ``jax.jit`` over a class-sharded NamedSharding whose compiled program never
  gathers the logits; uneven vocabularies (C = 50,257 over 2 and 3 devices) padded to divide
  evenly, ``num_classes`` marking the padding.
"""

import json
import os

import numpy as np
import pytest

from helpers.spawn import check_pairs, error_of, main, spawn, torch_launch
from helpers.support import require_or_skip

TIMEOUT = 150
TOL = 1e-9        # float64 against float64: only the order of the additions differs
N, T, H = 2, 5, 4
SIZES3 = (5, 1, 6)   # C = 12 over 3 ranks, one holding a single class
SIZES2 = (7, 5)      # C = 12 over the subgroup of ranks 0 and 1
BIG3 = (25086, 1, 25170)  # C = 50,257
BIG2 = (25129, 25128)

# option sets: (name, options, targets) with "cw" for class weights of the right slice
OPTION_SETS = [
    ("plain", {}, "index"),
    ("smooth_uniform", dict(label_smoothing=0.1), "index"),
    ("smooth_others", dict(label_smoothing=0.2, smoothing="others"), "index"),
    ("class_weights", dict(class_weights="cw"), "index"),
    ("cw_smooth_zloss_cap", dict(class_weights="cw", label_smoothing=0.1, z_loss=0.05, logit_softcap=3.0), "index"),
    ("zloss", dict(z_loss=1e-2), "index"),
    ("softcap", dict(logit_softcap=2.0), "index"),
    ("mask_lengths_weights", dict(mask="mask", lengths="lengths", weights="weights"), "index"),
    ("ignore_two_values", dict(ignore_index=[-100, 3]), "index"),
    ("sum", dict(reduction="sum"), "index"),
    ("none", dict(reduction="none"), "index"),
    ("per_sequence", dict(reduction="per_sequence"), "index"),
    ("sequence_mean_cw", dict(reduction="sequence_mean", class_weights="cw"), "index"),
    ("denominator_tokens_cw", dict(denominator="tokens", class_weights="cw"), "index"),
    ("denominator_positions", dict(denominator="positions", mask="mask"), "index"),
    ("normalizer", dict(normalizer=7.0), "index"),
    ("empty_nan_all_ignored", dict(empty="nan", mask="none_counted"), "index"),
    ("shift", dict(shift=1, label_smoothing=0.1), "index"),
    ("segments", dict(segment_ids="segs", reduction="segment_mean"), "index"),
    ("soft", {}, "soft"),
    ("soft_cw_smooth", dict(class_weights="cw", label_smoothing=0.1), "soft"),
    ("soft_zloss_cap", dict(z_loss=0.1, logit_softcap=4.0), "soft"),
    ("log_probs", dict(inputs="log_probs", label_smoothing=0.1), "index"),
    ("probs", dict(inputs="probs"), "index"),
    ("layout_nct", dict(layout="NCT"), "index"),
]


# ================================================================================ PyTorch


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    require_or_skip("torch")
    return spawn(__file__, "torch", 3, str(tmp_path_factory.mktemp("cp_torch")), TIMEOUT)


def _pairs(runs, prefix, ranks=(0, 1, 2)):
    return check_pairs(runs, prefix, ranks, TOL)


@pytest.mark.parametrize("world", ["3", "2", "3chunks"])
def test_torch_every_option_uneven_slices(torch_runs, world):
    """"3chunks": the fused kernel's chunks are sized by the global C, so every rank runs the same
    chunks (4 here) and their collectives pair up although the slices differ."""
    ranks = (0, 1) if world == "2" else (0, 1, 2)
    n = _pairs(torch_runs, f"w{world}/", ranks)
    assert n == len(ranks) * len(OPTION_SETS) * 2  # loss and gradient slice, every rank


def test_torch_vocabulary_of_50257_over_2_and_3_ranks(torch_runs):
    assert _pairs(torch_runs, "big3/") == 3 * 2
    assert _pairs(torch_runs, "big2/", (0, 1)) == 2 * 2


def test_torch_fused_output_layer_weight_sharded(torch_runs):
    # loss, d hidden (summed over the group), d weight and d bias slices, both weight layouts
    assert _pairs(torch_runs, "linear/") == 3 * 4 * 4


def test_torch_module_and_value_and_grad(torch_runs):
    assert _pairs(torch_runs, "api/") == 3 * 4
    assert all(r["facts"]["linear_module_keeps_group"] for r in torch_runs)


def test_torch_dtensor_needs_no_option_and_matches_loss_parallel(torch_runs):
    assert _pairs(torch_runs, "dtensor/") == 3 * 3
    for r in torch_runs:
        assert r["facts"]["dtensor_grad_is_dtensor"]


def test_torch_collectives_are_few_and_token_sized(torch_runs):
    for r in torch_runs:
        f = r["facts"]
        # validate=True, class weights: the split's and the value checks' small all_gathers, then
        # cw[y] for the denominator, the max and the stacked sums
        assert f["ops_checked"] == ["all_gather", "all_gather"] + ["all_reduce"] * 3, f["ops_checked"]
        # validate=False, plain: the split, the max and the sums
        assert f["ops_unchecked"] == ["all_gather", "all_reduce", "all_reduce"], f["ops_unchecked"]
        # the split's all_gather: 16 integers and the checksums of 9 replicated arrays (issue 27), int64
        assert f["split_gather_bytes"] == (16 + 9) * 8, f["split_gather_bytes"]
        # bytes per rank are O(tokens): the same for C = 12 and C = 50,257, at most 8 float64 per token
        assert f["bytes_small_C"] == f["bytes_big_C"]
        assert f["bytes_small_C"] <= 8 * 8 * N * T, f["bytes_small_C"]


def test_torch_faults_raise_on_every_rank_without_hanging(torch_runs):
    for r in torch_runs:
        e, rank = r["errors"], r["rank"]
        for name in ("targets_shape_differs", "options_differ", "label_beyond_global_C", "num_classes_wrong",
                     "int_logits_on_rank_1", "negative_class_weight_on_rank_2", "probs_rows_sum_off"):
            assert e[name][0] in ("XSeqLossError", "XSeqLossTypeError"), (rank, name, e[name])
        assert "token shapes differ" in e["targets_shape_differs"][1]
        assert "options" in e["options_differ"][1]
        assert "[0, 12)" in e["label_beyond_global_C"][1] and "12" in e["label_beyond_global_C"][1]
        assert "C = 12" in e["num_classes_wrong"][1]
        if rank == 1:
            assert e["int_logits_on_rank_1"][0] == "XSeqLossTypeError"
        else:
            assert "rank(s) [1]" in e["int_logits_on_rank_1"][1]
        if rank == 2:
            assert "class_weights" in e["negative_class_weight_on_rank_2"][1]
        else:
            assert "rank(s) [2]" in e["negative_class_weight_on_rank_2"][1]
        assert "sums to" in e["probs_rows_sum_off"][1]
        assert e["torch_compile"][0].endswith("XSeqLossTypeError") and "torch.compile" in e["torch_compile"][1]
        assert r["facts"]["unchecked_bad_label_is_nan"]
        assert r["facts"]["after_errors_still_in_step"]


def _torch_worker(rank, world, init, out):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import xseqloss as xsl
    from xseqloss.torch import LinearCrossEntropyLoss, SequenceCrossEntropyLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    WORLD = dist.group.WORLD
    g2 = dist.new_group([0, 1])
    pairs, facts, errors = {}, {}, {}

    def record(name, got, want):
        pairs[name] = (np.asarray(got.detach() if hasattr(got, "detach") else got).tolist(),
                       np.asarray(want.detach() if hasattr(want, "detach") else want).tolist())

    def arrays(C, seed=0):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(N, T, C)) * 2
        y = rng.integers(0, C, (N, T))
        y[0, 1] = -100
        y[1, 2] = 3
        soft = rng.random((N, T, C)) ** 3
        soft /= soft.sum(-1, keepdims=True)
        mask = rng.random((N, T)) > 0.3
        segs = np.array([[0, 0, 1, 1, -1], [2, 2, 2, 5, 5]])
        side = dict(cw=rng.random(C) + 0.25, mask=mask, lengths=np.array([5, 3]), weights=rng.random((N, T)) + 0.5,
                    none_counted=np.zeros((N, T), bool), segs=segs)
        return z, y, soft, side

    def run_case(tag, sizes, group, name, opts, kind, C):
        if rank >= len(sizes):
            return
        z, y, soft, side = arrays(C, seed=len(name))
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        o_full, o_loc = {}, {}
        for k, v in opts.items():
            if isinstance(v, str) and v in side:
                val = side[v]
                o_full[k] = torch.tensor(val)
                o_loc[k] = torch.tensor(val[lo:hi]) if v == "cw" else torch.tensor(val)
            else:
                o_full[k] = o_loc[k] = v
        k_axis = 1 if opts.get("layout") == "NCT" else 2
        zz = z
        if opts.get("inputs") == "log_probs":
            zz = z - np.log(np.exp(z).sum(-1, keepdims=True))
        elif opts.get("inputs") == "probs":
            zz = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        if k_axis == 1:
            zz = zz.transpose(0, 2, 1)
        tgt_full = torch.tensor(soft) if kind == "soft" else torch.tensor(y)
        tgt_loc = torch.tensor(soft[..., lo:hi]) if kind == "soft" else tgt_full
        zf = torch.tensor(zz, requires_grad=True)
        ref = xsl.sequence_cross_entropy(zf, tgt_full, **o_full)
        ref.sum().backward()
        sl = (slice(None), slice(lo, hi)) if k_axis == 1 else (Ellipsis, slice(lo, hi))
        zl = torch.tensor(zz[sl], requires_grad=True)
        got = xsl.sequence_cross_entropy(zl, tgt_loc, class_parallel=group, **o_loc)
        got.sum().backward()
        record(f"{tag}/{name}/loss", got, ref)
        record(f"{tag}/{name}/grad", zl.grad, zf.grad[sl])

    from xseqloss.internals import engine as _engine
    for name, opts, kind in OPTION_SETS:
        run_case("w3", SIZES3, WORLD, name, opts, kind, 12)
        if rank < 2:
            run_case("w2", SIZES2, g2, name, opts, kind, 12)
        with _engine.use("torch", chunk_elements=12):  # 12 x 3 ranks / C = 12: 3 tokens a chunk, 4 chunks
            run_case("w3chunks", SIZES3, WORLD, name, opts, kind, 12)
    run_case("big3", BIG3, WORLD, "smooth_cw", dict(label_smoothing=0.1, class_weights="cw"), "index", 50257)
    if rank < 2:
        run_case("big2", BIG2, g2, "zloss", dict(z_loss=1e-3), "index", 50257)

    # ---- the fused output layer, weight (and bias, class weights) sharded along C
    rng = np.random.default_rng(5)
    C = 12
    lo, hi = sum(SIZES3[:rank]), sum(SIZES3[:rank + 1])
    h = rng.normal(size=(N, T, H))
    W, b = rng.normal(size=(C, H)), rng.normal(size=C)
    y = torch.tensor(rng.integers(0, C, (N, T)))
    cw = rng.random(C) + 0.5
    for i, (opts, wl) in enumerate([(dict(), "CH"), (dict(label_smoothing=0.1, z_loss=0.01), "HC"),
                                     (dict(chunk_size=3, logit_softcap=2.0, class_weights="cw"), "CH"),
                                     (dict(reduction="none"), "HC")]):
        def lin(hh, ww, bb, local):
            o = dict(opts)
            if o.get("class_weights") == "cw":
                o["class_weights"] = torch.tensor(cw[lo:hi] if local else cw)
            extra = dict(class_parallel=WORLD) if local else {}
            return xsl.linear_cross_entropy(hh, ww, y, bias=bb, weight_layout=wl, **o, **extra)
        Wl = W if wl == "CH" else W.T
        hf, wf, bf = (torch.tensor(a, requires_grad=True) for a in (h, Wl, b))
        ref = lin(hf, wf, bf, False)
        (ref.sum() * 1.5).backward()
        wsl = (slice(lo, hi),) if wl == "CH" else (slice(None), slice(lo, hi))
        hl, wloc, bl = (torch.tensor(a, requires_grad=True) for a in (h, Wl[wsl], b[lo:hi]))
        got = lin(hl, wloc, bl, True)
        (got.sum() * 1.5).backward()
        record(f"linear/{i}/loss", got, ref)
        record(f"linear/{i}/dh", hl.grad, hf.grad)
        record(f"linear/{i}/dw", wloc.grad, wf.grad[wsl])
        record(f"linear/{i}/db", bl.grad, bf.grad[lo:hi])

    # ---- the torch Modules and value_and_grad
    z, yy, _, side = arrays(12, seed=9)
    yt = torch.tensor(yy)
    zf = torch.tensor(z, requires_grad=True)
    ref = SequenceCrossEntropyLoss(label_smoothing=0.1, class_weights=side["cw"])(zf, yt)
    ref.backward()
    zl = torch.tensor(z[..., lo:hi], requires_grad=True)
    mod = SequenceCrossEntropyLoss(label_smoothing=0.1, class_weights=side["cw"][lo:hi], class_parallel=WORLD,
                                   num_classes=12)
    got = mod(zl, yt)
    got.backward()
    record("api/module/loss", got, ref)
    record("api/module/grad", zl.grad, zf.grad[..., lo:hi])
    v, g = xsl.value_and_grad(torch.tensor(z[..., lo:hi]), yt, z_loss=0.1, class_parallel=WORLD)
    vr, gr = xsl.value_and_grad(torch.tensor(z), yt, z_loss=0.1)
    record("api/vg/loss", v, vr)
    record("api/vg/grad", g, gr[..., lo:hi])
    facts["linear_module_keeps_group"] = LinearCrossEntropyLoss(class_parallel=WORLD).options["class_parallel"] is WORLD

    # ---- DTensor sharded along C over the 3 ranks: no option; PyTorch's own loss_parallel
    if True:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.parallel import loss_parallel
        mesh = DeviceMesh("cpu", [0, 1, 2])
        z, yy, _, _ = arrays(11, seed=3)   # C = 11: uneven shards (4, 4 and 3)
        yt = torch.tensor(yy)
        dz = distribute_tensor(torch.tensor(z), mesh, [Shard(2)]).requires_grad_(True)
        got = xsl.sequence_cross_entropy(dz, yt, label_smoothing=0.1)
        got.backward()
        zf = torch.tensor(z, requires_grad=True)
        ref = xsl.sequence_cross_entropy(zf, yt, label_smoothing=0.1)
        ref.backward()
        record("dtensor/xsl/loss", got, ref)
        record("dtensor/xsl/grad", dz.grad.full_tensor(), zf.grad)
        facts["dtensor_grad_is_dtensor"] = type(dz.grad).__name__ == "DTensor"
        # PyTorch's own vocabulary-parallel loss (no smoothing: it supports none), classes at dim 1
        dz1 = distribute_tensor(torch.tensor(z).transpose(1, 2).contiguous(), mesh, [Shard(1)])
        with loss_parallel():
            theirs = torch.nn.functional.cross_entropy(dz1, yt, ignore_index=-100)
        ours = xsl.sequence_cross_entropy(dz1, yt, layout="NCT")
        record("dtensor/loss_parallel/loss", ours, theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs)
    dist.barrier()

    # ---- the collectives of one call, counted and sized
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
        for C_, sizes, key in ((12, SIZES3, "small_C"), (50257, BIG3, "big_C")):
            z, yy, _, side = arrays(C_, seed=1)
            lo_, hi_ = sum(sizes[:rank]), sum(sizes[:rank + 1])
            log.clear()
            xsl.sequence_cross_entropy(torch.tensor(z[..., lo_:hi_]), torch.tensor(yy), label_smoothing=0.1,
                                       class_weights=torch.tensor(side["cw"][lo_:hi_]), class_parallel=WORLD)
            if key == "small_C":
                facts["ops_checked"] = [n for n, _ in log]
                facts["split_gather_bytes"] = log[0][1]
            facts[f"bytes_{key}"] = sum(b for n, b in log if n == "all_reduce")
        log.clear()
        xsl.sequence_cross_entropy(torch.tensor(z[..., lo_:hi_]), torch.tensor(yy), class_parallel=WORLD,
                                   validate=False)
        facts["ops_unchecked"] = [n for n, _ in log]
    finally:
        for n, f in real.items():
            setattr(dist, n, f)

    # ---- faults: an error on every rank, never a hang

    z, yy, soft, side = arrays(12, seed=2)
    lo, hi = sum(SIZES3[:rank]), sum(SIZES3[:rank + 1])
    zl, yt = torch.tensor(z[..., lo:hi]), torch.tensor(yy)
    cp = dict(class_parallel=WORLD)
    errors["targets_shape_differs"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl[:, :4] if rank == 1 else zl, yt[:, :4] if rank == 1 else yt, **cp))
    errors["options_differ"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl, yt, label_smoothing=0.1 if rank == 0 else 0.0, **cp))
    bad = yt.clone()
    bad[1, 4] = 12
    errors["label_beyond_global_C"] = error_of(lambda: xsl.sequence_cross_entropy(zl, bad, **cp))
    errors["num_classes_wrong"] = error_of(lambda: xsl.sequence_cross_entropy(zl, yt, num_classes=13, **cp))
    errors["int_logits_on_rank_1"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl.long() if rank == 1 else zl, yt, **cp))
    cwl = torch.tensor(side["cw"][lo:hi])
    if rank == 2:
        cwl[3] = -1.0
    errors["negative_class_weight_on_rank_2"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl, yt, class_weights=cwl, **cp))
    p = torch.softmax(torch.tensor(z), -1)
    p[0, 0] *= 1.1  # this row sums to 1.1: only the sum over all ranks shows it
    errors["probs_rows_sum_off"] = error_of(lambda: xsl.sequence_cross_entropy(
        p[..., lo:hi], yt, inputs="probs", **cp))
    errors["torch_compile"] = error_of(lambda: torch.compile(
        lambda a: xsl.sequence_cross_entropy(a, yt, **cp), backend="eager", fullgraph=True)(zl))
    v = xsl.sequence_cross_entropy(zl, bad, reduction="none", validate=False, **cp)
    facts["unchecked_bad_label_is_nan"] = bool(torch.isnan(v[1, 4])) and bool(torch.isfinite(v[0, 0]))
    ok = xsl.sequence_cross_entropy(zl, yt, **cp)
    ref = xsl.sequence_cross_entropy(torch.tensor(z), yt)
    facts["after_errors_still_in_step"] = bool(abs(float(ok) - float(ref)) < 1e-9)

    dist.barrier()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, pairs=pairs, facts=facts, errors=errors), f)
    dist.destroy_process_group()


# ==================================================================================== JAX


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    require_or_skip("jax")
    return spawn(__file__, "jax", 1, str(tmp_path_factory.mktemp("cp_jax")), TIMEOUT)[0]


def test_jax_shard_map_every_option(jax_run):
    assert _pairs([jax_run], "shard_map/", (0,)) >= 2 * 16


def test_jax_uneven_vocabulary_padded_over_2_3_and_4_devices(jax_run):
    # C = 50,257 over 2 and 3 devices, C = 10 over 4 (one device holding a single real class), C = 5
    # over 4 (one device holding no real class: JAX slices are even, so this is its empty slice)
    assert _pairs([jax_run], "shard_map_padded/", (0,)) == 4 * 2 * 2
    assert jax_run["facts"]["padding_gradient_is_zero"] == [True] * 8


def test_jax_shard_map_fused_output_layer(jax_run):
    assert _pairs([jax_run], "shard_map_linear/", (0,)) == 3 * 4


def test_jax_jit_named_sharding_never_gathers_the_logits(jax_run):
    assert _pairs([jax_run], "jit/", (0,)) == 2
    f = jax_run["facts"]
    assert f["jit_grad_sharded"]
    # why JAX has no uneven slices (docs/distributed.md): its sharded arrays must divide evenly
    assert f["uneven_device_put"] == "IndivisibleError"
    assert f["jit_all_gathers"] == [], f["jit_all_gathers"]
    assert f["jit_all_reduces"] >= 1
    # no buffer on one device holds the (N, T, C) logits: the largest is one device's slice
    assert f["jit_temp_bytes"] < f["logits_bytes"], (f["jit_temp_bytes"], f["logits_bytes"])


def test_jax_errors(jax_run):
    e = jax_run["errors"]
    assert e["outside_shard_map"][0] == "XSeqLossError" and "inside shard_map" in e["outside_shard_map"][1]
    assert e["num_classes_wrong"][0] == "XSeqLossError" and "valid range [1, 16]" in e["num_classes_wrong"][1]
    assert e["torch_group_on_jax"][0] == "XSeqLossTypeError"
    assert e["concrete_bad_label"][0] == "XSeqLossError" and "[0, 16)" in e["concrete_bad_label"][1]
    assert jax_run["facts"]["traced_bad_label_is_nan"]


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
        pairs[name] = (np.asarray(got).tolist(), np.asarray(want).tolist())

    C = 16
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(N, T, C)) * 2)
    y = np.asarray(rng.integers(0, C, (N, T)))
    y[0, 1] = -100
    y = jnp.asarray(y)
    soft = rng.random((N, T, C)) ** 3
    soft = jnp.asarray(soft / soft.sum(-1, keepdims=True))
    cw = jnp.asarray(rng.random(C) + 0.25)
    mask = jnp.asarray(rng.random((N, T)) > 0.3)
    zspec = P(None, None, "tp")
    sets = [(n, o, k) for n, o, k in OPTION_SETS if n in (
        "plain", "smooth_uniform", "smooth_others", "class_weights", "cw_smooth_zloss_cap", "softcap", "sum",
        "none", "mask_lengths_weights", "shift", "soft", "soft_cw_smooth", "soft_zloss_cap", "log_probs",
        "probs", "denominator_tokens_cw")]
    for name, opts, kind in sets:
        o = {k: v for k, v in opts.items() if not (isinstance(v, str) and v in ("cw", "mask", "lengths", "weights"))}
        if "mask" in opts:
            o.update(mask=mask, lengths=jnp.asarray([5, 3]), weights=jnp.asarray(rng.random((N, T)) + 0.5))
        zz = z
        if opts.get("inputs") == "log_probs":
            zz = jax.nn.log_softmax(z, -1)
        elif opts.get("inputs") == "probs":
            zz = jax.nn.softmax(z, -1)
        tgt = soft if kind == "soft" else y
        use_cw = opts.get("class_weights") == "cw"

        def full(zv, o=o, tgt=tgt, use_cw=use_cw):
            return xsl.sequence_cross_entropy(zv, tgt, **o, **(dict(class_weights=cw) if use_cw else {}))

        def local(zv, tv, c, o=o, use_cw=use_cw):
            return xsl.sequence_cross_entropy(zv, tv, class_parallel="tp", **o,
                                              **(dict(class_weights=c) if use_cw else {}))
        sm = jax.shard_map(local, mesh=mesh, in_specs=(zspec, zspec if kind == "soft" else P(), P("tp")),
                           out_specs=P(None, None) if opts.get("reduction") == "none" else P())
        ref, gref = jax.value_and_grad(lambda v: full(v).sum())(zz)
        got, g = jax.jit(jax.value_and_grad(lambda v: sm(v, tgt, cw).sum()))(zz)
        record(f"shard_map/{name}/loss", got, ref)
        record(f"shard_map/{name}/grad", g, gref)

    # the fused layer inside shard_map: weight, bias and class weights sharded along C
    h = jnp.asarray(rng.normal(size=(N, T, H)))
    W, b = jnp.asarray(rng.normal(size=(C, H))), jnp.asarray(rng.normal(size=C))
    for i, opts in enumerate([dict(), dict(label_smoothing=0.1, z_loss=0.01, chunk_size=3),
                              dict(logit_softcap=2.0, class_weights=True)]):
        o = {k: v for k, v in opts.items() if k != "class_weights"}
        cwo = dict(class_weights=cw) if opts.get("class_weights") else {}

        def lf(hh, ww, bb, o=o, cwo=cwo):
            return xsl.linear_cross_entropy(hh, ww, y, bias=bb, **o, **cwo)

        def ll(hh, ww, bb, c, o=o, cwo=cwo):
            return xsl.linear_cross_entropy(hh, ww, y, bias=bb, class_parallel="tp", **o,
                                            **(dict(class_weights=c) if cwo else {}))
        sm = jax.shard_map(ll, mesh=mesh, in_specs=(P(), P("tp"), P("tp"), P("tp")), out_specs=P())
        ref, gref = jax.value_and_grad(lf, argnums=(0, 1, 2))(h, W, b)
        got, g = jax.jit(jax.value_and_grad(lambda a, w_, c: sm(a, w_, c, cw), argnums=(0, 1, 2)))(h, W, b)
        record(f"shard_map_linear/{i}/loss", got, ref)
        for part, a, r in zip(("dh", "dw", "db"), g, gref):
            record(f"shard_map_linear/{i}/{part}", a, r)

    # uneven vocabularies, padded to divide evenly: num_classes = the real C marks the padding
    # (junk logits and class weights there); C = 10 over 4 devices holds 3, 3, 3 and 1 real classes,
    # C = 5 over 4 devices 2, 2, 1 and 0 (the last device holds padding only: JAX's empty slice)
    pad_zero = []
    for Cr, nd in ((10, 4), (5, 4), (50257, 2), (50257, 3)):
        pmesh = Mesh(np.array(jax.devices()[:nd]), ("tp",))
        width = -(-Cr // nd) * nd
        zr = rng.normal(size=(N, T, Cr)) * 2
        yr = rng.integers(0, Cr, (N, T))
        yr[0, 1] = Cr - 1
        cwr = rng.random(Cr) + 0.2
        sr = rng.random((N, T, Cr)) ** 3
        sr /= sr.sum(-1, keepdims=True)

        def padded(a, v, width=width, Cr=Cr):
            return jnp.asarray(np.concatenate([a, np.full(a.shape[:-1] + (width - Cr,), v)], -1))
        for tag, o, kind in (("smooth_cw_zloss_cap", dict(label_smoothing=0.1, z_loss=0.01, logit_softcap=3.0), "index"),
                             ("soft_smooth_cw", dict(label_smoothing=0.1), "soft")):
            tgt = sr if kind == "soft" else yr
            ref, gref = jax.value_and_grad(lambda v, o=o, tgt=tgt, cwr=cwr: xsl.sequence_cross_entropy(
                v, jnp.asarray(tgt), class_weights=jnp.asarray(cwr), **o))(jnp.asarray(zr))
            tspec = zspec if kind == "soft" else P()
            sm = jax.shard_map(lambda v, tv, c, o=o, Cr=Cr: xsl.sequence_cross_entropy(
                v, tv, class_parallel="tp", num_classes=Cr, class_weights=c, **o), mesh=pmesh,
                in_specs=(zspec, tspec, P("tp")), out_specs=P())
            tv = padded(sr, 0.0) if kind == "soft" else jnp.asarray(yr)
            got, g = jax.jit(jax.value_and_grad(sm))(padded(zr, 7.0), tv, padded(cwr, 5.0))
            record(f"shard_map_padded/{Cr}x{nd}/{tag}/loss", got, ref)
            record(f"shard_map_padded/{Cr}x{nd}/{tag}/grad", g[..., :Cr], gref)
            pad_zero.append(bool((g[..., Cr:] == 0).all()))
    facts["padding_gradient_is_zero"] = pad_zero

    # plain jax.jit over logits sharded along C by a NamedSharding: no option (JAX arrays and
    # shard_map need C divisible by the devices: jax.device_put refuses 13 over 4, IndivisibleError)
    zs = jax.device_put(z, NamedSharding(mesh, zspec))
    fn = jax.jit(jax.value_and_grad(lambda v: xsl.sequence_cross_entropy(v, y, label_smoothing=0.1, z_loss=0.01)))
    got, g = fn(zs)
    ref, gref = jax.value_and_grad(lambda v: xsl.sequence_cross_entropy(v, y, label_smoothing=0.1, z_loss=0.01))(z)
    record("jit/sharded/loss", got, ref)
    record("jit/sharded/grad", g, gref)
    facts["jit_grad_sharded"] = str(g.sharding.spec) == str(zspec)
    Nb, Tb, Cb = 4, 64, 4096  # a size where gathering the logits would show in the memory analysis
    zb = jax.device_put(jnp.zeros((Nb, Tb, Cb), jnp.float32), NamedSharding(mesh, zspec))
    yb = jnp.zeros((Nb, Tb), jnp.int32)
    compiled = jax.jit(jax.value_and_grad(lambda v: xsl.sequence_cross_entropy(v, yb, label_smoothing=0.1))
                       ).lower(zb).compile()
    hlo = compiled.as_text()
    facts["jit_all_gathers"] = [ln.strip()[:160] for ln in hlo.splitlines() if "all-gather" in ln]
    facts["jit_all_reduces"] = sum(1 for ln in hlo.splitlines() if " all-reduce(" in ln)
    mem = compiled.memory_analysis()
    facts["jit_temp_bytes"] = int(mem.temp_size_in_bytes)
    facts["logits_bytes"] = Nb * Tb * Cb * 4
    try:
        jax.device_put(jnp.zeros((N, T, 13)), NamedSharding(mesh, zspec))
        facts["uneven_device_put"] = "accepted"
    except Exception as exc:  # noqa: BLE001
        facts["uneven_device_put"] = type(exc).__name__

    errors["outside_shard_map"] = error_of(lambda: xsl.sequence_cross_entropy(z, y, class_parallel="tp"))
    errors["num_classes_wrong"] = error_of(lambda: jax.shard_map(
        lambda v: xsl.sequence_cross_entropy(v, y, class_parallel="tp", num_classes=17), mesh=mesh,
        in_specs=(zspec,), out_specs=P())(z))
    errors["torch_group_on_jax"] = error_of(lambda: xsl.sequence_cross_entropy(z, y, class_parallel=object()))
    bad = y.at[1, 4].set(C)
    # labels closed over are concrete: checked (and raised) against the global C even inside shard_map
    errors["concrete_bad_label"] = error_of(lambda: jax.shard_map(
        lambda zv: xsl.sequence_cross_entropy(zv, bad, class_parallel="tp"), mesh=mesh, in_specs=(zspec,),
        out_specs=P())(z))
    v = jax.jit(jax.shard_map(lambda zv, yv: xsl.sequence_cross_entropy(zv, yv, reduction="none", class_parallel="tp"),
                              mesh=mesh, in_specs=(zspec, P()), out_specs=P(None, None)))(z, bad)
    facts["traced_bad_label_is_nan"] = bool(jnp.isnan(v[1, 4])) and bool(jnp.isfinite(v[0, 0]))

    with open(os.path.join(out, "0.json"), "w") as f:
        json.dump(dict(rank=0, pairs=pairs, facts=facts, errors=errors), f)


# =========================================================================== the docs' examples


def _doc_block(marker):
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "distributed.md")).read()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


def test_docs_torchrun_example_runs_on_two_ranks(tmp_path):
    """docs/distributed.md's tp.py, as torchrun would start it (env:// rendezvous, 2 processes)."""
    require_or_skip("torch")
    import socket
    import subprocess
    import sys
    from helpers.spawn import env
    script = tmp_path / "tp.py"
    done = "tp.py: every assertion held"
    script.write_text(_doc_block("# tp.py") + f"\nprint({done!r}, flush=True)\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(
        env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    # Each rank must run the whole example. The one failure tolerated is an abort (SIGABRT, -6) in
    # torch's gloo teardown after the script's last line, seen in ~1 of 6 runs on the code before
    # and after this change alike: "terminate called without an active exception" and nothing else.
    for p, log in zip(procs, logs):
        assert done in log, log[-4000:]
        rest = log.replace(done, "").replace("terminate called without an active exception", "").strip()
        assert p.returncode == 0 or (p.returncode == -6 and not rest), (p.returncode, log[-4000:])


def test_docs_jax_example_runs(tmp_path):
    require_or_skip("jax")
    import subprocess
    import sys
    from helpers.spawn import env
    script = tmp_path / "tp_jax.py"
    script.write_text(_doc_block("loss2 = jax.jit(lambda z: xsl.sequence_cross_entropy(z, y, label_smoothing=0.1))(zs)"))
    out = subprocess.run([sys.executable, str(script)], env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]


# ============================================================================ one process


def test_numpy_and_tensorflow_reject_class_parallel(xsl):
    z, y = np.zeros((1, 2, 3)), np.zeros((1, 2), np.int64)
    with pytest.raises(xsl.XSeqLossTypeError, match="class_parallel is for PyTorch and JAX"):
        xsl.sequence_cross_entropy(z, y, class_parallel="tp")
    with pytest.raises(xsl.XSeqLossTypeError, match="class_parallel is for PyTorch and JAX"):
        xsl.linear_cross_entropy(np.zeros((1, 2, 4)), np.zeros((3, 4)), y, class_parallel="tp")
    require_or_skip("tensorflow")
    import tensorflow as tf
    with pytest.raises(xsl.XSeqLossTypeError, match="class_parallel is for PyTorch and JAX"):
        xsl.sequence_cross_entropy(tf.zeros((1, 2, 3)), y, class_parallel="tp")


def test_torch_without_init_process_group(xsl):
    require_or_skip("torch")
    import torch
    import torch.distributed as dist
    assert not dist.is_initialized()
    with pytest.raises(xsl.XSeqLossTypeError, match="ProcessGroup"):
        xsl.sequence_cross_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), class_parallel=3)


if __name__ == "__main__":
    main(__file__, {"torch": lambda n, init, out: torch_launch(__file__, _torch_worker, n, init, out),
                    "torch-rank": _torch_worker,
                    "jax": lambda n, init, out: _jax_worker(out)})
