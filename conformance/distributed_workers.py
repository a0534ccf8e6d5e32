"""The workers of the conformance suite across devices (distributed.py): the child processes'
entry (``child``), the torch launcher and its gloo ranks, and the JAX process with its host
devices. They compute and write what each worker gave; distributed.py compares."""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from typing import Any

import numpy as np

from .cases import Case, make_case
from .checks import _short, cotangents
from .distributed import DTYPES, JAX_DEVICES, class_index, local_arrays, plan, specs, torch_slices
from .distributed_stats import jax_stats, stats_specs, torch_stats

def child(mode: str, out: str, kw: dict) -> None:
    """Entry point of a child process: ``mode`` "torch" (forks the ranks) or "jax"."""
    warnings.filterwarnings("ignore", message=".*did you pass softmax outputs.*")
    chosen = [s for s in specs() if s["name"] in set(kw["cases"])]
    stats = [s for s in stats_specs() if s["name"] in set(kw.get("stats", ()))]
    dtypes = tuple(kw.get("dtypes", DTYPES))
    if mode == "torch":
        _torch_launch(out, kw["engines"], chosen, dtypes, stats)
    else:
        _jax_run(out, kw["engines"], chosen, dtypes, stats)


def _torch_launch(out: str, engines: list[str], chosen: list[dict], dtypes: tuple = DTYPES,
                  stats: list[dict] = ()) -> None:
    """Import torch and xseqloss once, then fork each world's ranks (one group per world size)."""
    import torch  # noqa: F401

    import xseqloss.torch  # noqa: F401  (imports the torch backend before the fork)
    status = 0
    for e in engines:
        world = int(e.split("-")[1])
        init = os.path.join(out, f"{e}.init")
        pids = []
        for rank in range(world):
            pid = os.fork()
            if pid == 0:  # the rank
                code = 1
                try:
                    _torch_rank(rank, world, init, out, e, chosen, dtypes, stats)
                    code = 0
                except BaseException:  # noqa: BLE001 - a child must never return into the launcher
                    import traceback
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        for pid in pids:
            _, st = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(st) != 0:
                status = 1
                print(f"{e}: rank {pids.index(pid)} exited with {os.waitstatus_to_exitcode(st)}", flush=True)
    sys.exit(status)


def _torch_rank(rank: int, world: int, init: str, out: str, engine: str, chosen: list[dict],
                dtypes: tuple = DTYPES, stats: list[dict] = ()) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from .adapters import ADAPTERS, call
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    adapter = ADAPTERS["torch"]
    got: dict[str, dict] = {}
    for spec, dt in plan(engine, chosen, dtypes):
        case = make_case(spec, dt)
        sizes = torch_slices(spec["shape"]["C"], world, spec["name"])
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        index = class_index(case, lo, hi)
        worker = f"rank {rank} of {world}"
        arrays = local_arrays(case, lo, hi)
        options = dict(case.options, class_parallel=dist.group.WORLD)
        o: dict[str, Any] = {}
        try:
            eager = call(adapter, arrays, options, dt, "cpu")
            o.update(values=[(worker, eager.value)], value_dtype=eager.value_dtype, grad_dtype=eager.grad_dtype,
                     type_ok=eager.type_ok, grad_error=eager.grad_error,
                     pieces=[] if eager.grad is None else [dict(worker=worker, index=index, grad=eager.grad)])
            ups = []
            for ct in cotangents(case, eager.value.shape):
                try:
                    g = call(adapter, arrays, options, dt, "cpu", cotangent=ct).grad
                    ups.append((ct, [dict(worker=worker, index=index, grad=g)]))
                except Exception as exc:  # noqa: BLE001
                    ups.append((ct, f"{worker}: " + _short(exc)))
            o["upstream"] = ups
        except Exception as exc:  # noqa: BLE001 - recorded as a failing row
            o = {"error": f"{worker}: " + _short(exc)}
        got[case.name] = o
    got.update(torch_stats(rank, world, dist.group.WORLD, engine, list(stats), dtypes))  # token_stats
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"{engine}.{rank}.pkl"), "wb") as f:
        pickle.dump(got, f)


