#!/usr/bin/env bash
# The GPU suite, from the repository root on a machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu_suite.sh [--install-only | --tests-only] [OUT_DIR]
#
# (--install-only stops after step 1: on a machine whose commands are time-limited, install in one call and run
# the suite in the next, which reuses the environment.)
#
# 1. python3 as it is when it already has torch for CUDA and pytest (this checkout on PYTHONPATH); else a virtual
#    environment (build/gpu-venv, reused when it works) with torch 2.13.0 built for CUDA: plain
#    `pip install torch==2.13.0` first; if torch then sees no GPU, the CUDA wheels of download.pytorch.org
#    (cu128, then cu126); then this package and pytest;
# 2. the GPU tests (tests/test_gpu.py: grouped GEMM, compiled decode, bf16 autocast, FSDP2 over NCCL, pre-training
#    on CUDA; the 2-GPU tests skip on one GPU) and the GPU-independent distributed tests of FSDP2 + EP;
# 3. benchmarks/bench_gpu.py: HBM bandwidth, MFU of a Lite-shaped training step, decode tokens/s against the
#    bandwidth limit.
# Every step prints what it did and how long it took; OUT_DIR (default build/gpu-suite) gets the logs and
# bench_gpu.json. Set GPU_SUITE_PYTHON to an interpreter that already has torch with CUDA to skip step 1.
set -u
cd "$(dirname "$0")/.."
INSTALL_ONLY=0
TESTS_ONLY=0
if [ "${1:-}" = "--install-only" ]; then INSTALL_ONLY=1; shift; fi
if [ "${1:-}" = "--tests-only" ]; then TESTS_ONLY=1; shift; fi
OUT="${1:-build/gpu-suite}"
mkdir -p "$OUT"
VENV="${GPU_VENV:-build/gpu-venv}"
T0=$(date +%s)
stamp() { echo "[gpu_suite +$(( $(date +%s) - T0 ))s] $*"; }
status=0

cuda_ok() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # this checkout's dscoder, installed or not
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [ -z "${GPU_SUITE_PYTHON:-}" ] && cuda_ok python3 && python3 -c "import pytest" 2>/dev/null; then
    GPU_SUITE_PYTHON=python3  # a machine with torch for CUDA already installed (it may have no package registry)
fi
if [ -n "${GPU_SUITE_PYTHON:-}" ]; then
    PY="$GPU_SUITE_PYTHON"
    stamp "using $PY ($(command -v "$PY")) with PYTHONPATH=src: no install"
else
    PY="$VENV/bin/python"
    if [ -x "$PY" ] && cuda_ok "$PY" && "$PY" -c "import dscoder, pytest" 2>/dev/null; then
        stamp "reusing $VENV"
    else
        stamp "creating $VENV"
        rm -rf "$VENV"
        SYS_TORCH=$(python3 -c "import torch; print(torch.__version__ if torch.cuda.is_available() else '')" 2>/dev/null)
        VENV_ARGS=""
        case "$SYS_TORCH" in 2.13.*) VENV_ARGS="--system-site-packages"
            stamp "the system python already has torch $SYS_TORCH with CUDA: the venv sees it";; esac
        if ! python3 -m venv $VENV_ARGS "$VENV" 2>"$OUT/venv.err"; then
            stamp "python3 -m venv failed ($(tail -1 "$OUT/venv.err")); a venv without pip, filled by the system pip"
            rm -rf "$VENV"
            python3 -m venv --without-pip $VENV_ARGS "$VENV" || { echo "gpu_suite: cannot create a venv"; exit 2; }
        fi
        if "$PY" -m pip --version >/dev/null 2>&1; then
            PIP=("$PY" -m pip)
        else
            PIP=(python3 -m pip --python "$PY")
        fi
        "${PIP[@]}" install -q --upgrade pip >/dev/null 2>&1 || true
        if cuda_ok "$PY"; then
            stamp "torch with CUDA already importable: $("$PY" -c 'import torch; print(torch.__version__)')"
        else
            stamp "pip install torch==2.13.0 (the registry's default build)"
            "${PIP[@]}" install -q torch==2.13.0 2>&1 | tail -3
        fi
        if ! cuda_ok "$PY"; then
            for cu in cu128 cu126 cu130; do
                stamp "torch sees no GPU; trying the $cu wheels from download.pytorch.org"
                "${PIP[@]}" install -q --force-reinstall torch==2.13.0 --index-url "https://download.pytorch.org/whl/$cu" \
                    2>&1 | tail -3
                cuda_ok "$PY" && break
            done
        fi
        stamp "pip install -e . pytest (the package and its dependencies)"
        "${PIP[@]}" install -q -e . "pytest>=8" 2>&1 | tail -5
        if ! "$PY" -c "import dscoder.cli, dscoder.data.pipeline" 2>/dev/null; then
            stamp "the full install failed; installing the core dependencies only"
            "${PIP[@]}" install -q "safetensors>=0.4" "numpy>=2" tokenizers==0.23.3 "tqdm>=4.66" "matplotlib>=3.8" \
                "pytest>=8" 2>&1 | tail -3
            "${PIP[@]}" install -q --no-deps -e . 2>&1 | tail -3
        fi
    fi
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}, "
      f"GPUs: {torch.cuda.device_count()}" + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF
if ! cuda_ok "$PY"; then
    echo "gpu_suite: torch in $PY does not see a CUDA GPU (nvidia-smi below); stopping"
    nvidia-smi 2>&1 | head -15
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
if [ "$INSTALL_ONLY" = 1 ]; then stamp "installed; run without --install-only for the suite"; exit 0; fi

stamp "GPU tests: tests/test_gpu.py"
OMP_NUM_THREADS=4 timeout 330 "$PY" -m pytest tests/test_gpu.py -v -rs -s -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | \
    grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|NVIDIA|Error|assert" | head -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "$TESTS_ONLY" = 1 ]; then stamp "done (status $status; --tests-only); logs in $OUT"; exit $status; fi
stamp "benchmarks/bench_gpu.py"
timeout 200 "$PY" benchmarks/bench_gpu.py --budget-s 90 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | grep -v "^\s*$" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "done (status $status); logs in $OUT"
exit $status
