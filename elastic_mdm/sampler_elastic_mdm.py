"""The Elastic-MDM sampler (docs/design.md §3, the paper's Alg. 1 made exact) on a packed stream, as a stepper.

Every sequence of the batch keeps its own active length: a pass encodes the active tokens only, nothing is padded
to a canvas. `ElasticStepper` holds every running sequence (`stepper_elastic_mdm.py`: cohorts with their own step,
horizon, schedule, sampling settings and cap) and advances them one packed pass at a time; `sample_elastic` runs one
cohort to the end. The bookkeeping it shares with the MDLM baseline lives in `sampler_loop_elastic_mdm.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .device_reads_elastic_mdm import per_sequence_sum, rows_where
from .length_lock_elastic_mdm import LengthLock
from .sampler_loop_elastic_mdm import (
    Denoiser,
    ElasticMDMGenerateOutput,
    PassWork,
    SamplerOptions,
    run_to_end,
    sample_categorical,
)
from .sampling_state_elastic_mdm import ActiveState, cap_insertions, insert_masks, sample_binomial
from .stepper_elastic_mdm import Cohort, Stepper


@dataclass
class Growth:
    """An insertion step planned from its counts, before the tokens move: the new `lengths` `[B]`, the sequences
    that `grew` `[B]` (they hold the new masks), the `dirty` flags `[B]` of the next pass and its `work`, and on the
    host the masks `inserted` into each cohort and whether a sequence would outgrow its cap (`over`); with
    `read_lengths`, the new lengths on the host too (`host_lengths`)."""

    lengths: torch.Tensor
    grew: torch.Tensor
    dirty: torch.Tensor
    work: PassWork
    inserted: list[int]
    over: bool
    host_lengths: list[int] | None = None

    @classmethod
    def of(
        cls,
        lengths: torch.Tensor,
        owners: torch.Tensor,
        counts: torch.Tensor,
        dirty: torch.Tensor | None,
        caps: torch.Tensor,
        cap: int | None,
        per_cohort: Callable[[torch.Tensor], torch.Tensor] | None,
        read_lengths: bool = False,
    ) -> Growth:
        """`counts[i]` masks into the gap `i` of sequence `owners[i]`, under the caps `[B]` (or the one host `cap`
        they share), after the fill changed the sequences `dirty` `[B]` (`None`: none); `per_cohort` gives the `[C]`
        running totals of a `[B]` tensor over the cohorts (`None`: one cohort). One read (the new lengths ride in it
        with `read_lengths`)."""
        grown = lengths.index_add(0, owners, counts)  # [B] n_b + Σ_{owners[i] = b} counts[i]
        grew = grown > lengths  # [B]
        dirty = grew if dirty is None else dirty | grew
        totals = counts.sum() if per_cohort is None else per_cohort(grown - lengths)  # [C] running totals
        excess = grown.max() if cap is not None else (grown - caps).max()
        work, (excess, *values) = PassWork.of(grown, dirty, excess, totals, *([grown] if read_lengths else []))
        inserted, host_lengths = values[: totals.numel()], values[totals.numel() :] if read_lengths else None
        inserted = [b - a for a, b in zip([0, *inserted[:-1]], inserted, strict=True)]
        return cls(grown, grew, dirty, work, inserted, excess > (cap or 0), host_lengths)


class ElasticStepper(Stepper):
    r"""Elastic-MDM's reverse process (docs/design.md §3) over every running sequence, one step at a time.

    Each cohort runs, on its own clock `k = 0 .. K` (`q_k = (F(k+1) - F(k)) / (1 - F(k))`):
    ```
    h = f(x, F(k))                                   one pass over the active tokens of every cohort
    x[i] ~ p_θ(· | h_i) for every [MASK] i           (none at k = 0)
    if k < K, for every open adjacent pair (a, b):
        g ~ p_φ(· | h_a, h_b)                        removed count of the gap
        m ~ Binomial(g, q_k)
        insert m [MASK] between a and b
    ```
    `q_{K-1} = 1`, so a cohort's last pass fills every remaining position; it is finished after step `K`. A
    sequence whose input did not change since its last pass (no mask filled, nothing inserted) reuses that pass when
    its `use_cache` (exact unless time-conditioned). With `lock_length`, every open gap of step 0 keeps the total it
    draws there and later steps only place it inside that gap's region (`length_lock_elastic_mdm.py`).
    `on_draft(state)` sees the cohort after the fill of every step that runs a pass: every active token is then clean.

    A step reads the device once, after the insertion: the masks inserted into each cohort, whether a sequence
    would outgrow its cap, and the size of the next pass. The host then knows every count the next step needs.
    Since a step fills every mask, the sequences a fill changes are those that grew at the step before (`masked`
    `[B]`, `None`: no sequence holds a mask): the next pass's `dirty` flags need no scatter of the filled rows.
    """

    masked: torch.Tensor | None = None

    def add(
        self,
        state: ActiveState,
        options: SamplerOptions,
        *,
        gap_temperature: float = 1.0,
        gap_do_sample: bool = True,
        lock_length: bool = False,
        caps: torch.Tensor | None = None,
    ) -> Cohort:
        """A cohort of the sequences of `state` (prompts, templates, `BOS EOS`) joins at the next step, each capped at
        `caps` `[size]` tokens (`None`: `options.max_length`); one read (with the start lengths, which are the final
        ones, when no step of it inserts)."""
        size, before = state.lengths.numel(), self.batch
        cohort = self.new_cohort(
            state, options, options.num_steps + 1, caps,
            gap_temperature=gap_temperature, gap_do_sample=gap_do_sample, lock=LengthLock() if lock_length else None,
        )  # fmt: skip
        cohort.extra["last_growth"] = max((k for k, q in enumerate(cohort.share) if q > 0.0), default=-1)
        ones = torch.ones(size, dtype=torch.bool, device=state.tokens.device)
        is_mask = state.tokens == options.mask_token_id  # [T]
        start = [state.lengths] if cohort.extra["last_growth"] < 0 else []
        work, (num_masks, num_open, *lengths) = PassWork.of(
            state.lengths, ones, is_mask.sum(), state.open_after.sum(), *start
        )
        cohort.lengths = lengths if start else None
        masked = per_sequence_sum(is_mask.long(), state.sequence_ids, size) > 0 if num_masks else None  # [size]
        if before == 0 or (masked is None and self.masked is None):
            self.masked = masked
        else:
            parts = [(self.masked, before), (masked, size)]
            self.masked = torch.cat([ones.new_zeros(n) if m is None else m for m, n in parts])
        cohort.num_masks, cohort.num_open = num_masks, num_open
        self.join_work(work)
        return cohort

    def step(self) -> None:
        """One step of every live cohort: one pass, the fills, the gap draws and the insertion."""
        live = self.live
        if not live:
            return
        for cohort in live:
            self.record(cohort)
        active = [c for c in live if c.share[c.k] > 0.0 or c.num_masks > 0]
        if active:
            self.advance(live, active)
        for cohort in live:
            cohort.k += 1
            if cohort.finished:
                self.record(cohort)

    def advance(self, live: list[Cohort], active: list[Cohort]) -> None:
        state, mask_token_id = self.state, active[0].options.mask_token_id
        # a cohort sits this step out: keep its sequences off the pass (unless the last pass is gone: all are encoded)
        partial = len(active) < len(self.cohorts) and self.hidden is not None
        flags = self.flags(active) if partial else None
        dirty = self.dirty & flags if partial else self.dirty  # [B]
        work = PassWork.of(state.lengths, dirty)[0] if partial or self.work is None else self.work
        levels = self.noise_levels(active)
        if work.tokens > 0:
            self.encode(dirty, work, levels, active)
        # changed since this pass: the sequences the fill writes (all masks: the others have none), re-encoded ones
        dirty = either(self.masked, None if all(c.options.use_cache for c in self.cohorts) else self.refresh)
        dirty = either(dirty, self.dirty & ~flags) if partial else dirty  # [B] or None (none)

        num_masks = sum(c.num_masks for c in active)  # the other cohorts have none
        rows = rows_where(state.tokens == mask_token_id, num_masks) if num_masks else None
        self.fill(rows, [(c, c.num_masks) for c in active], None)
        for cohort in active:
            cohort.num_masks = 0
        growing = [c for c in active if c.share[c.k] > 0.0]
        if not growing:
            keep = not partial and all(not c.options.use_cache for c in self.cohorts)
            self.dirty = torch.zeros_like(self.dirty) if dirty is None else dirty
            self.work, self.masked = work if keep else None, None
            return

        open_rows = rows_where(state.open_after, sum(c.num_open for c in self.cohorts))
        owners = state.sequence_ids[open_rows]  # [open] the sequence of each open gap
        level = levels if isinstance(levels, float) else levels[owners]
        gap_logits = self.denoiser.gap_logits(self.hidden, open_rows, level).float()  # [open, G + 1]
        counts = self.insertions(gap_logits, growing)
        single = len(self.cohorts) == 1
        ends = None if single else self.per_cohort
        last = [c for c in growing if c.k == c.extra["last_growth"]]  # their lengths are now final: read them too
        plan = (dirty, self.caps, self.cap, ends, bool(last))
        growth = Growth.of(state.lengths, owners, counts, *plan)  # the step's one read
        if growth.over:  # rare: a sequence would outgrow its cap (one more read this step)
            counts, clipped = cap_insertions(counts, owners, state.lengths, self.caps)
            self.hit_max_length |= clipped
            growth = Growth.of(state.lengths, owners, counts, *plan)
        for cohort in last:
            cohort.lengths = growth.host_lengths[cohort.rows]
        self.dirty, self.work, self.masked = growth.dirty, growth.work, growth.grew
        repeats = counts.new_ones(state.tokens.numel()).index_add_(0, open_rows, counts)  # [T] 1 + masks after i
        total = state.tokens.numel() + sum(growth.inserted)
        self.state, source = insert_masks(state, None, mask_token_id, total, growth.lengths, repeats)
        if single and growth.work.sequences == growth.lengths.numel():
            self.hidden = None  # the next pass encodes every sequence: no row of this one is read again
        else:  # a new mask's row copies its left neighbour's: its sequence grew, so the next pass rewrites it
            self.hidden = self.hidden[source]
        offset = 0
        for cohort, inserted in zip(self.cohorts, growth.inserted, strict=True):
            lock = cohort.extra["lock"]
            if lock is not None:
                lock.grow(counts if single else counts[offset : offset + cohort.num_open], cohort.num_open + inserted)
            offset += cohort.num_open
            cohort.num_masks, cohort.num_open = inserted, cohort.num_open + inserted

    def on_remove(self, rows: torch.Tensor, keep: torch.Tensor) -> None:
        self.masked = None if self.masked is None else self.masked[keep]

    def insertions(self, gap_logits: torch.Tensor, growing: list[Cohort]) -> torch.Tensor:
        """`[open]` masks to insert after every open gap: each growing cohort draws its gaps (at its temperature,
        from its generator) and their `Binomial(g, q_k)` share, or its length lock's; the others insert none."""
        parts, offset = [], 0
        for cohort in self.cohorts:
            n = cohort.num_open
            if cohort not in growing:
                parts.append(torch.zeros(n, dtype=torch.long, device=gap_logits.device))
            else:
                logits = gap_logits if len(self.cohorts) == 1 else gap_logits[offset : offset + n]
                if cohort.extra["gap_temperature"] != 1.0:
                    logits = logits / cohort.extra["gap_temperature"]
                generator, q = cohort.options.generator, cohort.share[cohort.k]
                gaps = sample_categorical(logits, cohort.extra["gap_do_sample"], generator)
                lock = cohort.extra["lock"]
                if lock is not None:  # every step-0 open gap keeps its drawn total; the gap head only places it
                    parts.append(lock.insertions(gaps, logits, q, generator))
                else:
                    parts.append(sample_binomial(gaps, q, generator))  # [n]
            offset += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def either(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """`first | second` of two `[B]` flag tensors, `None` standing for all False (no op when one is `None`)."""
    return second if first is None else first if second is None else first | second


def sample_elastic(
    denoiser: Denoiser, state: ActiveState, options: SamplerOptions, **settings: Any
) -> ElasticMDMGenerateOutput:
    """Elastic-MDM's reverse process on the packed batch `state`, started together: one cohort of an
    `ElasticStepper` with `settings` (`ElasticStepper.add`: `gap_temperature`, `gap_do_sample`, `lock_length`,
    `caps`), stepped `K + 1` times."""
    stepper = ElasticStepper(denoiser)
    return run_to_end(stepper, stepper.add(state, options, **settings), "elastic-mdm")
