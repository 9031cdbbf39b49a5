#!/usr/bin/env bash
# The main job of the README: set up .venv if needed, then train a tiny Elastic-MDM on the built-in JSON task,
# sample from it, print the generated-vs-data length histogram and the JSON validity, and save the checkpoint.
# A re-run replaces its own outputs/tiny-elastic (--overwrite_output_dir); pass --output_dir to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train.py configs/tiny.yaml --overwrite_output_dir true "$@"
