"""Classes split across workers (API.md 9.2), PyTorch: what the workers must agree on, and issue 27.

ONE launch of 4 gloo processes (this file is their script, under one timeout: a hung collective
fails the test instead of hanging it; helpers/spawn.py):

* ranks 0 and 1 (a subgroup): workers that disagree on the values of a replicated argument (the
  targets, a mask, weights) or on the fused layer's hidden size get an error on every rank, naming
  what differs and the ranks; workers that agree get torch's own ``F.cross_entropy`` (values and
  gradient slices);
* a worker holding 0 classes: uneven slices (5, 0, 4, 3) over the 4 ranks and (0, 7) over ranks 0
  and 1 (sequence_cross_entropy with several options, soft targets, the fused layer, token_stats,
  linear_token_stats),
  and a DTensor whose Shard(2) leaves the last rank empty;
* a DTensor on a 2 x 2 (data x tensor) mesh: Shard(0) or Replicate() on the data dimension,
  Shard(2) (the classes) on the tensor dimension.

Numbers are checked against PyTorch's ``F.cross_entropy`` on the whole float64 logits.
"""

import json
import os

import numpy as np
import pytest

from helpers.spawn import check_pairs, error_of, main, spawn, torch_launch
from helpers.support import require_or_skip

TIMEOUT = 150
TOL = 1e-9
WORLD = 4
N, T, C, H = 2, 5, 7, 3
SIZES2 = (4, 3)  # C = 7 over the subgroup of ranks 0 and 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_or_skip("torch")
    return spawn(__file__, "torch", WORLD, str(tmp_path_factory.mktemp("cp_checks")), TIMEOUT)


def _pairs(runs, prefix, ranks):
    return check_pairs(runs, prefix, ranks, TOL)


def _raised_on_both(runs, name, *needles):
    for r in runs[:2]:
        kind, msg = r["errors"][name]
        assert kind == "XSeqLossError", (r["rank"], name, kind, msg)
        for needle in needles:
            assert needle in msg, (r["rank"], name, msg)


# ================================================================= agreement (issue 27 item 7)


def test_agreeing_ranks_match_torch_cross_entropy(runs):
    # loss and gradient slice: masked + weighted, validate=False, the fused layer (loss, d hidden, d weight)
    assert _pairs(runs, "agree/", (0, 1)) == 2 * (2 + 2 + 3)
    for r in runs[:2]:
        assert r["facts"]["after_errors_still_agree"], r["rank"]


def test_differing_targets_raise_on_every_rank(runs):
    _raised_on_both(runs, "targets_differ", "targets on rank(s) [1]")
    _raised_on_both(runs, "targets_swapped", "targets on rank(s) [1]")
    _raised_on_both(runs, "targets_differ_unvalidated", "targets on rank(s) [1]")
    _raised_on_both(runs, "linear_targets_differ", "targets on rank(s) [1]")
    _raised_on_both(runs, "token_stats_targets_differ", "targets on rank(s) [1]")


def test_differing_mask_or_weights_raise_on_every_rank(runs):
    _raised_on_both(runs, "mask_differs", "mask on rank(s) [1]")
    _raised_on_both(runs, "weights_differ_by_one_ulp", "weights on rank(s) [1]")
    _raised_on_both(runs, "mask_and_lengths_differ", "mask on rank(s) [1]", "lengths on rank(s) [1]")


def test_differing_hidden_size_raises_on_every_rank(runs):
    _raised_on_both(runs, "hidden_size_differs", "H = [3, 4]")


# ===================================================== a worker holding 0 classes (issue 27 item 6)


def test_a_worker_may_hold_no_class(runs):
    # per case: 5 option sets + soft (loss and gradient), the fused layer (4), token_stats (3),
    # linear_token_stats (4)
    per_case = 6 * 2 + 4 + 3 + 4
    assert _pairs(runs, "zero/w4/", (0, 1, 2, 3)) == 4 * per_case
    assert _pairs(runs, "zero/w2_first_empty/", (0, 1)) == 2 * per_case
    assert runs[1]["facts"]["zero/w4/local_grad_shape"] == [N, T, 0]
    assert runs[0]["facts"]["zero/w2_first_empty/local_grad_shape"] == [N, T, 0]


def test_a_dtensor_shard_may_hold_no_class(runs):
    assert [r["facts"]["dtensor_local_classes"] for r in runs] == [2, 2, 1, 0]
    assert _pairs(runs, "zero/dtensor/", (0, 1, 2, 3)) == 4 * 2


