#!/usr/bin/env bash
# Create .venv (if missing) and install elastic-mdm with the extras the main job and the tests need.
# Works on a fresh machine with Python >= 3.10 and pip. On a CUDA machine install your torch build first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import elastic_mdm, pytest, jsonschema, datasets, matplotlib, yaml" 2>/dev/null; then
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch
  .venv/bin/pip install -q -e ".[train,eval,dev]"
fi
