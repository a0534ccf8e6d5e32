"""Tokens split across workers (API.md 9.1, xseqloss/distributed.py, docs/distributed.md).

Every case compares the sharded loss and gradient with the single-process loss and gradient of the
whole batch. The multi-worker cases run in subprocesses (this file is their script: ``python
tests/test_distributed.py <mode> ...``), each with a timeout, so a hung collective fails the test
instead of hanging it:

* PyTorch: ONE launch of 4 gloo processes (forked after one import of torch; file:// init) holds
  every case: data parallel over 3 ranks (uneven rows, one rank with only ignored tokens,
  gradient accumulation inside each rank), over 2 ranks (shift=1, token weights), context
  parallel 2 x data parallel 2 over all 4, each with gradients summed by hand
  (``global_token_count``) and averaged by DDP (``ddp_normalizer``), plus the bad-input cases
  (an error on every rank, no hang);
* JAX: one process with 4 host devices: ``jax.jit`` over a NamedSharding-sharded batch (no
  collective) and ``shard_map`` with ``axis_name`` (psum), "mean", "segment_mean", "sequence_mean";
* TensorFlow: one process with 2 logical CPUs under ``MirroredStrategy``: a custom ``strategy.run``
  loop and Keras ``fit`` with ``xseqloss.keras.SequenceCrossEntropy``.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from helpers.spawn import error_of, main, spawn as _spawn_script, torch_launch
from helpers.support import assert_close, require_or_skip

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 120  # seconds per spawn, all its processes together
TOL = 1e-5     # |x - ref| / (1 + |ref|), float64 and float32 alike

N, T, H, C = 6, 5, 4, 7  # the PyTorch batch: tiny on purpose (a spawn costs seconds, not the math)


# =========================================================================================== NumPy


def _batch(seed=0, n=N, t=T):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, t, C))
    y = rng.integers(0, C, (n, t))
    y[n - 1] = -100        # the last sequence: ignored tokens only (a worker holding it has none)
    y[0, 3:] = -100
    y[n // 2, 1:] = -100   # one token in this row
    return z, y


def test_numpy_rejects_group_and_axis_name(xsl):
    _, y = _batch()
    for kw in (dict(group="dp"), dict(axis_name="dp")):
        for fn in (xsl.global_token_count, xsl.ddp_normalizer):
            with pytest.raises(xsl.XSeqLossTypeError, match="NumPy runs in one process"):
                fn(y, **kw)
        with pytest.raises(xsl.XSeqLossTypeError):
            xsl.global_segment_count(np.zeros((1, 3), np.int64), **kw)
        with pytest.raises(xsl.XSeqLossTypeError):
            xsl.global_sequence_count(y, **kw)


def test_numpy_counts_are_the_local_counts(xsl):
    _, y = _batch()
    w = np.random.default_rng(1).random(y.shape)
    for opts in (dict(), dict(shift=1), dict(weights=w), dict(denominator="positions", shift=2),
                 dict(class_weights=np.arange(1.0, C + 1), ignore_index=(-100, 2))):
        assert float(xsl.global_token_count(y, **opts)) == float(xsl.token_count(y, **opts))
        assert float(xsl.ddp_normalizer(y, **opts)) == float(xsl.token_count(y, **opts))  # world size 1
    segs = np.array([[0, 0, 1, 1, -1], [4, 4, 4, 4, 4]])
    assert int(xsl.global_segment_count(segs)) == 3
    assert int(xsl.global_sequence_count(y)) == N
    assert int(xsl.global_sequence_count(np.zeros((T, N, C)), layout="TNC")) == N  # soft targets
    assert int(xsl.global_sequence_count(y[:, 0], layout="NC")) == N
    with pytest.raises(xsl.XSeqLossError, match="needs a batch"):  # as sequence_mean itself
        xsl.global_sequence_count(y[0], layout="TC")
    with pytest.raises(xsl.XSeqLossError):  # the token_count errors, unchanged
        xsl.global_token_count(y, denominator="bogus")


def _workers(z, y, cuts):
    return [(z[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("opts", [dict(), dict(shift=1), dict(label_smoothing=0.1, z_loss=1e-3, empty="nan"),
                                  dict(weights="w", shift=1)])
def test_numpy_simulated_workers_with_a_zero_token_worker(xsl, opts):
    z, y = _batch()
    if opts.get("weights") == "w":
        opts = dict(opts, weights=np.random.default_rng(2).random(y.shape))
    cuts = [0, 3, 5, 6]  # uneven; the last worker holds only ignored tokens
    w = opts.get("weights")

    def o(a, b):
        return dict(opts, weights=None if w is None else w[a:b])

    parts = [(z[a:b], y[a:b], o(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
    assert int(xsl.token_count(parts[-1][1])) == 0
    n = sum(xsl.global_token_count(yp, **{k: v for k, v in op.items() if k in ("shift", "weights")})
            for _, yp, op in parts)
    full, gfull = xsl.value_and_grad(z, y, **opts)
    losses, grads = zip(*[xsl.value_and_grad(zp, yp, normalizer=n, **op) for zp, yp, op in parts])
    assert float(losses[-1]) == 0.0 and not np.isnan(losses[-1])  # not NaN, even with empty="nan"
    assert not grads[-1].any()                                     # exactly zero gradient
    assert_close(sum(losses), full, tol=TOL, what="global mean")
    assert_close(np.concatenate(grads), gfull, tol=TOL, what="gradient")
    # dividing by the local count and averaging (what DDP does with a plain mean) is wrong here
    local = [xsl.sequence_cross_entropy(zp, yp, **dict(op, empty="zero")) for zp, yp, op in parts]
    assert abs(np.mean(local) - full) > 1e-3


def test_numpy_nobody_holds_a_token(xsl):
    z, y = _batch()
    y[:] = -100
    n = xsl.global_token_count(y[:3]) + xsl.global_token_count(y[3:])
    loss, grad = xsl.value_and_grad(z[:3], y[:3], normalizer=n)
    assert float(loss) == 0.0 and not grad.any()


def test_numpy_segment_and_sequence_mean_over_workers(xsl):
    z, y = _batch()
    segs = np.tile(np.array([0, 0, 1, 1, 1]), (N, 1))
    segs[1] = [0, 1, 1, 2, -1]
    cuts = [0, 2, 5, 6]
    for reduction, count in (("segment_mean", lambda a, b: xsl.global_segment_count(segs[a:b])),
                             ("sequence_mean", lambda a, b: xsl.global_sequence_count(y[a:b]))):
        extra = dict(segment_ids=segs) if reduction == "segment_mean" else {}
        full, gfull = xsl.value_and_grad(z, y, reduction=reduction, shift=1, **extra)
        n = sum(count(a, b) for a, b in zip(cuts[:-1], cuts[1:]))
        got = [xsl.value_and_grad(z[a:b], y[a:b], reduction=reduction, shift=1, normalizer=n,
                                  **({k: v[a:b] for k, v in extra.items()}))
               for a, b in zip(cuts[:-1], cuts[1:])]
        assert_close(sum(g[0] for g in got), full, tol=TOL, what=reduction)
        assert_close(np.concatenate([g[1] for g in got]), gfull, tol=TOL, what=f"{reduction} gradient")


# ============================================================================ PyTorch, one process


def test_torch_without_init_process_group_is_an_error(xsl):
    require_or_skip("torch")
    import torch
    assert not torch.distributed.is_initialized()
    y = torch.tensor([[1, 2, -100]])
    for fn in (xsl.global_token_count, xsl.ddp_normalizer):
        with pytest.raises(xsl.XSeqLossError, match="torch.distributed is not initialised"):
            fn(y)
    with pytest.raises(xsl.XSeqLossTypeError, match="axis_name= names a JAX mesh axis"):
        xsl.global_token_count(y, axis_name="dp")


def test_torch_gradient_accumulation_three_micro_batches(xsl):
    require_or_skip("torch")
    import torch
    z, y = _batch(3)
    zt = torch.tensor(z, requires_grad=True)
    yt = torch.tensor(y)
    full = xsl.sequence_cross_entropy(zt, yt, shift=1, label_smoothing=0.1)
    (gfull,) = torch.autograd.grad(full, zt)
    micro = [slice(0, 1), slice(1, 4), slice(4, 6)]  # 3 uneven micro-batches, the last with one empty row
    n = sum(xsl.token_count(yt[s], shift=1) for s in micro)
    total = 0.0
    for s in micro:
        loss = xsl.sequence_cross_entropy(zt[s], yt[s], shift=1, label_smoothing=0.1, normalizer=n)
        loss.backward()  # gradients accumulate in zt.grad
        total = total + loss.detach()
    assert_close(total.numpy(), full.detach().numpy(), tol=TOL, what="accumulated loss")
    assert_close(zt.grad.numpy(), gfull.numpy(), tol=TOL, what="accumulated gradient")


# ============================================================================ subprocess plumbing


def _spawn(mode, n, tmp):
    return _spawn_script(__file__, mode, n, tmp, TIMEOUT)


def _check_pairs(results, prefix):
    """Every (got, want) pair whose name starts with ``prefix``, on every rank; returns how many."""
    seen = 0
    for res in results:
        for name, (got, want) in res["pairs"].items():
            if name.startswith(prefix):
                assert_close(np.asarray(got), np.asarray(want), tol=TOL, what=f"rank {res['rank']}: {name}")
                seen += 1
    return seen


# ======================================================================= PyTorch, 4 gloo processes


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    require_or_skip("torch")
    return _spawn("torch", 4, str(tmp_path_factory.mktemp("torch")))


def test_torch_dp3_gradient_sum_with_accumulation(torch_runs):
    assert _check_pairs(torch_runs, "dp3_sum") == 3 * 2  # loss and gradient on each of the 3 ranks
    zero = torch_runs[2]["facts"]
    assert zero["dp3_local_tokens"] == 0
    assert zero["dp3_local_loss"] == 0.0 and zero["dp3_local_grad_abs"] == 0.0  # not NaN, exactly 0


def test_torch_dp3_ddp_average_with_ddp_normalizer(torch_runs):
    assert _check_pairs(torch_runs, "dp3_ddp") == 3 * 2
    assert torch_runs[2]["facts"]["dp3_ddp_local_loss"] == 0.0
    # the local mean with DDP's averaging (Megatron-LM issue 4590) is off with uneven counts
    assert torch_runs[0]["facts"]["dp3_local_mean_grad_error"] > 1e-3


def test_torch_dp2_shift_and_weights(torch_runs):
    assert _check_pairs(torch_runs, "dp2_") == 2 * 2 * 2  # sum and DDP, loss and gradient, 2 ranks
    assert isinstance(torch_runs[0]["facts"]["dp2_count"], float)  # weights: a float denominator


def test_torch_context_parallel_2_by_data_parallel_2(torch_runs):
    assert _check_pairs(torch_runs, "cp2dp2_") == 4 * 2 * 2
    # the count reduced over the data-parallel group only (verl issue 5983) is wrong
    assert all(r["facts"]["cp2dp2_dp_only_count_error"] > 1e-3 for r in torch_runs)


def test_torch_bad_input_raises_on_every_rank_without_hanging(torch_runs):
    for r in torch_runs:
        e = r["errors"]
        assert e["bad_option"][0] == "XSeqLossError" and "denominator" in e["bad_option"][1]
        if r["rank"] == 1:  # the rank with the bad label names it
            assert e["bad_label_on_rank_1"][0] == "XSeqLossError" and "-5" in e["bad_label_on_rank_1"][1]
        else:               # the others are told, instead of waiting in the all-reduce forever
            assert e["bad_label_on_rank_1"][0] == "XSeqLossError"
            assert "another rank" in e["bad_label_on_rank_1"][1]
        assert e["axis_name_on_torch"][0] == "XSeqLossTypeError"
        for fn in ("global_token_count", "ddp_normalizer", "global_segment_count", "global_sequence_count"):
            kind, msg = e[f"group_str_{fn}"]  # not torch's ValueError: ours, naming group and the way out
            assert kind == "XSeqLossTypeError" and "group must be a torch.distributed ProcessGroup" in msg, (fn, msg)
            assert "got 'dp' (str)" in msg and "mesh.get_group('dp')" in msg, msg
        assert e["group_object"][0] == "XSeqLossTypeError" and "(object)" in e["group_object"][1]
        assert r["facts"]["count_after_errors"] == r["facts"]["count_after_errors_want"]  # still in step


def test_torch_global_segment_and_sequence_counts(torch_runs):
    """The documented counts of documents and sequences across workers sum over the given group."""
    for r in torch_runs:
        if r["rank"] < 3:  # ranks 0, 2: one row of 2 documents; rank 1: 2 + 1 documents
            assert r["facts"]["segments_over_g3"] == 2 + 3 + 2
        assert r["facts"]["sequences_over_all"] == 1 + 2 + 3 + 4


def _torch_worker(rank, world, init, out):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import xseqloss as xsl
    from xseqloss.torch import SequenceCrossEntropyLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    g3 = dist.new_group([0, 1, 2])
    g2 = dist.new_group([0, 1])
    same_cp = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # the data-parallel group of each cp index
    pairs, facts, errors = {}, {}, {}

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(N, T, H)))
    _, yn = _batch(0)
    y = torch.tensor(yn)
    w_tok = torch.tensor(rng.random((N, T)))
    W0, b0 = rng.normal(size=(C, H)), rng.normal(size=C)

    def model():
        m = torch.nn.Linear(H, C, dtype=torch.float64)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(W0))
            m.bias.copy_(torch.tensor(b0))
        return m

    def grads(m):
        return np.concatenate([m.weight.grad.numpy().ravel(), m.bias.grad.numpy().ravel()])

    def reference(**opts):
        m = model()
        loss = xsl.sequence_cross_entropy(m(x), y, **opts)
        loss.backward()
        return float(loss), grads(m)

    def sum_over(m, loss, group):
        for p in m.parameters():
            dist.all_reduce(p.grad, group=group)
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        return float(total), grads(m)

    def record(name, got, want):
        pairs[name + "_loss"] = [got[0], want[0]]
        pairs[name + "_grad"] = [got[1].tolist(), want[1].tolist()]

    # ---- DP = 3 (ranks 0-2), uneven rows, rank 2 holds only ignored tokens; gradients summed by
    # hand after accumulating one micro-batch per row (3, 2 and 1 micro-batches)
    rows3 = {0: [0, 1, 2], 1: [3, 4], 2: [5]}
    if rank in rows3:
        rows = rows3[rank]
        want = reference()
        m = model()
        n = xsl.global_token_count(y[rows], group=g3)  # one all-reduce per optimizer step
        local = torch.zeros((), dtype=torch.float64)
        for r in rows:
            loss = xsl.sequence_cross_entropy(m(x[r:r + 1]), y[r:r + 1], normalizer=n)
            loss.backward()
            local = local + loss.detach()
        facts["dp3_local_tokens"] = int(xsl.token_count(y[rows]))
        facts["dp3_local_loss"] = float(local)
        facts["dp3_local_grad_abs"] = float(np.abs(grads(m)).sum())
        record("dp3_sum", sum_over(m, local, g3), want)

        # DDP averages: ddp_normalizer makes the average the full-batch gradient
        ddp = torch.nn.parallel.DistributedDataParallel(model(), process_group=g3)
        loss = xsl.sequence_cross_entropy(ddp(x[rows]), y[rows], normalizer=xsl.ddp_normalizer(y[rows], group=g3))
        loss.backward()
        facts["dp3_ddp_local_loss"] = float(loss)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=g3)  # gloo has no AVG: the global mean is the average
        record("dp3_ddp", (float(mean_loss) / 3, grads(ddp.module)), want)

        # the wrong recipe: the local mean averaged by DDP
        ddp = torch.nn.parallel.DistributedDataParallel(model(), process_group=g3)
        xsl.sequence_cross_entropy(ddp(x[rows]), y[rows]).backward()
        facts["dp3_local_mean_grad_error"] = float(np.abs(grads(ddp.module) - want[1]).max())

    # ---- DP = 2 (ranks 0-1), next-token shift and token weights (a float count); DDP through the
    # nn.Module
    if rank in (0, 1):
        rows = [0, 1, 2, 3] if rank == 0 else [4, 5]
        opts = dict(shift=1)
        want = reference(weights=w_tok, **opts)
        m = model()
        n = xsl.global_token_count(y[rows], group=g2, weights=w_tok[rows], **opts)
        facts["dp2_count"] = float(n) if n.is_floating_point() else int(n)
        loss = xsl.sequence_cross_entropy(m(x[rows]), y[rows], weights=w_tok[rows], normalizer=n, **opts)
        loss.backward()
        record("dp2_sum", sum_over(m, loss, g2), want)
        ddp = torch.nn.parallel.DistributedDataParallel(model(), process_group=g2)
        nd = xsl.ddp_normalizer(y[rows], group=g2, weights=w_tok[rows], **opts)
        loss_fn = SequenceCrossEntropyLoss(**opts)  # the nn.Module takes the normalizer per call
        loss = loss_fn(ddp(x[rows]), y[rows], weights=w_tok[rows], normalizer=nd)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=g2)
        record("dp2_ddp", (float(mean_loss) / 2, grads(ddp.module)), want)

    # ---- context parallel 2 x data parallel 2 (all 4 ranks): rows by dp, time steps by cp. The
    # next-token shift is applied BEFORE the split (by the caller), so the target of the last step of
    # the first time slice (the first target of the second slice) is not lost at the boundary.
    dp, cp = divmod(rank, 2)
    rows = [0, 1, 2] if dp == 0 else [3, 4, 5]
    a, b = (0, 3) if cp == 0 else (3, T)  # uneven time slices
    y_shifted = torch.cat([y[:, 1:], torch.full((N, 1), -100)], 1)  # y_shifted[:, t] = y[:, t + 1]
    y_loc = y_shifted[rows, a:b]
    want = reference(shift=1)
    m = model()
    n = xsl.global_token_count(y_loc)  # group=None: the default group, every dp x cp rank
    loss = xsl.sequence_cross_entropy(m(x[rows, a:b]), y_loc, normalizer=n)
    loss.backward()
    record("cp2dp2_sum", sum_over(m, loss, None), want)
    ddp = torch.nn.parallel.DistributedDataParallel(model())  # averages over all 4 ranks
    loss = xsl.sequence_cross_entropy(ddp(x[rows, a:b]), y_loc, normalizer=xsl.ddp_normalizer(y_loc))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    record("cp2dp2_ddp", (float(mean_loss) / world, grads(ddp.module)), want)
    # the count reduced over the data-parallel group only, gradients summed over dp x cp: wrong
    m = model()
    n_dp = xsl.global_token_count(y_loc, group=same_cp[cp])
    loss = xsl.sequence_cross_entropy(m(x[rows, a:b]), y_loc, normalizer=n_dp)
    loss.backward()
    facts["cp2dp2_dp_only_count_error"] = abs(sum_over(m, loss, None)[0] - want[0])

    # ---- bad input: every rank raises, none hangs, and the group stays usable

    errors["bad_option"] = error_of(lambda: xsl.global_token_count(y, denominator="bogus"))
    y_bad = y.clone()
    if rank == 1:
        y_bad[1, 0] = -5  # the row rank 1 counts
    errors["bad_label_on_rank_1"] = error_of(lambda: xsl.global_token_count(y_bad[rank:rank + 1]))
    errors["axis_name_on_torch"] = error_of(lambda: xsl.global_token_count(y, axis_name="dp"))
    for fn in ("global_token_count", "ddp_normalizer", "global_segment_count", "global_sequence_count"):
        arg = torch.zeros((1, 3), dtype=torch.long) if fn == "global_segment_count" else y
        errors[f"group_str_{fn}"] = error_of(lambda: getattr(xsl, fn)(arg, group="dp"))
    errors["group_object"] = error_of(lambda: xsl.global_token_count(y, group=object()))
    # documents and sequences across the workers (API.md 9.1): rank r holds 2 + (r % 2) documents
    segs = torch.tensor([[0, 0, 1, 1, -1], [3, 3, 3, 3, 3]] if rank % 2 else [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]])
    segs = segs if rank % 2 else segs[:1]
    facts["segments_over_g3"] = int(xsl.global_segment_count(segs, group=g3)) if rank < 3 else None
    facts["sequences_over_all"] = int(xsl.global_sequence_count(y[:rank + 1]))
    facts["count_after_errors"] = int(xsl.global_token_count(y[rank:rank + 1]))
    facts["count_after_errors_want"] = int(xsl.token_count(y[:world]))

    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, pairs=pairs, facts=facts, errors=errors), f)


# ====================================================================== JAX, 4 host devices


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    require_or_skip("jax")
    return _spawn("jax", 1, str(tmp_path_factory.mktemp("jax")))[0]


def test_jax_jit_over_a_sharded_batch_needs_no_collective(jax_run):
    assert jax_run["facts"]["devices"] == 4
    assert _check_pairs([jax_run], "jit_") == 2
    assert jax_run["facts"]["jit_count_is_global"]


def test_jax_shard_map_with_axis_name(jax_run):
    assert _check_pairs([jax_run], "shard_map_") == 2 * 2  # global_token_count and ddp_normalizer
    local = jax_run["facts"]["shard_map_local_losses"]
    assert local[1] == 0.0 and all(np.isfinite(local))  # the device holding no token: exactly 0


def test_jax_segment_and_sequence_mean(jax_run):
    assert _check_pairs([jax_run], "segment_mean_") == 2
    assert _check_pairs([jax_run], "sequence_mean_") == 2


def test_jax_errors(jax_run):
    e = jax_run["errors"]
    assert e["traced_without_axis_name"][0] == "XSeqLossError" and "axis_name=" in e["traced_without_axis_name"][1]
    assert e["unbound_axis_name"][0] == "XSeqLossError" and "not bound" in e["unbound_axis_name"][1]
    assert e["group_on_jax"][0] == "XSeqLossTypeError"


def _jax_worker(out):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import xseqloss as xsl

    jax.config.update("jax_enable_x64", True)
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older JAX
        from jax.experimental.shard_map import shard_map
    pairs, facts, errors = {}, {}, {}
    facts["devices"] = len(jax.devices())
    mesh = jax.make_mesh((4,), ("dp",))
    rng = np.random.default_rng(0)
    n, t = 8, 5
    z = rng.normal(size=(n, t, C))
    y = rng.integers(0, C, (n, t))
    y[2:4] = -100          # device 1: no token at all
    y[4, 2:] = -100
    y[6, :4] = -100
    segs = np.tile(np.array([0, 0, 1, 1, 1]), (n, 1))
    segs[5] = [0, 1, 1, 2, -1]
    zj, yj, sj = jnp.asarray(z), jnp.asarray(y), jnp.asarray(segs)

    def ref(**opts):
        v, g = jax.value_and_grad(lambda z: xsl.sequence_cross_entropy(z, yj, shift=1, **opts))(zj)
        return float(v), np.asarray(g)

    def record(name, got, want):
        pairs[name + "_loss"] = [float(got[0]), want[0]]
        pairs[name + "_grad"] = [np.asarray(got[1]).tolist(), want[1].tolist()]


    import contextlib
    ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext()
    with ctx:
        sh = NamedSharding(mesh, P("dp"))
        zs, ys, ss = (jax.device_put(a, sh) for a in (zj, yj, sj))
        want = ref()

        # plain jax.jit over the sharded global batch: the count of the global array is global
        @jax.jit
        def global_loss(z, y):
            return xsl.sequence_cross_entropy(z, y, shift=1, normalizer=xsl.global_token_count(y, shift=1))

        record("jit", jax.value_and_grad(global_loss)(zs, ys), want)
        facts["jit_count_is_global"] = int(jax.jit(lambda y: xsl.global_token_count(y, shift=1))(ys)) == int(
            xsl.token_count(y, shift=1))

        # shard_map: each device its rows; the count psum'd over "dp", the loss too
        def per_device(z, y):
            cnt = xsl.global_token_count(y, shift=1, axis_name="dp")
            return xsl.sequence_cross_entropy(z, y, shift=1, normalizer=cnt)

        summed = shard_map(lambda z, y: jax.lax.psum(per_device(z, y), "dp"), mesh=mesh,
                           in_specs=(P("dp"), P("dp")), out_specs=P())
        record("shard_map_sum", jax.jit(jax.value_and_grad(summed))(zs, ys), want)
        local = shard_map(lambda z, y: per_device(z, y)[None], mesh=mesh, in_specs=(P("dp"), P("dp")),
                          out_specs=P("dp"))
        facts["shard_map_local_losses"] = np.asarray(jax.jit(local)(zs, ys)).tolist()

        # averaging frameworks (pmean of the losses): ddp_normalizer
        def averaged(z, y):
            cnt = xsl.ddp_normalizer(y, shift=1, axis_name="dp")
            return jax.lax.pmean(xsl.sequence_cross_entropy(z, y, shift=1, normalizer=cnt), "dp")

        f = shard_map(averaged, mesh=mesh, in_specs=(P("dp"), P("dp")), out_specs=P())
        record("shard_map_ddp", jax.jit(jax.value_and_grad(f))(zs, ys), want)

        # segment_mean: the global number of documents
        def seg(z, y, s):
            cnt = xsl.global_segment_count(s, axis_name="dp")
            return jax.lax.psum(xsl.sequence_cross_entropy(z, y, shift=1, segment_ids=s, reduction="segment_mean",
                                                           normalizer=cnt), "dp")

        f = shard_map(seg, mesh=mesh, in_specs=(P("dp"),) * 3, out_specs=P())
        record("segment_mean", jax.jit(jax.value_and_grad(f))(zs, ys, ss), ref(segment_ids=sj,
                                                                              reduction="segment_mean"))

        # sequence_mean: the global number of sequences
        def seq(z, y):
            cnt = xsl.global_sequence_count(y, axis_name="dp")
            return jax.lax.psum(xsl.sequence_cross_entropy(z, y, shift=1, reduction="sequence_mean",
                                                           normalizer=cnt), "dp")

        f = shard_map(seq, mesh=mesh, in_specs=(P("dp"),) * 2, out_specs=P())
        record("sequence_mean", jax.jit(jax.value_and_grad(f))(zs, ys), ref(reduction="sequence_mean"))

        bad = shard_map(lambda y: xsl.global_token_count(y), mesh=mesh, in_specs=P("dp"), out_specs=P())
        errors["traced_without_axis_name"] = error_of(lambda: jax.jit(bad)(ys))
    errors["unbound_axis_name"] = error_of(lambda: xsl.global_token_count(yj, axis_name="dp"))
    errors["group_on_jax"] = error_of(lambda: xsl.global_token_count(yj, group=object()))
    with open(os.path.join(out, "0.json"), "w") as f:
        json.dump(dict(rank=0, pairs=pairs, facts=facts, errors=errors), f)


# ============================================================= TensorFlow, MirroredStrategy x 2


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    require_or_skip("tensorflow")
    return _spawn("tensorflow", 1, str(tmp_path_factory.mktemp("tensorflow")))[0]


def test_tensorflow_strategy_run_custom_loop(tf_run):
    assert tf_run["facts"]["replicas"] == 2
    assert _check_pairs([tf_run], "strategy_run_") == 2 * 2  # summed (global_token_count), averaged (ddp_normalizer)
    assert tf_run["facts"]["replica_1_loss"] == 0.0 and tf_run["facts"]["replica_1_grad_abs"] == 0.0


def test_keras_fit_under_mirrored_strategy(tf_run):
    if not tf_run["facts"]["keras"]:
        if os.environ.get("XSEQLOSS_REQUIRE_BACKENDS", "").strip():
            pytest.fail("keras is not importable but XSEQLOSS_REQUIRE_BACKENDS asks for the frameworks")
        pytest.skip("keras not importable")
    # reduction="sum" with sample_weight = 1 / (the global batch's token count): exact, however the
    # tokens fall on the replicas; the weights after two SGD steps equal the single-device ones
    assert _check_pairs([tf_run], "keras_fit_") == 2
    # normalizer="global": the same, with no input-pipeline weights
    assert _check_pairs([tf_run], "keras_global_fit_") == 2
    # the default (a local mean scaled by 1 / replicas) is not, with uneven counts
    assert tf_run["facts"]["keras_default_mean_error"] > 1e-3
    # float64 labels (exact integers), as Keras hands them over: the same exact training
    assert _check_pairs([tf_run], "keras_float_labels_fit_") == 2


def test_keras_evaluate_predict_save_load_under_mirrored_strategy(tf_run):
    """The compiled model with SequenceCrossEntropy(normalizer="global"): evaluate (integer and
    float64 labels) equals the float64 global mean on a batch with uneven tokens per replica,
    predict the affine map, and a .keras round trip loaded under the strategy keeps both; a
    non-integral float label is a NaN loss (traced), never rounded to a class."""
    if not tf_run["facts"]["keras"]:
        pytest.skip("keras not importable")
    assert _check_pairs([tf_run], "keras_evaluate_") == 2
    assert _check_pairs([tf_run], "keras_predict") == 1
    assert _check_pairs([tf_run], "keras_loaded_") == 2
    assert tf_run["facts"]["keras_loaded_loss"] == ["SequenceCrossEntropy", "global"]
    assert tf_run["facts"]["keras_evaluate_non_integral"] == "nan"


def _tf_worker(out):
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import xseqloss as xsl

    pairs, facts = {}, {}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    facts["replicas"] = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    n, t = 8, 3
    x = rng.normal(size=(n, t, H)).astype(np.float32)
    y = rng.integers(0, C, (n, t))
    y[2:4] = -100                 # custom loop, replica 1 (rows 2-3 of the first 4): no token
    y[4:6, 1:] = -100             # second global batch of fit: 2 tokens on replica 0, 6 on replica 1
    W0 = (rng.normal(size=(H, C)) * 0.3).astype(np.float32)
    b0 = np.zeros(C, np.float32)

    def record(name, got, want):
        pairs[name] = [np.asarray(got, np.float64).ravel().tolist(), np.asarray(want, np.float64).ravel().tolist()]

    # ---- custom loop: the first 4 rows, 2 per replica
    xb, yb = x[:4], y[:4]
    Wref = tf.Variable(W0)
    with tf.GradientTape() as tape:
        full = xsl.sequence_cross_entropy(tf.einsum("nth,hc->ntc", tf.constant(xb), Wref), tf.constant(yb), shift=1)
    gfull = tape.gradient(full, Wref)
    with strategy.scope():
        W = tf.Variable(W0)

    def per_replica(a):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[2 * ctx.replica_id_in_sync_group:2 * ctx.replica_id_in_sync_group + 2]))

    @tf.function
    def step(xs, ys):
        def fn(xr, yr):
            out = []
            # inside strategy.run: the replica context's all-reduce; summed, then averaged gradients
            for cnt in (xsl.global_token_count(yr, shift=1), xsl.ddp_normalizer(yr, shift=1)):
                with tf.GradientTape() as tape:
                    loss = xsl.sequence_cross_entropy(tf.einsum("nth,hc->ntc", xr, W), yr, shift=1, normalizer=cnt)
                out += [loss, tape.gradient(loss, W)]
            return tuple(out)
        res = strategy.run(fn, args=(xs, ys))
        ops = ("SUM", "SUM", "MEAN", "MEAN")
        return ([strategy.reduce(op, v, None) for op, v in zip(ops, res)],
                strategy.experimental_local_results(res[0]), strategy.experimental_local_results(res[1]))

    (loss, grad, loss_avg, grad_avg), losses, grads = step(per_replica(xb), per_replica(yb))
    record("strategy_run_sum_loss", loss, full)
    record("strategy_run_sum_grad", grad, gfull)
    facts["replica_1_loss"] = float(losses[1])
    facts["replica_1_grad_abs"] = float(tf.reduce_sum(tf.abs(grads[1])))
    record("strategy_run_ddp_loss", loss_avg, full)
    record("strategy_run_ddp_grad", grad_avg, gfull)

    # ---- Keras fit: global batches of 4 (2 per replica), two SGD steps
    facts["keras"] = importlib.util.find_spec("keras") is not None
    if facts["keras"]:
        import keras

        import xseqloss.keras as xk

        lr = 0.5
        Wn, bn = W0.astype(np.float64), b0.astype(np.float64)
        step_losses = []
        for s in (slice(0, 4), slice(4, 8)):  # the single-device reference: full-batch means, SGD
            v, g = xsl.value_and_grad(x[s].astype(np.float64) @ Wn + bn, y[s])
            step_losses.append(float(v))
            Wn, bn = Wn - lr * np.einsum("nth,ntc->hc", x[s], g), bn - lr * g.sum((0, 1))

        def with_weights(xb, yb):
            # on the GLOBAL batch, before it is split over the replicas: 1 / its token count
            cnt = tf.cast(xsl.token_count(yb), tf.float32)
            return xb, yb, tf.fill(tf.shape(yb)[:1], tf.math.divide_no_nan(1.0, cnt))

        def fit(loss, data):
            with strategy.scope():
                model = keras.Sequential([keras.Input((t, H)), keras.layers.Dense(C)])
                model.layers[0].set_weights([W0, b0])
                # no workaround: Keras builds the compiled loss on the MEAN over the replicas of the
                # first batch, whose labels are float64 (exact integers here), and xseqloss takes them
                model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss)
            hist = model.fit(data, epochs=1, verbose=0, shuffle=False)
            fitted.append(model)
            return model.layers[0].get_weights(), hist.history["loss"][0]

        fitted = []

        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        (kW, kb), reported = fit(xk.SequenceCrossEntropy(reduction="sum"), ds.map(with_weights))
        record("keras_fit_weights", np.concatenate([kW.ravel(), kb.ravel()]), np.concatenate([Wn.ravel(), bn.ravel()]))
        record("keras_fit_reported_loss", reported, np.mean(step_losses))
        # normalizer="global": the default call made exact (the global batch's count, all-reduced)
        (kW, kb), reported = fit(xk.SequenceCrossEntropy(normalizer="global"), ds)
        record("keras_global_fit_weights", np.concatenate([kW.ravel(), kb.ravel()]),
               np.concatenate([Wn.ravel(), bn.ravel()]))
        record("keras_global_fit_reported_loss", reported, np.mean(step_losses))
        (kW, _), _ = fit(xk.SequenceCrossEntropy(), ds)
        facts["keras_default_mean_error"] = float(np.abs(kW - Wn).max())
        # labels given as float64 (what Keras hands over on some paths): the same training
        ds64 = tf.data.Dataset.from_tensor_slices((x, y.astype(np.float64))).batch(4)
        (kW, kb), reported = fit(xk.SequenceCrossEntropy(normalizer="global"), ds64)
        record("keras_float_labels_fit_weights", np.concatenate([kW.ravel(), kb.ravel()]),
               np.concatenate([Wn.ravel(), bn.ravel()]))
        record("keras_float_labels_fit_reported_loss", reported, np.mean(step_losses))

        # evaluate / predict / save + load of the compiled model, under the strategy; the batch
        # x[4:8] puts 2 tokens on replica 0 and 6 on replica 1: only the global count is exact
        model = fitted[1]  # normalizer="global", trained on integer labels
        W1, b1 = (v.astype(np.float64) for v in model.layers[0].get_weights())
        want_eval = float(xsl.sequence_cross_entropy(x[4:8].astype(np.float64) @ W1 + b1, y[4:8]))
        one = tf.data.Dataset.from_tensor_slices((x[4:8], y[4:8])).batch(4)
        record("keras_evaluate_global", model.evaluate(one, verbose=0), want_eval)
        one64 = tf.data.Dataset.from_tensor_slices((x[4:8], y[4:8].astype(np.float64))).batch(4)
        record("keras_evaluate_float_labels", model.evaluate(one64, verbose=0), want_eval)
        record("keras_predict", model.predict(x, batch_size=4, verbose=0), x.astype(np.float64) @ W1 + b1)
        bad = y[4:8].astype(np.float64)
        bad[3, 0] = 2.5  # not a class id: traced inside evaluate, so the loss is NaN (not rounded to 2)
        facts["keras_evaluate_non_integral"] = str(model.evaluate(
            tf.data.Dataset.from_tensor_slices((x[4:8], bad)).batch(4), verbose=0))
        path = os.path.join(out, "model.keras")
        model.save(path)
        with strategy.scope():
            loaded = keras.models.load_model(path)
        facts["keras_loaded_loss"] = [type(loaded.loss).__name__, loaded.loss.get_config()["normalizer"]]
        record("keras_loaded_evaluate", loaded.evaluate(one, verbose=0), want_eval)
        record("keras_loaded_predict", loaded.predict(x, batch_size=4, verbose=0), x.astype(np.float64) @ W1 + b1)
    with open(os.path.join(out, "0.json"), "w") as f:
        json.dump(dict(rank=0, pairs=pairs, facts=facts, errors={}), f)


# =========================================================================== the script entry


if __name__ == "__main__":
    main(__file__, {"torch": lambda n, init, out: torch_launch(__file__, _torch_worker, n, init, out),
                    "torch-rank": _torch_worker,
                    "jax": lambda n, init, out: _jax_worker(out),
                    "tensorflow": lambda n, init, out: _tf_worker(out)})