def test_every_slice_empty_is_an_error_on_every_rank(runs):
    _raised_on_both(runs, "every_slice_empty", "C = 0", "[0, 0]")


# ============================================================ a 2-D data x tensor mesh (item 6)


def test_dtensor_on_a_data_by_tensor_mesh(runs):
    # Shard(0) on "dp": the sum and the mean with a global normalizer, summed over "dp";
    # Replicate() on "dp": the loss itself; loss and full gradient on every rank
    assert _pairs(runs, "mesh2d/", (0, 1, 2, 3)) == 4 * 3 * 2
    for r in runs:
        assert r["facts"]["mesh2d/sum/local_shape"] == [2, T, 4 if r["rank"] % 2 == 0 else 3]
        kind, msg = r["errors"]["classes_on_two_dims"]
        assert kind == "XSeqLossError" and "exactly one mesh dimension" in msg, (r["rank"], msg)
        kind, msg = r["errors"]["mesh_not_increasing"]
        assert kind == "XSeqLossError" and "do not increase" in msg, (r["rank"], msg)


def _agreement(rank, group, pairs, facts, errors, record):
    import torch
    import torch.nn.functional as F

    import xseqloss as xsl

    rng = np.random.default_rng(0)
    lo, hi = sum(SIZES2[:rank]), sum(SIZES2[:rank + 1])
    z = rng.normal(size=(N, T, C)) * 2
    y = rng.integers(0, C, (N, T))
    y[0, 1] = -100
    y[0, 0], y[0, 3] = 1, 5
    mask = rng.random((N, T)) > 0.3
    w = rng.random((N, T)) + 0.5
    yt, mt, wt = torch.tensor(y), torch.tensor(mask), torch.tensor(w)
    cp = dict(class_parallel=group)

    # agreeing ranks: torch's F.cross_entropy over the whole logits, weighted mean over counted tokens
    zf = torch.tensor(z, requires_grad=True)
    lt = F.cross_entropy(zf.reshape(-1, C), yt.reshape(-1), ignore_index=-100, reduction="none").reshape(N, T)
    keep = (mt & (yt != -100)).double() * wt
    ref = (lt * keep).sum() / keep.sum()
    ref.backward()
    zl = torch.tensor(z[..., lo:hi], requires_grad=True)
    got = xsl.sequence_cross_entropy(zl, yt, mask=mt, weights=wt, **cp)
    got.backward()
    record("agree/masked/loss", got, ref)
    record("agree/masked/grad", zl.grad, zf.grad[..., lo:hi])
    zf2 = torch.tensor(z, requires_grad=True)
    ref2 = F.cross_entropy(zf2.reshape(-1, C), yt.reshape(-1), ignore_index=-100)
    ref2.backward()
    zl2 = torch.tensor(z[..., lo:hi], requires_grad=True)
    got2 = xsl.sequence_cross_entropy(zl2, yt, validate=False, **cp)
    got2.backward()
    record("agree/unvalidated/loss", got2, ref2)
    record("agree/unvalidated/grad", zl2.grad, zf2.grad[..., lo:hi])
    h = rng.normal(size=(N, T, H))
    W = rng.normal(size=(C, H))
    hf, wf = torch.tensor(h, requires_grad=True), torch.tensor(W, requires_grad=True)
    ref3 = F.cross_entropy((hf @ wf.T).reshape(-1, C), yt.reshape(-1), ignore_index=-100)
    ref3.backward()
    hl, wl = torch.tensor(h, requires_grad=True), torch.tensor(W[lo:hi], requires_grad=True)
    got3 = xsl.linear_cross_entropy(hl, wl, yt, **cp)
    got3.backward()
    record("agree/linear/loss", got3, ref3)
    record("agree/linear/dh", hl.grad, hf.grad)
    record("agree/linear/dw", wl.grad, wf.grad[lo:hi])

    # disagreeing ranks: rank 1 differs, both raise (never a hang, never a silent result)
    zl = torch.tensor(z[..., lo:hi])
    other = yt.clone()
    other[1, 2] = (other[1, 2] + 1) % C
    mine = other if rank == 1 else yt
    errors["targets_differ"] = error_of(lambda: xsl.sequence_cross_entropy(zl, mine, **cp))
    errors["targets_differ_unvalidated"] = error_of(lambda: xsl.sequence_cross_entropy(zl, mine, validate=False,
                                                                                        **cp))
    swapped = yt.clone()
    swapped[0, 0], swapped[0, 3] = yt[0, 3], yt[0, 0]   # the same values, two places swapped
    errors["targets_swapped"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl, swapped if rank == 1 else yt, **cp))
    m2 = mt.clone()
    m2[1, 3] = ~m2[1, 3]
    errors["mask_differs"] = error_of(lambda: xsl.sequence_cross_entropy(zl, yt, mask=m2 if rank == 1 else mt, **cp))
    w2 = torch.tensor(w)
    w2[0, 4] = float(np.nextafter(w[0, 4], np.inf))
    errors["weights_differ_by_one_ulp"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl, yt, weights=w2 if rank == 1 else wt, **cp))
    lengths = torch.tensor([5, 3] if rank == 0 else [4, 3])
    errors["mask_and_lengths_differ"] = error_of(lambda: xsl.sequence_cross_entropy(
        zl, yt, mask=m2 if rank == 1 else mt, lengths=lengths, **cp))
    errors["linear_targets_differ"] = error_of(lambda: xsl.linear_cross_entropy(
        torch.tensor(h), torch.tensor(W[lo:hi]), mine, **cp))
    errors["token_stats_targets_differ"] = error_of(lambda: xsl.token_stats(zl, mine, **cp))
    Hr = H + rank  # hidden (N, T, H_r) and weight (C_r, H_r) agree on each rank, not across the ranks
    hr = torch.tensor(rng.normal(size=(N, T, Hr)))
    wr = torch.tensor(rng.normal(size=(hi - lo, Hr)))
    errors["hidden_size_differs"] = error_of(lambda: xsl.linear_cross_entropy(hr, wr, yt, **cp))
    again = xsl.sequence_cross_entropy(zl, yt, mask=mt, weights=wt, **cp)
    facts["after_errors_still_agree"] = bool(abs(float(again.detach()) - float(ref.detach())) < 1e-9)


