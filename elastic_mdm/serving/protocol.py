"""The OpenAI request bodies the server takes, checked field by field (`parse_completion`, `parse_chat`).

Every field is honoured, extended or refused; nothing is ignored silently:

* honoured (OpenAI's meaning): `model`, `prompt` (a string or a list of strings), `suffix` (infilling: the prompt,
  an open gap of free length, the suffix), `messages` (chat, through the tokenizer's chat template), `max_tokens`
  (`max_completion_tokens` for chat), `temperature` (0: the most likely token), `top_p`, `n`, `seed`, `stop`,
  `stream`, `stream_options.include_usage`, `user` (logged with the request);
* Elastic-MDM's extensions: `num_steps` (K), `schedule` (reveal schedule name), `lock_length`,
  `stream_options.include_drafts` (a draft of every choice at every step), `timeout` (seconds, at most the
  server's `--request_timeout`);
* refused with a 400 naming the field, unless it holds its neutral value: `logprobs`, `top_logprobs`, `best_of`,
  `echo`, `presence_penalty`, `frequency_penalty`, `logit_bias`, `tools`, `tool_choice`, `functions`,
  `function_call`, `response_format` (other than text), `parallel_tool_calls`; any other field is unknown (400).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a message, and the offending field (`param`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


NEUTRAL: dict[str, tuple] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, False),
}
"""Fields with an OpenAI meaning the samplers do not implement: accepted only at these values."""

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "user"}
EXTENSIONS = {"num_steps", "schedule", "lock_length", "timeout"}
COMPLETION_FIELDS = COMMON | EXTENSIONS | {"prompt", "suffix"}
CHAT_FIELDS = COMMON | EXTENSIONS | {"messages", "max_completion_tokens"}


@dataclass
class SamplingRequest:
    """A checked request: the texts to continue (each with an optional `suffix`), `n` choices of each, and the
    settings. `generation` holds the `generate()` keywords (`num_steps`, `schedule`, `temperature`, `top_p`,
    `do_sample`, `lock_length`); `max_tokens` is `None` for "up to the model's cap"."""

    model: str | None
    prompts: list[str]
    suffix: str | None = None
    max_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    include_drafts: bool = False
    user: str | None = None
    timeout: float | None = None
    chat: bool = False
    generation: dict[str, Any] = field(default_factory=dict)


def load_json(body: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"The request body is not valid JSON ({error}).") from None
    if not isinstance(value, dict):
        raise RequestError("The request body must be a JSON object.")
    return value


def typed(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    """`body[name]` (None when absent) if it is one of `kinds` (a bool is no number here), else a 400."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:60]}.", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"'{name}' must be a finite number.", name)
    return value


def bounded(body: dict, name: str, kinds: tuple[type, ...], low: float, high: float, what: str) -> Any:
    value = typed(body, name, kinds, what)
    if value is not None and not low <= value <= high:
        raise RequestError(f"'{name}' must be {what} between {low} and {high}, got {value}.", name)
    return value


def check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise RequestError(
                    f"'{name}' is not supported by this server (a diffusion sample has no such option); omit it or "
                    f"send {json.dumps(NEUTRAL[name][1])}.",
                    name,
                )
        elif name not in allowed:
            raise RequestError(f"Unknown field '{name}'.", name)


def parse_common(body: dict, limits: Limits, request: SamplingRequest) -> SamplingRequest:
    """The fields both endpoints share."""
    request.model = typed(body, "model", (str,), "a string")
    name = "max_completion_tokens" if request.chat and "max_completion_tokens" in body else "max_tokens"
    request.max_tokens = bounded(body, name, (int,), 1, limits.max_tokens, "an integer")
    request.n = bounded(body, "n", (int,), 1, limits.max_n, "an integer") or 1
    request.seed = bounded(body, "seed", (int,), -(2**63), 2**64 - 1, "an integer")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError("'stop' must be a non-empty string or a list of them.", "stop")
    if stops is not None and len(stops) > 4:
        raise RequestError("'stop' takes at most 4 sequences.", "stop")
    request.stop = stops or []
    request.stream = bool(typed(body, "stream", (bool,), "a boolean"))
    options = typed(body, "stream_options", (dict,), "an object") or {}
    for name in options:
        if name not in ("include_usage", "include_drafts"):
            raise RequestError(f"Unknown field 'stream_options.{name}'.", f"stream_options.{name}")
    if options and not request.stream:
        raise RequestError("'stream_options' needs 'stream': true.", "stream_options")
    request.include_usage = bool(typed(options, "include_usage", (bool,), "a boolean"))
    request.include_drafts = bool(typed(options, "include_drafts", (bool,), "a boolean"))
    request.user = typed(body, "user", (str,), "a string")
    request.timeout = bounded(body, "timeout", (int, float), 1e-3, limits.request_timeout, "a number of seconds")
    generation: dict[str, Any] = {}
    temperature = bounded(body, "temperature", (int, float), 0.0, 2.0, "a number")
    if temperature is not None:
        generation.update(do_sample=False) if temperature == 0 else generation.update(temperature=float(temperature))
    top_p = typed(body, "top_p", (int, float), "a number")
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise RequestError(f"'top_p' must be in (0, 1], got {top_p}.", "top_p")
        generation["top_p"] = float(top_p)
    num_steps = bounded(body, "num_steps", (int,), 1, limits.max_num_steps, "an integer")
    if num_steps is not None:
        generation["num_steps"] = num_steps
    schedule = typed(body, "schedule", (str,), "a string")
    if schedule is not None:
        generation["schedule"] = schedule
    lock_length = typed(body, "lock_length", (bool,), "a boolean")
    if lock_length is not None:
        generation["lock_length"] = lock_length
    request.generation = generation
    return request


@dataclass
class Limits:
    """What one request may ask for (the server's command-line limits)."""

    max_tokens: int
    max_n: int
    max_num_steps: int
    request_timeout: float


def parse_completion(body: dict, limits: Limits) -> SamplingRequest:
    """`/v1/completions`."""
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings.", "prompt")
    request = SamplingRequest(model=None, prompts=prompts, suffix=typed(body, "suffix", (str,), "a string"))
    return parse_common(body, limits, request)


def parse_chat(body: dict, limits: Limits) -> tuple[SamplingRequest, list[dict]]:
    """`/v1/chat/completions`: the request and its messages (rendered by the caller's chat template)."""
    check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects.", "messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise RequestError(f"'messages[{i}]' must be an object with a string 'role'.", f"messages[{i}]")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"'messages[{i}].content' must be a string.", f"messages[{i}].content")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("Give 'max_completion_tokens' or 'max_tokens', not both.", "max_tokens")
    request = parse_common(body, limits, SamplingRequest(model=None, prompts=[""], chat=True))
    return request, [{"role": m["role"], "content": m["content"]} for m in messages]
