"""The samplers as steppers: one packed state holding every running sequence, advanced one step at a time.

A `Cohort` is the sequences that join a stepper together with one set of settings (one `generate()` call, or one
request and its `n` choices): its `SamplerOptions` (schedule, horizon `K`, token sampling, generator, cap), its own
step `k` and the host counts of its masks and open gaps. A `Stepper` packs the tokens of every live cohort in one
`ActiveState`, so that a step runs *one* denoiser pass over all of them, each sequence at its own noise level; the
heads run once over the rows of every cohort, the draws per cohort (each with its own generator, processors and
temperatures). Cohorts are added between steps (`add`) and leave when they finish (`collect`): step-level continuous
batching. `ElasticStepper` (`sampler_elastic_mdm.py`) and `MDLMStepper` (`sampler_mdlm_elastic_mdm.py`) implement
`step()`; `sample_elastic` / `sample_mdlm` add one cohort and step it to the end, so a batch started together gives
the same draws, samples and host reads as one sampler run.

Host reads (docs/design.md §8): a step still reads the device once, through `host_read`; the counts of every cohort
ride in that one read. Adding a cohort reads its start counts once; `collect` reads the finished sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .device_reads_elastic_mdm import rows_where
from .packing_elastic_mdm import PackedSequences, cu_seqlens_from_lengths
from .sampler_loop_elastic_mdm import (
    ElasticMDMGenerateOutput,
    PassWork,
    SamplerOptions,
    TokenDenoiser,
    reveal_tables,
    sample_categorical,
)
from .sampling_state_elastic_mdm import ActiveState


@dataclass(eq=False)
class Cohort:
    """Sequences that joined a stepper together, with one set of settings.

    `size` sequences, from sequence `start` of the stepper's state (cohorts are contiguous, in joining order);
    `total_steps` the steps it runs (`K + 1` for Elastic-MDM, `K` for MDLM), `k` the next one; `reveal` `F(0..K)`
    and `share` `q_0..q_K` on the host; `num_masks` / `num_open` its masks and open gaps, known on the host.
    Counters: `num_passes` (passes that encoded one of its sequences), `tokens_processed`, `sequence_passes`
    `[size]`; `lengths` its final lengths, once a step's read brought them to the host (the output then needs no
    read); `trajectory` with `output_trajectory`; `output` once collected. `extra` holds what one sampler adds
    (Elastic-MDM: gap settings, the length lock, its last growing step; MDLM: the canvas cut)."""

    options: SamplerOptions
    size: int
    total_steps: int
    reveal: list[float]
    share: list[float]
    start: int = 0
    k: int = 0
    num_masks: int = 0
    num_open: int = 0
    num_passes: int = 0
    tokens_processed: int = 0
    lengths: list[int] | None = None  # its final lengths on the host, once a read brought them
    pending_passes: torch.Tensor | None = None  # device counts while it shares passes with other cohorts
    pending_tokens: torch.Tensor | None = None
    trajectory: list[list[torch.Tensor]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    output: ElasticMDMGenerateOutput | None = None

    @property
    def rows(self) -> slice:
        """Its sequences in the stepper's `[B]` tensors."""
        return slice(self.start, self.start + self.size)

    @property
    def finished(self) -> bool:
        return self.k >= self.total_steps


class CohortView:
    """What `on_draft` and the trajectory see of one cohort of a shared state: its sequences (`split`)."""

    def __init__(self, state: ActiveState, cohort: Cohort) -> None:
        self.state, self.cohort = state, cohort

    def split(self, on_device: bool = False) -> list[torch.Tensor]:
        return self.state.split(on_device)[self.cohort.rows]


