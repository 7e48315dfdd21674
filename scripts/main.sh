#!/usr/bin/env bash
# The main job, in one command: set up (idempotent), then train a LoRA on the tiny SD3 model through a
# real ComfyUI with the example workflow and print where the LoRA and the loss plot went.
#   bash scripts/main.sh [--steps N] [--workflow PATH] [--keep-server]   (see scripts/main.py --help)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python scripts/main.py "$@"
