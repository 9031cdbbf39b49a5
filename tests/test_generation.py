"""Tests of the Elastic-MDM reverse process (docs/design.md §3) and of `generate()`.

The sampler is first driven by an *oracle* denoiser that knows the clean sequences: it must then return them exactly,
for every schedule and horizon, and the number of active tokens at step k must be Binomial(n, F(k)). Then `generate()`
runs on tiny random models for the input modes, caps, sampling options and input validation.
"""

from __future__ import annotations

import math
import os
from itertools import pairwise

import pytest
import torch
from helpers import (
    BOS,
    EOS,
    MASK,
    MAX_POS,
    PAD,
    VOCAB,
    HostSyncRecorder,
    TrueTokenHead,
    cached_and_fresh,
    schedule_of,
    sequences_of,
    tiny_config,
)
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.generation_config_elastic_mdm import ElasticMDMGenerationConfig
from elastic_mdm.packing import PackedSequences
from elastic_mdm.sampler_elastic_mdm import sample_elastic
from elastic_mdm.sampler_loop_elastic_mdm import SamplerOptions
from elastic_mdm.sampling_state_elastic_mdm import ActiveState
from elastic_mdm.schedules import SCHEDULES, RevealSchedule, get_schedule

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


# ---------------------------------------------------------------------------------------------------------------
# generate() on tiny random models
# ---------------------------------------------------------------------------------------------------------------

ANCHORS = (5, 6, 7, 8)  # ids the tame model never generates, so anchors can be found in the output


