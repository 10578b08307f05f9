#!/usr/bin/env bash
# The CUDA checks in one call on a lent GPU machine (the device tool: 15 minutes a session,
# no network there). Two steps:
#
#   bench/device_check.sh prepare   # here: what the machine lacks, into .device/ (ignored)
#   bench/device_check.sh run [PART...]  # there, with .device carried; logs under $OUT
#
# PARTs (default: all, in this order, the engine first): engine, triton, bench.
#
# e.g. the device tool's run with carry [".device"] and the command
#   bash bench/device_check.sh run
# with a timeout_s that leaves time to run it again.
#
# `run` builds the native module with the machine's own Python (its image has torch with
# CUDA, Triton, transformers, CMake, ninja and pybind11), installs the carried wheels, then
# runs the GPU tests -- the engine end to end on CUDA (tests/test_cuda.py), the Triton
# kernels compiled (tests/test_triton_attention.py, tests/test_triton_moe.py) -- and times
# the Triton kernels (python -m bench.ops.triton_gpu). Each part's log goes to $OUT; the
# summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

if [ "$mode" = prepare ]; then
    set -e
    py=${PYTHON:-.venv/bin/python}
    mkdir -p .device/wheels .device/tokenizer
    # Pure-Python packages the device image does not have (Python 3.12 there).
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .device/wheels "gguf>=0.10"
    # The demo model's tokenizer (the model itself is over the 64 MiB a call carries; the
    # tests use random-weight models with this tokenizer).
    demo=$("$py" -c "from xllm.loader.demo import demo_model_dir; print(demo_model_dir(progress=False))")
    for f in tokenizer.json tokenizer_config.json generation_config.json; do
        cp "$demo/$f" .device/tokenizer/
    done
    du -sh .device
    exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 prepare|run [engine] [triton] [bench]" >&2; exit 2; }
shift
parts=" ${*:-engine triton bench} "
want() { [[ "$parts" == *" $1 "* ]]; }
OUT=${OUT:-/tmp/xllm-device-check}
mkdir -p "$OUT"
py=${PYTHON:-python3}
summary=()
step() {  # step NAME COMMAND...: runs it, its output in $OUT/NAME.log, its status kept
    local name=$1; shift
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc, $((SECONDS - t0)) s, $(tail -n 1 "$OUT/$name.log" | cut -c1-150)")
    return $rc
}

{
    nvidia-smi -L
    "$py" -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name(0))"
} >"$OUT/machine.log" 2>&1
cat "$OUT/machine.log"

if [ -d .device/wheels ] && ls .device/wheels/*.whl >/dev/null 2>&1; then
    step wheels "$py" -m pip install --no-index --no-deps .device/wheels/*.whl
fi
step build bash -c "cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE=$(command -v "$py") -Dpybind11_DIR=$("$py" -m pybind11 --cmakedir) \
    && cmake --build build/device -j16" || {
    printf '%s\n' "${summary[@]}"; tail -n 30 "$OUT/build.log"; exit 1; }

export PYTHONPATH=$PWD XLLM_TOKENIZER_DIR=$PWD/.device/tokenizer HF_HUB_OFFLINE=1
# The engine first (what has never run on a GPU), then the kernels, then their timings.
want engine && step engine "$py" -m pytest -q -rfE --timeout 300 tests/test_cuda.py
want triton && step triton_attention "$py" -m pytest -q -rfE -m gpu tests/test_triton_attention.py
want triton && step triton_moe "$py" -m pytest -q -rfE -m gpu tests/test_triton_moe.py
want bench && step triton_bench "$py" -m bench.ops.triton_gpu --quick

echo "== failures (the failing tests of each part)"
for f in engine triton_attention triton_moe; do
    [ -f "$OUT/$f.log" ] && grep -q -E "failed|error" "$OUT/$f.log" && { echo "-- $f"
        grep -E "^(FAILED|ERROR)" "$OUT/$f.log" | head -n 20; }
done
echo "== summary"
printf '%s\n' "${summary[@]}"
