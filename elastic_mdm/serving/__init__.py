"""An OpenAI-compatible server for Elastic-MDM checkpoints (`elastic-mdm serve PATH`, `python -m elastic_mdm.serving`).

Tooling, not remote code: nothing in the checkpoint's root modules imports it. Needs the `serve` extra (FastAPI,
uvicorn, sse-starlette, prometheus-client). `protocol.py` checks the OpenAI fields, `jobs.py` turns a request into
a stepper cohort and its output into texts, `engine.py` is the step-level scheduler, `app.py` the HTTP layer,
`cli.py` the command, `static/index.html` the page at `/`.
"""
