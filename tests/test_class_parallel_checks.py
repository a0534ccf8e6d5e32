"""Classes split across workers (API.md 9.2), PyTorch: what the workers must agree on, and issue 27.

ONE launch of 2 gloo processes (this file is their script, under one timeout: a hung collective
fails the test instead of hanging it; helpers/spawn.py):

* 2 ranks: workers that disagree on the values of a replicated argument (the
  targets, a mask, weights) or on the fused layer's hidden size get an error on every rank, naming
  what differs and the ranks; workers that agree get torch's own ``F.cross_entropy`` (values and
  gradient slices).

Numbers are checked against PyTorch's ``F.cross_entropy`` on the whole float64 logits.
"""

import json
import os

import numpy as np
import pytest

from helpers.spawn import error_of, main, spawn, torch_launch
from helpers.support import assert_close, require_or_skip

TIMEOUT = 150
TOL = 1e-9
WORLD = 2
N, T, C, H = 2, 5, 7, 3
SIZES2 = (4, 3)  # C = 7 over the subgroup of ranks 0 and 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_or_skip("torch")
    return spawn(__file__, "torch", WORLD, str(tmp_path_factory.mktemp("cp_checks")), TIMEOUT)


def _pairs(runs, prefix, ranks):
    seen = 0
    for res in runs:
        if res["rank"] not in ranks:
            continue
        for name, (got, want) in res["pairs"].items():
            if name.startswith(prefix):
                assert_close(np.asarray(got, dtype=float), np.asarray(want, dtype=float), tol=TOL,
                             what=f"rank {res['rank']}: {name}")
                seen += 1
    return seen


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
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, pairs=pairs, facts=facts, errors=errors), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(__file__, {"torch": lambda n, init, out: torch_launch(__file__, _worker, n, init, out),
                    "torch-rank": _worker})
