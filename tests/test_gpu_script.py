"""benchmarks/gpu.sh and benchmarks/gpu.py's CPU-side logic (the GPU run itself happens elsewhere, by
hand): argument parsing, the summary writer (benchmarks/gpu_report.py), the loud skipping of whatever
is missing, and smoke runs on the CPU so that a GPU session does not discover a typo: the workers
(benchmarks/gpu_workers.py, --allow-cpu) and gpu.sh's test step, tests/test_triton_cuda.py, through
Triton's interpreter."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers.triton_runs import require_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "gpu.py")
SHELL = os.path.join(BENCHMARKS, "gpu.sh")


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py as a module (its siblings gpu_report, gpu_workers and harness imported from
    benchmarks/, which is on sys.path only while it loads)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(BENCHMARKS)
        spec = importlib.util.spec_from_file_location("xseqloss_bench_gpu", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(gpu):
    """benchmarks/gpu_report.py, as gpu.py imported it."""
    return sys.modules["gpu_report"]


def _run(args, timeout=60):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _cuda():
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------ arguments

def test_defaults_are_the_issue_sizes(gpu):
    a = gpu.parse_args(["out"])
    assert a.outdir == "out"
    assert a.sizes == ["8192x32000", "8192x128256"] and a.lce_size == "8192x4096x128256"
    assert a.dtypes == ["float32", "bfloat16"] and a.kernels == ["triton", "chunked", "native"]
    assert a.workers == gpu.WORKERS and a.reps == 10 and not a.tiny and not a.allow_cpu


def test_tiny_and_overrides(gpu):
    a = gpu.parse_args(["out", "--tiny"])
    assert a.sizes == gpu.TINY_CE_SIZES and a.lce_size == gpu.TINY_LCE_SIZE and a.reps == 2 and a.warmup <= 1
    a = gpu.parse_args(["out", "--tiny", "--reps", "5", "--sizes", "16x100", "--kernels", "triton",
                        "--workers", "ce-base", "ce-triton", "--budget", "30", "--no-compile"])
    assert a.reps == 5 and a.sizes == ["16x100"] and a.kernels == ["triton"]
    assert a.workers == ["ce-base", "ce-triton"] and a.budget == 30 and a.no_compile


@pytest.mark.parametrize("bad", [["out", "--sizes", "8192"], ["out", "--lce-size", "8x8"],
                                 ["out", "--kernels", "cuda"], ["out", "--dtypes", "float64"],
                                 ["out", "--reps", "0"], ["out", "--workers", "everything"],
                                 ["out", "--workers", "checks"]])  # the kernel checks: tests/test_triton_cuda.py
def test_bad_arguments_are_errors(gpu, bad):
    with pytest.raises(SystemExit) as exc:
        gpu.parse_args(bad)
    assert exc.value.code != 0


# ------------------------------------------------------------------------------------- summary

def _fake_result():
    rows = [
        {"bench": "ce", "size": "8192x32000", "dtype": "bfloat16", "contender": "floor: copy of the logits",
         "ms": 0.5},
        {"bench": "ce", "size": "8192x32000", "dtype": "bfloat16", "contender": "F.cross_entropy eager",
         "ms": 2.0, "peak_x_logits": 3.0, "loss": 10.5, "reference": True},
        {"bench": "ce", "size": "8192x32000", "dtype": "bfloat16", "contender": "xseqloss[triton]",
         "ms": 0.8, "peak_x_logits": 1.0, "loss": 10.5, "note": "launches 1 | per call"},
        {"bench": "lce", "size": "8192x4096x128256", "dtype": "bfloat16", "logits_size": "8192x128256",
         "contender": "matmul alone: h @ W^T (logits)", "ms": 5.0},
        {"bench": "lce", "size": "8192x4096x128256", "dtype": "bfloat16", "logits_size": "8192x128256",
         "contender": "matmul alone: g @ W (d hidden)", "ms": 5.0},
        {"bench": "lce", "size": "8192x4096x128256", "dtype": "bfloat16", "logits_size": "8192x128256",
         "contender": "floor: copy of the logits", "ms": 2.0},
        {"bench": "lce", "size": "8192x4096x128256", "dtype": "bfloat16", "logits_size": "8192x128256",
         "contender": "matmul + F.cross_entropy eager", "ms": 30.0, "reference": True, "peak_x_logits": 4.0},
    ]
    return {"environment": {"date": "2026-12-01", "gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
                            "jax": None, "budget_s": 300},
            "skipped": [{"what": "Liger-Kernel contenders", "why": "liger_kernel is not installed"},
                        {"what": "optax under jax.jit", "why": "jax is not installed"}],
            "errors": [{"what": "worker compiled", "error": "timed out"}],
            "rows": rows, "seconds": 123.0}


def test_floors_and_matmul_ratios(gpu):
    res = _fake_result()
    gpu._relate_to_floors(res["rows"])
    by = {(r.get("bench"), r.get("contender")): r for r in res["rows"]}
    assert by[("ce", "xseqloss[triton]")]["x_floor"] == pytest.approx(1.6)
    assert by[("ce", "F.cross_entropy eager")]["x_floor"] == pytest.approx(4.0)
    lce = by[("lce", "matmul + F.cross_entropy eager")]
    assert lce["x_floor"] == pytest.approx(15.0)  # the logits-size copy of its own worker
    assert lce["x_matmuls"] == pytest.approx(3.0)  # over the sum of the matmuls alone


def test_markdown_tables_and_skip_lines(gpu, report):
    res = _fake_result()
    gpu._relate_to_floors(res["rows"])
    md = report.render_markdown(res)
    assert "- SKIPPED: Liger-Kernel contenders: liger_kernel is not installed" in md
    assert "- SKIPPED: optax under jax.jit: jax is not installed" in md
    assert "## Cross-entropy forward+backward, 8192x32000, bfloat16" in md
    assert "| contender | ms | x floor | peak (x logits) | vs ref | loss | note |" in md
    assert "| xseqloss[triton] | 0.8 | 1.6 | 1 | 0.4 | 10.5 | launches 1 / per call |" in md  # '|' escaped
    assert "| F.cross_entropy eager (ref) | 2 | 4 | 3 | 1 | 10.5 |  |" in md
    assert "## Fused output layer forward+backward, 8192x4096x128256, bfloat16" in md
    assert "| contender | ms | x floor | x matmuls | peak (x logits) | vs ref | loss | note |" in md
    assert "| matmul + F.cross_entropy eager (ref) | 30 | 15 | 3 | 4 | 1 | - |  |" in md
    assert "- worker compiled: timed out" in md
    lines = md.splitlines()
    n = None
    for i, line in enumerate(lines):  # every table row has as many cells as its header
        if not line.startswith("|"):
            n = None
        elif n is None:
            assert lines[i + 1].startswith("|---") and lines[i + 1].count("|") == line.count("|"), line
            n = line.count("|")
        else:
            assert line.count("|") == n, line


def test_nothing_skipped_says_so(report, tmp_path):
    res = {"environment": {}, "skipped": [], "errors": [], "rows": [], "seconds": 1.0}
    j, m = report.write_outputs(res, str(tmp_path / "o"))
    assert json.load(open(j))["rows"] == []
    assert "Nothing was skipped." in open(m).read()


# --------------------------------------------------------------------------- runs on this machine

def test_without_cuda_everything_is_skipped_loudly(tmp_path):
    if _cuda():
        pytest.skip("CUDA is present here: the no-CUDA path is not what this machine runs")
    out = tmp_path / "gpu"
    p = _run([str(out), "--tiny", "--budget", "60"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "SKIPPED:" in p.stdout and "CUDA is not available" in p.stdout, p.stdout
    if importlib.util.find_spec("liger_kernel") is None:
        assert "liger_kernel is not installed" in p.stdout
    if importlib.util.find_spec("cut_cross_entropy") is None:
        assert "cut_cross_entropy is not installed" in p.stdout
    res = json.load(open(out / "gpu-bench.json"))
    md = (out / "gpu-bench.md").read_text()
    assert any("CUDA is not available" in s["why"] for s in res["skipped"])
    assert "- SKIPPED: " in md and "CUDA is not available" in md
    assert not res["errors"], res["errors"]


def test_out_of_time_is_skipped_loudly(tmp_path):
    p = _run([str(tmp_path / "o"), "--tiny", "--allow-cpu", "--budget", "1", "--workers", "ce-base", "lce"])
    assert p.returncode == 0, p.stderr[-2000:]
    if importlib.util.find_spec("torch") is not None:
        assert "SKIPPED: worker 'ce-base': out of time" in p.stdout, p.stdout
    assert (tmp_path / "o" / "gpu-bench.md").exists()


def test_worker_code_runs_on_cpu(tmp_path):
    """--allow-cpu runs the PyTorch workers on CPU tensors (times meaningless): the measurement,
    row, floor and summary code all run, and xseqloss agrees with F.cross_entropy."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    out = tmp_path / "smoke"
    p = _run([str(out), "--tiny", "--allow-cpu", "--no-compile", "--reps", "1", "--warmup", "0",
              "--workers", "ce-base", "ce-triton", "lce"], timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.load(open(out / "gpu-bench.json"))
    assert not res["errors"], res["errors"]
    names = {(r["bench"], r["dtype"], r["contender"]) for r in res["rows"]}
    for dt in ("float32", "bfloat16"):
        assert ("ce", dt, "floor: copy of the logits") in names
        assert ("ce", dt, "F.cross_entropy eager") in names
        assert ("ce", dt, "xseqloss[triton]") in names and ("ce", dt, "xseqloss[triton] inplace_backward") in names
    assert ("lce", "bfloat16", "matmul + F.cross_entropy eager") in names
    assert all(r.get("x_floor") for r in res["rows"] if r["bench"] == "ce")
    ce = {(r["dtype"], r["contender"]): r for r in res["rows"] if r["bench"] == "ce"}
    ref = ce[("float32", "F.cross_entropy eager")]["loss"]
    assert ce[("float32", "xseqloss[triton]")]["loss"] == pytest.approx(ref, rel=1e-5)
    assert "max abs grad diff vs F.cross_entropy" in ce[("float32", "xseqloss[triton]")]["note"]
    md = (out / "gpu-bench.md").read_text()
    assert "## Cross-entropy forward+backward, 64x1000, float32" in md


def test_triton_cuda_tests_run_on_cpu_through_the_interpreter():
    """gpu.sh's test step, tests/test_triton_cuda.py, on CPU tensors through Triton's interpreter
    (TRITON_INTERPRET=1, small sizes): its code runs before a GPU session runs it for real."""
    require_triton()
    if _cuda():
        pytest.skip("CUDA is present here: tests/test_triton_cuda.py runs on it in this session")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_cuda.py"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0 and "5 passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


def test_shell_script_parses_and_documents_the_wheels():
    p = subprocess.run(["bash", "-n", SHELL], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    text = open(SHELL).read()
    head = text.split("set -u")[0]
    for word in ("liger-kernel", "cut-cross-entropy", "triton", "pip install --no-deps wheels/*.whl",
                 "pip install --no-deps", "-e .", "gpu-report.json", "gpu-report.md", "xseqloss info",
                 "pytest", "triton-cuda-tests.txt", "triton-cuda-tests.xml"):
        assert word in head, word
    body = text.split("set -u")[1]
    assert "-m pytest" in body and "tests/test_triton_cuda.py" in body and '$OUT/triton-cuda-tests.xml' in body
