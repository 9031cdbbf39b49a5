"""The Elastic-MDM reverse process (docs/design.md §3) driven by an *oracle* denoiser that knows the clean sequences:
the sampler must return them exactly, for every schedule and horizon, and the number of active tokens at step k must
be Binomial(n, F(k)).
"""

from __future__ import annotations

import math
import os
from itertools import pairwise

import pytest
import torch
from helpers import (
    TrueTokenHead,
    schedule_of,
    sequences_of,
)
from transformers.generation.logits_process import LogitsProcessorList

from elastic_mdm.packing_elastic_mdm import PackedSequences
from elastic_mdm.sampler_elastic_mdm import sample_elastic
from elastic_mdm.sampler_loop_elastic_mdm import SamplerOptions
from elastic_mdm.sampling_state_elastic_mdm import ActiveState
from elastic_mdm.schedules_elastic_mdm import SCHEDULES, RevealSchedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ---------------------------------------------------------------------------------------------------------------
# Oracle denoiser
# ---------------------------------------------------------------------------------------------------------------

ORACLE_MASK, ORACLE_EOS = 0, 1
ORACLE_FIRST_BOS = 2  # sequence c of a batch has its own BOS id ORACLE_FIRST_BOS + c ...
ORACLE_FIRST_INTERIOR = 1000  # ... and interior ids ORACLE_FIRST_INTERIOR + (0..n-1), distinct inside one x0


class Oracle(TrueTokenHead):
    """Knows the clean `x0` of every sequence and answers with the truth (docs/design.md §3, first test fact).

    The sampler only treats `mask_token_id` specially, so every sequence gets its own BOS id: the first token of a
    packed sequence (always its BOS, insertions only go after tokens) says which `x0` it is, also when step caching
    re-encodes only some of the sequences. Interior ids are distinct within one `x0`, so a clean token's id gives its
    position in `x0`. The masks of a run between two known tokens at positions `a < b` are given a uniformly random
    subset of the positions strictly between them. `hidden = [true token id, true position]`; the token head puts all
    mass on the true token, the gap head on the number of positions between two adjacent tokens.
    """

    def __init__(self, x0s: list[list[int]], generator: torch.Generator, max_gap: int | None = None):
        self.x0s = x0s
        self.position = [{token: i for i, token in enumerate(x0)} for x0 in x0s]
        for x0, position in zip(x0s, self.position, strict=True):
            assert len(position) == len(x0), "interior ids must be distinct inside one x0"
        self.vocab_size = ORACLE_FIRST_INTERIOR + max(len(x0) for x0 in x0s)
        self.num_gap_classes = (max_gap if max_gap is not None else max(len(x0) for x0 in x0s)) + 1
        self.generator = generator
        self.noise_levels: list[list[float]] = []
        self.passes = 0

    def diffusion_features(self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor):
        assert input_ids.dtype == torch.long and input_ids.dim() == 1
        assert noise_level.shape == (packed.batch_size,)
        self.passes += 1
        self.noise_levels.append(noise_level.tolist())
        tokens, bounds = input_ids.tolist(), packed.cu_seqlens.tolist()
        assert bounds[-1] == len(tokens)
        hidden = torch.empty(len(tokens), 2)
        assert packed.max_seqlen == max(b - a for a, b in pairwise(bounds)), "the sampler's host-side longest"
        for start, end in pairwise(bounds):
            seq = tokens[start:end]
            which = seq[0] - ORACLE_FIRST_BOS
            x0, position = self.x0s[which], self.position[which]
            assert seq[-1] == ORACLE_EOS
            positions = [position[t] if t != ORACLE_MASK else -1 for t in seq]
            known = [i for i, p in enumerate(positions) if p >= 0]
            for left, right in pairwise(known):
                run = right - left - 1  # masks between two known tokens
                lo, hi = positions[left], positions[right]
                assert hi - lo - 1 >= run, "more active tokens than x0 has positions"
                if run:
                    free = torch.randperm(hi - lo - 1, generator=self.generator)[:run].sort().values + lo + 1
                    positions[left + 1 : right] = free.tolist()
            assert positions == sorted(positions) and len(set(positions)) == len(positions)
            hidden[start:end, 0] = torch.tensor([x0[p] for p in positions], dtype=torch.float32)
            hidden[start:end, 1] = torch.tensor(positions, dtype=torch.float32)
        return hidden

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor:
        gap = (hidden[left + 1, 1] - hidden[left, 1] - 1).long()
        assert (gap >= 0).all()
        logits = torch.full((left.numel(), self.num_gap_classes), float("-inf"))
        logits[torch.arange(left.numel()), gap] = 0.0
        return logits


