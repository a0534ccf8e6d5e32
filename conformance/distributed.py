"""Conformance across devices (API.md 9.2): classes split across workers, ``class_parallel``.

``xseqloss conformance --distributed`` runs a declarative subset of the case matrix
(``SHARDED_CASES`` of ``cases.BASE_CASES`` and the extra cases ``TP_CASES``, whose C divides by 4)
with the class axis split over workers, against the same float64 reference and tolerances as the
single-device suite:

* ``torch`` / ``cpu x2`` and ``cpu x3`` / ``gloo class_parallel``: one launcher process imports
  torch once and forks the ranks of one gloo group per world size (file:// rendezvous in a fresh
  temporary folder, so no port is shared); every case runs in that one group. Slices are uneven
  (``torch_slices``): over 2 ranks 2/3 and 1/3 of C, over 3 ranks one rank holds a single class.
  Each rank calls ``sequence_cross_entropy(local_logits, targets, class_parallel=group.WORLD)``.
* ``jax`` / ``cpu x4`` / ``shard_map class_parallel``: a process with
  ``--xla_force_host_platform_device_count=4``; ``jax.shard_map`` over a ("tp",) mesh with the
  class axis of the logits (and of soft targets and class weights) split, ``class_parallel="tp"``,
  ``out_specs=P()``. Where C does not divide by 4 the class axis is padded to the next multiple
  with junk (logits 0.5, soft targets 0.3, class weights 2) and ``num_classes=C`` marks the
  padding, as a user pads an uneven vocabulary; the padded columns' gradient must be exactly 0
  (the value row fails otherwise) and is left out of the comparison.
* ``jax`` / ``cpu x4`` / ``jit NamedSharding``: plain ``jax.jit`` with no option, the logits
  ``device_put`` with a class-sharded ``NamedSharding``; where C does not divide by 4 (JAX refuses
  an indivisible sharding for ``device_put``) the logits are constrained to that sharding inside the
  program (``with_sharding_constraint``), which XLA pads.

The JAX engines run in processes of their own (the jit one in two, a dtype each) and the torch
launcher in another, ``jobs`` of them at a time (``UNITS``); each has a timeout, so a hung
collective gives failing rows instead of a hung run.

Checks (one row per engine, case, dtype and check, in the single-device record format; the worst
worker is named in the detail): ``value`` (every worker's loss against the reference, its shape and
dtype), ``grad`` (every worker's gradient against its slice of the reference gradient, and its
dtype), ``upstream`` (the same with the suite's upstream gradients other than 1) and ``replicated``
(every worker holds bitwise the same loss; exact). The comparison lives in ``check_sharded``, in
this process; the workers (distributed_workers.py, run in the child processes) only compute.

The "stats" check kind (``token_stats(..., class_parallel=...)``, API.md 11.4) runs on the same
engines over the stats cases of distributed_stats.py: rows ``stats``, ``stats_replicated`` and
``stats_vjp`` against the float64 reference of stats_reference.py (cases "stats:<name>/<dtype>").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any, Callable, Iterable


from .cases import BASE_CASES, MIX, Case, _c, make_case
from .checks import _short, reference_of
from .runner import LOAD_SUITE
from .distributed_checks import DTYPES, check_sharded, read_outcomes, select_specs
from . import distributed_stats as dstats

TORCH_WORLDS = (2, 3)
JAX_DEVICES = 4
TIMEOUT = 600  # seconds for one child process (the torch launcher, or the JAX process)

# The base cases of the single-device matrix that run sharded: every option of API.md 9.2. Each has
# C >= 3 (every rank of 3 holds a class). Their own dtypes are narrowed to ``DTYPES``.
SHARDED_CASES = (
    # layouts: the class axis last, in the middle, first
    "ntc", "nct", "tnc", "nc", "cnt", "t_eq_c_nct",
    # which tokens count
    "mask", "lengths", "lengths_zero_per_sequence", "ignore_default", "ignore_in_range", "ignore_collection",
    "ignore_none", "mask_lengths_ignore",
    # weights
    "weights", "weights_tokens", "weights_negative_tokens", "class_weights", "class_weights_zero_ignore",
    "weights_class_weights_none",
    # label smoothing, both conventions (Megatron-LM issue 737 is the counter-example)
    "smooth_uniform", "smooth_others", "smooth_one", "smooth_others_one", "mix_uniform", "mix_others",
    "mix_others_tnc",
    # z-loss and softcap
    "zloss", "zloss_mix", "zloss_class_weights", "zloss_class_weights_soft", "softcap", "softcap_zloss_mix",
    # soft targets (sharded like the logits)
    "soft", "soft_smooth_cw", "soft_others_mix", "soft_nct_none", "soft_garbage",
    # log_probs and probs inputs
    "log_probs", "log_probs_mix", "probs", "probs_mix", "probs_soft",
    # every reduction with every denominator
    "red_none", "red_sum",
    *[f"red_{r}_{d}" for r in ("mean", "per_sequence", "per_position", "sequence_mean")
      for d in ("weights", "tokens", "positions")],
    "red_per_position_nct", "normalizer_mean", "normalizer_sequence_mean", "all_masked_mean_nan",
    "empty_sequence_nan",
    # edge values: rows whose maximum is on one worker, -inf and NaN at classes of other workers
    "big_near_max", "neginf_nontarget", "masked_vocab_soft", "masked_vocab_cw", "garbage_masked", "garbage_mix",
    # a 32,000-class vocabulary
    "vocab32k_nct_mix",
)

# Cases whose C divides by the 4 JAX devices (shard_map needs equal slices), declared like the base
# cases (cases.py keys); they run on every engine.
_S8 = dict(N=2, T=4, C=8)
_S12 = dict(N=2, T=3, C=12)
TP_CASES: list[dict[str, Any]] = [
    _c("tp_c8", "NTC", _S8),
    _c("tp_c8_nct_mask", "NCT", _S8, mask=0.3),
    _c("tp_c12_tnc_lengths_ignore", "TNC", _S12, lengths="random", ignore=0.25),
    _c("tp_c8_class_weights_zero", "NTC", _S8, class_weights="with_zero", ignore=0.2),
    _c("tp_c8_mix_uniform", "NTC", _S8, **MIX, options=dict(label_smoothing=0.15)),
    _c("tp_c12_mix_others", "NTC", _S12, **MIX, options=dict(label_smoothing=0.15, smoothing="others")),
    _c("tp_c8_zloss_softcap_mix", "NCT", _S8, **MIX, options=dict(z_loss=1e-2, logit_softcap=3.0,
                                                                  label_smoothing=0.1)),
    _c("tp_c12_soft_cw_zloss", "NTC", _S12, targets="soft", class_weights="random", mask=0.25,
       options=dict(z_loss=5e-2, label_smoothing=0.1)),
    _c("tp_c8_soft_others_nct", "NCT", _S8, targets="soft", weights="random",
       options=dict(label_smoothing=0.2, smoothing="others", reduction="none")),
    _c("tp_c8_log_probs_mix", "NTC", _S8, inputs="log_probs", **MIX, options=dict(label_smoothing=0.1)),
    _c("tp_c12_probs_soft", "NTC", _S12, inputs="probs", targets="soft", mask=0.25),
    _c("tp_c8_probs_mix", "NTC", _S8, inputs="probs", **MIX, options=dict(label_smoothing=0.1, smoothing="others")),
    _c("tp_c8_red_per_sequence_tokens", "NTC", _S8, **MIX, options=dict(reduction="per_sequence",
                                                                        denominator="tokens")),
    _c("tp_c12_red_per_position_positions", "TNC", _S12, **MIX, options=dict(reduction="per_position",
                                                                             denominator="positions")),
    _c("tp_c8_red_sequence_mean_weights", "NTC", _S8, **MIX, options=dict(reduction="sequence_mean")),
    _c("tp_c8_red_none_sum", "NTC", _S8, **MIX, options=dict(reduction="none", z_loss=1e-3)),
    _c("tp_c8_normalizer_empty_nan", "NTC", _S8, mask="all", options=dict(empty="nan")),
    _c("tp_c12_big_near_max", "NTC", _S12, logits="big_near_max", ignore=0.2),
    _c("tp_c12_masked_vocab_cw", "NTC", _S12, logits="masked_vocab", class_weights="masked_vocab", ignore=0.2,
       options=dict(reduction="sum", z_loss=1e-3)),
    _c("tp_c8_garbage_mix", "NTC", _S8, **MIX, garbage=True, options=dict(label_smoothing=0.1, z_loss=1e-3)),
]

# engine key -> (backend, device label, engine label)
ENGINES = {
    "torch-2": ("torch", "cpu x2", "gloo class_parallel"),
    "torch-3": ("torch", "cpu x3", "gloo class_parallel"),
    "jax-shard_map": ("jax", f"cpu x{JAX_DEVICES}", "shard_map class_parallel"),
    "jax-jit": ("jax", f"cpu x{JAX_DEVICES}", "jit NamedSharding"),
}


# ---------------------------------------------------------------------------------- the matrix

def specs(patterns: Iterable[str] | None = None) -> list[dict]:
    """The distributed base cases (``SHARDED_CASES`` then ``TP_CASES``), dtypes narrowed to DTYPES;
    ``patterns``: fnmatch patterns or substrings of their names, as ``--cases``."""
    return select_specs(BASE_CASES, SHARDED_CASES, TP_CASES, patterns)


def runs_on(engine: str, spec: dict) -> bool:
    """Whether ``engine`` runs the case: every torch rank holds at least one class; under shard_map
    a C that does not divide by the devices is padded (``num_classes`` marks the padding)."""
    C = spec["shape"]["C"]
    if engine.startswith("torch-"):
        return C >= int(engine.split("-")[1])
    return C >= 2


def plan(engine: str, specs_: list[dict], dtypes: Iterable[str] = DTYPES) -> list[tuple[dict, str]]:
    """(spec, dtype) pairs ``engine`` runs, in order (the worker and the checker agree on it)."""
    return [(s, dt) for s in specs_ if runs_on(engine, s) for dt in s["dtypes"] if dt in dtypes]


def torch_slices(C: int, world: int, name: str) -> list[int]:
    """Uneven slice sizes in rank order: over 2 ranks C - C // 3 and C // 3; over 3 ranks one rank
    (which one depends on the case) holds a single class and the others split the rest unevenly."""
    if world == 2:
        sizes = [C - C // 3, C // 3]
    elif world == 3:
        sizes = [1, (C - 1) - (C - 1) // 2, (C - 1) // 2]
        r = zlib.crc32(name.encode()) % 3
        sizes = sizes[-r:] + sizes[:-r] if r else sizes
    else:
        q, m = divmod(C, world)
        sizes = [q + (i < m) for i in range(world)]
    assert sum(sizes) == C and min(sizes) >= 1, (C, world, sizes)
    return sizes


def local_arrays(case: Case, lo: int, hi: int) -> dict:
    """One worker's inputs: the logits, soft targets and class weights cut to classes [lo, hi);
    index targets and the token arrays stay global."""
    k = case.layout.index("C")
    cut = tuple(slice(lo, hi) if i == k else slice(None) for i in range(len(case.layout)))
    out = dict(case.arrays)
    out["logits"] = case.arrays["logits"][cut]
    if case.soft:
        out["targets"] = case.arrays["targets"][cut]
    if "class_weights" in out:
        out["class_weights"] = case.arrays["class_weights"][lo:hi]
    return out


def class_index(case: Case, lo: int, hi: int) -> list[tuple[int, int]]:
    """The index (a (start, stop) per logits axis) of classes [lo, hi) of the gradient."""
    shape = case.arrays["logits"].shape
    k = case.layout.index("C")
    return [(lo, hi) if i == k else (0, n) for i, n in enumerate(shape)]


# ------------------------------------------------------------------------------------ the runner

def workers_of(engine: str) -> int:
    return int(engine.split("-")[1]) if engine.startswith("torch-") else JAX_DEVICES


def engines_for(backends: Iterable[str] | None) -> list[str]:
    names = None if backends is None else set(backends)
    return [e for e, (b, _, _) in ENGINES.items() if names is None or b in names]


def _available(backend: str) -> str | None:
    """Why an engine's framework cannot run here (None: it can)."""
    import importlib.util
    if importlib.util.find_spec(backend) is None:
        return f"{backend} is not installed (pip install 'xseqloss[{backend}]')"
    if backend == "torch":
        try:
            import torch.distributed as dist
        except Exception as exc:  # pragma: no cover - a broken install
            return f"torch.distributed does not import: {_short(exc)}"
        if not dist.is_available() or not dist.is_gloo_available():
            return "torch.distributed has no gloo backend in this build"
        if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
            return "the torch launcher forks its ranks (POSIX only)"
    return None


