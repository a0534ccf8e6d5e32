"""Run the conformance suite: every installed backend, every device it reaches.

``run()`` returns ``{"environment": {...}, "results": [...]}``; see checks.py
for the record format and report.py for the Markdown report.
"""

from __future__ import annotations

import datetime
import fnmatch
import importlib
import os
import platform
import sys
import time
import warnings
from typing import Callable, Iterable

from . import cases as case_matrix
from .adapters import ADAPTERS
from .checks import check_case, check_errors, reference_of
from .linear import check_linear
from .pooling import check_pooling
from .stats_cases import expand_linear_stats, expand_stats
from .stats_checks import run_stats

BACKENDS = ("numpy", "torch", "tensorflow", "jax")

# The quick subset (``xseqloss conformance --quick``, the CLI test): a few
# cases that still touch every check kind.
QUICK_CASES = ("ntc", "nct", "mix_uniform", "soft", "red_per_sequence_weights", "garbage_masked")
QUICK_ERRORS = ("target_ge_C", "lengths_gt_T", "mask_shape", "unknown_reduction")
QUICK_STATS = ("st_ntc", "st_temp_token_shift", "st_bad_target", "lst_plain_t15")  # token_stats: a few of stats_cases
# The distributed cases of the default report (``xseqloss conformance`` without ``--full``): uneven
# torch slices and a padded JAX vocabulary, every option family, and token_stats on both engines.
QUICK_DISTRIBUTED = ("tp_c8_zloss_softcap_mix", "tp_c12_soft_cw_zloss", "mix_others_tnc", "red_per_sequence_positions",
                     "st_ids3_tnc_shift_t05", "tp_st_c8_temp_token_ids")

# Every kernel of a backend is forced and checked (xseqloss/plan/engine.py), not only the one "auto"
# picks for the suite's small inputs: the chunked kernels with chunks of a few rows (every case
# crosses chunk boundaries) and the reusable gradient buffer at every size. Per backend: kernel ->
# the base cases it runs (None: all), the dtypes, and its sizes.
TINY = dict(chunk_elements=12, buffer_min_bytes=0)
PLAIN_CASES = ("ntc", "nct", "tnc", "nc", "cnt", "c", "mask", "lengths", "ignore_default", "ignore_in_range",
               "weights", "weights_tokens", "mask_lengths_ignore", "garbage_masked", "garbage_ignored",
               "big_near_max*", "huge_near_max", "all_masked_mean_zero", "all_ignored_*", "red_per_sequence_tnc",
               "red_per_position_nct", "red_sequence_mean_cnt", "normalizer_zero_nan", "vocab32k", "multichunk*")
# The Triton kernel (xseqloss/backends/torch/triton.py, API.md 10): every option it covers, float32
# and bfloat16, C = 32000 crossing its blocks, NaN in rows that do not count, p(y) -> 1 in
# bfloat16; it runs where a CUDA device is, or on CPU under TRITON_INTERPRET=1 (slow: this subset).
TRITON_CASES = ("ntc", "tnc", "nc", "c", "c1", "vocab32k", "vocab32k_zloss_cap", "mask", "lengths", "ignore_default",
                "ignore_collection", "mask_lengths_ignore", "weights", "weights_tokens", "class_weights",
                "class_weights_zero_ignore", "smooth_uniform", "smooth_others", "mix_uniform", "mix_others",
                "zloss", "zloss_mix", "zloss_class_weights", "softcap", "softcap_zloss_mix", "red_none", "red_sum",
                "red_per_sequence_weights", "red_sequence_mean_tokens", "normalizer_mean", "big_near_max*",
                "huge_near_max*", "neginf_nontarget", "masked_vocab_cw", "garbage_masked", "garbage_mix",
                "garbage_ignored", "garbage_lengths_softcap", "all_ignored_*", "shift1", "segments_mean")