@torch.no_grad()
def build_model(tame: bool = True, seed: int = 0, **overrides) -> ElasticMDMForDiffusionLM:
    """Tiny random model. `tame`: gap logits biased towards small counts (a geometric-like prior, so lengths vary
    instead of always hitting the cap) and the special / anchor ids never generated as tokens."""
    torch.manual_seed(seed)
    model = ElasticMDMForDiffusionLM(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    if tame:
        classes = torch.arange(model.config.num_gap_classes, dtype=torch.float32)
        model.gap_head.out_proj.bias.copy_(-1.0 * classes)
        model.gap_head.out_proj.weight.mul_(0.1)
        banned = [PAD, BOS, EOS, *ANCHORS]
        if model.lm_head.bias is None:
            model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        model.lm_head.bias[banned] = -1e4
    return model


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    return build_model()


@pytest.fixture(scope="module")
def wild_model() -> ElasticMDMForDiffusionLM:
    """Untamed: gap counts near uniform over 0..64, so sequences run into max_length."""
    return build_model(tame=False, seed=1)


def check_valid(sequences: torch.Tensor, lengths: torch.Tensor, bos: int = BOS, eos: int = EOS, pad: int = PAD):
    assert sequences.dim() == 2 and lengths.shape == (sequences.shape[0],)
    assert sequences.shape[1] == int(lengths.max())
    for row, length in zip(sequences, lengths.tolist(), strict=True):
        assert 2 <= length <= MAX_POS
        assert row[0] == bos and row[length - 1] == eos
        assert not (row[:length] == MASK).any()
        assert (row[length:] == pad).all()


def test_unconditional(model) -> None:
    out = model.generate(num_return_sequences=6, num_steps=8, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    assert sequences.shape[0] == 6
    check_valid(sequences, lengths)
    assert len(set(lengths.tolist())) > 1, "lengths should vary"
    for row, length in zip(sequences, lengths.tolist(), strict=True):  # tame model: no special id inside
        assert not torch.isin(row[1 : length - 1], torch.tensor([PAD, BOS, EOS, *ANCHORS])).any()


def test_return_dict_and_trajectory(model) -> None:
    num_steps = 6
    out = model.generate(
        num_return_sequences=6, num_steps=num_steps, seed=2, return_dict_in_generate=True, output_trajectory=True
    )
    check_valid(out.sequences, out.lengths)
    assert (out.lengths > 2).sum() >= 2, "some sequences should grow"
    assert len(out.trajectory) == num_steps + 2
    assert all(len(step) == 6 for step in out.trajectory)
    assert all(seq.tolist() == [BOS, EOS] for seq in out.trajectory[0])
    for b, length in enumerate(out.lengths.tolist()):
        assert out.trajectory[-1][b].tolist() == out.sequences[b, :length].tolist()
        sizes = [len(step[b]) for step in out.trajectory]
        assert sizes == sorted(sizes), "active lengths never shrink"
        for k in range(1, num_steps + 1):  # step k is fed the masks inserted at step k - 1
            masks = int((out.trajectory[k][b] == MASK).sum())
            assert masks == sizes[k] - sizes[k - 1], (b, k, out.trajectory[k][b].tolist())
    assert not out.hit_max_length.any()
    assert 1 <= out.num_passes <= num_steps + 1 and out.tokens_processed > 0


def test_default_return_is_padded_token_ids(model) -> None:
    """As every Transformers `generate`: a LongTensor `[batch, longest]` padded with `pad_token_id`; the lengths and
    the rest come with `return_dict_in_generate=True`."""
    ids = model.generate(num_return_sequences=4, num_steps=8, seed=0)
    out = model.generate(num_return_sequences=4, num_steps=8, seed=0, return_dict_in_generate=True)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long and torch.equal(ids, out.sequences)
    assert ids.shape == (4, int(out.lengths.max()))
    for row, n in zip(ids, out.lengths.tolist(), strict=True):
        assert row[n - 1] == EOS and (row[n:] == PAD).all()


def test_prompt_is_kept_as_prefix(model) -> None:
    prompts = [[BOS, 5, 6, 7], [BOS, 8], [BOS]]
    out = model.generate(prompts, num_return_sequences=2, num_steps=6, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    assert sequences.shape[0] == 6
    check_valid(sequences, lengths)
    for i, (row, length) in enumerate(zip(sequences, lengths.tolist(), strict=True)):
        prompt = prompts[i // 2]  # each prompt repeated num_return_sequences times, in order
        assert row[: len(prompt)].tolist() == prompt
        assert length >= len(prompt) + 1


def test_padded_prompt_tensor_matches_list(model) -> None:
    prompts = [[BOS, 5, 6, 7], [BOS, 8]]
    ids = torch.tensor([[BOS, 5, 6, 7], [PAD, PAD, BOS, 8]])  # left padding
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    a = model.generate(prompts, num_steps=5, seed=3, return_dict_in_generate=True)
    b = model.generate(ids, attention_mask=mask, num_steps=5, seed=3, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.lengths, b.lengths)


def test_template_keeps_anchors_and_grows_open_gaps_only(model) -> None:
    # BOS 5 [open] 6 7 [open] EOS: closed gaps BOS-5 and 6-7 must stay empty
    template = [BOS, 5, MASK, 6, 7, MASK, EOS]
    grown = 0
    for seed in range(4):
        out = model.generate(
            template_ids=[template], num_return_sequences=4, num_steps=8, seed=seed, return_dict_in_generate=True
        )
        sequences, lengths = out.sequences, out.lengths
        check_valid(sequences, lengths)
        for row, length in zip(sequences, lengths.tolist(), strict=True):
            seq = row[:length].tolist()
            anchors = [i for i, t in enumerate(seq) if t in (BOS, EOS, *ANCHORS)]
            assert [seq[i] for i in anchors] == [BOS, 5, 6, 7, EOS]  # every anchor, in order, nothing else special
            assert anchors[1] == 1 and anchors[3] == anchors[2] + 1  # closed gaps stay empty
            grown += length - 5
    assert grown > 0, "open gaps never grew"


def test_template_without_open_gap_is_returned_unchanged(model) -> None:
    template = [BOS, 5, 6, EOS]
    out = model.generate(template_ids=torch.tensor([template]), num_steps=4, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    assert lengths.tolist() == [4] and sequences[0].tolist() == template


def test_max_length_cap(wild_model) -> None:
    out = wild_model.generate(num_return_sequences=5, num_steps=8, max_length=12, seed=0, return_dict_in_generate=True)
    check_valid(out.sequences, out.lengths)
    assert (out.lengths <= 12).all()
    assert out.hit_max_length.any()
    assert (out.lengths[out.hit_max_length] == 12).all()
    # default cap is max_position_embeddings
    out = wild_model.generate(num_return_sequences=3, num_steps=8, seed=0, return_dict_in_generate=True)
    check_valid(out.sequences, out.lengths)
    assert (out.lengths[out.hit_max_length] == MAX_POS).all()


def test_max_length_cap_with_prompt(wild_model) -> None:
    prompt = [BOS, 5, 6, 7, 8]
    out = wild_model.generate(
        [prompt], num_return_sequences=3, num_steps=4, max_length=9, seed=0, return_dict_in_generate=True
    )
    sequences, lengths = out.sequences, out.lengths
    assert (lengths <= 9).all()
    for row in sequences:
        assert row[:5].tolist() == prompt


def test_same_seed_same_output(model) -> None:
    a = model.generate(num_return_sequences=4, num_steps=8, seed=7)
    b = model.generate(num_return_sequences=4, num_steps=8, seed=7)
    c = model.generate(num_return_sequences=4, num_steps=8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, c)
    d = model.generate(num_return_sequences=4, num_steps=8, seed=8)
    assert not (d.shape == a.shape and torch.equal(d, a))


def test_sampling_options_run(model) -> None:
    for options in (
        dict(gap_do_sample=False),
        dict(top_k=5),
        dict(top_p=0.8),
        dict(temperature=0.5, top_k=10, top_p=0.9),
        dict(gap_temperature=0.5),
        dict(schedule="exponential", schedule_kwargs=dict(sigma=3.0)),
        dict(schedule="clipped", schedule_kwargs=dict(beta=0.2, omega=0.8)),
        dict(progress_bar=False, use_cache=False),
    ):
        out = model.generate(num_return_sequences=3, num_steps=5, seed=0, **options, return_dict_in_generate=True)
        sequences, lengths = out.sequences, out.lengths
        check_valid(sequences, lengths)


def test_greedy_tokens(model) -> None:
    out = model.generate(num_steps=5, seed=0, do_sample=False, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    check_valid(sequences, lengths)


def test_greedy_tokens_with_several_samples(model) -> None:
    """Greedy tokens with num_return_sequences > 1 is meaningful here (gap counts are still sampled, so the samples
    differ); the autoregressive rule of GenerationConfig.validate ("greedy methods do not support
    num_return_sequences > 1") must not reject it."""
    out = model.generate(num_return_sequences=8, num_steps=5, seed=0, do_sample=False, return_dict_in_generate=True)
    check_valid(out.sequences, out.lengths)
    assert len(set(out.lengths.tolist())) > 1


def test_generation_config_object(model) -> None:
    config = ElasticMDMGenerationConfig(num_steps=3, schedule="cosine", num_return_sequences=2)
    out = model.generate(generation_config=config, seed=0, return_dict_in_generate=True, output_trajectory=True)
    assert len(out.trajectory) == 3 + 2 and out.sequences.shape[0] == 2
    via_kwargs = model.generate(num_steps=3, schedule="cosine", num_return_sequences=2, seed=0)
    assert torch.equal(out.sequences, via_kwargs)


def test_plain_generation_config_keeps_model_defaults(wild_model) -> None:
    """As in Transformers, fields a passed GenerationConfig leaves unset (None, e.g. do_sample) take the model's
    generation_config values (do_sample=True here), so a plain GenerationConfig does not silently switch to greedy."""
    from transformers import GenerationConfig

    prompts = [[BOS, 5], [BOS, 6, 7], [BOS]]
    for seed in (0, 1):
        config = GenerationConfig(num_steps=1, gap_do_sample=False)
        assert config.do_sample is None
        passed = wild_model.generate(prompts, generation_config=config, seed=seed)
        expected = wild_model.generate(
            prompts, num_steps=1, gap_do_sample=False, seed=seed, return_dict_in_generate=True
        )
        assert expected.lengths.min() > 10  # greedy gaps of the untamed model: many tokens are sampled
        assert torch.equal(passed, expected.sequences)


def test_greedy_everything_is_deterministic(model) -> None:
    """Greedy gaps with K = 1 (q_0 = 1: no binomial draw) and greedy tokens consume no randomness."""
    prompts = [[BOS, 5], [BOS, 6, 7]]
    a = model.generate(prompts, num_steps=1, gap_do_sample=False, do_sample=False, seed=0)
    b = model.generate(prompts, num_steps=1, gap_do_sample=False, do_sample=False, seed=99)
    assert torch.equal(a, b)
    # top_k = 1 sampling is greedy decoding
    c = model.generate(prompts, num_steps=1, gap_do_sample=False, top_k=1, seed=5)
    assert torch.equal(a, c)


def test_bos_equal_eos_gpt2_style() -> None:
    model = build_model(bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None)
    out = model.generate(num_return_sequences=3, num_steps=6, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    check_valid(sequences, lengths, bos=EOS, eos=EOS, pad=EOS)  # pad falls back to EOS
    out = model.generate([[EOS, 5, 6]], num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    check_valid(sequences, lengths, bos=EOS, eos=EOS, pad=EOS)
    assert (sequences[:, :3] == torch.tensor([EOS, 5, 6])).all()


@pytest.mark.parametrize("prompt", [False, True])
def test_step_cache_is_exact_and_saves_work(prompt: bool) -> None:
    """Caching only skips re-encoding unchanged sequences: the random draws are the same (same rows sampled in the
    same order), so with a fixed seed a non-time-conditioned model gives the same sequences, with fewer tokens
    encoded. A strong bias to gap 0 makes most steps insert nothing."""
    model = build_model(seed=2)
    inputs = [[BOS, 5, 6], [BOS]] if prompt else None
    kwargs = dict(num_return_sequences=4, num_steps=16, seed=11, return_dict_in_generate=True)
    cached, fresh = cached_and_fresh(model, inputs, **kwargs)
    assert len(set(cached.lengths.tolist())) > 1
    assert fresh.num_passes <= 17  # the last pass is skipped when nothing is left to fill
    assert cached.tokens_processed < fresh.tokens_processed
    assert cached.num_passes <= fresh.num_passes


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_step_loop_reads_the_device_once_per_step(monkeypatch, use_cache: bool) -> None:
    """docs/design.md §8: no host-device sync inside the step loop but the one `host_read` after each insertion
    (plus one before the loop); the model forward, the heads and the draws read nothing back."""
    model = build_model(seed=2)
    state = model._initial_state(None, None, None, num_return_sequences=4)
    with HostSyncRecorder(monkeypatch) as recorder:
        options = SamplerOptions(
            mask_token_id=MASK, num_steps=16, schedule=get_schedule("linear"),
            token_processors=LogitsProcessorList(), max_length=MAX_POS, pad_token_id=PAD, use_cache=use_cache,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        output = sample_elastic(model, state, options)
    assert recorder.syncs == []
    assert recorder.reads == 1 + 16  # before the loop, then after the insertion of steps 0..K-1
    assert 1 <= output.num_passes <= 17


def test_capped_steps_read_once_more_and_sync_nowhere(monkeypatch, wild_model) -> None:
    """A step whose draws would take a sequence past `max_length` reads the device a second time (the insertion
    is capped, then planned again); still no other read-back."""
    with HostSyncRecorder(monkeypatch, loop_only=True) as recorder:
        kwargs = dict(num_return_sequences=4, num_steps=16, seed=0, max_length=24, return_dict_in_generate=True)
        out = wild_model.generate(**kwargs)
    assert out.hit_max_length.any() and recorder.syncs == []
    assert 1 + 16 < recorder.reads <= 1 + 2 * 16


def test_host_sync_recorder_sees_reads(monkeypatch) -> None:
    """The recorder of the test above flags every kind of read-back it claims to (and not the sync-free forms)."""
    x = torch.arange(6)
    with HostSyncRecorder(monkeypatch) as recorder:
        int(x.sum()), bool(x.any()), x[x > 2], x.nonzero(), x.repeat_interleave(x), torch.multinomial(x.float(), 1)
        torch.nonzero_static(x > 2, size=3), x.repeat_interleave(x, output_size=15), x[torch.tensor([1, 2])]
    assert [name.split(".")[1] for name in recorder.syncs] == [
        "_local_scalar_dense", "_local_scalar_dense", "index", "nonzero", "repeat_interleave", "multinomial"
    ]  # fmt: skip


def test_time_conditioned_model_never_caches() -> None:
    model = build_model(time_conditioning=True)
    kwargs = dict(num_return_sequences=3, num_steps=12, seed=4, return_dict_in_generate=True)
    cached = model.generate(use_cache=True, **kwargs)
    fresh = model.generate(use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert cached.tokens_processed == fresh.tokens_processed and cached.num_passes == fresh.num_passes


@pytest.mark.parametrize("block_type", ["dit", "llama"])
def test_generate_on_both_block_types(block_type: str) -> None:
    model = build_model(block_type=block_type, adaln=block_type == "llama", time_conditioning=True)
    out = model.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    check_valid(sequences, lengths)


# ---------------------------------------------------------------------------------------------------------------
# generate(): bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_ids=[[BOS, 5, MASK, 6]]), "mask token"),
        (dict(input_ids=[[5, 6, 7]]), "BOS"),
        (dict(input_ids=[[]]), "BOS"),
        (dict(input_ids=[[BOS, 5, EOS]]), "EOS"),
        (dict(template_ids=[[BOS, 5, MASK, 6]]), "EOS"),
        (dict(template_ids=[[5, MASK, EOS]]), "BOS"),
        (dict(template_ids=[[BOS, MASK, MASK, EOS]]), "adjacent"),
        (dict(input_ids=[[BOS]], template_ids=[[BOS, MASK, EOS]]), "not both"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=-3), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(schedule="sigmoid"), "schedule"),
        (dict(schedule="clipped", schedule_kwargs=dict(beta=0.9, omega=0.1)), "beta"),
        (dict(gap_temperature=0.0), "gap_temperature"),
        (dict(input_ids=[]), "empty"),
        (dict(template_ids=[]), "empty"),
        (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "empty"),
        (dict(max_length=MAX_POS + 1), "max_length"),
        (dict(input_ids=[[BOS, *range(10, 20)]], max_length=8), "max_length"),
        (dict(num_stpes=4), "num_stpes"),
        (dict(guidance_scale_typo=2.0), "unknown"),
    ],
)
def test_bad_input_raises(model, kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(num_steps=kwargs.pop("num_steps", 4), **kwargs)


def test_generate_needs_special_ids() -> None:
    model = build_model(tame=False, mask_token_id=None)
    with pytest.raises(ValueError, match="mask_token_id"):
        model.generate(num_steps=2)


# ---------------------------------------------------------------------------------------------------------------
# Length-locked sampler
# ---------------------------------------------------------------------------------------------------------------


def test_locked_length_is_the_step_zero_draw() -> None:
    """With greedy gaps the step-0 draw is one number; the locked sampler ends every sample at that length for any
    K, while the paper's sampler re-draws the gaps at every step and grows past it."""
    model = build_model(seed=3)
    classes = torch.arange(model.config.num_gap_classes, dtype=torch.float32)
    with torch.no_grad():
        model.gap_head.out_proj.bias.copy_(-0.5 * (classes - 6.0) ** 2)  # greedy counts near 6

    def lengths(num_steps: int, lock_length: bool) -> list[int]:
        out = model.generate(
            num_return_sequences=8, num_steps=num_steps, gap_do_sample=False, lock_length=lock_length, seed=0,
            return_dict_in_generate=True,
        )  # fmt: skip
        return out.lengths.tolist()

    locked = {num_steps: lengths(num_steps, True) for num_steps in (1, 4, 16)}
    assert len({length for row in locked.values() for length in row}) == 1
    assert locked[1] == lengths(1, False)  # K = 1: both samplers take the step-0 draw
    assert min(lengths(16, False)) > locked[1][0]


def test_locked_template_keeps_every_gap_step_zero_draw() -> None:
    """A template's open gaps are locked one by one: with greedy gaps, where the anchors land (the length of every
    value) is the same for K = 1 and K = 16, while the paper's sampler moves them."""
    model = build_model(seed=3)
    classes = torch.arange(model.config.num_gap_classes, dtype=torch.float32)
    with torch.no_grad():
        model.gap_head.out_proj.bias.copy_(-0.5 * (classes - 4.0) ** 2)  # greedy counts near 4
    template = [[BOS, ANCHORS[0], MASK, ANCHORS[1], MASK, ANCHORS[2], EOS]]

    def anchor_positions(num_steps: int, lock_length: bool) -> list[list[int]]:
        out = model.generate(
            template_ids=template, num_return_sequences=4, num_steps=num_steps, gap_do_sample=False,
            lock_length=lock_length, seed=0, return_dict_in_generate=True,
        )  # fmt: skip
        return [[i for i, t in enumerate(row.tolist()) if t in ANCHORS] for row in out.sequences]

    locked = anchor_positions(1, True)
    assert anchor_positions(16, True) == locked
    assert locked[0][1] - locked[0][0] > 1 and locked[0][2] - locked[0][1] > 1  # both values grew
    assert anchor_positions(16, False) != locked


def test_locked_slots_are_hypergeometric() -> None:
    """`draw_slots`: M of the slots of a sequence drawn without replacement; gaps (2, 3), M = 2: P(m_1 = 0, 1, 2) =
    (3, 6, 1) / 10, within 4 standard errors over 20000 draws; a second sequence's slots stay its own."""
    from elastic_mdm.length_lock import draw_slots

    copies = 20000
    gaps = torch.tensor([2, 3, 4]).repeat(copies)
    owners = torch.arange(2 * copies).repeat_interleave(torch.tensor([2, 1]).repeat(copies))
    totals = torch.tensor([2, 1]).repeat(copies)
    counts = draw_slots(gaps, owners, totals, 4, torch.Generator().manual_seed(0)).view(copies, 3)
    assert (counts[:, :2].sum(-1) == 2).all() and (counts[:, 2] == 1).all() and (counts <= gaps.view(copies, 3)).all()
    for k, p in enumerate([0.3, 0.6, 0.1]):
        share = float((counts[:, 0] == k).double().mean())
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / copies)


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


class RecordingStreamer(BaseStreamer):
    """A `BaseStreamer` that keeps what it is given: `puts`, `drafts` (when `drafts=True`) and the `end` calls."""

    def __init__(self, drafts: bool = True) -> None:
        self.puts: list[torch.Tensor] = []
        self.drafts: list[torch.Tensor] = []
        self.ends = 0
        if not drafts:
            self.put_draft = None  # type: ignore[assignment]

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value)

    def put_draft(self, value: torch.Tensor) -> None:
        self.drafts.append(value)

    def end(self) -> None:
        self.ends += 1


def test_streamer_gets_prefix_drafts_final_tokens_and_end(model) -> None:
    """DiffusionGemma's order: `put(prompt)`, a clean draft at every step that runs a pass (growing, never a mask,
    each ending with EOS), `put(final tokens after the prompt)`, `end()` once; the samples do not change."""
    prompt = [BOS, 9, 10]
    kwargs = dict(num_steps=8, seed=3, return_dict_in_generate=True)
    streamer = RecordingStreamer()
    out = model.generate([prompt], streamer=streamer, **kwargs)
    plain = model.generate([prompt], **kwargs)
    assert torch.equal(out.sequences, plain.sequences)
    assert len(streamer.puts) == 2 and streamer.ends == 1
    assert streamer.puts[0].tolist() == [prompt]
    assert streamer.puts[1].tolist() == [out.sequences[0, len(prompt) : int(out.lengths[0])].tolist()]
    assert 1 <= len(streamer.drafts) <= 8 + 1
    sizes = [draft.shape[1] for draft in streamer.drafts]
    assert sizes == sorted(sizes) and sizes[0] == 1  # step 0: EOS alone after the prompt
    for draft in streamer.drafts:
        assert draft.dtype == torch.long and draft.shape[0] == 1
        assert int(draft[0, -1]) == EOS and not (draft == MASK).any()
    assert torch.equal(streamer.drafts[-1], streamer.puts[1])


def test_streamer_without_drafts_and_batched_prefixes(model) -> None:
    """A plain `BaseStreamer` gets the prefixes and the final tokens only; a batch comes padded with `pad_token_id`,
    an unconditional sample's prefix is BOS and a template's its head up to the first open gap."""
    streamer = RecordingStreamer(drafts=False)
    out = model.generate(
        template_ids=[[BOS, 5, MASK, 6, EOS]], num_return_sequences=2, num_steps=4, seed=0, streamer=streamer,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert streamer.drafts == [] and streamer.ends == 1 and streamer.puts[0].tolist() == [[BOS, 5], [BOS, 5]]
    for row, seq, n in zip(streamer.puts[1], out.sequences, out.lengths.tolist(), strict=True):
        assert row[: n - 2].tolist() == seq[2:n].tolist() and (row[n - 2 :] == PAD).all()
    streamer = RecordingStreamer()
    model.generate(num_return_sequences=3, num_steps=4, seed=0, streamer=streamer)
    assert streamer.puts[0].tolist() == [[BOS]] * 3 and all(draft.shape[0] == 3 for draft in streamer.drafts)


def test_streamer_with_one_run_per_length_cap(model) -> None:
    """`max_new_tokens` with inputs of different lengths runs the sampler once per cap: every draft still holds the
    whole batch."""
    streamer = RecordingStreamer()
    prompts = [[BOS, 5], [BOS, 5, 6, 7]]
    ids = model.generate(prompts, num_steps=4, seed=0, max_new_tokens=3, streamer=streamer)
    assert streamer.drafts and all(draft.shape[0] == 2 for draft in streamer.drafts)
    assert streamer.puts[0][:, :4].tolist() == [[BOS, 5, PAD, PAD], [BOS, 5, 6, 7]] and ids.shape[0] == 2


def test_text_diffusion_streamer_prints_the_final_text(model, capsys) -> None:
    """Transformers' own `TextDiffusionStreamer` runs end to end (drafts overwritten in place, final text kept)."""
    from transformers import TextDiffusionStreamer

    class Digits:
        def decode(self, ids, **kwargs) -> str:
            return " ".join(str(int(t)) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))

    ids = model.generate([[BOS, 9]], num_steps=4, seed=0, streamer=TextDiffusionStreamer(Digits(), skip_prompt=True))
    printed = capsys.readouterr().out
    assert "\0337" in printed  # a draft was drawn (cursor saved) ...
    assert printed.endswith(" ".join(str(int(t)) for t in ids[0, 2:]) + "\n")  # ... and the final tokens kept


def test_bad_streamer_is_refused(model) -> None:
    with pytest.raises(ValueError, match="streamer must be a transformers BaseStreamer"):
        model.generate(num_steps=2, streamer=object())


# ---------------------------------------------------------------------------------------------------------------
# Tokens per forward pass
# ---------------------------------------------------------------------------------------------------------------


def test_tokens_per_forward_counts_generated_tokens_per_sequence_pass(model) -> None:
    """Generated tokens (prompt, anchors and padding excluded) over the passes that encoded each sequence: for one
    sequence `generated / num_passes`; for a batch the per-sequence passes, so caching and batching do not inflate
    it."""
    prompt = [BOS, 9, 10, 11]
    one = model.generate([prompt], num_steps=8, seed=1, return_dict_in_generate=True)
    generated = int(one.lengths[0]) - (len(prompt) + 1)
    assert one.sequence_passes.tolist() == [one.num_passes]
    assert one.tokens_per_forward == pytest.approx(generated / one.num_passes)
    for use_cache in (True, False):
        out = model.generate(
            [prompt, [BOS]], num_return_sequences=3, num_steps=8, seed=2, use_cache=use_cache,
            return_dict_in_generate=True,
        )  # fmt: skip
        starts = torch.tensor([len(prompt) + 1] * 3 + [2] * 3)
        assert out.sequence_passes.shape == (6,) and int(out.sequence_passes.max()) <= out.num_passes
        if not use_cache:
            assert (out.sequence_passes == out.num_passes).all()
        expected = float((out.lengths - starts).sum()) / float(out.sequence_passes.sum())
        assert out.tokens_per_forward == pytest.approx(expected) and out["tokens_per_forward"] == out.tokens_per_forward


def test_tokens_per_forward_with_one_run_per_length_cap(model) -> None:
    out = model.generate(
        [[BOS, 5], [BOS, 5, 6, 7]], num_steps=6, seed=0, max_new_tokens=4, return_dict_in_generate=True
    )
    expected = float((out.lengths - torch.tensor([3, 5])).sum()) / float(out.sequence_passes.sum())
    assert out.tokens_per_forward == pytest.approx(expected) and (out.sequence_passes > 0).all()
