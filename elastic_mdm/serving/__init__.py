"""An OpenAI-compatible server for Elastic-MDM checkpoints (`elastic-mdm serve PATH`, `commands/serve.py`).

Tooling, not remote code: nothing in the checkpoint's root modules imports it. Needs the `serve` extra (FastAPI,
uvicorn, sse-starlette, prometheus-client). `protocol.py` checks the OpenAI fields, `jobs.py` turns a request into
a stepper cohort and its output into texts, `engine.py` is the step-level scheduler, `app.py` the HTTP layer,
`static/index.html` the page at `/`; `cli.py` is the console-script target of older installs.
"""
