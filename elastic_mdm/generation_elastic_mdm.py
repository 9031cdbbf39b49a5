"""Sampling for Elastic-MDM (design §3, the paper's Alg. 1 made exact) and for the MDLM baseline.

`sample_elastic` works on a packed stream: every sequence of the batch keeps its own active length, nothing is
padded to a canvas. `sample_mdlm` is MDLM's ancestral sampler on a fixed canvas of `max_length` tokens, run through
the same denoiser protocol, packing, step cache and token sampling, so that the two are compared on identical code.
`generate()` picks one by the model config's `objective`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .cuda_graphs import CUDAGraphDenoiser
from .length_lock import locked_insertions
from .packing import PackedSequences, cu_seqlens_from_lengths
from .schedules import RevealSchedule, get_schedule, reveal_probability, sample_binomial

MAX_NUM_STEPS = 65536
"""Largest `num_steps` K. The samplers keep `F(0..K)` on the host and run K + 1 steps whatever happens in them (a
step that inserts nothing still draws every open gap's count); a sequence of at most `max_length` tokens changes in
at most `max_length - 2` of them, so K far above `max_length` only refines the schedule's time grid, at a cost
linear in K (100000 steps: about 40 s for one 64-token sequence on a CPU). 65536 is 64 x the longest paper context."""

# Transformers generation fields the samplers honour; any other field set to a non-neutral value is refused.
SUPPORTED_HF_FIELDS = {
    "do_sample", "temperature", "top_k", "top_p", "use_cache", "max_length", "max_new_tokens",
    "num_return_sequences", "return_dict_in_generate", "bos_token_id", "eos_token_id", "pad_token_id",
    "suppress_tokens", "bad_words_ids", "_from_model_config", "transformers_version",
}  # fmt: skip
NEUTRAL_HF_VALUES = {
    "num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
    "length_penalty": 1.0, "typical_p": 1.0, "diversity_penalty": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "renormalize_logits": False, "remove_invalid_values": False, "low_memory": False, "early_stopping": False,
}  # fmt: skip
HF_FIELDS = frozenset(vars(GenerationConfig()))
UNSUPPORTED_REASONS = {
    "num_beams": "there is no beam search: every token is drawn in parallel; use num_return_sequences for several "
    "samples",
    "repetition_penalty": "it penalises tokens generated before, which needs a left-to-right order the diffusion "
    "sampler does not have",
    "no_repeat_ngram_size": "n-gram bans need a left-to-right order the diffusion sampler does not have",
    "min_length": "lengths come from the gap head and cannot be forced up without biasing them; filter the samples "
    "by length instead",
    "min_new_tokens": "lengths come from the gap head and cannot be forced up without biasing them; filter the "
    "samples by length instead",
}


class ElasticMDMGenerationConfig(GenerationConfig):
    """Generation settings of Elastic-MDM, saved with the model as `generation_config.json`.

    Args:
        num_steps: Number of reverse steps `K` (`K + 1` denoiser passes at most, fewer with caching).
        schedule: Reveal schedule name (`linear`, `cosine`, `exponential`, `p-linear`, `clipped`).
        schedule_kwargs: Its parameters (`sigma`, `p`, `beta`, `omega`).
        gap_temperature: Temperature of the gap-count distribution.
        gap_do_sample: Sample gap counts (`True`) or take the most likely count (`False`).
        lock_length: Keep the length the gap head draws at step 0 (the length model) and let later steps only
            place the remaining positions (`length_lock.py`; one more device read per step). `False` (default) is the
            paper's sampler, which re-draws every gap's count at every step. Both are exact with an oracle model.
            `scripts/train.py` saves `True` with the checkpoints it trains (`--lock_length`, chosen by the
            length-fidelity ablation of docs/quality.md).
        use_cache: Reuse a sequence's last pass when its input did not change (no fill, no insertion) and the model
            is not time-conditioned, as MDLM's `ddpm_cache`.
        output_trajectory: Return the active sequence of every step (`return_dict_in_generate=True`).
        progress_bar: Show a tqdm bar over the steps.
        max_length: Safety cap on the total length of a sequence, anchors included (default: the model's
            `max_position_embeddings`). Sequences that reach it are flagged in `hit_max_length`. For
            `objective="mdlm"` models it is the canvas length `L`.
        mdlm_gap_budget: `objective="mdlm"` with `template_ids` only: the fixed number of placeholder masks each
            open gap of a template gets (the paper's §5.4 MDLM baseline). Pad / EOS tokens the model writes inside a
            gap are dropped from the result: they are how MDLM writes a value shorter than the budget.
        cuda_graphs: Replay every denoiser pass from a CUDA graph captured per static shape bucket
            (`cuda_graphs.CUDAGraphDenoiser`; the model must be on a CUDA device). Removes the per-pass launch
            overhead that dominates short passes (design §8); the first call of each bucket captures its graph.
        do_sample, temperature, top_k, top_p: Token sampling, as in Transformers.
        max_new_tokens: How many tokens each input (prompt, template or the unconditional `BOS EOS`) may grow by;
            a sequence that reaches it is flagged in `hit_max_length`. Combines with `max_length` (the smaller
            cap wins).
        suppress_tokens, bad_words_ids: Tokens never sampled (Transformers' `SuppressTokensLogitsProcessor` and
            `NoBadWordsLogitsProcessor`); `bad_words_ids` holds single tokens only (`[[id], ...]`).

    Other Transformers fields (`num_beams`, `repetition_penalty`, `no_repeat_ngram_size`, `min_new_tokens`,
    `min_length`, ...) have no meaning for a diffusion sampler: `generate()` refuses them instead of ignoring them.
    `num_steps` is at most `MAX_NUM_STEPS`.

    `gap_temperature` and `gap_do_sample` only concern `objective="elastic"` models (MDLM has no gap head).
    """

    def __init__(
        self,
        num_steps: int = 128,
        schedule: str = "linear",
        schedule_kwargs: dict | None = None,
        gap_temperature: float = 1.0,
        gap_do_sample: bool = True,
        lock_length: bool = False,
        output_trajectory: bool = False,
        progress_bar: bool = False,
        mdlm_gap_budget: int | None = None,
        cuda_graphs: bool = False,
        **kwargs,
    ):
        self.num_steps = num_steps
        self.schedule = schedule
        self.schedule_kwargs = dict(schedule_kwargs or {})
        self.gap_temperature = gap_temperature
        self.gap_do_sample = gap_do_sample
        self.lock_length = lock_length
        self.output_trajectory = output_trajectory
        self.progress_bar = progress_bar
        self.mdlm_gap_budget = mdlm_gap_budget
        self.cuda_graphs = cuda_graphs
        kwargs.setdefault("do_sample", True)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> ElasticMDMGenerationConfig:
        """Defaults plus the special ids of the model config."""
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        return cls(**{name: getattr(model_config, name, None) for name in ids})

    def reveal_schedule(self) -> RevealSchedule:
        return get_schedule(self.schedule, **self.schedule_kwargs)


@dataclass
class ElasticMDMGenerateOutput(ModelOutput):
    """`sequences` `[batch, max_len]` padded with the pad (or EOS) id; `lengths` `[batch]` true lengths (anchors
    included); `hit_max_length` `[batch]` whether a sequence was stopped by `max_length` (MDLM: no EOS on the canvas;
    MDLM templates: a gap used its whole budget); `trajectory[k][b]` the sequence `b` fed at step `k` (the active
    sequence for Elastic, the whole canvas for MDLM; the last entry is the final state), when asked; `num_passes`
    denoiser passes run and `tokens_processed` the tokens they encoded; `sequence_passes` `[batch]` the passes that
    encoded each sequence (a packed pass counts once for every sequence in it; the step cache skips the others);
    `tokens_per_forward` the generated tokens over those passes (`tokens_per_forward()`; filled by `generate`)."""

    sequences: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    hit_max_length: torch.Tensor | None = None
    trajectory: list[list[torch.Tensor]] | None = None
    num_passes: int | None = None
    tokens_processed: int | None = None
    sequence_passes: torch.Tensor | None = None
    tokens_per_forward: float | None = None


def tokens_per_forward(output: ElasticMDMGenerateOutput, input_lengths: torch.Tensor | list[int]) -> float:
    """Tokens per forward pass, as dLLM leaderboards report it: the generated tokens (each final length minus its
    input length `input_lengths` `[batch]`, the sampler's start state: prompt or template anchors with BOS and EOS, so
    neither the prompt nor padding counts) divided by the denoiser passes. A packed pass counts once for every
    sequence it encodes (`output.sequence_passes`), so the figure does not depend on the batch size; for one sequence
    it is `generated / num_passes`. 0 when nothing was encoded."""
    start = torch.as_tensor(input_lengths, device=output.lengths.device)
    generated = int((output.lengths - start).clamp_min(0).sum())
    passes = int(output.sequence_passes.sum())
    return generated / passes if passes else 0.0


class TokenDenoiser(Protocol):
    """What `sample_mdlm` needs of a model: features of a packed stream and the token head on selected rows."""

    def diffusion_features(self, input_ids: torch.Tensor, packed, noise_level: torch.Tensor) -> torch.Tensor: ...

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class Denoiser(TokenDenoiser, Protocol):
    """What `sample_elastic` needs: a `TokenDenoiser` with the gap head too."""

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor: ...


@dataclass
class ActiveState:
    """The packed active sequences: `tokens` `[T]`, `sequence_ids` `[T]` (sorted), `open_after` `[T]` (the gap
    between token i and i+1 may grow), `lengths` `[B]`."""

    tokens: torch.Tensor
    sequence_ids: torch.Tensor
    open_after: torch.Tensor
    lengths: torch.Tensor

    def split(self, on_device: bool = False) -> list[torch.Tensor]:
        """The active sequences as a list of 1-D tensors (on the host unless `on_device`)."""
        tokens = self.tokens if on_device else self.tokens.to("cpu", copy=True)  # a snapshot, never a view
        return list(tokens.split(self.lengths.tolist()))

    def select(self, keep: torch.Tensor) -> ActiveState:
        """The state restricted to the rows flagged in `keep` `[T]` (order kept)."""
        lengths = torch.zeros_like(self.lengths).index_add_(0, self.sequence_ids, keep.long())
        return ActiveState(self.tokens[keep], self.sequence_ids[keep], self.open_after[keep], lengths)

    def positions(self) -> torch.Tensor:
        """`[T]` index of every token inside its sequence."""
        starts = cu_seqlens_from_lengths(self.lengths)[:-1].long()  # [B]
        return torch.arange(self.tokens.numel(), device=self.tokens.device) - starts[self.sequence_ids]

    def last_rows(self) -> torch.Tensor:
        """`[B]` row of the last token of every sequence."""
        return cu_seqlens_from_lengths(self.lengths)[1:].long() - 1


def sample_categorical(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `softmax(logits)` (`argmax` when not sampling).

    Exponential race: `argmax_v p_v / E_v` with `E_v ~ Exp(1)` is a draw of `p` (the Gumbel-max trick after `exp`).
    It is what `torch.multinomial(p, 1)` computes, draw for draw, without its validity check, which reads the
    device back (a host sync per step on CUDA)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def insert_masks(
    state: ActiveState,
    counts: torch.Tensor,
    mask_token_id: int,
    total: int | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[ActiveState, torch.Tensor]:
    """Insert `counts[i]` masks after token `i`; returns the new state and the new row of every old token.

    New masks inherit the open flag of their gap (they sit inside an open gap). `total`, the new token count, is
    read from the device when not given; `lengths`, the new lengths `[B]`, computed when not given.
    """
    repeats = counts + 1  # [T]
    new_rows = repeats.cumsum(0) - repeats  # [T] where old token i lands
    if total is None:
        total = state.tokens.numel() + int(counts.sum())
    tokens = torch.full((total,), mask_token_id, dtype=state.tokens.dtype, device=state.tokens.device)
    tokens[new_rows] = state.tokens
    if lengths is None:
        lengths = state.lengths + torch.zeros_like(state.lengths).index_add_(0, state.sequence_ids, counts)
    new_state = ActiveState(
        tokens=tokens,
        sequence_ids=state.sequence_ids.repeat_interleave(repeats, output_size=total),
        open_after=state.open_after.repeat_interleave(repeats, output_size=total),
        lengths=lengths,
    )
    return new_state, new_rows


def cap_insertions(
    counts: torch.Tensor, sequence_ids: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip insertion counts (rows in stream order) so no sequence exceeds `max_length`; flags clipped sequences."""
    budget = (max_length - lengths).clamp_min(0)  # [B]
    inclusive = counts.cumsum(0)
    first = torch.full_like(lengths, torch.iinfo(torch.long).max).scatter_reduce(
        0, sequence_ids, inclusive - counts, reduce="amin"
    )
    before = inclusive - counts - first[sequence_ids]  # insertions earlier in the same sequence
    capped = torch.minimum(counts, (budget[sequence_ids] - before).clamp_min(0))
    clipped = torch.zeros_like(lengths).index_add_(0, sequence_ids, (capped < counts).long()) > 0
    return capped, clipped


def reveal_tables(schedule: RevealSchedule, num_steps: int) -> tuple[list[float], list[float]]:
    """`F(0..K)` and `q_0..q_K` with `q_k = (F(k+1) - F(k)) / (1 - F(k))` and `q_K = 0`, as host floats (the step
    loop then reads them without a device sync). `q_{K-1} = 1` unless everything was revealed before."""
    if num_steps > MAX_NUM_STEPS:
        raise ValueError(f"num_steps={num_steps} is above the limit of {MAX_NUM_STEPS} (see MAX_NUM_STEPS).")
    reveal = schedule.table(num_steps)  # float64 on the host
    share = reveal_probability(reveal[:-1], reveal[1:]).tolist() + [0.0]
    return reveal.tolist(), share


def step_range(num_steps: int, desc: str, progress_bar: bool):
    """`range(num_steps)`, wrapped in a tqdm bar when asked."""
    steps = range(num_steps)
    if not progress_bar:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, total=num_steps)


def fill_tokens(
    denoiser: TokenDenoiser,
    hidden: torch.Tensor,
    state: ActiveState,
    rows: torch.Tensor,
    dirty: torch.Tensor,
    token_processors: LogitsProcessorList,
    do_sample: bool,
    generator: torch.Generator | None,
) -> None:
    """`x_i ~ p_θ(· | h_i)` (after the temperature / top-k / top-p processors) for every row `i` of `rows` `[R]`,
    written into `state.tokens` in place; the sequences that changed are flagged in `dirty` `[B]`."""
    if rows.numel() == 0:
        return
    logits = token_processors(None, denoiser.token_logits(hidden[rows]).float())  # [R, vocab]
    state.tokens[rows] = sample_categorical(logits, do_sample, generator).to(state.tokens.dtype)
    dirty[state.sequence_ids[rows]] = True


def generate_output(
    state: ActiveState,
    hit_max_length: torch.Tensor,
    pad_token_id: int,
    trajectory: list[list[torch.Tensor]] | None,
    num_passes: int,
    tokens_processed: int,
    sequence_passes: torch.Tensor,
) -> ElasticMDMGenerateOutput:
    """Pack the final sequences of `state` into `[batch, longest]`, padded with `pad_token_id`."""
    return ElasticMDMGenerateOutput(
        sequences=torch.nn.utils.rnn.pad_sequence(
            state.split(on_device=True), batch_first=True, padding_value=pad_token_id
        ),
        lengths=state.lengths,
        hit_max_length=hit_max_length,
        trajectory=trajectory,
        num_passes=num_passes,
        tokens_processed=tokens_processed,
        sequence_passes=sequence_passes,
    )


def host_read(*values: torch.Tensor) -> list[int]:
    """The device-to-host read of a sampling step: a few integer scalars stacked and copied back at once (each
    separate `int(tensor)` would stall the stream once; the step loops below read once per step)."""
    return torch.stack([value.reshape(()).long() for value in values]).tolist()


def rows_where(flags: torch.Tensor, count: int) -> torch.Tensor:
    """`[count]` indices of the `True` entries of `flags` `[T]`, `count` known on the host (no read-back)."""
    return torch.nonzero_static(flags, size=count).squeeze(-1)


@dataclass
class PassWork:
    """What the next denoiser pass encodes, known on the host: its sequences, tokens and longest sequence."""

    sequences: int
    tokens: int
    longest: int

    @classmethod
    def of(cls, lengths: torch.Tensor, dirty: torch.Tensor, *more: torch.Tensor) -> tuple[PassWork, list[int]]:
        """The work of the `dirty` sequences of `lengths` `[B]`, read in one go with the scalars `more`."""
        selected = lengths * dirty  # [B] zero for the sequences a pass reuses
        sequences, tokens, longest, *values = host_read(dirty.sum(), selected.sum(), selected.max(), *more)
        return cls(sequences, tokens, longest), values


@dataclass
class Growth:
    """An insertion step planned from its counts, before the tokens move: the new `lengths` `[B]`, the `dirty`
    flags `[B]` of the next pass and its `work`, and on the host the number of masks `inserted` and the `longest`
    sequence after the insertion."""

    lengths: torch.Tensor
    dirty: torch.Tensor
    work: PassWork
    inserted: int
    longest: int

    @classmethod
    def of(cls, lengths: torch.Tensor, owners: torch.Tensor, counts: torch.Tensor, dirty: torch.Tensor) -> Growth:
        """`counts[i]` masks into the gap `i` of sequence `owners[i]`; one read."""
        added = torch.zeros_like(lengths).index_add_(0, owners, counts)  # [B]
        grown, dirty = lengths + added, dirty | (added > 0)
        work, (inserted, longest) = PassWork.of(grown, dirty, counts.sum(), grown.max())
        return cls(grown, dirty, work, inserted, longest)


def sample_elastic(
    denoiser: Denoiser,
    state: ActiveState,
    *,
    mask_token_id: int,
    num_steps: int,
    schedule: RevealSchedule,
    token_processors: LogitsProcessorList,
    do_sample: bool = True,
    gap_temperature: float = 1.0,
    gap_do_sample: bool = True,
    max_length: int,
    pad_token_id: int,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    output_trajectory: bool = False,
    progress_bar: bool = False,
    lock_length: bool = False,
    on_draft: Callable[[ActiveState], None] | None = None,
) -> ElasticMDMGenerateOutput:
    r"""Elastic-MDM reverse process (design §3) on a packed batch.

    ```
    x <- anchors (+ prompt / template); open gaps may grow
    for k = 0 .. K:
        h = f(x, F(k))                                   one pass over the active tokens only
        x[i] ~ p_θ(· | h_i) for every [MASK] i           (none at k = 0)
        if k < K, for every open adjacent pair (a, b):
            g ~ p_φ(· | h_a, h_b)                        removed count of the gap
            m ~ Binomial(g, q_k),  q_k = (F(k+1) - F(k)) / (1 - F(k))
            insert m [MASK] between a and b
    ```
    `q_{K-1} = 1`, so the last pass fills every remaining position. A sequence whose input did not change since its
    last pass (no mask filled, nothing inserted) reuses that pass when `use_cache` (exact unless time-conditioned).
    With `lock_length`, every open gap of step 0 keeps the total it draws there (for an unconditional sample, its
    length) and later steps only place it inside that gap's region (`length_lock.py`).
    `on_draft(state)`, when given, sees the state of every step that runs a pass, after its fill and before its
    insertion: every active token is then clean (a step fills all the masks the step before inserted).

    The loop reads the device once per step (design §8), after the insertion: the number of inserted masks and the
    size of the next pass. The host then knows every count a step needs: the masks to fill are the masks inserted
    at the previous step (all of them are filled at every pass), and every inserted mask is open.
    """
    reveal, reveal_share = reveal_tables(schedule, num_steps)  # F(k), q_k for k = 0..K
    batch = state.lengths.numel()
    everything = torch.ones(batch, dtype=torch.bool, device=state.tokens.device)
    dirty = everything  # [B] needs a fresh pass
    hit_max_length = torch.zeros_like(everything)
    work, (num_masks, num_open) = PassWork.of(
        state.lengths, everything, (state.tokens == mask_token_id).sum(), state.open_after.sum()
    )
    hidden, trajectory, num_passes, tokens_processed = None, [], 0, 0
    sequence_passes = torch.zeros(batch, dtype=torch.long, device=state.tokens.device)  # [B] passes that encoded it
    remaining = regions = None  # lock_length: positions still to reveal per region, region of each token's gap
    for k in step_range(num_steps + 1, "elastic-mdm", progress_bar):
        if output_trajectory:
            trajectory.append(state.split())
        q = reveal_share[k]
        grows = q > 0.0
        if not grows and num_masks == 0:
            continue  # nothing to fill, nothing to insert (flat stretch of a clipped schedule)

        if work is None:  # after a step that filled without inserting (clipped schedules only)
            work, _ = PassWork.of(state.lengths, dirty)
        if work.tokens > 0:
            hidden = encode_dirty(denoiser, state, hidden, dirty, work, reveal[k])
            num_passes += 1
            tokens_processed += work.tokens
            sequence_passes += dirty
        dirty = torch.zeros_like(everything) if use_cache else everything

        mask_rows = rows_where(state.tokens == mask_token_id, num_masks)
        fill_tokens(denoiser, hidden, state, mask_rows, dirty, token_processors, do_sample, generator)
        num_masks = 0
        if on_draft is not None:
            on_draft(state)
        if not grows:
            work = None if use_cache else work
            continue

        open_rows = rows_where(state.open_after, num_open)
        owners = state.sequence_ids[open_rows]  # [open] the sequence of each open gap
        gap_logits = denoiser.gap_logits(hidden, open_rows, reveal[k]).float() / gap_temperature  # [open, G + 1]
        gaps = sample_categorical(gap_logits, gap_do_sample, generator)
        if lock_length:  # every step-0 open gap keeps its drawn total; the gap head only places it (one more read)
            if regions is None:  # region r: the r-th open gap of the first growing step, and all it grows into
                regions, num_regions = state.open_after.long().cumsum(0) - 1, num_open  # [T]
            counts, remaining = locked_insertions(
                gaps, gap_logits, regions[open_rows], remaining, q, num_regions, generator
            )
        else:
            counts = sample_binomial(gaps, q, generator)  # [open]
        growth = Growth.of(state.lengths, owners, counts, dirty)  # the step's one read
        if growth.longest > max_length:  # rare: a sequence would outgrow the cap (one more read this step)
            counts, clipped = cap_insertions(counts, owners, state.lengths, max_length)
            hit_max_length |= clipped
            growth = Growth.of(state.lengths, owners, counts, dirty)
        dirty, work = growth.dirty, growth.work
        all_counts = torch.zeros_like(state.tokens).index_put_((open_rows,), counts)  # [T]
        total = state.tokens.numel() + growth.inserted
        state, new_rows = insert_masks(state, all_counts, mask_token_id, total, growth.lengths)
        if regions is not None:  # new masks sit inside their gap's region, as they inherit its open flag
            regions = regions.repeat_interleave(all_counts + 1, output_size=total)
        hidden = hidden.new_empty(state.tokens.numel(), hidden.shape[-1]).index_copy_(0, new_rows, hidden)
        num_masks, num_open = growth.inserted, num_open + growth.inserted

    if output_trajectory:
        trajectory.append(state.split())
    return generate_output(
        state, hit_max_length, pad_token_id, trajectory if output_trajectory else None, num_passes, tokens_processed,
        sequence_passes,
    )  # fmt: skip


def encode_dirty(
    denoiser: TokenDenoiser,
    state: ActiveState,
    hidden: torch.Tensor | None,
    dirty: torch.Tensor,
    work: PassWork,
    noise_level: float,
) -> torch.Tensor:
    """Run the denoiser on the sequences flagged `dirty` `[B]` (`work` says how many, their tokens and the longest)
    and return `hidden` with their rows replaced. Every index is taken at a host-known size: no read-back."""
    if hidden is None or work.sequences == dirty.numel():
        rows, lengths, tokens = None, state.lengths, state.tokens
    else:
        lengths = state.lengths[rows_where(dirty, work.sequences)]  # [S]
        rows = rows_where(dirty[state.sequence_ids], work.tokens)  # [work.tokens]
        tokens = state.tokens[rows]
    packed = PackedSequences.from_cu_seqlens(cu_seqlens_from_lengths(lengths), work.longest, work.tokens)
    level = torch.full((lengths.numel(),), noise_level, device=tokens.device)
    features = denoiser.diffusion_features(tokens, packed, level)
    if rows is None:
        return features
    return hidden.index_copy(0, rows, features.to(hidden.dtype))


def sample_mdlm(
    denoiser: TokenDenoiser,
    state: ActiveState,
    *,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    max_length: int,
    num_steps: int,
    schedule: RevealSchedule,
    token_processors: LogitsProcessorList,
    do_sample: bool = True,
    gap_budget: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    output_trajectory: bool = False,
    progress_bar: bool = False,
    on_draft: Callable[[ActiveState], None] | None = None,
) -> ElasticMDMGenerateOutput:
    r"""MDLM's ancestral (DDPM) sampler on a fixed canvas, the baseline of Elastic-MDM, on a packed batch.

    `state` holds the same anchors `sample_elastic` starts from (`_initial_state`); each sequence becomes a canvas of
    `L = max_length` tokens, the layout `MDLMCollator` trains on (BOS + sequence + EOS + pads):

    * prompt / unconditional (`gap_budget=None`; the only open gap is the one before EOS):
      `[BOS, p_1 .. p_m, MASK × (L - 1 - m)]`: EOS is dropped, the model writes where the sequence ends;
    * template (`gap_budget=g`): every open gap becomes `g` masks, the template's EOS stays, and fixed pads fill the
      canvas up to `L` (the pads MDLM saw after EOS in training).

    With `F` the reveal schedule (`F(0) = 0`, `F(K) = 1`; for MDLM's `α_t`, `F(k) = α_{t_k}`, `t_k = 1 - k/K`), the
    input of step `k` has each maskable position revealed with probability `F(k)`:
    ```
    for k = 0 .. K-1:
        R = every [MASK] independently with prob. q_k = (F(k+1) - F(k)) / (1 - F(k))     (q_{K-1} = 1)
        h = f(x, F(k))                                   one pass; noise level F(k) = MDLMCollator's 1 - t
        x[i] ~ p_θ(· | h_i) for i in R                   same token processors as Elastic-MDM
    ```
    This is MDLM's `_ddpm_update` (`q(x_s | x_t, x_0 ~ p_θ)`, unmask with `(α_s - α_t) / (1 - α_t)`) written with
    the reveal draw first, which has the same law. After `k` steps the number of revealed positions of a
    sequence is `Binomial(#maskable, F(k))`; after `K` steps none is masked.

    `use_cache` (MDLM's `ddpm_cache`; exact unless the model is time-conditioned): a sequence is encoded only at a
    step that reveals one of its positions, and its last pass is reused when its canvas did not change since. With
    `use_cache=False` every step runs one full pass (`K · B · L` tokens), MDLM's plain sampler. The random draws do
    not depend on `use_cache`, so both give the same samples for a fixed `generator`. Like `sample_elastic`, the loop
    reads the device once per step (the number of revealed positions and the size of the pass).

    Output: prompt / unconditional sequences end at the first EOS generated after the prompt (length = its index + 1);
    with none, the length is `L` and `hit_max_length` is set. Templates keep every anchor and every generated token
    except the pad / EOS tokens inside a gap; `hit_max_length` flags a template with a gap that used its whole budget
    (its value may be cut). `trajectory[k]` (`k = 0..K`) is the canvas fed to step `k`, `trajectory[K]` the final one.
    `on_draft(canvas)`, when given, sees the canvas after the fill of every step (unrevealed positions still masks).
    """
    canvas, template_lengths = mdlm_canvas(state, max_length, mask_token_id, pad_token_id, gap_budget)
    generated = canvas.tokens == mask_token_id  # [B * L] positions the model writes
    reveal, reveal_share = reveal_tables(schedule, num_steps)
    everything = torch.ones(canvas.lengths.numel(), dtype=torch.bool, device=canvas.tokens.device)
    dirty = everything  # [B] canvas changed since its last pass
    (num_masks,) = host_read(generated.sum())
    hidden, trajectory, num_passes, tokens_processed = None, [], 0, 0
    sequence_passes = torch.zeros_like(canvas.lengths)  # [B] passes that encoded each canvas
    for k in step_range(num_steps, "mdlm", progress_bar):
        if output_trajectory:
            trajectory.append(canvas.split())
        mask_rows = rows_where(canvas.tokens == mask_token_id, num_masks)  # [M]
        revealed = reveal_draw(num_masks, reveal_share[k], generator, canvas.tokens.device)  # [M]
        if use_cache and hidden is not None:  # encode the changed canvases with a revealed position
            needed = torch.zeros_like(canvas.lengths).index_add_(0, canvas.sequence_ids[mask_rows], revealed.long())
            stale = dirty & (needed > 0)
        else:
            stale = everything
        work, (num_revealed,) = PassWork.of(canvas.lengths, stale, revealed.sum())  # the step's one read
        if work.tokens > 0:
            hidden = encode_dirty(denoiser, canvas, hidden, stale, work, reveal[k])
            num_passes += 1
            tokens_processed += work.tokens
            sequence_passes += stale
            dirty = dirty & ~stale
        rows = mask_rows[rows_where(revealed, num_revealed)]  # [R]
        fill_tokens(denoiser, hidden, canvas, rows, dirty, token_processors, do_sample, generator)
        num_masks -= num_revealed
        if on_draft is not None:
            on_draft(canvas)

    if output_trajectory:
        trajectory.append(canvas.split())
    if template_lengths is None:
        final, hit_max_length = cut_at_first_eos(canvas, generated, eos_token_id)
    else:
        final, hit_max_length = squeeze_gaps(canvas, generated, template_lengths, (eos_token_id, pad_token_id))
    return generate_output(
        final, hit_max_length, pad_token_id, trajectory if output_trajectory else None, num_passes, tokens_processed,
        sequence_passes,
    )  # fmt: skip


def reveal_draw(count: int, prob: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`[count]` independent `Bernoulli(prob)` flags: which masked positions a step reveals (all at `prob >= 1`, none
    at `prob <= 0`; only the strictly fractional case draws random numbers)."""
    if prob >= 1.0 or prob <= 0.0 or count == 0:
        return torch.full((count,), prob >= 1.0, dtype=torch.bool, device=device)
    return torch.rand(count, generator=generator, dtype=torch.float64, device=device) < prob


def mdlm_canvas(
    anchors: ActiveState, length: int, mask_token_id: int, pad_token_id: int, gap_budget: int | None
) -> tuple[ActiveState, torch.Tensor | None]:
    """The `[B * L]` MDLM canvases of `anchors` (see `sample_mdlm`) and, for templates, the length of each filled
    template `[B]` (its rows after that are the fixed pad tail); `None` for prompts."""
    if gap_budget is None:
        is_last = torch.zeros_like(anchors.open_after).index_fill_(0, anchors.last_rows(), True)
        if not torch.equal(anchors.open_after, is_last.roll(-1)):
            raise ValueError(
                "MDLM has no gaps that grow: only a prompt (one open gap before EOS) can be continued without a "
                "budget; give gap_budget (generate(): mdlm_gap_budget) to fill a template's open gaps."
            )
        body, tail_token = anchors.select(~is_last), mask_token_id  # drop EOS: the model writes the end
        template_lengths = None
    else:
        counts = anchors.open_after.long() * gap_budget  # [T] masks after each open token
        body, _ = insert_masks(anchors, counts, mask_token_id)
        tail_token, template_lengths = pad_token_id, body.lengths
    longest = int(body.lengths.max())
    if longest > length:
        what = "A prompt" if gap_budget is None else f"A template with mdlm_gap_budget={gap_budget} masks per gap"
        raise ValueError(f"{what} has {longest} tokens, more than the canvas length max_length={length}.")
    counts = torch.zeros_like(body.tokens).index_put_((body.last_rows(),), length - body.lengths)
    canvas, _ = insert_masks(body, counts, tail_token)  # the tail is inserted after each last token
    canvas.open_after.zero_()
    return canvas, template_lengths


def cut_at_first_eos(
    canvas: ActiveState, generated: torch.Tensor, eos_token_id: int
) -> tuple[ActiveState, torch.Tensor]:
    """Each sequence up to its first generated EOS (included), or the whole canvas with `hit_max_length` set."""
    position = canvas.positions()  # [T]
    ends = (generated & (canvas.tokens == eos_token_id)).nonzero().squeeze(-1)
    lengths = canvas.lengths.scatter_reduce(0, canvas.sequence_ids[ends], position[ends] + 1, reduce="amin")
    ended = torch.zeros_like(canvas.lengths, dtype=torch.bool).index_fill_(0, canvas.sequence_ids[ends], True)
    return canvas.select(position < lengths[canvas.sequence_ids]), ~ended


def squeeze_gaps(
    canvas: ActiveState, generated: torch.Tensor, template_lengths: torch.Tensor, stop_ids: tuple[int, int]
) -> tuple[ActiveState, torch.Tensor]:
    """Each filled template without the pad / EOS tokens generated in its gaps, nor the pad tail; flags the
    templates with a gap holding no such token (it used its whole budget)."""
    stop = generated & torch.isin(canvas.tokens, torch.tensor(stop_ids, device=canvas.tokens.device))  # [T]
    gap = (~generated).long().cumsum(0)  # [T] one id per run of generated rows (after its fixed left neighbour)
    gap_stopped = torch.zeros(canvas.tokens.numel() + 1, dtype=torch.bool, device=stop.device)
    gap_stopped.index_fill_(0, gap[stop], True)
    full = generated & ~gap_stopped[gap]  # rows of the gaps that used their whole budget
    hit = torch.zeros_like(canvas.lengths, dtype=torch.bool).index_fill_(0, canvas.sequence_ids[full], True)
    keep = (canvas.positions() < template_lengths[canvas.sequence_ids]) & ~stop
    return canvas.select(keep), hit


class ElasticMDMGenerationMixin:
    """Adds `generate()` to `ElasticMDMForDiffusionLM`: variable-length Elastic-MDM sampling, or MDLM's fixed-canvas
    sampler for checkpoints trained with `objective="mdlm"`."""

    def diffusion_features(self, input_ids: torch.Tensor, packed, noise_level: torch.Tensor) -> torch.Tensor:
        return self.model.forward_packed(input_ids, packed, noise_level)

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ) -> None:
        """Called by `from_pretrained`: load `generation_config.json` as an `ElasticMDMGenerationConfig`."""
        if generation_config is not None:
            self.generation_config = ElasticMDMGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        loading = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        try:
            self.generation_config = ElasticMDMGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in loading if k in kwargs}
            )
        except OSError:  # no generation_config.json: keep the defaults built from the model config
            pass

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        template_ids: torch.Tensor | list[list[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        return_dict_in_generate: bool | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs,
    ) -> torch.LongTensor | ElasticMDMGenerateOutput:
        r"""Sample sequences with the sampler of the checkpoint's `config.objective`.

        `"elastic"`: `sample_elastic`, variable lengths (design §3). `"mdlm"`: `sample_mdlm`, MDLM's ancestral
        sampler on a canvas of `max_length` tokens, through the same packing, step cache and token sampling; a
        sequence ends at its first generated EOS.

        Inputs (at most one of them):
            * nothing: `num_return_sequences` unconditional samples, starting from `BOS EOS`;
            * `input_ids` (+ `attention_mask`, or a list of lists): prompts `BOS p_1 .. p_m` (no EOS); each is
              continued in one open gap before an appended EOS;
            * `template_ids`: `BOS .. EOS` templates in which every `mask_token_id` marks an open gap (infilling,
              JSON skeletons); the markers are removed and only those gaps grow. MDLM has no growing gaps: it needs
              `mdlm_gap_budget`, the number of masks each open gap gets (pad / EOS written in a gap are dropped).

        Every field of `ElasticMDMGenerationConfig` can be passed as a keyword (`num_steps`, `schedule`,
        `temperature`, `top_k`, `top_p`, `gap_temperature`, `max_length`, `max_new_tokens`, `suppress_tokens`,
        `bad_words_ids`, `num_return_sequences`, ...); Transformers fields without a diffusion meaning raise.
        `generator` (or `seed`) drives every random draw.

        `streamer` (any Transformers `BaseStreamer`, e.g. `TextStreamer` or `TextDiffusionStreamer`) follows the
        run as DiffusionGemma's `generate` feeds it (see `DraftStream`): `put(prefix)` first (each input up to its
        first open gap: the prompt, `BOS` alone, or a template's head), `put_draft(draft)` at every step that runs a
        pass when the streamer has `put_draft`, `put(rest)` with the final tokens after the prefix, then `end()`.
        Streaming reads each draft back from the device; the random draws, and so the samples, do not change.

        Returns the token ids `[batch, longest]` (`BOS .. EOS`, anchors included) padded with `pad_token_id` (EOS if
        unset), as every Transformers `generate`; with `return_dict_in_generate=True` an `ElasticMDMGenerateOutput`
        that adds the true `lengths`, `hit_max_length`, `num_passes`, `tokens_processed`, `sequence_passes`,
        `tokens_per_forward` (generated tokens per denoiser pass, see `tokens_per_forward()`) and the trajectory.
        """
        config = self._resolve_generation_config(generation_config, kwargs)
        check_streamer(streamer)
        if return_dict_in_generate is None:
            return_dict_in_generate = bool(config.return_dict_in_generate)
        max_length = self._generation_max_length(config)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        state = self._initial_state(input_ids, attention_mask, template_ids, config.num_return_sequences)
        input_lengths = state.lengths.tolist()
        if max(input_lengths) > max_length:
            raise ValueError(
                f"An input has {max(input_lengths)} tokens with its anchors, more than max_length={max_length}."
            )
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.eos_token_id
        common = dict(  # what both samplers share
            mask_token_id=self.config.mask_token_id,
            num_steps=config.num_steps,
            schedule=config.reveal_schedule(),
            token_processors=token_logits_processors(config),
            do_sample=bool(config.do_sample),
            max_length=max_length,
            pad_token_id=pad,
            use_cache=bool(config.use_cache) and not self.config.time_conditioning,
            generator=generator,
            output_trajectory=config.output_trajectory,
            progress_bar=config.progress_bar,
        )
        denoiser = self._cuda_graph_denoiser(pad) if config.cuda_graphs else self
        stream = DraftStream(streamer, state, pad) if streamer is not None else None

        def run(part: ActiveState, cap: int, rows: list[int]) -> ElasticMDMGenerateOutput:
            on_draft = stream.drafter(rows) if stream is not None else None
            if self.config.objective == "mdlm":
                budget = self._mdlm_gap_budget(config, template_ids is not None)
                return sample_mdlm(
                    denoiser, part, eos_token_id=self.config.eos_token_id, gap_budget=budget, on_draft=on_draft,
                    **{**common, "max_length": cap},
                )  # fmt: skip
            return sample_elastic(
                denoiser, part, gap_temperature=config.gap_temperature, gap_do_sample=config.gap_do_sample,
                lock_length=config.lock_length, on_draft=on_draft,
                **{**common, "max_length": cap},
            )  # fmt: skip

        groups = rows_by_cap(self._length_caps(config, input_lengths, max_length))
        if len(groups) == 1:
            cap, rows = next(iter(groups.items()))
            output = run(state, cap, rows)
        else:  # max_new_tokens with inputs of different lengths: one sampler run per length cap
            parts = [(rows, run(subset_state(state, rows), cap, rows)) for cap, rows in groups.items()]
            output = merge_outputs(parts, len(input_lengths), pad)
        output["tokens_per_forward"] = tokens_per_forward(output, input_lengths)
        if stream is not None:
            stream.finish(output)
        if return_dict_in_generate:
            return output
        return output.sequences

    # -- helpers ----------------------------------------------------------------------------------------------

    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict
    ) -> ElasticMDMGenerationConfig:
        known = set(inspect.signature(ElasticMDMGenerationConfig.__init__).parameters) | set(vars(GenerationConfig()))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"generate() got unknown arguments {unknown}; see ElasticMDMGenerationConfig for the options."
            )
        params = {**self.generation_config.to_dict()}
        if generation_config is not None:  # only the fields it sets: the others keep the model's values
            params.update(generation_config.to_diff_dict())
        params.update(kwargs)
        params.pop("transformers_version", None)
        # Transformers refuses num_return_sequences > 1 with greedy tokens (a beam-search rule); here gap counts
        # stay random, so the copies differ: keep it out of its validation.
        num_return_sequences = params.pop("num_return_sequences", None)
        config = ElasticMDMGenerationConfig(**params)
        config.num_return_sequences = 1 if num_return_sequences is None else num_return_sequences
        check_sampler_fields(config)
        check_transformers_fields(config, self.config.vocab_size)
        config.reveal_schedule()  # unknown schedule / bad parameters raise here
        budget = config.mdlm_gap_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"mdlm_gap_budget must be an integer >= 1 (masks per open gap), got {budget!r}.")
        return config

    def _cuda_graph_denoiser(self, pad_token_id: int) -> CUDAGraphDenoiser:
        """The model's graph cache, kept across calls; rebuilt when the weights moved (dtype or device change)."""
        if self.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs the model on a CUDA device (it is on {self.device}); move it with "
                "model.to('cuda') or drop cuda_graphs."
            )
        weights = next(self.parameters())
        key = (weights.data_ptr(), weights.dtype, pad_token_id)
        cached = getattr(self, "_cuda_graphs", None)
        if cached is None or cached[0] != key:
            cached = self._cuda_graphs = (key, CUDAGraphDenoiser(self, pad_token_id))
        return cached[1]

    @staticmethod
    def _mdlm_gap_budget(config: ElasticMDMGenerationConfig, has_template: bool) -> int | None:
        """Masks per open gap of a template for the MDLM sampler (`None` for prompts: one gap up to the canvas end)."""
        if not has_template:
            return None
        if config.mdlm_gap_budget is None:
            raise ValueError(
                "This is an objective='mdlm' model: its canvas has no gaps that grow, so template_ids need a fixed "
                "number of masks per open gap: pass mdlm_gap_budget=N (the paper's §5.4 MDLM baseline)."
            )
        return config.mdlm_gap_budget

    def _length_caps(self, config: ElasticMDMGenerationConfig, lengths: list[int], max_length: int) -> list[int]:
        """The longest each sequence may become: `max_length`, and with `max_new_tokens` its input length (anchors
        included) plus `max_new_tokens` when that is shorter."""
        if config.max_new_tokens is None:
            return [max_length] * len(lengths)
        return [min(max_length, n + config.max_new_tokens) for n in lengths]

    def _generation_max_length(self, config: ElasticMDMGenerationConfig) -> int:
        limit = self.config.max_position_embeddings
        if config.max_length is None:
            return limit
        if config.max_length > limit:
            raise ValueError(
                f"max_length={config.max_length} exceeds the model's max_position_embeddings={limit}; lower it."
            )
        return int(config.max_length)

    def _initial_state(
        self,
        input_ids: torch.Tensor | list[list[int]] | None,
        attention_mask: torch.Tensor | None,
        template_ids: torch.Tensor | list[list[int]] | None,
        num_return_sequences: int,
    ) -> ActiveState:
        """Packed start state: anchors, the open flag of every gap, each input repeated `num_return_sequences` times."""
        cfg = self.config
        bos, eos, mask = cfg.bos_token_id, cfg.eos_token_id, cfg.mask_token_id
        if bos is None or eos is None or mask is None:
            raise ValueError("The model config needs bos_token_id, eos_token_id and mask_token_id to generate.")
        if input_ids is not None and template_ids is not None:
            raise ValueError("Pass either input_ids (prompts) or template_ids (templates), not both.")
        sequences: list[tuple[list[int], list[bool]]] = []
        if input_ids is None and template_ids is None:
            sequences = [([bos, eos], [True, False])]
        elif input_ids is not None:
            for i, prompt in enumerate(rows_of(input_ids, attention_mask, "input_ids")):
                if not prompt or prompt[0] != bos:
                    raise ValueError(
                        f"input_ids[{i}] must start with BOS ({bos}); "
                        "tokenize with add_special_tokens=True or prepend it."
                    )
                if mask in prompt:
                    raise ValueError(
                        f"input_ids[{i}] contains the mask token ({mask}); prompts must be clean text. "
                        "Use template_ids to mark open gaps."
                    )
                if bos != eos and len(prompt) > 1 and prompt[-1] == eos:
                    raise ValueError(
                        f"input_ids[{i}] ends with EOS ({eos}); a prompt is a prefix: "
                        "drop the EOS, or use template_ids."
                    )
                sequences.append((prompt + [eos], [False] * (len(prompt) - 1) + [True, False]))
        else:
            for i, template in enumerate(rows_of(template_ids, attention_mask, "template_ids")):
                sequences.append(parse_template(template, bos, eos, mask, f"template_ids[{i}]"))
        sequences = [s for s in sequences for _ in range(num_return_sequences)]
        device = self.device
        tokens = torch.tensor([t for seq, _ in sequences for t in seq], dtype=torch.long, device=device)
        lengths = torch.tensor([len(seq) for seq, _ in sequences], dtype=torch.long, device=device)
        return ActiveState(
            tokens=tokens,
            sequence_ids=torch.arange(len(sequences), device=device).repeat_interleave(lengths),
            open_after=torch.tensor([f for _, flags in sequences for f in flags], dtype=torch.bool, device=device),
            lengths=lengths,
        )


def rows_of(ids: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None, name: str) -> list[list[int]]:
    """Token lists of a padded tensor (`attention_mask` picks the real tokens) or of a list of lists."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        rows = [row[m.bool()].tolist() for row, m in zip(ids, attention_mask, strict=True)]
    else:
        rows = [list(map(int, r)) for r in ids]
    if not rows:
        raise ValueError(f"{name} is an empty batch; pass at least one sequence.")
    return rows


def parse_template(template: list[int], bos: int, eos: int, mask: int, name: str) -> tuple[list[int], list[bool]]:
    """`BOS a [MASK] b EOS` -> tokens `BOS a b EOS`, open flags `F T F F`: each mask marks one open gap."""
    ids = torch.tensor(template, dtype=torch.long)
    if ids.numel() < 2 or ids[0] != bos or ids[-1] != eos:
        raise ValueError(f"{name} must start with BOS ({bos}) and end with EOS ({eos}).")
    marker = ids == mask
    if bool((marker[1:] & marker[:-1]).any()):
        raise ValueError(f"{name} has two adjacent open-gap markers; one mask token marks one gap.")
    open_after = torch.cat([marker[1:], marker.new_zeros(1)])[~marker]  # a kept token is open if a marker follows it
    return ids[~marker].tolist(), open_after.tolist()


def check_sampler_fields(config: ElasticMDMGenerationConfig) -> None:
    """Refuse sampler settings that would fail deep inside, silently do nothing, or turn every sample into NaN."""
    count = config.num_return_sequences
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {count!r}.")
    steps = config.num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {steps!r}.")
    if steps > MAX_NUM_STEPS:
        raise ValueError(
            f"num_steps={steps} is above the limit of {MAX_NUM_STEPS}: every step costs time whether or not it "
            "changes anything, and a sequence of max_length tokens changes in at most max_length - 2 steps, so more "
            "steps only refine the schedule's time grid. Use num_steps <= max_length (or at most "
            f"{MAX_NUM_STEPS})."
        )
    floats = {"gap_temperature": config.gap_temperature, "temperature": config.temperature, "top_p": config.top_p}
    floats.update({f"schedule_kwargs[{k!r}]": v for k, v in config.schedule_kwargs.items()})
    for name, value in floats.items():
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if config.gap_temperature <= 0:
        raise ValueError(f"gap_temperature must be > 0, got {config.gap_temperature}.")
    new = config.max_new_tokens
    if new is not None and (isinstance(new, bool) or not isinstance(new, int) or new < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0 (how many tokens an input may grow by), got {new!r}.")


def check_transformers_fields(config: GenerationConfig, vocab_size: int) -> None:
    """Refuse a Transformers generation field the diffusion samplers cannot honour (instead of ignoring it), and
    check the token lists of the ones they do."""
    for name, value in vars(config).items():
        if name not in HF_FIELDS or name in SUPPORTED_HF_FIELDS or value is None:
            continue
        if name in NEUTRAL_HF_VALUES and value == NEUTRAL_HF_VALUES[name]:
            continue
        reason = UNSUPPORTED_REASONS.get(name, "the diffusion samplers have no equivalent")
        raise ValueError(f"generate() does not support {name}={value!r}: {reason}. Leave it unset.")
    for name in ("suppress_tokens", "bad_words_ids"):
        tokens = getattr(config, name) or []
        flat = [t for entry in tokens for t in (entry if isinstance(entry, (list, tuple)) else [entry])]
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in flat):
            raise ValueError(f"{name} must hold token ids in 0..{vocab_size - 1}, got {tokens!r}.")
    long_words = [word for word in config.bad_words_ids or [] if not isinstance(word, (list, tuple)) or len(word) != 1]
    if long_words:
        raise ValueError(
            f"bad_words_ids may only hold single tokens ([[id], ...]): a multi-token word {long_words[0]!r} has no "
            "left context to match against in a diffusion sampler. Ban its tokens one by one, or use suppress_tokens."
        )


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
      decodes it as its mask token; `skip_special_tokens=True` hides it). With `max_new_tokens` and inputs of
      different lengths the sampler runs once per length cap: the rows of the other runs keep their last draft.
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


def rows_by_cap(caps: list[int]) -> dict[int, list[int]]:
    """Sequence indices grouped by their length cap, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for row, cap in enumerate(caps):
        groups.setdefault(cap, []).append(row)
    return groups


def subset_state(state: ActiveState, rows: list[int]) -> ActiveState:
    """The sequences `rows` of `state` as a state of their own."""
    index = torch.tensor(rows, device=state.lengths.device)
    keep = torch.isin(state.sequence_ids, index)
    lengths = state.lengths[index]
    sequence_ids = torch.arange(len(rows), device=index.device).repeat_interleave(lengths)
    return ActiveState(state.tokens[keep], sequence_ids, state.open_after[keep], lengths)


def merge_outputs(
    parts: list[tuple[list[int], ElasticMDMGenerateOutput]], batch: int, pad_token_id: int
) -> ElasticMDMGenerateOutput:
    """One output of `batch` sequences from sampler runs over disjoint `rows` (original order restored)."""
    width = max(part.sequences.shape[1] for _, part in parts)
    first = parts[0][1]
    sequences = first.sequences.new_full((batch, width), pad_token_id)
    lengths, hit = first.lengths.new_zeros(batch), first.hit_max_length.new_zeros(batch)
    passes = first.sequence_passes.new_zeros(batch)
    for rows, part in parts:
        index = torch.tensor(rows, device=sequences.device)
        sequences[index, : part.sequences.shape[1]] = part.sequences
        lengths[index], hit[index], passes[index] = part.lengths, part.hit_max_length, part.sequence_passes
    trajectory = None
    if first.trajectory is not None:
        steps = max(len(part.trajectory) for _, part in parts)
        trajectory = [[None] * batch for _ in range(steps)]
        for rows, part in parts:
            for k in range(steps):
                for row, seq in zip(rows, part.trajectory[min(k, len(part.trajectory) - 1)], strict=True):
                    trajectory[k][row] = seq
    return ElasticMDMGenerateOutput(
        sequences=sequences, lengths=lengths, hit_max_length=hit, trajectory=trajectory,
        num_passes=sum(part.num_passes for _, part in parts),
        tokens_processed=sum(part.tokens_processed for _, part in parts),
        sequence_passes=passes,
    )  # fmt: skip


def token_logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """Transformers' logits processors: `suppress_tokens` and single-token `bad_words_ids` (banned tokens), then the
    temperature, top-k and top-p warpers, in that order."""
    processors = LogitsProcessorList()
    if config.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens))
    if config.bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids))
    if config.temperature is not None and config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    return processors


__all__ = [
    "ElasticMDMGenerationConfig",
    "ElasticMDMGenerateOutput",
    "ElasticMDMGenerationMixin",
    "sample_elastic",
    "sample_mdlm",
    "insert_masks",
    "tokens_per_forward",
]
