#!/usr/bin/env bash
# The main job of the README: set up .venv if needed, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo.py "$@"