class Stepper:
    """The shared machinery of the two steppers: the packed state of every live cohort, its last pass `hidden`
    `[T, H]`, the per-sequence tensors `[B]` (`dirty`, `caps`, `refresh`: re-encode at every pass, `hit_max_length`,
    `sequence_passes`), the pass itself, the token fill, the drafts and the output of a finished cohort."""

    def __init__(self, denoiser: TokenDenoiser) -> None:
        self.denoiser = denoiser
        self.cohorts: list[Cohort] = []
        self.state: ActiveState | None = None
        self.hidden: torch.Tensor | None = None
        self.work: PassWork | None = None
        self.cap: int | None = None  # the cap of every sequence, when they share one (`caps` `[B]` otherwise)
        self.num_passes = self.tokens_processed = 0

    @property
    def batch(self) -> int:
        """Running sequences."""
        return 0 if self.state is None else self.state.lengths.numel()

    @property
    def live(self) -> list[Cohort]:
        """The cohorts a step advances. A cancelled cohort must have left (`collect`) first: its masks, still in
        the stream, would be taken for another cohort's."""
        if any(cohort.extra.get("cancelled") for cohort in self.cohorts):
            raise RuntimeError("A cancelled cohort is still in the batch: call collect() before the next step().")
        return [cohort for cohort in self.cohorts if not cohort.finished]

    def __len__(self) -> int:
        """Cohorts still to step."""
        return sum(not cohort.finished for cohort in self.cohorts)

    def new_cohort(
        self, state: ActiveState, options: SamplerOptions, total_steps: int, caps: torch.Tensor | None, **extra
    ) -> Cohort:
        """A cohort of the sequences of `state` joining after the current ones (every per-sequence tensor grows);
        `caps` `[size]` the longest each may become (`None`: `options.max_length`)."""
        reveal, share = reveal_tables(options.schedule, options.num_steps)
        cohort = Cohort(options, state.lengths.numel(), total_steps, reveal, share, start=self.batch, extra=extra)
        size, device = cohort.size, state.tokens.device
        per_sequence = dict(
            dirty=torch.ones(size, dtype=torch.bool, device=device),
            caps=torch.full((size,), options.max_length, dtype=torch.long, device=device) if caps is None else caps,
            refresh=torch.full((size,), not options.use_cache, dtype=torch.bool, device=device),
            hit_max_length=torch.zeros(size, dtype=torch.bool, device=device),
            sequence_passes=torch.zeros(size, dtype=torch.long, device=device),
        )
        cap = options.max_length if caps is None else None  # every sequence of the cohort under one host cap
        self.cap = cap if self.state is None or self.cap == cap else None
        if self.state is None:
            self.state = state
            for name, value in per_sequence.items():
                setattr(self, name, value)
        else:
            self.state = ActiveState(
                torch.cat([self.state.tokens, state.tokens]),
                torch.cat([self.state.sequence_ids, state.sequence_ids + self.batch]),
                torch.cat([self.state.open_after, state.open_after]),
                torch.cat([self.state.lengths, state.lengths]),
            )
            for name, value in per_sequence.items():
                setattr(self, name, torch.cat([getattr(self, name), value]))
            if self.hidden is not None:  # rows for the new tokens; they are dirty, so the next pass writes them
                self.hidden = torch.cat(
                    [self.hidden, self.hidden.new_zeros(state.tokens.numel(), self.hidden.shape[1])]
                )
        self.cohorts.append(cohort)
        return cohort

    def join_work(self, work: PassWork) -> None:
        """Fold the `work` of the new cohort's sequences (all dirty) into the next pass."""
        if len(self.cohorts) == 1:
            self.work = work
        elif self.work is not None:
            old = self.work
            self.work = PassWork(
                old.sequences + work.sequences, old.tokens + work.tokens, max(old.longest, work.longest)
            )

    def flags(self, cohorts: list[Cohort]) -> torch.Tensor:
        """`[B]` True on the sequences of `cohorts` (slices filled on the device: no host list is copied)."""
        flags = torch.zeros(self.batch, dtype=torch.bool, device=self.state.tokens.device)
        for cohort in cohorts:
            flags[cohort.rows] = True
        return flags

    def noise_levels(self, live: list[Cohort]) -> torch.Tensor | float:
        """`F(k)` of the step each sequence is at: one float when one cohort runs, else `[B]` (each cohort's slice
        filled on the device)."""
        if len(live) == 1:
            return live[0].reveal[live[0].k]
        levels = torch.empty(self.batch, device=self.state.tokens.device)
        for cohort in self.cohorts:
            levels[cohort.rows] = cohort.reveal[min(cohort.k, cohort.total_steps - 1)]
        return levels

    def per_cohort(self, values: torch.Tensor) -> torch.Tensor:
        """`[C]` running totals of `values` `[B]` at the last sequence of every cohort (their sums: differences)."""
        totals = values.cumsum(0)
        return torch.stack([totals[cohort.start + cohort.size - 1] for cohort in self.cohorts])

    def encode(
        self,
        dirty: torch.Tensor,
        work: PassWork,
        levels: torch.Tensor | float,
        live: list[Cohort],
        rows: torch.Tensor | None = None,
    ) -> None:
        """Run the denoiser on the sequences flagged `dirty` `[B]` (`work` says how many, their tokens and the
        longest), each at its noise level, and replace their rows of `hidden` `[T, H]` (`rows` `[work.tokens]`,
        when the caller has them). Every index is taken at a host-known size."""
        state, hidden = self.state, self.hidden
        if hidden is None or work.sequences == dirty.numel():
            rows, lengths, tokens, selected = None, state.lengths, state.tokens, None
        else:
            selected = rows_where(dirty, work.sequences)  # [S]
            lengths = state.lengths[selected]
            if rows is None:
                rows = rows_where(dirty[state.sequence_ids], work.tokens)  # [work.tokens]
            tokens = state.tokens[rows]
        if isinstance(levels, float):
            level = torch.full((lengths.numel(),), levels, device=tokens.device)
        else:
            level = levels if selected is None else levels[selected]
        packed = PackedSequences.from_cu_seqlens(  # a pass of every sequence: the state's sequence ids are its own
            cu_seqlens_from_lengths(lengths), work.longest, work.tokens, state.sequence_ids if rows is None else None
        )
        features = self.denoiser.diffusion_features(tokens, packed, level)
        self.num_passes += 1
        self.tokens_processed += work.tokens
        self.sequence_passes += dirty
        self.count_pass(dirty, work, live)
        self.hidden = features if rows is None else self.rewrite_rows(rows, features.to(hidden.dtype))

    def rewrite_rows(self, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """`hidden` with its `rows` `[R]` replaced by `features` `[R, H]` (a copy: `hidden` may be a pass's own
        output, which a CUDA graph rewrites at its next replay)."""
        return self.hidden.index_copy(0, rows, features)

    def count_pass(self, dirty: torch.Tensor, work: PassWork, live: list[Cohort]) -> None:
        """Charge a pass to the cohorts it encoded: on the host when one cohort runs, else on the device."""
        if len(self.cohorts) == 1:
            live[0].num_passes += 1
            live[0].tokens_processed += work.tokens
            return
        selected = self.state.lengths * dirty  # [B]
        for cohort in live:
            passes, tokens = dirty[cohort.rows].any().long(), selected[cohort.rows].sum()
            if cohort.pending_passes is None:
                cohort.pending_passes, cohort.pending_tokens = passes, tokens
            else:
                cohort.pending_passes, cohort.pending_tokens = (
                    cohort.pending_passes + passes,
                    cohort.pending_tokens + tokens,
                )

    def fill(self, rows: torch.Tensor | None, segments: list[tuple[Cohort, int]], dirty: torch.Tensor | None) -> None:
        """`x_i ~ p_θ(· | h_i)` for every row `i` of `rows` `[R]` (the rows of each cohort in `segments`, in order,
        with their counts; `None`: none), after that cohort's token processors, from its generator; written into the
        state in place, the changed sequences flagged in `dirty` `[B]` (`None`: the caller knows them). Then every
        cohort's draft."""
        state = self.state
        if rows is not None and rows.numel() > 0:
            logits = self.denoiser.token_logits(self.hidden[rows]).float()  # [R, vocab]
            draws, offset = [], 0
            for cohort, count in segments:
                part = logits if len(segments) == 1 else logits[offset : offset + count]
                options = cohort.options
                draws.append(
                    sample_categorical(options.token_processors(None, part), options.do_sample, options.generator)
                )
                offset += count
            state.tokens[rows] = (draws[0] if len(draws) == 1 else torch.cat(draws)).to(state.tokens.dtype)
            if dirty is not None:
                dirty[state.sequence_ids[rows]] = True
        for cohort, _ in segments:
            if cohort.options.on_draft is not None:
                cohort.options.on_draft(self.view(cohort))

    def view(self, cohort: Cohort) -> ActiveState | CohortView:
        return self.state if len(self.cohorts) == 1 else CohortView(self.state, cohort)

    def record(self, cohort: Cohort) -> None:
        """Keep the state fed to the cohort's step (its final state last) with `output_trajectory`."""
        if cohort.options.output_trajectory:
            cohort.trajectory.append(self.view(cohort).split())

    def cancel(self, cohort: Cohort) -> None:
        """Stop `cohort` (its client left): it runs no further step and leaves at the next `collect`, which must come
        before the next `step`."""
        cohort.k = cohort.total_steps
        cohort.extra["cancelled"] = True

    def collect(self) -> list[Cohort]:
        """Retire the finished cohorts: their `output` is set and their sequences leave the state. Reads the device
        (the finished sequences), so call it between steps."""
        done = [cohort for cohort in self.cohorts if cohort.finished]
        if len(done) == len(self.cohorts) == 1:
            done[0].output = self.output_of(done[0], self.state, None)
        elif done:
            keep = torch.ones(self.batch, dtype=torch.bool, device=self.state.tokens.device)
            for cohort in done:
                flags = (self.state.sequence_ids >= cohort.start) & (
                    self.state.sequence_ids < cohort.start + cohort.size
                )
                part = ActiveState(
                    self.state.tokens[flags], self.state.sequence_ids[flags] - cohort.start,
                    self.state.open_after[flags], self.state.lengths[cohort.rows],
                )  # fmt: skip
                cohort.output = self.output_of(cohort, part, flags)
                keep[cohort.rows] = False
            if len(done) < len(self.cohorts):
                self.remove(keep)
                return done
        else:
            return []
        self.cohorts, self.state, self.hidden, self.work = [], None, None, None
        return done

    def remove(self, keep: torch.Tensor) -> None:
        """Keep only the sequences flagged in `keep` `[B]` (and their cohorts), renumbered in order."""
        state = self.state
        rows = keep[state.sequence_ids]  # [T]
        renumber = keep.long().cumsum(0) - 1  # [B] new id of every kept sequence
        self.state = ActiveState(
            state.tokens[rows], renumber[state.sequence_ids[rows]], state.open_after[rows], state.lengths[keep]
        )
        self.hidden = None if self.hidden is None else self.hidden[rows]
        for name in ("dirty", "caps", "refresh", "hit_max_length", "sequence_passes"):
            setattr(self, name, getattr(self, name)[keep])
        self.on_remove(rows, keep)
        self.cohorts, start = [c for c in self.cohorts if not c.finished], 0
        for cohort in self.cohorts:
            cohort.start, start = start, start + cohort.size
        self.work = None  # re-planned at the next step (one more read)

    def on_remove(self, rows: torch.Tensor, keep: torch.Tensor) -> None:
        """A sampler's own per-token and per-sequence tensors follow `remove` (`rows` `[T]` the kept tokens, `keep`
        `[B]` the kept sequences)."""

    def output_of(
        self, cohort: Cohort, final: ActiveState, flags: torch.Tensor | None, hit: torch.Tensor | None = None
    ) -> ElasticMDMGenerateOutput:
        """The cohort's sequences of `final` (its tokens, flagged `flags` `[T]` in the state; `None`: all of them)
        packed into `[size, longest]`, padded with `pad_token_id`, and its counters; `hit` overrides the
        stepper's `hit_max_length`."""
        if cohort.pending_passes is not None:
            cohort.num_passes += int(cohort.pending_passes)
            cohort.tokens_processed += int(cohort.pending_tokens)
        if hit is None:
            hit = self.hit_max_length if flags is None else self.hit_max_length[cohort.rows]
        rows = final.split(on_device=True) if cohort.lengths is None else list(final.tokens.split(cohort.lengths))
        return ElasticMDMGenerateOutput(
            sequences=torch.nn.utils.rnn.pad_sequence(
                rows, batch_first=True, padding_value=cohort.options.pad_token_id
            ),
            lengths=final.lengths,
            hit_max_length=hit,
            trajectory=cohort.trajectory if cohort.options.output_trajectory else None,
            num_passes=cohort.num_passes,
            tokens_processed=cohort.tokens_processed,
            sequence_passes=self.sequence_passes if flags is None else self.sequence_passes[cohort.rows],
        )