def _zero_classes(rank, world_group, g2, pairs, facts, errors, record):
    """Uneven slices with one worker holding 0 classes: (5, 0, 4, 3) over the 4 ranks, (0, 7) over
    ranks 0 and 1; a DTensor whose Shard(2) over 4 ranks leaves the last one empty (C = 5)."""
    import torch
    import torch.nn.functional as F

    import xseqloss as xsl

    def case(tag, sizes, group):
        if rank >= len(sizes):
            return
        Cz = sum(sizes)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        rng = np.random.default_rng(len(tag))
        z = rng.normal(size=(N, T, Cz)) * 2
        y = rng.integers(0, Cz, (N, T))
        y[1, 1] = -100
        y[0, 2] = 5  # a class of rank 1's neighbours, near the empty slice
        cw = rng.random(Cz) + 0.5
        q = rng.random((N, T, Cz)) ** 2
        q /= q.sum(-1, keepdims=True)
        yt = torch.tensor(y)
        flat = yt.reshape(-1)
        refs = {
            "plain": (dict(), lambda a: F.cross_entropy(a.reshape(-1, Cz), flat)),
            "smooth": (dict(label_smoothing=0.1), lambda a: F.cross_entropy(a.reshape(-1, Cz), flat,
                                                                             label_smoothing=0.1)),
            "class_weights": (dict(class_weights="cw"), lambda a: F.cross_entropy(a.reshape(-1, Cz), flat,
                                                                                 weight=torch.tensor(cw))),
            "none": (dict(reduction="none"), lambda a: F.cross_entropy(a.reshape(-1, Cz), flat,
                                                                       reduction="none").reshape(N, T)),
            # float64 formula: l + z_loss * lse^2 over the counted tokens, mean
            "zloss": (dict(z_loss=0.1), lambda a: (F.cross_entropy(a.reshape(-1, Cz), flat, reduction="none")
                                                  + 0.1 * torch.logsumexp(a.reshape(-1, Cz), -1) ** 2
                                                  )[flat != -100].mean()),
        }
        for name, (opts, ref_fn) in refs.items():
            o = {k: (torch.tensor(cw[lo:hi]) if v == "cw" else v) for k, v in opts.items()}
            zf = torch.tensor(z, requires_grad=True)
            ref = ref_fn(zf)
            ref.sum().backward()
            zl = torch.tensor(z[..., lo:hi], requires_grad=True)
            got = xsl.sequence_cross_entropy(zl, yt, class_parallel=group, **o)
            got.sum().backward()
            record(f"zero/{tag}/{name}/loss", got, ref)
            record(f"zero/{tag}/{name}/grad", zl.grad, zf.grad[..., lo:hi])
        zf = torch.tensor(z, requires_grad=True)
        ref = F.cross_entropy(zf.reshape(-1, Cz), torch.tensor(q).reshape(-1, Cz))
        ref.backward()
        zl = torch.tensor(z[..., lo:hi], requires_grad=True)
        got = xsl.sequence_cross_entropy(zl, torch.tensor(q[..., lo:hi]), class_parallel=group)
        got.backward()
        record(f"zero/{tag}/soft/loss", got, ref)
        record(f"zero/{tag}/soft/grad", zl.grad, zf.grad[..., lo:hi])
        # the fused layer: weight (0, H) and bias (0,) on the empty rank
        h = rng.normal(size=(N, T, H))
        W, b = rng.normal(size=(Cz, H)), rng.normal(size=Cz)
        hf, wf, bf = (torch.tensor(a, requires_grad=True) for a in (h, W, b))
        ref = F.cross_entropy((hf @ wf.T + bf).reshape(-1, Cz), flat, label_smoothing=0.1)
        ref.backward()
        hl, wl, bl = (torch.tensor(a, requires_grad=True) for a in (h, W[lo:hi], b[lo:hi]))
        got = xsl.linear_cross_entropy(hl, wl, yt, bias=bl, label_smoothing=0.1, class_parallel=group)
        got.backward()
        record(f"zero/{tag}/linear/loss", got, ref)
        record(f"zero/{tag}/linear/dh", hl.grad, hf.grad)
        record(f"zero/{tag}/linear/dw", wl.grad, wf.grad[lo:hi])
        record(f"zero/{tag}/linear/db", bl.grad, bf.grad[lo:hi])
        # token_stats: log_prob, entropy and argmax against log_softmax
        zt = torch.tensor(z)
        lp = torch.log_softmax(zt, -1)
        s = xsl.token_stats(torch.tensor(z[..., lo:hi]), yt.clamp(min=0), outputs=("log_prob", "entropy", "argmax"),
                            class_parallel=group)
        record(f"zero/{tag}/stats/log_prob", s.log_prob, lp.gather(-1, yt.clamp(min=0)[..., None])[..., 0])
        record(f"zero/{tag}/stats/entropy", s.entropy, -(lp.exp() * lp).sum(-1))
        record(f"zero/{tag}/stats/argmax", s.argmax, zt.argmax(-1))
        # linear_token_stats: log_prob and entropy, and d hidden of their sum, against log_softmax
        hf, wf, bf = (torch.tensor(a, requires_grad=True) for a in (h, W, b))
        lpf = torch.log_softmax(hf @ wf.T + bf, -1)
        ref_lp = lpf.gather(-1, yt.clamp(min=0)[..., None])[..., 0]
        ref_ent = -(lpf.exp() * lpf).sum(-1)
        (ref_lp.sum() + ref_ent.sum()).backward()
        hl, wl, bl = (torch.tensor(a, requires_grad=True) for a in (h, W[lo:hi], b[lo:hi]))
        ls = xsl.linear_token_stats(hl, wl, yt.clamp(min=0), bias=bl, class_parallel=group)
        (ls.log_prob.sum() + ls.entropy.sum()).backward()
        record(f"zero/{tag}/linear_stats/log_prob", ls.log_prob, ref_lp)
        record(f"zero/{tag}/linear_stats/entropy", ls.entropy, ref_ent)
        record(f"zero/{tag}/linear_stats/dh", hl.grad, hf.grad)
        record(f"zero/{tag}/linear_stats/dw", wl.grad, wf.grad[lo:hi])
        facts[f"zero/{tag}/local_grad_shape"] = list(zl.grad.shape)

    case("w4", (5, 0, 4, 3), world_group)
    if rank < 2:
        case("w2_first_empty", (0, 7), g2)
        empty = torch.zeros(N, T, 0, dtype=torch.float64)
        errors["every_slice_empty"] = error_of(lambda: xsl.sequence_cross_entropy(
            empty, torch.zeros(N, T, dtype=torch.long), class_parallel=g2))

    # a DTensor sharded along C = 5 over 4 ranks: torch's chunks are (2, 2, 1, 0)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = DeviceMesh("cpu", [0, 1, 2, 3])
    rng = np.random.default_rng(11)
    z = rng.normal(size=(N, T, 5))
    yt = torch.tensor(rng.integers(0, 5, (N, T)))
    dz = distribute_tensor(torch.tensor(z), mesh, [Shard(2)]).requires_grad_(True)
    facts["dtensor_local_classes"] = int(dz.to_local().shape[2])
    got = xsl.sequence_cross_entropy(dz, yt, label_smoothing=0.1)
    got.backward()
    zf = torch.tensor(z, requires_grad=True)
    ref = F.cross_entropy(zf.reshape(-1, 5), yt.reshape(-1), label_smoothing=0.1)
    ref.backward()
    record("zero/dtensor/loss", got, ref)
    record("zero/dtensor/grad", dz.grad.full_tensor(), zf.grad)


