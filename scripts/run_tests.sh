#!/usr/bin/env bash
# The test command of the README: set up .venv if needed, then run the default (CPU, not slow) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -c "import deepspeed" 2>/dev/null || .venv/bin/pip install -q -e ".[deepspeed]"  # ZeRO-2/3 on CPU tests
.venv/bin/python -c "import lm_eval" 2>/dev/null || .venv/bin/pip install -q -e ".[lmeval]"  # lm-eval harness tests
.venv/bin/python -c "import hypothesis_jsonschema" 2>/dev/null || .venv/bin/pip install -q -e ".[schemas]"  # SchemaStore tests
.venv/bin/python -c "import fastapi, uvicorn, sse_starlette, prometheus_client, openai, httpx" 2>/dev/null \
    || .venv/bin/pip install -q -e ".[serve,dev]"  # the server and its tests (the real openai client)
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
