#!/usr/bin/env bash
# Start ComfyUI with this pack for a person, in the foreground (Ctrl-C stops it).
#   PORT=8188 (default)   LISTEN=127.0.0.1 (default; 0.0.0.0 to reach it from other machines)
#   extra arguments go to ComfyUI's main.py, e.g.  bash scripts/serve.sh --preview-method auto
# Base directory: .comfyui/base (models/, input/, output/, user/, custom_nodes/comfyui-lora-lab -> repo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh

PORT="${PORT:-8188}"
LISTEN="${LISTEN:-127.0.0.1}"
BASE="$ROOT/.comfyui/base"
PY="$ROOT/.venv/bin/python"

# --cpu unless torch in the venv can use a GPU (LORALAB_COMFY_CPU=1/0 forces it either way).
device_args=()
if ! LORALAB_ROOT="$ROOT" "$PY" -c 'import os, sys
sys.path.insert(0, os.environ["LORALAB_ROOT"])
from harness.server import cuda_available
sys.exit(0 if cuda_available(sys.executable) else 1)'; then
    device_args=(--cpu)
fi

host="$LISTEN"
if [[ "$host" == "0.0.0.0" || "$host" == "::" || -z "$host" ]]; then host="127.0.0.1"; fi
if command -v ss >/dev/null 2>&1 && ss -ltn 2>/dev/null | awk '{print $4}' | grep -qE "[:.]$PORT\$"; then
    echo "[serve] port $PORT is taken; set PORT=... to use another one" >&2
    exit 1
fi
echo "[serve] ComfyUI with LoRA Lab: open http://$host:$PORT/  (base directory $BASE; Ctrl-C stops it)"
echo "[serve] the example workflow is under Templates > comfyui-lora-lab, or load example_workflows/*.json"
exec "$PY" "$ROOT/.comfyui/ComfyUI/main.py" \
    --listen "$LISTEN" --port "$PORT" \
    --base-directory "$BASE" \
    --database-url "sqlite:///$BASE/user/comfyui.db" \
    --disable-auto-launch "${device_args[@]}" "$@"