def _mesh_2d(rank, pairs, facts, errors, record):
    """A 2 x 2 (data x tensor) mesh: the logits Shard(0) or Replicate() on "dp", Shard(2) on "tp"."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import xseqloss as xsl

    mesh = DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("dp", "tp"))
    dp = mesh.get_group("dp")
    Nb, Cm = 4, 7   # the batch over 2 data ranks, C = 7 over 2 tensor ranks (4 and 3)
    rng = np.random.default_rng(21)
    z = rng.normal(size=(Nb, T, Cm)) * 2
    y = rng.integers(0, Cm, (Nb, T))
    y[0, 1] = y[3, 4] = -100
    yt = torch.tensor(y)
    flat = yt.reshape(-1)
    count = float((yt != -100).sum())   # the global token count: the caller's normalizer

    def over_dp(v):
        v = v.detach().clone()
        dist.all_reduce(v, group=dp)
        return v

    # data sharded: the sum, and the mean with the global count as normalizer, summed over "dp"
    for name, opts, ref_fn in (
            ("sum", dict(reduction="sum"), lambda a: F.cross_entropy(a, flat, reduction="sum")),
            ("mean_global_normalizer", dict(normalizer=count, label_smoothing=0.1),
             lambda a: F.cross_entropy(a, flat, label_smoothing=0.1))):
        dz = distribute_tensor(torch.tensor(z), mesh, [Shard(0), Shard(2)]).requires_grad_(True)
        dy = distribute_tensor(yt, mesh, [Shard(0), Replicate()])
        got = xsl.sequence_cross_entropy(dz, dy, **opts)
        got.backward()
        zf = torch.tensor(z, requires_grad=True)
        ref = ref_fn(zf.reshape(-1, Cm))
        ref.backward()
        record(f"mesh2d/{name}/loss", over_dp(got), ref)
        record(f"mesh2d/{name}/grad", dz.grad.full_tensor(), zf.grad)
        facts[f"mesh2d/{name}/local_shape"] = list(dz.to_local().shape)
    # data replicated: the loss itself
    dz = distribute_tensor(torch.tensor(z), mesh, [Replicate(), Shard(2)]).requires_grad_(True)
    got = xsl.sequence_cross_entropy(dz, yt, z_loss=0.01)
    got.backward()
    zf = torch.tensor(z, requires_grad=True)
    ref = (F.cross_entropy(zf.reshape(-1, Cm), flat, reduction="none")
           + 0.01 * torch.logsumexp(zf.reshape(-1, Cm), -1) ** 2)[flat != -100].mean()
    ref.backward()
    record("mesh2d/replicated/loss", got, ref)
    record("mesh2d/replicated/grad", dz.grad.full_tensor(), zf.grad)
    # refused on every rank before any collective: the classes sharded on both dimensions
    dz = distribute_tensor(torch.tensor(z), mesh, [Shard(2), Shard(2)])
    errors["classes_on_two_dims"] = error_of(lambda: xsl.sequence_cross_entropy(dz, yt))
    # ranks 3, 2 along "tp": the group orders its ranks 2, 3, the shards follow the mesh
    crossed = DeviceMesh("cpu", [[0, 1], [3, 2]], mesh_dim_names=("dp", "tp"))
    dz = distribute_tensor(torch.tensor(z), crossed, [Replicate(), Shard(2)])
    errors["mesh_not_increasing"] = error_of(lambda: xsl.sequence_cross_entropy(dz, yt))


def _worker(rank, world, init, out):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    g2 = dist.new_group([0, 1])
    pairs, facts, errors = {}, {}, {}

    def record(name, got, want):
        pairs[name] = (np.asarray(got.detach() if hasattr(got, "detach") else got).tolist(),
                       np.asarray(want.detach() if hasattr(want, "detach") else want).tolist())

    if rank < 2:
        _agreement(rank, g2, pairs, facts, errors, record)
    dist.barrier()
    _zero_classes(rank, dist.group.WORLD, g2, pairs, facts, errors, record)
    dist.barrier()
    _mesh_2d(rank, pairs, facts, errors, record)
    dist.barrier()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, pairs=pairs, facts=facts, errors=errors), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(__file__, {"torch": lambda n, init, out: torch_launch(__file__, _worker, n, init, out),
                    "torch-rank": _worker})
