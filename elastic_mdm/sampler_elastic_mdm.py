"""The Elastic-MDM sampler (docs/design.md §3, the paper's Alg. 1 made exact) on a packed stream.

Every sequence of the batch keeps its own active length: a pass encodes the active tokens only, nothing is padded
to a canvas. The bookkeeping it shares with the MDLM baseline lives in `sampler_loop_elastic_mdm.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .length_lock import locked_insertions
from .sampler_loop_elastic_mdm import (
    Denoiser,
    ElasticMDMGenerateOutput,
    PassWork,
    SamplerOptions,
    SamplingLoop,
    reveal_tables,
    rows_where,
    sample_categorical,
)
from .sampling_state_elastic_mdm import ActiveState, cap_insertions, insert_masks, per_sequence_sum
from .schedules import sample_binomial


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
        added = per_sequence_sum(counts, owners, lengths.numel())  # [B]
        grown, dirty = lengths + added, dirty | (added > 0)
        work, (inserted, longest) = PassWork.of(grown, dirty, counts.sum(), grown.max())
        return cls(grown, dirty, work, inserted, longest)


@dataclass
class LengthLock:
    """`lock_length`: every open gap of the first growing step is a region that keeps the total it draws there
    (`length_lock.py`). `regions` `[T]` the region of each token's gap, `remaining` the positions each still places."""

    regions: torch.Tensor | None = None
    num_regions: int = 0
    remaining: torch.Tensor | None = None

    def insertions(
        self,
        state: ActiveState,
        open_rows: torch.Tensor,
        gaps: torch.Tensor,
        gap_logits: torch.Tensor,
        q: float,
        num_open: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """`[open]` masks to insert after each open row: the step's share of every region's remaining total,
        placed by the gap draws `gaps` (one more read)."""
        if self.regions is None:  # region r: the r-th open gap of the first growing step, and all it grows into
            self.regions, self.num_regions = state.open_after.long().cumsum(0) - 1, num_open  # [T]
        counts, self.remaining = locked_insertions(
            gaps, gap_logits, self.regions[open_rows], self.remaining, q, self.num_regions, generator
        )
        return counts

    def grow(self, counts: torch.Tensor, total: int) -> None:
        """New masks sit inside their gap's region, as they inherit its open flag."""
        if self.regions is not None:
            self.regions = self.regions.repeat_interleave(counts + 1, output_size=total)


def sample_elastic(
    denoiser: Denoiser,
    state: ActiveState,
    options: SamplerOptions,
    *,
    gap_temperature: float = 1.0,
    gap_do_sample: bool = True,
    lock_length: bool = False,
) -> ElasticMDMGenerateOutput:
    r"""Elastic-MDM reverse process (docs/design.md §3) on a packed batch.

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
    last pass (no mask filled, nothing inserted) reuses that pass when `options.use_cache` (exact unless
    time-conditioned). With `lock_length`, every open gap of step 0 keeps the total it draws there (for an
    unconditional sample, its length) and later steps only place it inside that gap's region (`length_lock.py`).
    `options.on_draft(state)`, when given, sees the state of every step that runs a pass, after its fill and before
    its insertion: every active token is then clean (a step fills all the masks the step before inserted).

    The loop reads the device once per step (docs/design.md §8), after the insertion: the number of inserted masks
    and the size of the next pass. The host then knows every count a step needs: the masks to fill are the masks
    inserted at the previous step (all of them are filled at every pass), and every inserted mask is open.
    """
    mask_token_id, generator = options.mask_token_id, options.generator
    reveal, reveal_share = reveal_tables(options.schedule, options.num_steps)  # F(k), q_k for k = 0..K
    batch = state.lengths.numel()
    loop = SamplingLoop(denoiser, options, batch, state.tokens.device)
    everything = torch.ones(batch, dtype=torch.bool, device=state.tokens.device)
    dirty = everything  # [B] needs a fresh pass
    hit_max_length = torch.zeros_like(everything)
    work, (num_masks, num_open) = PassWork.of(
        state.lengths, everything, (state.tokens == mask_token_id).sum(), state.open_after.sum()
    )
    hidden = None
    lock = LengthLock() if lock_length else None
    for k in loop.steps(options.num_steps + 1, "elastic-mdm"):
        loop.record(state)
        q = reveal_share[k]
        grows = q > 0.0
        if not grows and num_masks == 0:
            continue  # nothing to fill, nothing to insert (flat stretch of a clipped schedule)

        if work is None:  # after a step that filled without inserting (clipped schedules only)
            work, _ = PassWork.of(state.lengths, dirty)
        if work.tokens > 0:
            hidden = loop.encode(state, hidden, dirty, work, reveal[k])
        dirty = torch.zeros_like(everything) if options.use_cache else everything

        loop.fill(hidden, state, rows_where(state.tokens == mask_token_id, num_masks), dirty)
        num_masks = 0
        if not grows:
            work = None if options.use_cache else work
            continue

        open_rows = rows_where(state.open_after, num_open)
        owners = state.sequence_ids[open_rows]  # [open] the sequence of each open gap
        gap_logits = denoiser.gap_logits(hidden, open_rows, reveal[k]).float() / gap_temperature  # [open, G + 1]
        gaps = sample_categorical(gap_logits, gap_do_sample, generator)
        if lock is not None:  # every step-0 open gap keeps its drawn total; the gap head only places it
            counts = lock.insertions(state, open_rows, gaps, gap_logits, q, num_open, generator)
        else:
            counts = sample_binomial(gaps, q, generator)  # [open]
        growth = Growth.of(state.lengths, owners, counts, dirty)  # the step's one read
        if growth.longest > options.max_length:  # rare: a sequence would outgrow the cap (one more read this step)
            counts, clipped = cap_insertions(counts, owners, state.lengths, options.max_length)
            hit_max_length |= clipped
            growth = Growth.of(state.lengths, owners, counts, dirty)
        dirty, work = growth.dirty, growth.work
        all_counts = torch.zeros_like(state.tokens).index_put_((open_rows,), counts)  # [T]
        total = state.tokens.numel() + growth.inserted
        state, new_rows = insert_masks(state, all_counts, mask_token_id, total, growth.lengths)
        if lock is not None:
            lock.grow(all_counts, total)
        hidden = hidden.new_empty(state.tokens.numel(), hidden.shape[-1]).index_copy_(0, new_rows, hidden)
        num_masks, num_open = growth.inserted, num_open + growth.inserted

    loop.record(state)
    return loop.output(state, hit_max_length)
