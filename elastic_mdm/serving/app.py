"""The HTTP layer: an OpenAI-compatible FastAPI app over one `Engine`.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus), and the page at `/`. Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`).

Streaming (`stream: true`, server-sent events through sse-starlette, OpenAI's chunk format, `data: [DONE]` last):
the text of a diffusion sample is final only when it finishes (any open gap can still grow), so each choice's text
comes whole in its last chunk, with its `finish_reason`; a standard client accumulates exactly the final text. With
`stream_options.include_drafts`, every step first sends one chunk per choice whose text (`text`, or `delta`) is
empty and whose extension fields hold the draft: `draft` (the text that grew so far; an Elastic-MDM draft never shows
a mask: the positions the next step opens are not shown until they are filled; an MDLM draft shows its unrevealed
positions as the tokenizer's mask token), `draft_pieces` and `draft_separator` (its tokens,
`draft_separator.join(draft_pieces) == draft` when the tokenizer decodes token by token). Choices carry `index`
(prompt `i`, choice `j` of `n`: `i * n + j`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from .engine import Engine, QueueFull
from .jobs import Job, build_job, choice_texts, draft_texts
from .protocol import Limits, RequestError, load_json, parse_chat, parse_completion

log = logging.getLogger("elastic_mdm.serving")


def error_response(error: RequestError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(
    model, tokenizer, engine: Engine, *, model_name: str, limits: Limits, api_key: str | None = None
) -> FastAPI:
    """The app serving `model` as `model_name`; `engine` is started and stopped with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Elastic-MDM", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    eos = model.config.eos_token_id

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = RequestError("Missing or wrong API key: send 'Authorization: Bearer <key>'.", status=401)
                error.kind = "authentication_error"
                return error_response(error)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((resources.files(__package__) / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy
        return JSONResponse({"status": "ok" if ok else "failed", "model": model_name}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "elastic-mdm"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            parsed = parse_completion(load_json(await request.body()), limits)
            return await serve(request, parsed, parsed.prompts)
        except RequestError as error:
            return error_response(error)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            parsed, messages = parse_chat(load_json(await request.body()), limits)
            if not getattr(tokenizer, "chat_template", None):
                raise RequestError(
                    f"The tokenizer of '{model_name}' has no chat template; use /v1/completions, or serve a checkpoint "
                    "whose tokenizer_config.json defines chat_template.",
                    "messages",
                )
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return await serve(request, parsed, [text])
        except RequestError as error:
            return error_response(error)

    async def serve(request: Request, parsed, prompts: list[str]):
        if parsed.model is not None and parsed.model != model_name:
            error = RequestError(f"The model '{parsed.model}' does not exist; this server serves '{model_name}'.",
                                 "model", status=404)  # fmt: skip
            return error_response(error)
        if parsed.n * len(prompts) > engine.max_running:
            raise RequestError(
                f"'n' x prompts = {parsed.n * len(prompts)} choices; this server runs at most {engine.max_running} "
                "sequences at once (--max_running).",
                "n",
            )
        job = build_job(model, tokenizer, parsed, prompts, limits.request_timeout, asyncio.get_running_loop())
        if job.cost > engine.max_batch_tokens:
            raise RequestError(
                f"The request can hold {job.cost} tokens in a pass (n x its cap), more than this server's "
                f"--max_batch_tokens={engine.max_batch_tokens}; lower 'n' or 'max_tokens'.",
                "max_tokens",
            )
        try:
            engine.submit(job)
        except QueueFull:
            error = RequestError("The server's queue is full; retry later.", status=429, kind="rate_limit_error")
            return error_response(error, headers={"Retry-After": "1"})
        log.info("request %s user=%s choices=%d", id(job), parsed.user, job.size)
        reply = Reply(job, tokenizer, model_name, eos)
        if parsed.stream:
            return EventSourceResponse(reply.events(engine), ping=15)
        return await reply.whole(request, engine)

    return app


class Reply:
    """The OpenAI body (or chunks) of one job."""

    def __init__(self, job: Job, tokenizer, model_name: str, eos: int) -> None:
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        chat = job.request.chat
        self.head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if chat and job.request.stream else
                      "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }  # fmt: skip

    def choice(self, index: int, text: str | None, finish_reason: str | None, **extra) -> dict:
        if not self.job.request.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason, **extra}
        if not self.job.request.stream:
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        delta = {"content": text} if text is not None else {}
        return {"index": index, "delta": delta, "finish_reason": finish_reason, **extra}

    def usage(self, completion_tokens: int) -> dict:
        prompt = self.job.input_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    async def whole(self, request: Request, engine: Engine):
        """Wait for the job (polling for a disconnect) and return the whole response."""
        getter = asyncio.ensure_future(self.job.events.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.2)
            if done:
                break
            if await request.is_disconnected():
                getter.cancel()
                engine.cancel(self.job)
                return Response(status_code=499)
        kind, value = getter.result()
        if kind == "error":
            status, message = value
            kind = "invalid_request_error" if status == 400 else "server_error"
            return error_response(RequestError(message, status=status, kind=kind))
        choices = choice_texts(self.job, self.tokenizer, value, self.eos)
        body = dict(self.head, choices=[self.choice(i, c.text, c.finish_reason) for i, c in enumerate(choices)])
        body["usage"] = self.usage(sum(c.tokens for c in choices))
        return JSONResponse(body)

    async def events(self, engine: Engine):
        """Server-sent events: drafts (when asked), each choice's final chunk, usage (when asked), `[DONE]`."""
        finished = False
        try:
            if self.job.request.chat:
                for index in range(self.job.size):
                    choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield {"data": json.dumps(dict(self.head, choices=[choice]))}
            while True:
                kind, value = await self.job.events.get()
                if kind == "draft":
                    value = self.job.take_draft()
                    for index, draft in enumerate(draft_texts(self.job, self.tokenizer, value or [], self.eos)):
                        choice = self.choice(index, None, None, draft=draft["text"], draft_pieces=draft["pieces"],
                                             draft_separator=draft["separator"])  # fmt: skip
                        yield {"data": json.dumps(dict(self.head, choices=[choice]))}
                elif kind == "error":
                    finished = True
                    status, message = value
                    yield {"data": json.dumps(RequestError(message, status=status, kind="server_error").body())}
                    return
                else:
                    finished = True
                    choices = choice_texts(self.job, self.tokenizer, value, self.eos)
                    for index, c in enumerate(choices):
                        yield {
                            "data": json.dumps(dict(self.head, choices=[self.choice(index, c.text, c.finish_reason)]))
                        }
                    if self.job.request.include_usage:
                        usage = self.usage(sum(c.tokens for c in choices))
                        yield {"data": json.dumps(dict(self.head, choices=[], usage=usage))}
                    yield {"data": "[DONE]"}
                    return
        finally:
            if not finished:  # the client went away mid-stream: its sequences leave at the next step
                engine.cancel(self.job)
