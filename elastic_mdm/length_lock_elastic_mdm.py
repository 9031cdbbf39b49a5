r"""Length-locked insertion: the sampler variant that keeps the lengths the gap head draws at step 0.

The paper's sampler re-draws every gap `g_j ~ p_φ(· | z_k)` at every step and inserts `m_j ~ Binomial(g_j, q_k)`
masks, independently per gap: the final length is the sum of K rounds of independent re-predictions, so any error
of the gap head on the model's own (imperfect) fills adds up over the steps. The locked variant keeps the count each
open gap of step 0 draws (for an unconditional sample: its length; for a template: the length of every value) and
lets the later steps only decide *where* inside that gap's region the remaining positions go. A region is an open
gap of step 0 and every gap that the masks inserted into it later split it into:

```
R_r <- g_r for every open gap r of step 0                       the length model's draw
every step k:   g_j ~ p_φ(· | z_k)                              placement weights, as in the paper
                M_r ~ Binomial(R_r, q_k)                        how many positions of region r step k + 1 reveals
                m   = M_r slots drawn without replacement from the Σ_{j in r} g_j slots of region r
                R_r <- R_r - M_r
```

With an oracle gap head (`g_j` the true counts, so `Σ_{j in r} g_j = R_r`) the draw of `m` is the multivariate
hypergeometric split of `M_r ~ Binomial(R_r, q_k)`, which is exactly the law of independent `Binomial(g_j, q_k)`:
the forward process itself. Exact recovery and the `Binomial(n, F(k))` active counts hold as for the paper's
sampler. When a region's slots run short (`Σ g_j < M_r`) the step inserts all of them and the rest waits; the last
step (`q = 1`) places any remainder in one gap of the region drawn in proportion to `E_φ[g_j]`, so the region ends
with exactly `R_r` positions. `owners` below are region ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device_reads_elastic_mdm import host_read, per_sequence_sum
from .sampling_state_elastic_mdm import sample_binomial


def draw_slots(
    gaps: torch.Tensor,  # [open] slots of each gap
    owners: torch.Tensor,  # [open] sequence of each gap (sorted)
    totals: torch.Tensor,  # [B] slots to draw per sequence, at most its number of slots
    width: int,  # >= gaps.max()
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`[open]` how many of the `totals[b]` slots drawn uniformly without replacement from the `Σ_j gaps[j]` slots
    of sequence b fall into gap j (multivariate hypergeometric), by random keys ranked inside each sequence."""
    if width == 0 or gaps.numel() == 0:
        return torch.zeros_like(gaps)
    keys = torch.rand(gaps.numel(), width, generator=generator, device=gaps.device, dtype=torch.float64)
    valid = torch.arange(width, device=gaps.device)[None] < gaps[:, None]  # [open, width]
    keys = torch.where(valid, keys, torch.full_like(keys, 1.5)) + 2.0 * owners[:, None]  # sequence-major order
    order = keys.flatten().argsort()
    rank = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    per_sequence = per_sequence_sum(torch.full_like(gaps, width), owners, totals.numel())  # [B] slots incl. invalid
    starts = per_sequence.cumsum(0) - per_sequence  # [B]
    rank = rank.view(-1, width) - starts[owners][:, None]  # rank of each slot inside its sequence
    return (rank < totals[owners][:, None]).sum(-1)


def pick_one_gap(weights: torch.Tensor, owners: torch.Tensor, batch: int, generator) -> torch.Tensor:
    """`[open]` bool: one gap per sequence, drawn with probability `∝ weights` (exponential race per sequence)."""
    race = weights / torch.empty_like(weights).exponential_(1.0, generator=generator)  # [open]
    best = torch.zeros(batch, dtype=race.dtype, device=race.device).scatter_reduce(0, owners, race, reduce="amax")
    return race == best[owners]


def expected_count(logits: torch.Tensor) -> torch.Tensor:
    """`E[g] = Σ_g g · softmax(logits)_g` per row `[rows]`."""
    classes = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return torch.softmax(logits.float(), dim=-1) @ classes


def locked_insertions(
    gaps: torch.Tensor,  # [open] g_j drawn from the gap head
    gap_logits: torch.Tensor,  # [open, G + 1] the draws' logits; E_φ[g_j] places a remainder at the last step
    owners: torch.Tensor,  # [open] sequence of each open gap (sorted)
    remaining: torch.Tensor | None,  # [B] positions still to reveal (None at step 0)
    reveal_share: float,  # q_k
    batch: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks to insert into every open gap `[open]` and the positions still to reveal afterwards `[B]`.

    Reads the device once, through `host_read`: the widest gap, which sizes the slot draw."""
    slots = per_sequence_sum(gaps, owners, batch)  # [B]
    if remaining is None:
        remaining = slots
    totals = sample_binomial(remaining, reveal_share, generator)  # [B] M_b ~ Binomial(R_b, q_k)
    if reveal_share >= 1.0:  # the last step: everything left goes in, a shortfall into one gap
        shortfall = (remaining - slots).clamp_min(0)
        weights = expected_count(gap_logits).double() + 1e-6  # [open]
        gaps = gaps + shortfall[owners] * pick_one_gap(weights, owners, batch, generator)
    else:
        totals = torch.minimum(totals, slots)
    (width,) = host_read(gaps.max()) if gaps.numel() else (0,)
    return draw_slots(gaps, owners, totals, width, generator), remaining - totals


__all__ = ["locked_insertions", "draw_slots", "pick_one_gap"]


@dataclass
class LengthLock:
    """`lock_length` for one cohort: every open gap of its first growing step is a region that keeps the total it
    draws there (`length_lock_elastic_mdm.py`). `regions` `[open]` the region of each of its open gaps (stream order),
    `remaining` the positions each region still places."""

    regions: torch.Tensor | None = None
    num_regions: int = 0
    remaining: torch.Tensor | None = None

    def insertions(
        self, gaps: torch.Tensor, gap_logits: torch.Tensor, q: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """`[open]` masks to insert after each open gap: the step's share of every region's remaining total,
        placed by the gap draws `gaps` (one more read)."""
        if self.regions is None:  # region r: the r-th open gap of the first growing step, and all it grows into
            self.num_regions = gaps.numel()
            self.regions = torch.arange(self.num_regions, device=gaps.device)
        counts, self.remaining = locked_insertions(
            gaps, gap_logits, self.regions, self.remaining, q, self.num_regions, generator
        )
        return counts

    def grow(self, counts: torch.Tensor, total: int) -> None:
        """Masks inserted after an open gap are open gaps of its region, next to it in stream order."""
        if self.regions is not None:
            self.regions = self.regions.repeat_interleave(counts + 1, output_size=total)
