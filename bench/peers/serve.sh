#!/usr/bin/env bash
# Serve the demo model with a peer's OpenAI-compatible server, for bench.serve to load:
#
#   bench/peers/serve.sh vllm|llamacpp [PORT] [MODEL_DIR]     (default port 8001)
#
# Runs in the foreground until stopped (Ctrl-C or SIGTERM); binds 127.0.0.1 and serves the
# model under the name "demo", as xllm-server does. MODEL_DIR (vllm only): a Hugging Face
# directory to serve instead of the demo (a bench.random_checkpoint one, say). The peers
# come from bench/peers/setup.sh ($XLLM_PEERS_DIR, default ~/.cache/xllm/peers). The model
# paths come from xllm's demo cache (this repository's python: $XLLM_PYTHON, default the
# python on PATH).
#
#   vllm:     vLLM's OpenAI server on the converted HF directory, in its default dtype for
#             this CPU (bfloat16 where it has AVX512-BF16 or AMX, else float32;
#             $XLLM_VLLM_DTYPE overrides), threads bound to
#             the cores this script may use (pin it with taskset), tcmalloc and Intel OpenMP
#             preloaded as vLLM's CPU guide says, 4 GiB of KV cache (xllm-server gets the
#             same: --kv-cache-memory-gb 4). Its first start compiles for several minutes.
#   llamacpp: llama-cpp-python's server on the demo's Q4_1 GGUF, n_threads = cores. It
#             serves one request at a time (no continuous batching); --interrupt_requests
#             False, since by default a new request cuts off the one streaming (most
#             outputs then end after one token).
#
# Ready when GET /v1/models answers, e.g.
#   until curl -sf http://127.0.0.1:8001/v1/models >/dev/null; do sleep 5; done
set -euo pipefail

PEER="${1:-}"
PORT="${2:-8001}"
MODEL_DIR="${3:-}"
PEERS_DIR="${XLLM_PEERS_DIR:-$HOME/.cache/xllm/peers}"
XLLM_PYTHON="${XLLM_PYTHON:-python}"
CONTEXT=2048

cores() { "$XLLM_PYTHON" -c "import os; print(len(os.sched_getaffinity(0)))"; }
# "0-1" style list of the cores this process may use (VLLM_CPU_OMP_THREADS_BIND's form).
core_list() {
    "$XLLM_PYTHON" -c "import os; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0))))"
}

# vLLM's CPU build computes in bf16 where the CPU has bf16 arithmetic, as xllm does.
vllm_dtype() {
    if [[ -n "${XLLM_VLLM_DTYPE:-}" ]]; then
        echo "$XLLM_VLLM_DTYPE"
    elif grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo; then
        echo bfloat16
    else
        echo float32
    fi
}

case "$PEER" in
    vllm)
        MODEL="${MODEL_DIR:-$("$XLLM_PYTHON" -c "from xllm.loader.demo import demo_model_dir; print(demo_model_dir())")}"
        PY="$PEERS_DIR/vllm/bin/python"
        PRELOAD=""
        for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 "$PEERS_DIR/vllm/lib/libiomp5.so"; do
            [[ -f "$lib" ]] && PRELOAD="${PRELOAD:+$PRELOAD:}$lib"
        done
        # A neutral working directory: python -m puts it first on sys.path, and a stray
        # module there (an attr.py in /tmp, say) would shadow vLLM's dependencies.
        cd "$PEERS_DIR/vllm"
        exec env -u PYTHONPATH VLLM_CPU_OMP_THREADS_BIND="$(core_list)" \
            VLLM_CPU_NUM_OF_RESERVED_CPU=0 LD_PRELOAD="$PRELOAD" \
            "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
            --served-model-name demo --host 127.0.0.1 --port "$PORT" --dtype "$(vllm_dtype)" \
            --max-model-len "$CONTEXT" --kv-cache-memory-bytes $((4 << 30)) --seed 0
        ;;
    llamacpp)
        if [[ -n "$MODEL_DIR" ]]; then
            echo "serve.sh: llamacpp serves the demo's GGUF only; MODEL_DIR is for vllm" >&2
            exit 2
        fi
        GGUF="$("$XLLM_PYTHON" -c "from xllm.loader.demo import ensure_demo_gguf; print(ensure_demo_gguf())")"
        PY="$PEERS_DIR/llamacpp/bin/python"
        cd "$PEERS_DIR/llamacpp"
        exec env -u PYTHONPATH "$PY" -m llama_cpp.server --model "$GGUF" --model_alias demo \
            --host 127.0.0.1 --port "$PORT" --n_threads "$(cores)" --n_ctx "$CONTEXT" \
            --interrupt_requests False
        ;;
    *)
        sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
