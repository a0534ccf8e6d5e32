"""Benchmark of classes split across workers (``class_parallel``, API.md 9.2) on torch.distributed.

At tokens x vocabulary = 8,192 x 32,000 float32 (the logits are L = 1.05 GB), over 2 gloo processes
on this machine (one thread each), in one run:

* forward+backward time of ``xsl.sequence_cross_entropy(local_logits, y, class_parallel=group)``
  against PyTorch's own ``loss_parallel()`` with ``F.cross_entropy`` on the same DTensor (their
  options overlap for plain cross-entropy with ``ignore_index``), rounds interleaved, medians; and
  against the single-process call on the whole logits (a subprocess with 2 threads: the same two
  cores);
* per-rank peak extra memory of forward+backward beyond the logits and the returned gradient
  (peak RSS after ``clear_refs``), in multiples of L;
* the cost of the checksums of the replicated values (issue 27): the same call with them turned
  off (``_class_parallel.check_values_agree``, internal), rounds interleaved;
* bytes each rank sends per call through ``all_reduce`` / ``all_gather`` (counted by wrapping
  them), against the O(tokens) bound (a few float64 per token) and against O(tokens x C).

    python benchmarks/class_parallel_bench.py                 # 8192 x 32000
    python benchmarks/class_parallel_bench.py --tokens 1024 --reps 3

Two processes share two cores here: the times are caveated (docs/performance.md). Nothing here is
a test: it prints a table and writes benchmarks/results/class-parallel-cpu.json. The peak-RSS,
fresh-process and JSON machinery is benchmarks/harness.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import harness  # noqa: E402


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (gloo's traffic between the ranks here)."""
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return 0


def data(T: int, C: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((T, C), dtype=np.float32)
    y = rng.integers(0, C, T)
    y[::7] = -100
    return z, y


def peak_extra(run, keep_bytes: int) -> int:
    from xseqloss.torch import empty_cache
    empty_cache()  # xseqloss keeps a freed gradient buffer for reuse: out of the base, so it is counted
    out, extra = harness.rss_peak(run)
    del out
    return extra - keep_bytes


def single(T: int, C: int, reps: int) -> dict:
    import torch
    import xseqloss as xsl
    torch.set_num_threads(2)
    zn, yn = data(T, C)
    z, y = torch.from_numpy(zn), torch.from_numpy(yn)

    def run():
        zz = z.detach().requires_grad_(True)
        xsl.sequence_cross_entropy(zz, y, layout="NC").backward()
        return zz.grad
    run()
    mem = peak_extra(run, z.numel() * 4)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.median(times)), "peak_extra_bytes": mem}