ENGINES = {
    "numpy": {"native": (None, None, {}), "chunked": (None, None, TINY)},
    "torch": {"native": (None, None, {}), "chunked": (None, None, TINY),
              "triton": (TRITON_CASES, ("float32", "bfloat16"), {})},
    "tensorflow": {"xla": (PLAIN_CASES, ("float32", "bfloat16"), {}),
                   "native": (("multichunk*",), None, {})},
    "jax": {"native": (("ntc", "mask", "mix_uniform", "soft", "zloss", "big_near_max", "garbage_ignored",
                        "red_mean_weights", "multichunk*"), ("float32",), {})},
}

# token_stats under a forced kernel: TensorFlow's fused-layer chunk kernel compiled by XLA ("auto"
# compiles it from 16 MB chunks on, which the suite's inputs never reach).
STATS_ENGINES = {"tensorflow": {"xla": ("lst_*",)}}


def _kernel_unavailable(backend: str, kernel: str, device: str) -> str | None:
    """Why a forced kernel cannot run here (reported, never counted as passing), or None."""
    if (backend, kernel) != ("torch", "triton"):
        return None
    from xseqloss.internals import part; torch_triton = part("torch", "triton")
    if not torch_triton.available():
        return "the triton package does not import" if not torch_triton._AVAILABLE else \
            "no CUDA device and TRITON_INTERPRET=1 is not set"
    if device == "cpu" and not torch_triton._interpret_requested():
        return "on CPU it runs only under TRITON_INTERPRET=1 (tests/test_triton_conformance.py sets it)"
    return None


def _version(module: str) -> str | None:
    try:
        m = importlib.import_module(module)
    except Exception:
        return None
    return getattr(m, "__version__", "unknown")


