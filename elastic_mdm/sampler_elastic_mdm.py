"""The Elastic-MDM sampler (docs/design.md §3, the paper's Alg. 1 made exact) on a packed stream, as a stepper.

Every sequence of the batch keeps its own active length: a pass encodes the active tokens only, nothing is padded
to a canvas. `ElasticStepper` holds every running sequence (`stepper_elastic_mdm.py`: cohorts with their own step,
horizon, schedule, sampling settings and cap) and advances them one packed pass at a time; `sample_elastic` runs one
cohort to the end. The bookkeeping it shares with the MDLM baseline lives in `sampler_loop_elastic_mdm.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .device_reads_elastic_mdm import host_read, rows_where
from .length_lock_elastic_mdm import LengthLock
from .sampler_loop_elastic_mdm import (
    Denoiser,
    ElasticMDMGenerateOutput,
    PassWork,
    SamplerOptions,
    run_to_end,
    sample_categorical,
)
from .sampling_state_elastic_mdm import ActiveState, cap_insertions, sample_binomial
from .schedules_elastic_mdm import reveal_probability
from .stepper_elastic_mdm import Cohort, Stepper


@dataclass
class HostLengths:
    """What the host knows of every sequence `[B]` without reading the device: its `lengths`, the lengths before
    the last insertion `base` (so the sequences holding masks are those with `lengths > base`) and its `caps`."""

    lengths: list[int] = field(default_factory=list)
    base: list[int] = field(default_factory=list)
    caps: list[int] = field(default_factory=list)

    def join(self, lengths: list[int], base: list[int], caps: list[int]) -> None:
        """A cohort's sequences join after the others."""
        self.lengths, self.base, self.caps = self.lengths + lengths, self.base + base, self.caps + caps

    def keep(self, cohorts: list[Cohort]) -> None:
        """Only the sequences of `cohorts` stay (in order)."""
        for name in ("lengths", "base", "caps"):
            setattr(self, name, [n for c in cohorts for n in getattr(self, name)[c.rows]])

    def grow(self, lengths: list[int]) -> None:
        """An insertion made them `lengths`: every mask they hold came with it."""
        self.lengths, self.base = lengths, self.lengths


@dataclass
class StreamLayout:
    """The packed stream after a spare leading row (stream row `i` is row `i + 1`), so that an insertion is one
    gather per dtype: `tags` `[2, T + 1]` the tokens and the sequence ids, `marks` `[3, T + 1]` the masks, the
    open gaps and the tokens of the next pass (when `has_pass`; all False on the spare row). `state` is the
    `ActiveState` of views into them (a fill writes its tokens into `tags`)."""

    state: ActiveState
    tags: torch.Tensor
    marks: torch.Tensor
    has_pass: bool = False

    @classmethod
    def of(cls, state: ActiveState) -> StreamLayout:
        """The layout of `state`, its open gaps flagged (two copies; an insertion flags the rest)."""
        tags = F.pad(torch.stack([state.tokens, state.sequence_ids]), (1, 0))  # [2, T + 1]
        marks = F.pad(state.open_after.expand(3, -1), (1, 0))  # [3, T + 1]
        return cls(ActiveState(tags[0, 1:], tags[1, 1:], marks[1, 1:], state.lengths), tags, marks)

    def insert(
        self, repeats: torch.Tensor, inserted: int, mask_token_id: int, growth: Growth, with_pass: bool
    ) -> tuple[torch.Tensor, StreamLayout]:
        """`repeats[i + 1] - 1` masks after stream row `i` (`repeats` `[T + 1]`, 1 first for the spare row),
        `inserted` in all: the new layout (its lengths `growth.lengths`; with `with_pass`, the tokens of the
        sequences `growth.dirty` flagged) and the old row `source` `[T' + 1]` of every new row, spare rows included.
        A new mask takes the sequence and the open gap of the token it follows, and a new row is a mask exactly
        when its old row is the one of the row before it."""
        source = torch.repeat_interleave(repeats, output_size=self.state.tokens.numel() + inserted + 1)
        tags, marks = self.tags[:, source], self.marks[:, source]  # [2, T' + 1], [3, T' + 1]
        torch.eq(source[1:], source[:-1], out=marks[0, 1:])
        tokens = tags[0, 1:].masked_fill_(marks[0, 1:], mask_token_id)
        if with_pass:
            torch.index_select(growth.dirty, 0, tags[1, 1:], out=marks[2, 1:])
        state = ActiveState(tokens, tags[1, 1:], marks[1, 1:], growth.lengths)
        return source, StreamLayout(state, tags, marks, with_pass)

    @staticmethod
    def rows(
        layout: StreamLayout | None, state: ActiveState, counts: tuple[int, int, int], mask_token_id: int
    ) -> list[torch.Tensor | None]:
        """The rows of the masks, of the open gaps and of the next pass's tokens in `state`, `counts` of each known
        on the host (0: not wanted: `None`), by one `nonzero_static` over consecutive rows of its `layout`'s marks
        when it has them all; else each apart (the pass rows then left to `Stepper.encode`)."""
        wanted = [i for i, n in enumerate(counts) if n]
        usable = layout is not None and (layout.has_pass or not counts[2])
        if usable and wanted and wanted == list(range(wanted[0], wanted[-1] + 1)):
            flags = layout.marks[wanted[0] : wanted[-1] + 1, 1:]
            found = iter(torch.nonzero_static(flags, size=sum(counts))[:, 1].split([counts[i] for i in wanted]))
            return [next(found) if n else None for n in counts]
        flags = [
            layout.marks[0, 1:] if layout is not None else state.tokens == mask_token_id,
            state.open_after,
            layout.marks[2, 1:] if usable else None,
        ]
        return [rows_where(flags[i], n) if n and flags[i] is not None else None for i, n in enumerate(counts)]