def rank_main(rank: int, world: int, init: str, T: int, C: int, reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import xseqloss as xsl
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.group.WORLD
    zn, yn = data(T, C)
    sizes = [C // world + (1 if r < C % world else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    z_loc = torch.from_numpy(np.ascontiguousarray(zn[:, lo:lo + sizes[rank]]))
    y = torch.from_numpy(yn)
    del zn
    mesh = DeviceMesh("cpu", list(range(world)))
    dz = distribute_tensor(torch.empty(0), mesh, [Shard(0)])  # warm the mesh
    del dz
    from torch.distributed.tensor import DTensor
    dz_base = DTensor.from_local(z_loc, mesh, [Shard(1)], run_check=False)

    def ours():
        zz = z_loc.detach().requires_grad_(True)
        xsl.sequence_cross_entropy(zz, y, layout="NC", class_parallel=group).backward()
        return zz.grad

    def theirs():
        zz = dz_base.detach().requires_grad_(True)
        with loss_parallel():
            loss = F.cross_entropy(zz, y, ignore_index=-100)
            loss.backward()
        return zz.grad

    def ours_unchecked():  # the same call without the checksums of the replicated values (internal switch)
        from xseqloss import _class_parallel
        _class_parallel.check_values_agree = False
        try:
            return ours()
        finally:
            _class_parallel.check_values_agree = True

    contenders = {"xseqloss class_parallel": ours, "torch loss_parallel": theirs,
                  "xseqloss, no value checksum": ours_unchecked}
    # correctness first: the same value on every rank, equal to loss_parallel's
    with loss_parallel():
        ref = F.cross_entropy(dz_base, y, ignore_index=-100)
    ref = ref.full_tensor() if hasattr(ref, "full_tensor") else ref
    val = xsl.sequence_cross_entropy(z_loc, y, layout="NC", class_parallel=group)
    result = {"rank": rank, "sizes": sizes, "value": float(val), "loss_parallel_value": float(ref)}
    # bytes through the collectives, one call each
    sent = []
    real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                                          "reduce_scatter_tensor", "all_to_all_single")}

    def counting(n):
        def f(t, *a, **k):
            x = a[0] if n in ("all_gather", "all_gather_into_tensor") else t
            sent.append((n, x.numel() * x.element_size()))
            return real[n](t, *a, **k)
        return f
    from torch.distributed.tensor.debug import CommDebugMode
    bytes_of = {}
    for name, fn in contenders.items():
        for n in real:
            setattr(dist, n, counting(n))
        try:
            fn()  # warm
            dist.barrier()
            sent.clear()
            lo0 = loopback_bytes()
            with CommDebugMode() as comm:  # DTensor's collectives are c10d ops, not torch.distributed calls
                fn()
            dist.barrier()
            lo1 = loopback_bytes()
            counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
            bytes_of[name] = {"bytes_counted": sum(b for _, b in sent), "calls": [n for n, _ in sent],
                              "dtensor_collectives": counts,
                              "loopback_bytes_all_ranks": lo1 - lo0}
        finally:
            for n, f in real.items():
                setattr(dist, n, f)
    result["communication"] = bytes_of
    # memory: each contender once (after a warm-up), the gradient kept out of the count
    mem = {}
    for name, fn in contenders.items():
        fn()
        dist.barrier()
        mem[name] = peak_extra(fn, z_loc.numel() * 4)
        dist.barrier()
    result["peak_extra_bytes"] = mem
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    result["seconds"] = {k: float(np.median(v)) for k, v in times.items()}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "class-parallel-cpu.json"))
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    T, C = args.tokens, args.classes
    if args.role == "single":
        print(json.dumps(single(T, C, args.reps)))
        return 0
    if args.role == "ranks":
        import torch  # noqa: F401  (imported once, shared by the forked ranks)
        import xseqloss  # noqa: F401
        init = os.path.join(args.out, "init")
        pids = []
        for r in range(args.world):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    rank_main(r, args.world, init, T, C, args.reps, args.out)
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            pids.append(pid)
        return 1 if any(os.waitpid(p, 0)[1] for p in pids) else 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    me = os.path.abspath(__file__)
    common = ["--tokens", str(T), "--classes", str(C), "--reps", str(args.reps), "--world", str(args.world)]
    print(f"single process, {T} x {C} float32 (L = {T * C * 4 / 2**20:.0f} MB) ...", flush=True)
    one, why = harness.python_json([me, "--role", "single", *common], env=dict(os.environ), tail=3000)
    if one is None:
        print(why)
        return 1
    print(f"{args.world} gloo ranks ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rp = subprocess.run([sys.executable, me, "--role", "ranks", "--out", tmp, *common], env=env,
                            capture_output=True, text=True)
        if rp.returncode:
            print(rp.stdout[-3000:], rp.stderr[-3000:])
            return 1
        ranks = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(args.world)]
    L = T * C * 4
    names = list(ranks[0]["seconds"])
    rows = []
    print(f"\n{'contender':28s} {'fwd+bwd s':>10s} {'/ single':>9s} {'peak extra / L (per rank)':>28s} "
          f"{'loopback bytes / rank':>22s}")
    print(f"{'single process (2 threads)':28s} {one['seconds']:10.3f} {1.0:9.2f} "
          f"{one['peak_extra_bytes'] / L:28.3f} {0:22d}")
    for n in names:
        s = max(r["seconds"][n] for r in ranks)
        m = max(r["peak_extra_bytes"][n] for r in ranks)
        b = ranks[0]["communication"][n]["loopback_bytes_all_ranks"] // args.world
        rows.append({"contender": n, "seconds": s, "vs_single": s / one["seconds"], "peak_extra_x_L": m / L,
                     "bytes_sent_per_rank_loopback": b,
                     "bytes_counted_per_rank": ranks[0]["communication"][n]["bytes_counted"],
                     "collectives": ranks[0]["communication"][n]["calls"] or
                     ranks[0]["communication"][n]["dtensor_collectives"]})
        print(f"{n:28s} {s:10.3f} {s / one['seconds']:9.2f} {m / L:28.3f} {b:22d}")
    ratio = ranks[0]["seconds"]["xseqloss class_parallel"] / ranks[0]["seconds"]["torch loss_parallel"]
    print(f"\nxseqloss / loss_parallel time (rank 0): {ratio:.2f}; bytes per token (xseqloss): "
          f"{rows[0]['bytes_sent_per_rank_loopback'] / T:.1f} (O(tokens x C) would be {C * 4} per token)")
    cost = ranks[0]["seconds"]["xseqloss class_parallel"] - ranks[0]["seconds"]["xseqloss, no value checksum"]
    print(f"cost of the checksums of the replicated values (targets here) in the first all_gather, rank 0: "
          f"{cost * 1e3:.2f} ms per call ({cost / ranks[0]['seconds']['xseqloss class_parallel'] * 100:.1f}% of "
          f"the call; rounds interleaved, medians: within noise when small)")
    for r in rows:
        print(f"  {r['contender']}: collectives {r['collectives']}")
    print(f"values: xseqloss {ranks[0]['value']:.7f}, loss_parallel {ranks[0]['loss_parallel_value']:.7f}")
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "tokens": T, "classes": C, "world": args.world, "slices": ranks[0]["sizes"], "logits_bytes": L,
           "single": one, "rows": rows, "xseqloss_over_loss_parallel": ratio, "value_checksum_seconds": cost,
           "values": {"xseqloss": ranks[0]["value"], "loss_parallel": ranks[0]["loss_parallel_value"]},
           "caveat": "2 processes share 2 cores (one thread each); the single process uses 2 threads"}
    harness.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