def _quiet_frameworks() -> None:
    """Less noise while the suite runs (call inside warnings.catch_warnings())."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message=".*did you pass softmax outputs.*")


def environment(backends: Iterable[str], devices: dict) -> dict:
    import xseqloss
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "xseqloss": getattr(xseqloss, "__version__", "unknown"),
        "versions": {m: _version(m) for m in ("numpy", "ml_dtypes", "torch", "tensorflow", "keras", "jax",
                                                "jaxlib", "optax")},
        "backends": list(backends),
        "devices": devices,
    }
    if "tensorflow" in env["backends"]:
        try:  # the Keras natives run on the TensorFlow backend of Keras
            import keras
            env["keras_backend"] = keras.backend.backend()
        except Exception:
            pass
    return env


def numpy_accepts_bfloat16() -> tuple[bool, str]:
    """Ask the package whether the numpy backend takes ml_dtypes.bfloat16 logits."""
    import numpy as np
    try:
        import ml_dtypes
    except ImportError:
        return False, "ml_dtypes is not installed"
    import xseqloss as xsl
    x = np.zeros((1, 2, 3), dtype=ml_dtypes.bfloat16)
    try:
        with xsl.use_backend("numpy"):
            xsl.sequence_cross_entropy(x, np.zeros((1, 2), np.int64))
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def select_cases(patterns: Iterable[str] | None = None, quick: bool = False) -> list[dict]:
    specs = case_matrix.BASE_CASES
    if quick:
        specs = [s for s in specs if s["name"] in QUICK_CASES]
    if patterns:
        pats = list(patterns)
        specs = [s for s in specs if any(fnmatch.fnmatchcase(s["name"], p) or p in s["name"] for p in pats)]
    return specs


def _device_wanted(device: str, wanted: Iterable[str] | None) -> bool:
    if not wanted:
        return True
    kind = "cpu" if device == "cpu" else "gpu"
    for w in wanted:
        w = w.lower()
        if w == device or w == kind or (w == "cuda" and kind == "gpu") or device.startswith(w + ":"):
            return True
    return False


def _resolve_backends(backends: Iterable[str] | None) -> list[str]:
    if backends is None:
        return [b for b in BACKENDS if ADAPTERS[b].available()]
    names = list(backends)
    for b in names:
        if b not in ADAPTERS:
            raise ValueError(f"unknown backend {b!r}; choose from {list(BACKENDS)}")
        if not ADAPTERS[b].available():
            raise RuntimeError(f"backend {b!r} was requested but its framework is not installed")
    return names


def _engine_runs(case, names, dtypes) -> bool:
    if dtypes is not None and case.dtype not in dtypes:
        return False
    return names is None or any(fnmatch.fnmatchcase(case.base, p) for p in names)


def run_engine(backend: str, kernel: str, device: str = "cpu", exclude: Iterable[str] = (),
               progress: Callable[[str], None] | None = None) -> dict:
    """Only the cases ``ENGINES[backend][kernel]`` runs, with that kernel forced, on ``device``
    (the Triton kernel through the interpreter in CI: tests/test_triton_conformance.py)."""
    say = progress or (lambda msg: None)
    pats, dtypes, sizes = ENGINES[backend][kernel]
    specs = [s for s in case_matrix.BASE_CASES
             if (pats is None or any(fnmatch.fnmatchcase(s["name"], p) for p in pats))
             and not any(fnmatch.fnmatchcase(s["name"], p) for p in exclude)]
    mine = [c for c in case_matrix.expand(specs) if _engine_runs(c, pats, dtypes)]
    why = _kernel_unavailable(backend, kernel, device)
    if why:
        raise RuntimeError(f"kernel {kernel} cannot run on {backend}/{device}: {why}")
    adapter = ADAPTERS[backend]
    results: list[dict] = []
    with adapter.engine(kernel, **sizes):
        for i, case in enumerate(mine):
            results += check_case(adapter, case, device, reference_of(case), deterministic=False,
                                  natives=False, engine=kernel, held=True)
            if (i + 1) % 20 == 0:
                say(f"[{backend}/{device}] kernel {kernel}: {i + 1}/{len(mine)} cases")
    return {"results": results, "cases": len(mine)}


def run(backends: Iterable[str] | None = None, devices: Iterable[str] | None = None,
        progress: Callable[[str], None] | None = None, cases: Iterable[str] | None = None,
        quick: bool = False, compiled: bool = True, errors: bool = True, jobs: int = 1,
        engines: bool = True) -> dict:
    """Run the suite and return ``{"environment", "results", "not_applicable"}``.

    backends: names to run (default: every installed one; a requested one that
        is not installed raises).  devices: "cpu", "gpu"/"cuda" or a full label
        such as "cuda:0" (default: all found).  cases: fnmatch patterns or
        substrings of base case names.  quick: the small subset (QUICK_CASES).
        jobs: run up to this many backends at once, each in its own process
        (JAX spends most of its time compiling, on one core).  engines: also
        force every other kernel of each backend (``ENGINES``) on its cases.
    """
    with warnings.catch_warnings():
        _quiet_frameworks()
        names = _resolve_backends(backends)
        if jobs > 1 and len(names) > 1:
            return _run_parallel(names, jobs, progress, dict(devices=None if devices is None else list(devices),
                                                             cases=None if cases is None else list(cases),
                                                             quick=quick, compiled=compiled, errors=errors,
                                                             engines=engines))
        return _run_here(names, devices, progress, cases, quick, compiled, errors, engines)


def _run_here(names: list[str], devices: Iterable[str] | None, progress: Callable[[str], None] | None,
              cases: Iterable[str] | None, quick: bool, compiled: bool, errors: bool,
              engines: bool = True) -> dict:
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    specs = select_cases(cases, quick)
    all_cases = case_matrix.expand(specs)
    error_names = list(QUICK_ERRORS) if quick else None
    if cases and not quick:
        error_names = []  # a case filter selects cases only
    say(f"{len(specs)} base cases, {len(all_cases)} with dtypes; reference ...")
    refs = {c.name: reference_of(c) for c in all_cases}
    say(f"reference done in {time.perf_counter() - t0:.1f}s")

    results: list[dict] = []
    dev_map: dict[str, list[str]] = {}
    not_applicable: list[dict] = []
    timings: dict[str, float] = {}
    for b in names:
        adapter = ADAPTERS[b]
        devs = [d for d in adapter.devices() if _device_wanted(d, devices)]
        dev_map[b] = devs
        todo = all_cases
        if b == "numpy":
            ok, why = numpy_accepts_bfloat16()
            if not ok:
                todo = [c for c in all_cases if c.dtype != "bfloat16"]
                not_applicable.append({"backend": b, "dtype": "bfloat16", "cases": len(all_cases) - len(todo),
                                       "reason": "the numpy backend does not accept ml_dtypes.bfloat16 logits: "
                                                 + why})
        for dev in devs:
            tb = time.perf_counter()
            say(f"[{b}/{dev}] {len(todo)} cases")
            for i, case in enumerate(todo):
                use_compiled = compiled and (case.torch_compile and case.dtype == "float32" if b == "torch"
                                             else case.jit and case.dtype in COMPILED_DTYPES.get(b, ()))
                results += check_case(adapter, case, dev, refs[case.name], compiled=use_compiled,
                                      deterministic=(dev == "cpu"),
                                      upstream=b not in UPSTREAM_DTYPES or case.dtype in UPSTREAM_DTYPES[b])
                if (i + 1) % 50 == 0:
                    spent = time.perf_counter() - tb
                    say(f"[{b}/{dev}] {i + 1}/{len(todo)} cases, {spent:.0f}s, "
                        f"about {spent / (i + 1) * (len(todo) - i - 1):.0f}s left for these cases")
            for kernel, (pats, dtypes, sizes) in (ENGINES.get(b, {}) if engines else {}).items():
                mine = [c for c in todo if _engine_runs(c, pats, dtypes)]
                why = _kernel_unavailable(b, kernel, dev)
                if why:
                    say(f"[{b}/{dev}] kernel {kernel}: not run ({why})")
                    not_applicable.append({"backend": b, "dtype": "all", "cases": len(mine),
                                           "reason": f"kernel {kernel} on {dev}: {why}"})
                    continue
                say(f"[{b}/{dev}] kernel {kernel}: {len(mine)} cases")
                with adapter.engine(kernel, **sizes):
                    for case in mine:
                        results += check_case(adapter, case, dev, refs[case.name], deterministic=False,
                                              natives=False, engine=kernel, held=True)
            if errors and error_names != []:
                say(f"[{b}/{dev}] error catalogue")
                results += check_errors(adapter, dev, compiled=compiled, names=error_names)
                results += check_errors(adapter, dev, compiled=compiled, names=error_names, linear=True)
                results += check_pooling(b, dev)
                say(f"[{b}/{dev}] the fused output layer")
                results += check_linear(b, dev)
                stats = expand_stats() + expand_linear_stats()
                if quick:
                    stats = [c for c in stats if c.name.split("/")[0] in QUICK_STATS]
                say(f"[{b}/{dev}] token_stats: {len(stats)} cases")
                results += run_stats(adapter, dev, stats, compiled=compiled)
                for kernel, pats in (STATS_ENGINES.get(b, {}) if engines else {}).items():
                    mine = [c for c in stats if any(fnmatch.fnmatch(c.name.split("/")[0], p) for p in pats)]
                    say(f"[{b}/{dev}] token_stats, kernel {kernel}: {len(mine)} cases")
                    with adapter.engine(kernel):
                        results += run_stats(adapter, dev, mine, compiled=False, engine=kernel)
            timings[f"{b}/{dev}"] = round(time.perf_counter() - tb, 1)
            fails = sum(1 for r in results if r["backend"] == b and r["device"] == dev and not r["passed"])
            say(f"[{b}/{dev}] done in {timings[f'{b}/{dev}']}s, {fails} failing")
    env = environment(names, dev_map)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["seconds_per_backend"] = timings
    env["gpu_found"] = any(d != "cpu" for ds in dev_map.values() for d in ds)
    env["cases"] = {"base": len(specs), "with_dtypes": len(all_cases)}
    return {"environment": env, "results": results, "not_applicable": not_applicable}


# A child process: load this very suite (under the same module name, from the
# same folder, so that the installed xseqloss._conformance and the repository's
# conformance/ both work), run one backend and write its report as JSON.
# LOAD_SUITE (shared with distributed.py's children) imports the suite as ``mod`` from sys.argv[1:3].
LOAD_SUITE = """
import importlib, importlib.util, json, os, sys
name, folder = sys.argv[1:3]
try:
    mod = importlib.import_module(name)
