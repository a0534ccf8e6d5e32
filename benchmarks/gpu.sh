#!/usr/bin/env bash
# xseqloss on an NVIDIA GPU: one command, no network, within 8 minutes on an H200.
#
#     bash benchmarks/gpu.sh OUTDIR
#
# Steps (each with its own time limit; one that fails or runs out of time is reported LOUDLY and the
# next one still runs; the exit status is 1 if any step failed):
#   1. xseqloss info                                     -> OUTDIR/info.txt
#   2. the conformance suite on CUDA (PyTorch) and GPU (JAX), PyTorch and JAX side by side
#                                                        -> OUTDIR/gpu-report.json, OUTDIR/gpu-report.md
#      and, at the same time, the PyTorch suite with XSEQLOSS_TORCH_KERNEL=triton
#                                                        -> OUTDIR/gpu-report-torch-triton.{json,md}
#   3. the Triton kernel's tests on CUDA (pytest tests/test_triton_cuda.py: every option against a
#      float64 reference, p(y) -> 1 in bfloat16, large logits, in place, past 2**31 elements)
#                                                        -> OUTDIR/triton-cuda-tests.txt,
#                                                           OUTDIR/triton-cuda-tests.xml (JUnit, with
#                                                           each test's measured error)
#   4. benchmarks/gpu.py: cross-entropy and fused-output-layer benchmarks against the HBM floor and
#      the other libraries, and a Triton launch-configuration sweep
#                                                        -> OUTDIR/gpu-bench.json, OUTDIR/gpu-bench.md
# Everything printed also goes to OUTDIR/gpu.log. Bring OUTDIR back.
#
# Setting up the GPU machine (it has torch 2.11, Triton 3.6, JAX 0.11 with CUDA, CuPy, Python 3.12;
# no TensorFlow and no network). Carry a folder of wheels along, downloaded on a machine with network
# for CPython 3.12 on linux x86_64:
#
#     pip download --no-deps --python-version 3.12 --only-binary=:all: -d wheels \
#         liger-kernel cut-cross-entropy        # the contenders (pure Python wheels)
#     # and only if the GPU machine lacks them:
#     #   triton==3.6.0 (the kernel; must match torch's), optax absl-py (the JAX contender and the
#     #   conformance suite's optax natives), pytest iniconfig pluggy packaging (step 3),
#     #   setuptools wheel (for the editable install below)
#
# then on the GPU machine, from the repository root:
#
#     pip install --no-deps wheels/*.whl
#     pip install --no-deps --no-build-isolation -e .   # optional: this script also puts the
#                                                       # repository on PYTHONPATH itself
#     bash benchmarks/gpu.sh OUTDIR
#
# Limits (seconds, environment variables): GPU_SH_TOTAL (whole script, default 470),
# GPU_SH_CONFORMANCE (step 2, default 230), GPU_SH_TESTS (step 3, default 90). Extra arguments after
# OUTDIR go to gpu.py (e.g. --no-compile, --workers ce-base ce-triton).

set -u
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu.sh OUTDIR [gpu.py options]" >&2
    exit 2
fi
OUT="$1"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
TOTAL="${GPU_SH_TOTAL:-470}"
CONF_LIMIT="${GPU_SH_CONFORMANCE:-230}"
TESTS_LIMIT="${GPU_SH_TESTS:-90}"
START=$SECONDS
STATUS=0

# the package from this checkout, installed or not; JAX must not preallocate 75% of the GPU while
# PyTorch shares it (the conformance suite runs both at once; the benchmarks alternate them)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
cd "$REPO"

exec > >(tee -a "$OUT/gpu.log") 2>&1

loud() { echo "!!!!!!!! $*"; }

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo
    echo "======== $name (limit ${limit} s, $((SECONDS - START)) s elapsed)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        loud "$name: TIMED OUT after ${limit} s (raise the limit: see the top of benchmarks/gpu.sh)"
        STATUS=1
    elif [ $rc -ne 0 ]; then
        loud "$name: FAILED with exit status $rc"
        STATUS=1
    fi
    return 0
}

echo "gpu.sh: repository $REPO, output $OUT, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || loud "nvidia-smi not found: is there a GPU here?"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())" \
    || loud "torch does not import"

step "xseqloss info" 60 bash -c "\"$PY\" -m xseqloss info | tee \"$OUT/info.txt\""

# Alongside (CPU work mostly, 16 cores): the PyTorch suite again with the Triton kernel forced, so the
# report shows that kernel itself conforming whatever "auto" picks; its output goes to its own log.
(
    XSEQLOSS_TORCH_KERNEL=triton timeout --kill-after=10 "$CONF_LIMIT" \
        "$PY" -m xseqloss conformance --backends torch --devices gpu --jobs 1 \
        --json "$OUT/gpu-report-torch-triton.json" --markdown "$OUT/gpu-report-torch-triton.md" \
        > "$OUT/conformance-torch-triton.log" 2>&1
    echo $? > "$OUT/.rc-torch-triton"
) &
TRITON_CONF=$!

step "conformance (torch CUDA, JAX GPU)" "$CONF_LIMIT" \
    "$PY" -m xseqloss conformance --backends torch jax --devices gpu --jobs 2 \
    --json "$OUT/gpu-report.json" --markdown "$OUT/gpu-report.md"
[ -f "$OUT/gpu-report.json" ] || loud "no conformance report was written (see the step above)"

wait "$TRITON_CONF"
RC="$(cat "$OUT/.rc-torch-triton" 2>/dev/null || echo missing)"
rm -f "$OUT/.rc-torch-triton"
echo
echo "======== conformance with XSEQLOSS_TORCH_KERNEL=triton (torch CUDA): exit status $RC"
tail -n 25 "$OUT/conformance-torch-triton.log"
case "$RC" in
    0) ;;
    124|137) loud "conformance with the Triton kernel: TIMED OUT after ${CONF_LIMIT} s"; STATUS=1 ;;
    *) loud "conformance with the Triton kernel: FAILED (exit status $RC, log: $OUT/conformance-torch-triton.log)"; STATUS=1 ;;
esac

# the Triton kernel's correctness on CUDA: a test file, run with pytest (a test that cannot run here,
# no CUDA or no triton, is listed as SKIPPED with its reason)
step "Triton kernel tests on CUDA (tests/test_triton_cuda.py)" "$TESTS_LIMIT" bash -c "set -o pipefail; \
    \"$PY\" -m pytest -v -rs -p no:cacheprovider -o junit_family=xunit1 \
    --junitxml \"$OUT/triton-cuda-tests.xml\" tests/test_triton_cuda.py | tee \"$OUT/triton-cuda-tests.txt\""

LEFT=$((TOTAL - (SECONDS - START) - 15))
if [ "$LEFT" -lt 30 ]; then
    loud "benchmarks: SKIPPED, only ${LEFT} s left of GPU_SH_TOTAL=${TOTAL}"
    STATUS=1
else
    step "benchmarks (benchmarks/gpu.py, budget ${LEFT} s)" $((LEFT + 10)) \
        "$PY" "$REPO/benchmarks/gpu.py" "$OUT" --budget "$LEFT" "$@"
fi

echo
echo "======== done in $((SECONDS - START)) s; status $STATUS"
ls -l "$OUT"
exit $STATUS
