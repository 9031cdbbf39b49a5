"""Streaming for `generate(streamer=...)`: a Transformers `BaseStreamer` fed with per-step drafts.

The call order is DiffusionGemma's: the fixed prefix of every input once, a draft after every step that runs a pass
(when the streamer has `put_draft`), the final tokens, then `end()`. See `DraftStream`. `ends_stream` makes `end()`
the last call on every exit of `generate`, an error included: a consumer of a `TextIteratorStreamer` never blocks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from .sampler_loop_elastic_mdm import ElasticMDMGenerateOutput
from .sampling_state_elastic_mdm import ActiveState


def check_streamer(streamer: object) -> None:
    """Refuse a `streamer` that cannot take tokens (Transformers' `BaseStreamer` protocol: `put` and `end`)."""
    if streamer is None:
        return
    missing = [name for name in ("put", "end") if not callable(getattr(streamer, name, None))]
    if missing:
        raise ValueError(
            f"streamer must be a transformers BaseStreamer (methods put and end), got {type(streamer).__name__} "
            f"without {' and '.join(missing)}; pass e.g. transformers.TextStreamer(tokenizer) or "
            "TextDiffusionStreamer(tokenizer)."
        )


class EndOnce:
    """A streamer seen through a wrapper whose `end()` reaches it once: the first call ends it, later ones do nothing.
    Every other attribute (`put`, `put_draft`, ...) is the streamer's own, so `put_draft` exists exactly when the
    streamer has it."""

    def __init__(self, streamer: BaseStreamer) -> None:
        self.streamer, self.ended = streamer, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.streamer, name)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.streamer.end()


def ends_stream(generate: Callable) -> Callable:
    """Wrap a `generate(self, ..., streamer=None, ...)` so that a streamer is checked (`check_streamer`) before
    anything runs and gets `end()` exactly once on every exit: after the final tokens, and also when `generate`
    raises (a validation error, a `put` / `put_draft` of the streamer that raises, an interrupt). The error itself
    propagates unchanged."""
    signature = inspect.signature(generate)

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        streamer = bound.arguments.get("streamer")
        if streamer is None:
            return generate(*args, **kwargs)
        check_streamer(streamer)
        bound.arguments["streamer"] = once = EndOnce(streamer)
        try:
            return generate(*bound.args, **bound.kwargs)
        finally:
            once.end()

    return wrapper


class DraftStream:
    """Feeds a Transformers streamer from the samplers, with DiffusionGemma's call order.

    Every value is a CPU `LongTensor` `[batch, longest]` padded with `pad_token_id` (Transformers' text streamers
    take batch 1). The *prefix* of an input is its tokens up to and including the first token followed by an open
    gap (a prompt whole, `BOS` alone for an unconditional sample, a template up to its first marker): it never
    changes, so it is `put` once before the first step, as DiffusionGemma puts the prompt (a `TextStreamer` with
    `skip_prompt=True` skips it). After it:

    * `put_draft(value=rest)`, when the streamer has `put_draft`, at every step that runs a pass: each sequence after
      its prefix, as it stands after the step's fill. Elastic-MDM: no mask ever shows, since a step fills every mask
      the step before inserted; the draft grows between calls by the positions each step opens (unfilled, they
      are not shown). MDLM: the fixed canvas, with `mask_token_id` at the positions not revealed yet (a tokenizer
      decodes it as its mask token; `skip_special_tokens=True` hides it). Every draft holds the whole batch (inputs
      of different lengths with `max_new_tokens` run as one batch, each sequence under its own cap).
    * `put(value=rest)` once with the final tokens after the prefix (up to each sequence's length), then `end()`.

    Drafts cost one device-to-host copy per step; without a streamer the samplers make no such read."""

    def __init__(self, streamer: BaseStreamer, start: ActiveState, pad_token_id: int) -> None:
        self.streamer, self.pad_token_id = streamer, pad_token_id
        self.wants_drafts = callable(getattr(streamer, "put_draft", None))
        sequences, flags = start.split(), start.open_after.cpu().split(start.lengths.tolist())
        self.prefix = [int(f.nonzero()[0, 0]) + 1 if bool(f.any()) else len(f) for f in flags]
        self.drafts = [seq[n:] for seq, n in zip(sequences, self.prefix, strict=True)]
        streamer.put(self.padded([seq[:n] for seq, n in zip(sequences, self.prefix, strict=True)]))

    def padded(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(
            [row.long() for row in rows], batch_first=True, padding_value=self.pad_token_id
        )

    def drafter(self, rows: list[int]) -> Callable[[ActiveState], None] | None:
        """The `on_draft` of a sampler run over the sequences `rows` (`None` when the streamer takes no drafts)."""
        if not self.wants_drafts:
            return None

        def on_draft(state: ActiveState) -> None:
            for row, seq in zip(rows, state.split(), strict=True):
                self.drafts[row] = seq[self.prefix[row] :]
            self.streamer.put_draft(value=self.padded(self.drafts))

        return on_draft

    def finish(self, output: ElasticMDMGenerateOutput) -> None:
        """`put` the final tokens after each prefix, then `end`."""
        sequences, lengths = output.sequences.cpu(), output.lengths.tolist()
        rest = [seq[p:n] for seq, p, n in zip(sequences, self.prefix, lengths, strict=True)]
        self.streamer.put(self.padded(rest))
        self.streamer.end()