except ImportError:
    spec = importlib.util.spec_from_file_location(name, folder + "/__init__.py",
                                                  submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
"""
_CHILD = """
import os
if os.environ.get("XSEQLOSS_QUIET_TENSORFLOW") == "1":
    from xseqloss._quiet import tensorflow_quietly
    tensorflow_quietly()
""" + LOAD_SUITE + """
out, backend, kw = sys.argv[3:6]
rep = mod.run(backends=[backend], progress=lambda m: print("[conformance] " + m, file=sys.stderr, flush=True),
              **json.loads(kw))
mod.write_json(rep, out)
"""

# Longest first, so that the slowest backend starts at once.
_EXPECTED_ORDER = ("jax", "tensorflow", "torch", "numpy")


def _run_parallel(names: list[str], jobs: int, progress: Callable[[str], None] | None, kw: dict) -> dict:
    import json
    import subprocess
    import tempfile
    from .report import read_json

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    package = __name__.rsplit(".", 1)[0]
    folder = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # two frameworks may share one GPU: neither may grab all of its memory up front
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    queue = sorted(names, key=lambda b: _EXPECTED_ORDER.index(b) if b in _EXPECTED_ORDER else 99)
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        running: dict[str, tuple] = {}
        while queue or running:
            while queue and len(running) < jobs:
                b = queue.pop(0)
                out = os.path.join(tmp, b + ".json")
                proc = subprocess.Popen([sys.executable, "-c", _CHILD, package, folder, out, b, json.dumps(kw)],
                                        env=env, stdout=subprocess.DEVNULL,
                                        stderr=None if progress else subprocess.DEVNULL)
                running[b] = (proc, out)
                say(f"[{b}] started in its own process")
            time.sleep(0.2)
            for b, (proc, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[b]
                if proc.returncode != 0 or not os.path.exists(out):
                    raise RuntimeError(f"the conformance run of backend {b!r} failed "
                                       f"(exit status {proc.returncode})")
                reports[b] = read_json(out)
    ordered = [reports[b] for b in names]
    results = [r for rep in ordered for r in rep["results"]]
    dev_map = {b: d for rep in ordered for b, d in rep["environment"]["devices"].items()}
    env_out = environment(names, dev_map)
    env_out["seconds"] = round(time.perf_counter() - t0, 1)
    env_out["seconds_per_backend"] = {k: v for rep in ordered
                                      for k, v in rep["environment"]["seconds_per_backend"].items()}
    env_out["gpu_found"] = any(rep["environment"]["gpu_found"] for rep in ordered)
    env_out["cases"] = ordered[0]["environment"]["cases"]
    env_out["jobs"] = jobs
    return {"environment": env_out, "results": results,
            "not_applicable": [n for rep in ordered for n in rep["not_applicable"]]}


# Upstream gradients other than 1: every dtype where the backend rescales a gradient formed in its
# forward pass itself (PyTorch's fused kernels); the widest two where autodiff does (JAX; and
# TensorFlow, whose XLA kernel's rescale the "xla" kernel runs also check), to keep the run short.
UPSTREAM_DTYPES = {"jax": ("float64", "float32"), "tensorflow": ("float64", "float32")}

# The dtypes a jit-flagged case runs compiled in: jax.jit compiles quickly,
# XLA through tf.function more slowly (two dtypes keep the full run short).
COMPILED_DTYPES = {"jax": ("float64", "float32", "bfloat16"),
                   "tensorflow": ("float32", "bfloat16")}


def failures(report: dict) -> list[dict]:
    return [r for r in report["results"] if not r["passed"]]