@dataclass
class Growth:
    """An insertion step planned from its counts, before the tokens move: the new `lengths` `[B]`, the `dirty`
    flags `[B]` of the next pass and its `work`, and on the host the new lengths `host_lengths`, the masks `inserted`
    into each cohort and whether a sequence would outgrow its cap (`over`)."""

    lengths: torch.Tensor
    dirty: torch.Tensor
    work: PassWork
    host_lengths: list[int]
    inserted: list[int]
    over: bool

    @classmethod
    def of(
        cls,
        lengths: torch.Tensor,
        base: torch.Tensor | None,
        owners: torch.Tensor,
        counts: torch.Tensor,
        changed: torch.Tensor | None,
        host: HostLengths,
        cohorts: list[Cohort],
    ) -> Growth:
        """`counts[i]` masks into the gap `i` of sequence `owners[i]` of `lengths` `[B]`. The next pass encodes every
        sequence that changed since this one: it grows now, or the fill wrote it (its masks came with the last
        insertion, so `n_b > base_b`, `base` `[B]` its lengths before that insertion, `None`: no sequence holds
        masks), so `n'_b > base_b`; or `changed` flags it (`[B]`, `None`: none). One read, the new lengths `n'`
        (and, with `changed`, those flags); the host knows `base` (`host`), so it computes the flags, the pass, the
        masks of every cohort and the caps from them."""
        grown = lengths.index_add(0, owners, counts)  # [B] n'_b = n_b + Σ_{owners[i] = b} counts[i]
        dirty = either(grown > (lengths if base is None else base), changed)  # [B]
        values = host_read(grown, *([] if changed is None else [dirty]))  # the step's one read
        batch = grown.numel()
        new = values[:batch]
        flags = [n > b for n, b in zip(new, host.base, strict=True)] if changed is None else values[batch:]
        encoded = [n for n, flag in zip(new, flags, strict=True) if flag]
        work = PassWork(len(encoded), sum(encoded), max(encoded, default=0))
        inserted = [sum(new[cohort.rows]) - sum(host.lengths[cohort.rows]) for cohort in cohorts]
        over = any(n > cap for n, cap in zip(new, host.caps, strict=True))
        return cls(grown, dirty, work, new, inserted, over)


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

    A step reads the device once, after the insertion is planned: the new lengths of every sequence. The host knows
    their lengths before (`host`), so it computes every count the next step needs (the masks inserted into each
    cohort, whether a sequence would outgrow its cap, the sequences and size of the next pass). Since a step fills
    every mask, the sequences a fill changes are those that grew at the step before: `base_lengths` `[B]` are the
    lengths before the last insertion (`None`: no sequence holds a mask), so the next pass's `dirty` flags need no
    scatter of the filled rows. An insertion lays the new state out in a `StreamLayout` (a spare leading row, the
    rows of a pass, the masks and the open gaps flagged), so that one `nonzero_static` finds the rows a step needs
    and the next insertion is one gather per kind of tensor.
    """

    base_lengths: torch.Tensor | None = None
    layout: StreamLayout | None = None
    hidden_spared: torch.Tensor | None = None  # [T + 1, H]: its tail `own_hidden` is `hidden` when it is the stepper's
    own_hidden: torch.Tensor | None = None

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__(denoiser)
        self.host = HostLengths()

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
        `caps` `[size]` tokens (`None`: `options.max_length`); one read (its counts, lengths and caps)."""
        size, before = state.lengths.numel(), self.batch
        if before == 0:  # a new batch (every cohort before it collected)
            self.host = HostLengths()
        cohort = self.new_cohort(
            state, options, options.num_steps + 1, caps,
            gap_temperature=gap_temperature, gap_do_sample=gap_do_sample, lock=LengthLock() if lock_length else None,
        )  # fmt: skip
        cohort.extra["last_growth"] = max((k for k, q in enumerate(cohort.share) if q > 0.0), default=-1)
        cohort.extra["shares"] = device_shares(options, state.tokens.device)
        is_mask = (state.tokens == options.mask_token_id).long()  # [T]
        base = state.lengths.index_add(0, state.sequence_ids, is_mask, alpha=-1)  # [size] its lengths without masks
        num_open, *values = host_read(state.open_after.sum(), state.lengths, base, *([] if caps is None else [caps]))
        lengths, host_base = values[:size], values[size : 2 * size]
        self.host.join(lengths, host_base, values[2 * size :] if caps is not None else [options.max_length] * size)
        work, num_masks = PassWork(size, sum(lengths), max(lengths)), sum(lengths) - sum(host_base)
        cohort.lengths = lengths if cohort.extra["last_growth"] < 0 else None
        base = base if num_masks else None
        if before == 0 or (base is None and self.base_lengths is None):
            self.base_lengths = base
        else:
            parts = [(self.base_lengths, slice(0, before)), (base, slice(before, before + size))]
            self.base_lengths = torch.cat([self.state.lengths[rows] if b is None else b for b, rows in parts])
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
            self.advance(active)
        for cohort in live:
            cohort.k += 1
            if cohort.finished:
                self.record(cohort)

    def advance(self, active: list[Cohort]) -> None:
        """The pass of the `active` cohorts, their fills, and the growth of those whose `q_k > 0`."""
        state = self.state
        # a cohort sits this step out: keep its sequences off the pass (unless the last pass is gone: all are encoded)
        partial = len(active) < len(self.cohorts) and self.hidden is not None
        flags = self.flags(active) if partial else None
        dirty = self.dirty & flags if partial else self.dirty  # [B]
        work = PassWork.of(state.lengths, dirty)[0] if partial or self.work is None else self.work
        growing = [c for c in active if c.share[c.k] > 0.0]
        num_masks = sum(c.num_masks for c in active)  # the other cohorts have none
        num_open = sum(c.num_open for c in self.cohorts) if growing else 0
        some = self.hidden is not None and work.sequences < dirty.numel() and not partial  # a pass of some sequences
        layout = self.layout if self.layout is not None and self.layout.state is state else None
        counts = (num_masks, num_open, work.tokens if some else 0)
        rows, open_rows, pass_rows = StreamLayout.rows(layout, state, counts, active[0].options.mask_token_id)
        levels = self.noise_levels(active)
        if work.tokens > 0:
            self.encode(dirty, work, levels, active, pass_rows)
        # changed since this pass, besides the sequences the fill writes: re-encoded ones, those kept off the pass
        changed = None if all(c.options.use_cache for c in self.cohorts) else self.refresh
        changed = either(changed, self.dirty & ~flags) if partial else changed  # [B] or None (none)

        self.fill(rows, [(c, c.num_masks) for c in active], None)
        for cohort in active:
            cohort.num_masks = 0
        if growing:
            self.grow(growing, open_rows, levels, changed)
            return
        keep = not partial and all(not c.options.use_cache for c in self.cohorts)
        dirty = either(None if self.base_lengths is None else state.lengths > self.base_lengths, changed)
        self.dirty = torch.zeros_like(self.dirty) if dirty is None else dirty
        self.work, self.base_lengths, self.layout = work if keep else None, None, None  # every mask is filled
        self.host.base = self.host.lengths

    def grow(
        self,
        growing: list[Cohort],
        open_rows: torch.Tensor | None,
        levels: torch.Tensor | float,
        changed: torch.Tensor | None,
    ) -> None:
        """The gap draws of the `growing` cohorts over the open gaps `open_rows` `[open]` (`None`: none; each
        sequence at its noise level `levels`), planned under the caps with the step's one read, and the insertion;
        `changed` `[B]` flags the sequences the next pass encodes besides those the fill wrote and those that grow
        (`None`: none)."""
        state, single = self.state, len(self.cohorts) == 1
        if open_rows is None:  # no open gap: the draws and the insertion run on empty tensors
            open_rows = rows_where(state.open_after, 0)
        owners = state.sequence_ids[open_rows]  # [open] the sequence of each open gap
        level = levels if isinstance(levels, float) else levels[owners]
        gap_logits = self.denoiser.gap_logits(self.hidden, open_rows, level).float()  # [open, G + 1]
        counts = self.insertions(gap_logits, growing)
        plan = (changed, self.host, self.cohorts)
        growth = Growth.of(state.lengths, self.base_lengths, owners, counts, *plan)  # the step's one read
        if growth.over:  # rare: a sequence would outgrow its cap (one more read this step)
            counts, clipped = cap_insertions(counts, owners, state.lengths, self.caps)
            self.hit_max_length |= clipped
            growth = Growth.of(state.lengths, self.base_lengths, owners, counts, *plan)
        for cohort in growing:
            if cohort.k == cohort.extra["last_growth"]:  # its lengths are now final
                cohort.lengths = growth.host_lengths[cohort.rows]
        self.dirty, self.work, self.base_lengths = growth.dirty, growth.work, state.lengths
        self.host.grow(growth.host_lengths)
        every = single and growth.work.sequences == growth.lengths.numel()  # the next pass encodes every sequence
        layout = self.layout if self.layout is not None and self.layout.state is state else StreamLayout.of(state)
        repeats = counts.new_ones(state.tokens.numel() + 1)  # [T + 1] the spare row, then 1 + the masks after each
        repeats[1:].index_add_(0, open_rows, counts)
        mask_token_id = growing[0].options.mask_token_id
        source, self.layout = layout.insert(repeats, sum(growth.inserted), mask_token_id, growth, not every)
        self.state = self.layout.state
        if every:
            self.hidden = None  # no row of this pass is read again
        else:  # a new mask's row copies its left neighbour's: its sequence grew, so the next pass rewrites it
            spared = self.hidden_spared if self.hidden is self.own_hidden else F.pad(self.hidden, (0, 0, 1, 0))
            self.hidden_spared = spared[source]  # [T' + 1, H], the spare row first
            self.hidden = self.own_hidden = self.hidden_spared[1:]
        self.count_insertions(counts, growth.inserted)

    def rewrite_rows(self, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """In place when `hidden` is the stepper's own (the tail of an insertion's gather: it keeps its spare leading
        row); else a copy."""
        if self.hidden is self.own_hidden:
            return self.hidden.index_copy_(0, rows, features)
        return super().rewrite_rows(rows, features)

    def count_insertions(self, counts: torch.Tensor, inserted: list[int]) -> None:
        """Every cohort's masks and open gaps after `inserted[c]` masks went into it (`counts` `[open]` per open gap,
        which its length lock follows)."""
        offset, single = 0, len(self.cohorts) == 1
        for cohort, count in zip(self.cohorts, inserted, strict=True):
            lock = cohort.extra["lock"]
            if lock is not None:
                lock.grow(counts if single else counts[offset : offset + cohort.num_open], cohort.num_open + count)
            offset += cohort.num_open
            cohort.num_masks, cohort.num_open = count, cohort.num_open + count

    def on_remove(self, rows: torch.Tensor, keep: torch.Tensor) -> None:
        self.base_lengths = None if self.base_lengths is None else self.base_lengths[keep]
        self.layout = None
        self.host.keep([c for c in self.cohorts if not c.finished])

    def insertions(self, gap_logits: torch.Tensor, growing: list[Cohort]) -> torch.Tensor:
        """`[open]` masks to insert after every open gap: each growing cohort draws its gaps (at its temperature,
        from its generator) and their `Binomial(g, q_k)` share, or its length lock's; the others insert none. The
        gap logits are the stepper's own: a draw may overwrite them (`sample_categorical`)."""
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
                lock, share = cohort.extra["lock"], cohort.extra["shares"][cohort.k]
                gaps = sample_categorical(logits, cohort.extra["gap_do_sample"], generator, overwrite=lock is None)
                if lock is not None:  # every step-0 open gap keeps its drawn total; the gap head only places it
                    parts.append(lock.insertions(gaps, logits, q, generator))
                else:
                    parts.append(sample_binomial(gaps, q, generator, share))  # [n]
            offset += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def device_shares(options: SamplerOptions, device: torch.device) -> torch.Tensor:
    """`[K]` `q_0..q_{K-1}` in float32 on the device, computed there once per cohort (as `reveal_tables` does on
    the host: no host-to-device copy), so that a step's `Binomial(g, q_k)` reads its probability from a view."""
    reveal = options.schedule.table(options.num_steps, device=device)  # [K + 1] float64
    return reveal_probability(reveal[:-1], reveal[1:]).float()  # [K]: q_K = 0 draws nothing


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