def _jax_run(out: str, engines: list[str], chosen: list[dict], dtypes: tuple = DTYPES,
             stats: list[dict] = ()) -> None:
    import jax
    import ml_dtypes
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import xseqloss as xsl

    from .adapters import ADAPTERS, side_dtype
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older JAX
        from jax.experimental.shard_map import shard_map
    devices = jax.devices("cpu")
    if len(devices) < JAX_DEVICES:
        raise SystemExit(f"expected {JAX_DEVICES} host devices, found {len(devices)} (XLA_FLAGS not honoured)")
    mesh = Mesh(np.array(devices[:JAX_DEVICES]), ("tp",))
    adapter = ADAPTERS["jax"]

    def put(a, dtype, spec):
        a = np.asarray(a)
        if dtype == "bfloat16":
            a = a.astype(np.float32).astype(ml_dtypes.bfloat16)
        elif dtype is not None:
            a = a.astype(dtype)
        return jax.device_put(a, NamedSharding(mesh, spec))

    for e in engines:
        got: dict[str, dict] = {}
        for spec, dt in plan(e, chosen, dtypes):
            case = make_case(spec, dt)
            layout, C = case.layout, spec["shape"]["C"]
            zspec = P(*[("tp" if a == "C" else None) for a in layout])
            even = C % JAX_DEVICES == 0
            split = e == "jax-shard_map" or even  # inputs placed class-sharded
            options = {k: v for k, v in case.options.items()}
            k = layout.index("C")
            pad = 0 if (even or e != "jax-shard_map") else -C % JAX_DEVICES
            if pad:
                options["num_classes"] = C  # the columns from C on are vocabulary padding
            o: dict[str, Any] = {}
            try:
                with adapter.context(dt, "cpu"):
                    t_arr = case.arrays["targets"]
                    specs_in = {"logits": zspec if split else P(),
                                "targets": zspec if (case.soft and split) else P()}
                    side = {k: v for k, v in case.arrays.items() if k not in ("logits", "targets")}
                    side_specs = {k: (P("tp") if (k == "class_weights" and split) else P()) for k in side}
                    z = put(_padded(case.arrays["logits"], k, pad, 0.5), dt, specs_in["logits"])
                    t = put(_padded(t_arr, k, pad, 0.3) if case.soft else t_arr,
                            dt if t_arr.dtype.kind == "f" else None, specs_in["targets"])
                    s = {n: put(_padded(v, 0, pad, 2.0) if n == "class_weights" else v, side_dtype(n, dt),
                                side_specs[n]) for n, v in side.items()}
                    if e == "jax-shard_map":
                        def local(z, t, s):
                            return xsl.sequence_cross_entropy(z, t, class_parallel="tp", **s, **options)
                        loss = shard_map(local, mesh=mesh, in_specs=(zspec, specs_in["targets"], side_specs),
                                         out_specs=P())
                    else:
                        constrain = NamedSharding(mesh, zspec)

                        def loss(z, t, s):
                            if not even:  # device_put refuses an indivisible sharding; XLA pads this one
                                z = jax.lax.with_sharding_constraint(z, constrain)
                            return xsl.sequence_cross_entropy(z, t, **s, **options)

                    def vg(z, t, s, ct):
                        v, pull = jax.vjp(lambda z: loss(z, t, s), z)
                        return v, pull(ct)[0]

                    f = jax.jit(vg)
                    shape = value_shape(case)  # known without a second trace of the loss
                    out_dtype = np.float64 if dt == "float64" else np.float32

                    def ct_of(c):
                        return jax.device_put(np.broadcast_to(np.asarray(c, np.float64), shape).astype(out_dtype),
                                              NamedSharding(mesh, P()))

                    v, g = f(z, t, s, ct_of(1.0))
                    pieces = _jax_pieces(g, adapter, k, C)
                    o.update(values=_jax_copies(v, adapter), value_dtype=str(v.dtype), grad_dtype=str(g.dtype),
                             type_ok=isinstance(v, jax.Array) and isinstance(g, jax.Array),
                             padding_ok=pieces is not None, pieces=pieces or [])
                    ups = []
                    for ct in cotangents(case, shape):
                        try:
                            ups.append((ct, _jax_pieces(f(z, t, s, ct_of(ct))[1], adapter, k, C) or []))
                        except Exception as exc:  # noqa: BLE001
                            ups.append((ct, _short(exc)))
                    o["upstream"] = ups
            except Exception as exc:  # noqa: BLE001 - recorded as a failing row
                o = {"error": _short(exc)}
            got[case.name] = o
        got.update(jax_stats(e, list(stats), dtypes, mesh, shard_map, put))  # token_stats
        with open(os.path.join(out, f"{e}.0.pkl"), "wb") as fh:
            pickle.dump(got, fh)


def value_shape(case: Case) -> tuple:
    """The shape of the loss (API.md 1, Reductions) for the reductions of the distributed cases."""
    red = case.options.get("reduction", "mean")
    sizes = dict(zip(case.layout, case.arrays["logits"].shape))
    if red == "none":
        return tuple(sizes[a] for a in case.layout if a != "C")
    if red == "per_sequence":
        return (sizes["N"],)
    if red == "per_position":
        return (sizes["T"],)
    assert red in ("mean", "sum", "sequence_mean"), red
    return ()


def _jax_index(index: tuple, shape: tuple) -> list[tuple[int, int]]:
    return [(s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape)]


def _jax_copies(v: Any, adapter: Any) -> list:
    """Every device's copy of the replicated loss."""
    return [(f"device {sh.device.id}", adapter.host(sh.data)) for sh in v.addressable_shards]


def _padded(a: Any, k: int, pad: int, junk: float) -> Any:
    """``a`` with ``pad`` junk columns appended along axis k (vocabulary padding)."""
    if not pad:
        return a
    a = np.asarray(a)
    shape = list(a.shape)
    shape[k] = pad
    return np.concatenate([a, np.full(shape, junk, a.dtype)], axis=k)


def _jax_pieces(g: Any, adapter: Any, k: int, C: int) -> list | None:
    """Every device's shard of the gradient with the index it covers, padding columns (from C on
    along axis k) cut off; None if any padding column's gradient is not exactly 0."""
    out = []
    for sh in g.addressable_shards:
        index = _jax_index(sh.index, g.shape)
        grad = np.asarray(adapter.host(sh.data))
        lo, hi = index[k]
        if hi > C:
            cut = [slice(None)] * grad.ndim
            cut[k] = slice(max(C - lo, 0), None)
            if np.any(grad[tuple(cut)].astype(np.float64) != 0):
                return None
            cut[k] = slice(0, max(C - lo, 0))
            grad, index[k] = grad[tuple(cut)], (lo, min(hi, C))
        if index[k][1] > index[k][0]:
            out.append(dict(worker=f"device {sh.device.id}", index=index, grad=grad))
    return out
