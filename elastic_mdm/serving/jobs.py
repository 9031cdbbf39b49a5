"""A request as the stepper runs it (`Job`): its packed start state, sampler options and caps, and the texts of its
finished sequences.

Layout of one choice (docs/design.md §3): `BOS prompt [open gap] EOS`, or with a `suffix`
`BOS prompt [open gap] suffix EOS` (a template with one open gap); its text is what grew in the gap. A choice's cap
is its input length (anchors included) plus `max_tokens`, at most the model's `max_position_embeddings`; for MDLM the
cap is its canvas.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampler_loop_elastic_mdm import SamplerOptions
from ..sampling_state_elastic_mdm import ActiveState
from .protocol import RequestError, SamplingRequest


@dataclass(eq=False)
class Job:
    """One request in the scheduler: `state` (its `size` sequences), `options`, `add_kwargs` for the stepper's
    `add`, `caps` `[size]` and their sum `cost` (the most tokens it can put in a pass); the `prefix` and `suffix`
    lengths of each choice; the event queue of the HTTP handler waiting for it; its `deadline` (monotonic s);
    `cancelled` once its client left."""

    request: SamplingRequest
    state: ActiveState
    options: SamplerOptions
    add_kwargs: dict[str, Any]
    caps: list[int]
    prefix: list[int]
    suffix: list[int]
    input_tokens: int
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    cohort: Any = None
    draft: list[torch.Tensor] | None = None  # the latest draft not yet sent

    @property
    def size(self) -> int:
        return len(self.caps)

    @property
    def cost(self) -> int:
        return sum(self.caps)

    def push(self, kind: str, value: Any = None) -> None:
        """Hand an event to the HTTP handler (from the scheduler thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def push_draft(self, sequences: list[torch.Tensor]) -> None:
        """Hand over a step's draft; a client slower than the steps gets the latest one (drafts never queue up)."""
        pending, self.draft = self.draft is not None, sequences
        if not pending:
            self.push("draft")

    def take_draft(self) -> list[torch.Tensor] | None:
        draft, self.draft = self.draft, None
        return draft


def build_job(
    model, tokenizer, request: SamplingRequest, prompts: list[str], timeout: float, loop: asyncio.AbstractEventLoop
) -> Job:
    """Tokenize `prompts` (and the suffix), check them against the model's cap, resolve the sampling settings
    through `generate()`'s own config checks (a bad value is a 400 naming it) and build the start state."""
    cfg = model.config
    limit = cfg.max_position_embeddings
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    suffix = encode(request.suffix) if request.suffix is not None else None
    rows, caps, prefix, suffixes = [], [], [], []
    for text in prompts:
        ids = [cfg.bos_token_id, *encode(text)]
        anchors = len(ids) + (len(suffix) if suffix is not None else 0) + 1  # BOS prompt [gap] suffix EOS
        if anchors > limit:
            raise RequestError(f"The prompt has {anchors} tokens with its anchors; this model takes {limit}.", "prompt")
        cap = limit if request.max_tokens is None else anchors + request.max_tokens
        if cap > limit:
            raise RequestError(
                f"'max_tokens'={request.max_tokens} with a prompt of {anchors} tokens exceeds this model's cap of "
                f"{limit} tokens; ask for at most {limit - anchors}.",
                "max_tokens",
            )
        rows.append(ids + [cfg.mask_token_id, *suffix, cfg.eos_token_id] if suffix is not None else ids)
        for _ in range(request.n):
            caps.append(cap)
            prefix.append(len(ids))
            suffixes.append(len(suffix) if suffix is not None else 0)
    try:
        config = model._resolve_generation_config(None, {"num_return_sequences": request.n, **request.generation})
    except ValueError as error:
        raise RequestError(str(error), next(iter(request.generation), None)) from None
    seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
    generator = torch.Generator(device=model.device).manual_seed(seed % 2**64)
    options = model._sampler_options(config, limit, generator)
    templates = suffix is not None
    try:
        state = model._initial_state(None if templates else rows, None, rows if templates else None, request.n)
    except ValueError as error:
        raise RequestError(str(error), "prompt") from None
    caps_tensor = torch.tensor(caps, device=model.device)
    if cfg.objective == "mdlm":
        add_kwargs = dict(eos_token_id=cfg.eos_token_id, caps=caps_tensor)
        if templates:  # the gap gets the budget it may fill: max_tokens, or all the canvas has left
            add_kwargs["gap_budget"] = min(caps) - max(len(r) - 1 for r in rows)
    else:
        add_kwargs = dict(
            gap_temperature=config.gap_temperature, gap_do_sample=config.gap_do_sample,
            lock_length=config.lock_length, caps=caps_tensor,
        )  # fmt: skip
    deadline = time.monotonic() + min(timeout, request.timeout or timeout)
    input_tokens = sum(len(r) for r in rows) * request.n
    return Job(request, state, options, add_kwargs, caps, prefix, suffixes, input_tokens, deadline, loop)


@dataclass
class Choice:
    """One finished choice: its `text`, its generated token count and OpenAI's `finish_reason`."""

    text: str
    tokens: int
    finish_reason: str


def gap_ids(job: Job, row: int, sequence: list[int], eos: int) -> list[int]:
    """The ids that grew in choice `row`'s gap: after its prefix, before its suffix and the final EOS."""
    end = len(sequence) - (1 if sequence and sequence[-1] == eos else 0) - job.suffix[row]
    return sequence[job.prefix[row] : end]


def choice_texts(job: Job, tokenizer, output, eos: int) -> list[Choice]:
    """The text of every choice of a finished job: its gap decoded, cut at the first `stop` string."""
    choices = []
    for row, (sequence, length, hit) in enumerate(
        zip(output.sequences.tolist(), output.lengths.tolist(), output.hit_max_length.tolist(), strict=True)
    ):
        ids = gap_ids(job, row, sequence[:length], eos)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        reason = "length" if hit else "stop"
        cuts = [text.find(stop) for stop in job.request.stop if stop in text]
        if cuts:
            text, reason = text[: min(cuts)], "stop"
        choices.append(Choice(text, len(ids), reason))
    return choices


def draft_texts(job: Job, tokenizer, sequences: list[torch.Tensor], eos: int) -> list[dict]:
    """Every choice's draft after a step: its text so far (a mask not revealed yet, MDLM only, shows as the
    tokenizer's mask token) and its token pieces (`separator.join(pieces) == text` when the tokenizer allows it,
    else one piece)."""
    drafts, hidden = [], set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}
    for row, sequence in enumerate(sequences):
        ids = [i for i in gap_ids(job, row, sequence.tolist(), eos) if i not in hidden]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        separator = next((sep for sep in ("", " ") if sep.join(pieces) == text), None)
        drafts.append(
            {"text": text, "pieces": pieces if separator is not None else [text], "separator": separator or ""}
        )
    return drafts