def make_x0(n: int, copy: int) -> list[int]:
    """x0 = BOS_copy y_1..y_n EOS with distinct interior ids in shuffled order."""
    interior = (torch.randperm(n, generator=torch.Generator().manual_seed(copy)) + ORACLE_FIRST_INTERIOR).tolist()
    return [ORACLE_FIRST_BOS + copy, *interior, ORACLE_EOS]


def start_state(x0s: list[list[int]], anchors: list[list[int]] | None = None) -> ActiveState:
    """Start state: BOS EOS per sequence (one open gap), or the given anchor positions of x0 where a gap is open
    iff x0 has removed positions in it."""
    sequences = []
    for i, x0 in enumerate(x0s):
        keep = [0, len(x0) - 1] if anchors is None else anchors[i]
        sequences.append(([x0[p] for p in keep], [b - a > 1 for a, b in pairwise(keep)] + [False]))
    return ActiveState.from_anchors(sequences)


def run_oracle(
    x0s: list[list[int]],
    schedule: RevealSchedule,
    num_steps: int,
    *,
    seed: int = 0,
    use_cache: bool = True,
    anchors: list[list[int]] | None = None,
    max_length: int | None = None,
    output_trajectory: bool = False,
    lock_length: bool = False,
):
    generator = torch.Generator().manual_seed(seed)
    oracle = Oracle(x0s, torch.Generator().manual_seed(seed + 1))
    options = SamplerOptions(
        mask_token_id=ORACLE_MASK,
        num_steps=num_steps,
        schedule=schedule,
        token_processors=LogitsProcessorList(),
        do_sample=True,
        max_length=max_length if max_length is not None else max(len(x0) for x0 in x0s),
        pad_token_id=ORACLE_EOS,
        use_cache=use_cache,
        generator=generator,
        output_trajectory=output_trajectory,
    )
    output = sample_elastic(oracle, start_state(x0s, anchors), options, gap_do_sample=True, lock_length=lock_length)
    return output, oracle


# ---------------------------------------------------------------------------------------------------------------
# Oracle: exact recovery
# ---------------------------------------------------------------------------------------------------------------

RECOVERY_NS = [0, 1, 2, 5, 17, 40]


SAMPLERS = pytest.mark.parametrize("lock_length", [False, True], ids=["paper", "locked"])


@SAMPLERS
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 64])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_oracle_recovers_x0_exactly(schedule: str, num_steps: int, use_cache: bool, lock_length: bool) -> None:
    """One packed batch of x0s with n = 0 .. 40 comes back exactly, for every schedule and horizon, with the paper's
    sampler and the length-locked one."""
    x0s = [make_x0(n, copy) for copy, n in enumerate(RECOVERY_NS)]
    output, oracle = run_oracle(
        x0s, schedule_of(schedule), num_steps, seed=num_steps, use_cache=use_cache, lock_length=lock_length
    )
    assert sequences_of(output) == x0s
    assert output.lengths.tolist() == [len(x0) for x0 in x0s]
    assert not output.hit_max_length.any()
    assert output.num_passes == oracle.passes <= num_steps + 1
    for row, length in zip(output.sequences, output.lengths.tolist(), strict=True):
        assert (row[length:] == ORACLE_EOS).all()  # padding


def test_oracle_noise_levels_are_the_schedule() -> None:
    """Pass k (no caching, every step runs) is conditioned on F(k)."""
    schedule = schedule_of("cosine")
    x0s = [make_x0(6, 0), make_x0(3, 1)]
    _, oracle = run_oracle(x0s, schedule, 5, use_cache=False)
    expected = schedule.table(5).float().tolist()
    assert oracle.passes == 6
    for levels, f in zip(oracle.noise_levels, expected, strict=True):
        assert levels == pytest.approx([f, f])


def test_oracle_cache_reuses_passes() -> None:
    """Caching encodes fewer tokens than re-encoding every step, and still recovers x0."""
    x0s = [make_x0(n, copy) for copy, n in enumerate([0, 1, 3, 30])]
    cached, _ = run_oracle(x0s, schedule_of("linear"), 32, use_cache=True)
    fresh, _ = run_oracle(x0s, schedule_of("linear"), 32, use_cache=False)
    assert sequences_of(cached) == sequences_of(fresh) == x0s
    assert cached.tokens_processed < fresh.tokens_processed


@SAMPLERS
@pytest.mark.parametrize("schedule", ["linear", "clipped"])
def test_oracle_template_closed_gaps_stay_closed(schedule: str, lock_length: bool) -> None:
    """Anchors inside x0: only the gaps that hide removed positions are open; x0 comes back exactly."""
    x0s = [make_x0(12, 0), make_x0(5, 1), make_x0(3, 2)]
    anchors = [[0, 3, 4, 9, 13], [0, 1, 2, 6], [0, 1, 2, 3, 4]]  # last one: everything is an anchor
    for num_steps in (1, 4, 16):
        output, _ = run_oracle(
            x0s, schedule_of(schedule), num_steps, anchors=anchors, seed=num_steps, lock_length=lock_length
        )
        assert sequences_of(output) == x0s


