"""Tests of `generate()` on tiny random models (docs/design.md §3): the input modes, caps, sampling options, the
step cache, host reads, input validation and the length-locked sampler. The exactness of the reverse process itself
is tested with an oracle denoiser in `tests/test_sampler_oracle.py`.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import (
    ANCHORS,
    BOS,
    EOS,
    MASK,
    MAX_POS,
    PAD,
    HostSyncRecorder,
    cached_and_fresh,
    random_model,
)
from transformers.generation.logits_process import LogitsProcessorList

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.generation_config_elastic_mdm import ElasticMDMGenerationConfig
from elastic_mdm.sampler_elastic_mdm import sample_elastic
from elastic_mdm.sampler_loop_elastic_mdm import SamplerOptions
from elastic_mdm.schedules_elastic_mdm import get_schedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ---------------------------------------------------------------------------------------------------------------
# generate() on tiny random models
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    return random_model()


@pytest.fixture(scope="module")
def wild_model() -> ElasticMDMForDiffusionLM:
    """Untamed: gap counts near uniform over 0..64, so sequences run into max_length."""
    return random_model(tame=False, seed=1)


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
    model = random_model(bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None)
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
    model = random_model(seed=2)
    inputs = [[BOS, 5, 6], [BOS]] if prompt else None
    kwargs = dict(num_return_sequences=4, num_steps=16, seed=11, return_dict_in_generate=True)
    cached, fresh = cached_and_fresh(model, inputs, **kwargs)
    assert len(set(cached.lengths.tolist())) > 1
    assert fresh.num_passes <= 17  # the last pass is skipped when nothing is left to fill
    assert cached.tokens_processed < fresh.tokens_processed
    assert cached.num_passes <= fresh.num_passes


@pytest.mark.parametrize("lock_length", [False, True], ids=["paper", "locked"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_step_loop_reads_the_device_once_per_step(monkeypatch, use_cache: bool, lock_length: bool) -> None:
    """docs/design.md §8: no host-device sync inside the step loop but the one `host_read` after each insertion
    (plus one before the loop); the model forward, the heads and the draws read nothing back. The locked sampler
    reads once more per growing step: the widest gap, which sizes its slot draw."""
    model = random_model(seed=2)
    state = model._initial_state(None, None, None, num_return_sequences=4)
    with HostSyncRecorder(monkeypatch) as recorder:
        options = SamplerOptions(
            mask_token_id=MASK, num_steps=16, schedule=get_schedule("linear"),
            token_processors=LogitsProcessorList(), max_length=MAX_POS, pad_token_id=PAD, use_cache=use_cache,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        output = sample_elastic(model, state, options, lock_length=lock_length)
    assert recorder.syncs == []
    assert recorder.reads == 1 + 16 * (2 if lock_length else 1)  # before the loop, then per step 0..K-1
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
    model = random_model(time_conditioning=True)
    kwargs = dict(num_return_sequences=3, num_steps=12, seed=4, return_dict_in_generate=True)
    cached = model.generate(use_cache=True, **kwargs)
    fresh = model.generate(use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert cached.tokens_processed == fresh.tokens_processed and cached.num_passes == fresh.num_passes


@pytest.mark.parametrize("block_type", ["dit", "llama"])
def test_generate_on_both_block_types(block_type: str) -> None:
    model = random_model(block_type=block_type, adaln=block_type == "llama", time_conditioning=True)
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
    model = random_model(tame=False, mask_token_id=None)
    with pytest.raises(ValueError, match="mask_token_id"):
        model.generate(num_steps=2)


# ---------------------------------------------------------------------------------------------------------------
# Length-locked sampler
# ---------------------------------------------------------------------------------------------------------------


def test_locked_length_is_the_step_zero_draw() -> None:
    """With greedy gaps the step-0 draw is one number; the locked sampler ends every sample at that length for any
    K, while the paper's sampler re-draws the gaps at every step and grows past it."""
    model = random_model(seed=3)
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
    model = random_model(seed=3)
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
    from elastic_mdm.length_lock_elastic_mdm import draw_slots

    copies = 20000
    gaps = torch.tensor([2, 3, 4]).repeat(copies)
    owners = torch.arange(2 * copies).repeat_interleave(torch.tensor([2, 1]).repeat(copies))
    totals = torch.tensor([2, 1]).repeat(copies)
    counts = draw_slots(gaps, owners, totals, 4, torch.Generator().manual_seed(0)).view(copies, 3)
    assert (counts[:, :2].sum(-1) == 2).all() and (counts[:, 2] == 1).all() and (counts <= gaps.view(copies, 3)).all()
    for k, p in enumerate([0.3, 0.6, 0.1]):
        share = float((counts[:, 0] == k).double().mean())
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / copies)