# A child process: load this very suite (under its own module name, from its folder, as runner.py's
# children do), then run one framework's engines and write what the workers gave.
_CHILD = LOAD_SUITE + """
mode, out, kw = sys.argv[3:6]
importlib.import_module(name + ".distributed_workers").child(mode, out, json.loads(kw))
"""


def _child_env(mode: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XSEQLOSS_BACKEND", None)
    if mode == "jax":  # before jax is imported there: the host platform as 4 devices
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={JAX_DEVICES}"])
        env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


# The child processes, longest first: the JAX engines in processes of their own (JAX spends its
# time compiling, on one core), the torch launcher for both world sizes (one import of torch).
# The plain-jit engine runs every case: its two dtypes go to two processes.
UNITS = (("jax-jit-float64", "jax", ("jax-jit",), ("float64",)),
         ("jax-jit-float32", "jax", ("jax-jit",), ("float32",)),
         ("jax-shard_map", "jax", ("jax-shard_map",), DTYPES),
         ("torch", "torch", ("torch-2", "torch-3"), DTYPES))


def run_distributed(backends: Iterable[str] | None = None, cases: Iterable[str] | None = None,
                    progress: Callable[[str], None] | None = None, jobs: int = 2,
                    outcomes: dict | None = None, timeout: float = TIMEOUT) -> dict:
    """Run the distributed subset; returns ``{"environment", "results", "not_applicable"}`` like
    ``runner.run`` (the environment holds what this mode adds, under "distributed"). ``backends``:
    the frameworks to run (None: torch and jax, a missing one listed as not applicable; named and
    missing: an error). ``cases``: patterns selecting the distributed cases. ``jobs``: child
    processes at once. ``outcomes``: a dict that receives the workers' raw results per engine and
    case name (for tests of the comparison)."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    wanted = engines_for(backends)
    chosen = specs(cases)
    chosen_stats = dstats.stats_specs(cases)  # token_stats: the "stats" check kind (distributed_stats.py)
    not_applicable: list[dict] = []
    ready: list[str] = []
    for e in wanted:
        b, dev, eng = ENGINES[e]
        why = _available(b)
        n = len(plan(e, chosen)) + len(dstats.stats_plan(e, chosen_stats))
        if why:
            if backends is not None and b in set(backends):
                raise RuntimeError(f"backend {b!r} was requested for --distributed but cannot run: {why}")
            not_applicable.append({"backend": b, "dtype": "all", "cases": n, "reason": f"{dev} {eng}: {why}"})
            say(f"[distributed] {b} {dev} {eng}: not run ({why})")
        elif n:
            ready.append(e)
    units = [(u, mode, [e for e in es if e in ready], dts) for u, mode, es, dts in UNITS]
    units = [u for u in units if u[2]]
    names = [s["name"] for s in chosen]
    all_cases = {(s["name"], dt): make_case(s, dt) for s in chosen for dt in s["dtypes"]}
    results: list[dict] = []
    raw: dict[str, dict] = {}
    timings: dict[str, float] = {}
    package = __name__.rsplit(".", 1)[0]
    folder = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="xseqloss-distributed-") as tmp:
        running: dict[str, tuple] = {}
        queue = list(units)

        def start():
            unit, mode, es, dts = queue.pop(0)
            out = os.path.join(tmp, unit)
            os.makedirs(out)
            log = open(os.path.join(tmp, unit + ".log"), "w+")
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, package, folder, mode, out,
                                     json.dumps({"engines": es, "cases": names, "dtypes": list(dts),
                                                 "stats": [s["name"] for s in chosen_stats]})],
                                    env=_child_env(mode), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running[unit] = (proc, out, log, time.perf_counter(), es, dts)
            say(f"[distributed] {', '.join(' '.join(ENGINES[e]) for e in es)} ({', '.join(dts)}): started in a "
                "process of its own")

        while queue and len(running) < max(1, jobs):
            start()
        # the reference, while the workers run
        needed = sorted({(s["name"], dt) for e in ready for s, dt in plan(e, chosen)})
        refs = {key: reference_of(all_cases[key]) for key in needed}
        stats_refs = dstats.references(chosen_stats, [(s["name"], dt) for e in ready
                                                      for s, dt in dstats.stats_plan(e, chosen_stats)])
        say(f"[distributed] {len(chosen)} base cases, {len(all_cases)} with dtypes; reference done in "
            f"{time.perf_counter() - t0:.1f}s")
        while running:
            time.sleep(0.1)
            for unit, (proc, out, log, tb, es, dts) in list(running.items()):
                late = time.perf_counter() - tb > timeout
                if proc.poll() is None and not late:
                    continue
                del running[unit]
                if late and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    failed = f"the {unit} process did not finish in {timeout:.0f} s (a hung collective?)"
                else:
                    failed = "" if proc.returncode == 0 else f"the {unit} process exited with status {proc.returncode}"
                log.seek(0)
                tail = log.read()[-3000:]
                log.close()
                timings[unit] = round(time.perf_counter() - tb, 1)
                if failed:
                    say(f"[distributed] {failed}:\n{tail}")
                if queue:
                    start()
                for e in es:
                    got = read_outcomes(out, e)
                    raw.setdefault(e, {}).update(got)
                    backend, dev, eng = ENGINES[e]
                    mine = plan(e, chosen, dts)
                    before = len(results)
                    for s, dt in mine:
                        o = got.get(f"{s['name']}/{dt}") or {
                            "error": (failed or "the worker wrote no result")
                            + (f"; log: {' '.join(tail.split()[-40:])}" if failed else "")}
                        results += check_sharded(backend, dev, eng, all_cases[(s["name"], dt)],
                                                 refs[(s["name"], dt)], o, workers=workers_of(e))
                    mine_stats = dstats.stats_plan(e, chosen_stats, dts)
                    for s, dt in mine_stats:
                        case, ref = stats_refs[(s["name"], dt)]
                        o = got.get(dstats.key(case.name)) or {"error": failed or "the worker wrote no result"}
                        results += dstats.check_sharded_stats(backend, dev, eng, case, ref, o, workers=workers_of(e))
                    fails = sum(1 for r in results[before:] if not r["passed"])
                    say(f"[distributed] {backend} {dev} {eng} ({', '.join(dts)}): {len(mine)} cases, "
                        f"{len(mine_stats)} token_stats cases, {fails} failing ({timings[unit]}s)")
    if outcomes is not None:
        outcomes.update(raw)
    env = {"distributed": {
        "seconds": round(time.perf_counter() - t0, 1), "seconds_per_process": timings,
        "engines": [" ".join(ENGINES[e]) for e in ready],
        "cases": {"base": len(chosen), "with_dtypes": len(all_cases), "stats": len(chosen_stats)},
    }}
    return {"environment": env, "results": results, "not_applicable": not_applicable}


def distributed_report(backends: Iterable[str] | None = None, cases: Iterable[str] | None = None,
                       progress: Callable[[str], None] | None = None, jobs: int = 2) -> dict:
    """``xseqloss conformance --distributed``: only this mode, as a full report (the environment
    of runner.run, with the multi-worker devices)."""
    from .runner import environment
    rep = run_distributed(backends=backends, cases=cases, progress=progress, jobs=jobs)
    ran = sorted({r["backend"] for r in rep["results"]})
    devices = {b: sorted({f"{r['device']} {r['engine']}" for r in rep["results"] if r["backend"] == b})
               for b in ran}
    env = environment(ran, devices)
    env.update(rep["environment"], seconds=rep["environment"]["distributed"]["seconds"], gpu_found=False,
               distributed_only=True, cases=rep["environment"]["distributed"]["cases"])
    return {**rep, "environment": env}


def merge(report: dict, extra: dict) -> dict:
    """The single-device report with the distributed one added (results, not applicable, timing)."""
    out = dict(report)
    out["results"] = report["results"] + extra["results"]
    out["not_applicable"] = report.get("not_applicable", []) + extra["not_applicable"]
    env = {**report["environment"], **extra["environment"]}
    seconds = extra["environment"]["distributed"]["seconds"]
    env["seconds"] = round(report["environment"].get("seconds", 0.0) + seconds, 1)
    env["seconds_per_backend"] = {**report["environment"].get("seconds_per_backend", {}), "distributed": seconds}
    out["environment"] = env
    return out