def test_oracle_max_length_cap() -> None:
    """A cap below |x0| stops growth at the cap, flags it, and what is kept is x0 in order (a subsequence)."""
    x0s = [make_x0(30, 0), make_x0(3, 1)]
    for use_cache in (True, False):
        output, _ = run_oracle(x0s, schedule_of("linear"), 8, max_length=10, use_cache=use_cache)
        long, short = sequences_of(output)
        assert output.lengths.tolist() == [10, 5]
        assert output.hit_max_length.tolist() == [True, False]
        assert short == x0s[1]
        assert long[0] == x0s[0][0] and long[-1] == ORACLE_EOS
        positions = [x0s[0].index(t) for t in long]
        assert positions == sorted(positions)


# ---------------------------------------------------------------------------------------------------------------
# Oracle: statistics of the active length
# ---------------------------------------------------------------------------------------------------------------


@SAMPLERS
@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_oracle_active_count_is_binomial(schedule: str, lock_length: bool) -> None:
    """Interior active tokens at step k ~ Binomial(n, F(k)): 400 copies of one x0 (n = 40, K = 8) in one packed run.

    Tolerances (per step k, p = F(k), N = 400 runs):
    * mean: |mean - n p| <= 4 standard errors, SE = sqrt(n p (1 - p) / N);
    * variance: |s² - σ²| <= 5 standard errors of the sample variance, σ² = n p (1 - p),
      SE² = (μ4 - σ⁴ (N - 3) / (N - 1)) / N with the binomial 4th central moment μ4 = σ² (1 + 3 (n - 2) p (1 - p))
      (≈ σ² sqrt(2 / N) ≈ 7 % of σ² in the bulk), plus 1e-9 for the exact p = 0 and p = 1 steps.
    With the fixed seeds the test is deterministic; these bounds hold for ~all seeds.
    """
    n, num_steps, copies = 40, 8, 400
    x0 = make_x0(n, 0)
    # same interior for every copy; each copy its own BOS so the oracle can tell them apart
    x0s = [[ORACLE_FIRST_BOS + c, *x0[1:]] for c in range(copies)]
    sched = schedule_of(schedule)
    output, _ = run_oracle(x0s, sched, num_steps, seed=123, output_trajectory=True, lock_length=lock_length)
    assert sequences_of(output) == x0s
    trajectory = output.trajectory
    assert len(trajectory) == num_steps + 2
    table = sched.table(num_steps).tolist()
    for k in range(num_steps + 1):
        counts = torch.tensor([len(seq) - 2 for seq in trajectory[k]], dtype=torch.float64)
        p = table[k]
        var = n * p * (1 - p)
        mean_se = math.sqrt(var / copies)
        assert abs(counts.mean().item() - n * p) <= 4 * mean_se + 1e-9, (k, counts.mean().item(), n * p)
        mu4 = var * (1 + 3 * (n - 2) * p * (1 - p))
        var_se = math.sqrt(max(mu4 - var**2 * (copies - 3) / (copies - 1), 0.0) / copies)
        assert abs(counts.var().item() - var) <= 5 * var_se + 1e-9, (k, counts.var().item(), var)
    assert all(len(seq) == n + 2 for seq in trajectory[-1])
    assert all(seq.tolist() == x0 for seq, x0 in zip(trajectory[-1], x0s, strict=True))


@pytest.mark.parametrize("use_cache", [True, False])
def test_oracle_trajectory_shows_the_masks_fed(use_cache: bool) -> None:
    """trajectory[k] is the input of step k: the positions inserted at step k - 1 are still [MASK] there, and every
    other token is the clean token of the previous step (the oracle fills every mask with its true token)."""
    x0s = [make_x0(n, copy) for copy, n in enumerate([0, 3, 12, 25])]
    output, _ = run_oracle(x0s, schedule_of("linear"), 5, output_trajectory=True, use_cache=use_cache)
    trajectory = output.trajectory
    inserted = 0
    for k in range(1, len(trajectory)):
        for b, x0 in enumerate(x0s):
            now, before = trajectory[k][b].tolist(), trajectory[k - 1][b].tolist()
            masks = sum(t == ORACLE_MASK for t in now)
            inserted += masks
            if k == len(trajectory) - 1:  # the returned sequences: nothing masked
                assert masks == 0 and now == x0
                continue
            assert masks == len(now) - len(before), (k, b, now, before)
            clean = [t for t in now if t != ORACLE_MASK]
            assert len(clean) == len(before) and ORACLE_MASK not in clean
            assert [x0.index(t) for t in clean] == sorted(x0.index(t) for t in clean)
    assert inserted == sum(len(x0) - 2 for x0 in x0s)
