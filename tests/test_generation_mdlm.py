"""Tests of the MDLM baseline sampler (`sample_mdlm`) and of `generate()` for `objective="mdlm"` checkpoints.

An *oracle* denoiser that knows the clean canvas `x` of every sequence (`BOS y EOS pad ..`, the layout `MDLMCollator`
trains on) must make the sampler return `x` up to its first EOS, for every schedule and horizon; after `k` steps the
number of revealed positions is `Binomial(#maskable, F(k))`; the step cache only skips work. Then `generate()` runs
on tiny random MDLM models for the three input modes and for bad input.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import HostSyncRecorder, TrueTokenHead, cached_and_fresh, schedule_of, sequences_of
from transformers.generation.logits_process import LogitsProcessorList

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.packing_elastic_mdm import PackedSequences
from elastic_mdm.sampler_loop_elastic_mdm import SamplerOptions
from elastic_mdm.sampler_mdlm_elastic_mdm import sample_mdlm
from elastic_mdm.sampling_state_elastic_mdm import ActiveState
from elastic_mdm.schedules_elastic_mdm import SCHEDULES, RevealSchedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------
# Oracle denoiser on a fixed canvas
# ---------------------------------------------------------------------------------------------------------------

O_MASK, O_EOS, O_PAD = 0, 1, 2
O_FIRST_BOS = 10  # sequence c has its own BOS id O_FIRST_BOS + c: the first token of a packed canvas names its x
O_FIRST_WORD = 1000  # content ids


class CanvasOracle(TrueTokenHead):
    """Knows the clean canvas `x_c` `[L]` of every sequence `c`; its features are the true token of each position
    and the token head puts all mass on it. It checks that every unmasked input token is the true one (so the
    sampler's canvas layout, prompt and template anchors included, is the one of `x`) and records the noise levels."""

    def __init__(self, canvases: list[list[int]]):
        self.table = torch.tensor(canvases)  # [C, L]
        self.vocab_size = int(self.table.max()) + 1
        self.noise_levels: list[list[float]] = []
        self.passes = 0

    def diffusion_features(self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor):
        assert input_ids.dtype == torch.long and input_ids.dim() == 1
        assert noise_level.shape == (packed.batch_size,)
        assert bool((packed.lengths == self.table.shape[1]).all()), "MDLM canvases all have length L"
        assert packed.max_seqlen == self.table.shape[1], "the sampler's host-side longest"
        self.passes += 1
        self.noise_levels.append(noise_level.tolist())
        which = input_ids[packed.cu_seqlens[:-1].long()] - O_FIRST_BOS  # [B]
        truth = self.table[which][packed.sequence_ids, packed.position_ids]  # [T]
        known = input_ids != O_MASK
        assert torch.equal(input_ids[known], truth[known]), "a clean canvas token differs from x"
        return truth[:, None].float()  # [T, 1]


def anchors_state(anchors: list[list[int]], open_after: list[list[bool]]) -> ActiveState:
    """Packed start state from per-sequence anchor tokens and open flags."""
    return ActiveState.from_anchors(list(zip(anchors, open_after, strict=True)))


def prompt_state(canvases: list[list[int]], prompt_lengths: list[int]) -> ActiveState:
    """`BOS p_1..p_m EOS` per sequence (`p` the first `m` content tokens of its canvas), open gap before EOS."""
    anchors = [x[: 1 + m] + [O_EOS] for x, m in zip(canvases, prompt_lengths, strict=True)]
    return anchors_state(anchors, [[False] * (len(a) - 2) + [True, False] for a in anchors])


def run_oracle(
    canvases: list[list[int]],
    state: ActiveState,
    schedule: RevealSchedule,
    num_steps: int,
    *,
    seed: int = 0,
    use_cache: bool = True,
    gap_budget: int | None = None,
    output_trajectory: bool = False,
):
    oracle = CanvasOracle(canvases)
    options = SamplerOptions(
        mask_token_id=O_MASK,
        pad_token_id=O_PAD,
        max_length=len(canvases[0]),
        num_steps=num_steps,
        schedule=schedule,
        token_processors=LogitsProcessorList(),
        use_cache=use_cache,
        generator=torch.Generator().manual_seed(seed),
        output_trajectory=output_trajectory,
    )
    output = sample_mdlm(oracle, state, options, eos_token_id=O_EOS, gap_budget=gap_budget)
    return output, oracle


def make_canvas(content: list[int], copy: int, length: int) -> list[int]:
    """`BOS_copy content EOS pad ..` of `length` tokens (no EOS when the content fills the canvas)."""
    x = [O_FIRST_BOS + copy, *content, O_EOS][:length]
    return x + [O_PAD] * (length - len(x))


L_RECOVERY = 24
# (content, prompt length): empty, short, one junk pad before EOS, EOS in the last position, no EOS at all
RECOVERY = [([], 0), ([1000, 1001], 1), ([1002, O_PAD, 1003, 1004], 2), (list(range(1010, 1032)), 5)]
RECOVERY.append((list(range(1040, 1040 + L_RECOVERY - 1)), 0))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 64])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_oracle_recovers_canvas_exactly(schedule: str, num_steps: int, use_cache: bool) -> None:
    """Unconditional and prompted canvases come back exactly, cut after their first EOS (length = its index + 1);
    the canvas without EOS comes back whole and is flagged."""
    canvases = [make_canvas(content, c, L_RECOVERY) for c, (content, _) in enumerate(RECOVERY)]
    state = prompt_state(canvases, [m for _, m in RECOVERY])
    output, oracle = run_oracle(canvases, state, schedule_of(schedule), num_steps, seed=num_steps, use_cache=use_cache)
    expected = [x[: x.index(O_EOS) + 1] if O_EOS in x else x for x in canvases]
    assert sequences_of(output) == expected
    assert output.lengths.tolist() == [len(x) for x in expected]
    assert output.hit_max_length.tolist() == [False] * (len(canvases) - 1) + [True]
    assert output.sequences.shape == (len(canvases), L_RECOVERY)
    assert output.num_passes == oracle.passes <= num_steps
    if not use_cache:  # MDLM's plain sampler: one full pass per step
        assert output.num_passes == num_steps
        assert output.tokens_processed == num_steps * len(canvases) * L_RECOVERY


@pytest.mark.parametrize("num_steps", [1, 5, 64])
def test_oracle_template_with_gap_budget(num_steps: int) -> None:
    """Each open gap becomes `budget` masks, the template EOS stays, fixed pads fill the canvas (the oracle checks
    this layout); pad / EOS written inside a gap are dropped; a gap that used its whole budget is flagged."""
    budget, length = 3, 16
    w = O_FIRST_WORD
    #        BOS    a      gap 1 (budget 3)   b      c      gap 2 (budget 3)     EOS    pad tail
    full = [O_FIRST_BOS, w, w + 1, O_PAD, w + 2, w + 3, w + 4, O_EOS, w + 5, O_PAD, O_EOS]
    canvases = [
        full + [O_PAD] * (length - len(full)),
        make_canvas([w + 6, w + 7, w + 8], 1, length),  # BOS [gap] EOS, the gap full: flagged
        make_canvas([w + 9], 2, length),  # no open gap: returned unchanged
    ]
    state = anchors_state(
        [[O_FIRST_BOS, w, w + 3, w + 4, O_EOS], [O_FIRST_BOS + 1, O_EOS], [O_FIRST_BOS + 2, w + 9, O_EOS]],
        [[False, True, False, True, False], [True, False], [False, False, False]],
    )
    for use_cache in (True, False):
        output, _ = run_oracle(
            canvases, state, schedule_of("cosine"), num_steps, gap_budget=budget, use_cache=use_cache
        )
        assert sequences_of(output) == [
            [O_FIRST_BOS, w, w + 1, w + 2, w + 3, w + 4, w + 5, O_EOS],
            [O_FIRST_BOS + 1, w + 6, w + 7, w + 8, O_EOS],
            [O_FIRST_BOS + 2, w + 9, O_EOS],
        ]
        assert output.hit_max_length.tolist() == [False, True, False]


def test_oracle_noise_levels_are_the_schedule() -> None:
    """Pass k (no caching: every step runs) is conditioned on F(k), the share of maskable positions revealed in
    expectation (MDLMCollator's 1 - t)."""
    schedule, num_steps = schedule_of("cosine"), 5
    canvases = [make_canvas([1000, 1001], 0, 8), make_canvas([1002], 1, 8)]
    _, oracle = run_oracle(canvases, prompt_state(canvases, [0, 1]), schedule, num_steps, use_cache=False)
    assert oracle.passes == num_steps
    for levels, f in zip(oracle.noise_levels, schedule.table(num_steps)[:-1].tolist(), strict=True):
        assert levels == pytest.approx([f, f])


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_oracle_revealed_count_is_binomial(schedule: str) -> None:
    """Revealed positions after k steps (the input of step k) ~ Binomial(L - 1, F(k)): 400 unconditional copies
    (L = 41, K = 8) in one packed run. Per step, with p = F(k), n = L - 1, N = 400: |mean - n p| <= 4 SE,
    SE = sqrt(n p (1 - p) / N); |s² - σ²| <= 5 SE of the sample variance (binomial 4th central moment
    μ4 = σ² (1 + 3 (n - 2) p (1 - p))), plus 1e-9 for the exact p = 0 and p = 1 steps. Deterministic seeds."""
    length, num_steps, copies = 41, 8, 400
    n = length - 1
    canvases = [make_canvas(list(range(1000, 1030)), c, length) for c in range(copies)]
    sched = schedule_of(schedule)
    output, _ = run_oracle(canvases, prompt_state(canvases, [0] * copies), sched, num_steps, seed=123,
                           output_trajectory=True)  # fmt: skip
    assert len(output.trajectory) == num_steps + 1
    for k, p in enumerate(sched.table(num_steps).tolist()):
        counts = ((torch.stack(output.trajectory[k]) != O_MASK).sum(-1) - 1).double()  # [copies] revealed, no BOS
        var = n * p * (1 - p)
        assert abs(counts.mean().item() - n * p) <= 4 * math.sqrt(var / copies) + 1e-9, (k, counts.mean(), n * p)
        mu4 = var * (1 + 3 * (n - 2) * p * (1 - p))
        var_se = math.sqrt(max(mu4 - var**2 * (copies - 3) / (copies - 1), 0.0) / copies)
        assert abs(counts.var().item() - var) <= 5 * var_se + 1e-9, (k, counts.var(), var)
    assert all(seq.tolist() == x for seq, x in zip(output.trajectory[-1], canvases, strict=True))


def test_oracle_cache_skips_steps_that_reveal_nothing() -> None:
    """K = 64 steps on a canvas of 8 (linear): most steps reveal nothing, so the cache encodes far fewer tokens,
    with the same output."""
    canvases = [make_canvas([1000 + i for i in range(n)], c, 8) for c, n in enumerate([0, 3, 6])]
    state = prompt_state(canvases, [0, 1, 0])
    cached, oracle = run_oracle(canvases, state, schedule_of("linear"), 64, use_cache=True)
    fresh, _ = run_oracle(canvases, state, schedule_of("linear"), 64, use_cache=False)
    assert sequences_of(cached) == sequences_of(fresh)
    assert fresh.tokens_processed == 64 * 3 * 8
    assert cached.tokens_processed < fresh.tokens_processed / 4
    assert cached.num_passes == oracle.passes < 20


def test_oracle_open_gaps_need_a_budget() -> None:
    canvases = [make_canvas([1000, 1001], 0, 8)]
    state = anchors_state([[O_FIRST_BOS, 1000, O_EOS]], [[True, False, False]])  # open gap after BOS, not before EOS
    with pytest.raises(ValueError, match="gap_budget"):
        run_oracle(canvases, state, schedule_of("linear"), 4)


# ---------------------------------------------------------------------------------------------------------------
# generate() on tiny random MDLM models
# ---------------------------------------------------------------------------------------------------------------

PAD, BOS, EOS, MASK = 0, 1, 2, 3
VOCAB, CANVAS = 48, 24
ANCHORS = (5, 6, 7, 8)  # never generated, so a template's anchors can be found in the output


@torch.no_grad()
def tiny_mdlm(seed: int = 0, **overrides) -> ElasticMDMForDiffusionLM:
    """Random 2-layer DiT trained with nothing, `objective="mdlm"`; BOS and the anchor ids are never generated and
    EOS / pad are likely, so sequences end at varied places and template gaps get stop tokens."""
    torch.manual_seed(seed)
    params = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=16)
    params.update(max_position_embeddings=CANVAS, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    params.update(mask_token_id=MASK, objective="mdlm", **overrides)
    model = ElasticMDMForDiffusionLM(ElasticMDMConfig(**params)).eval()
    for param in model.parameters():
        param.add_(0.1 * torch.randn_like(param))
    model.lm_head.bias[[BOS, *ANCHORS]] = -1e4
    model.lm_head.bias[[EOS, PAD]] += 2.0
    return model


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    return tiny_mdlm()


def check_samples(out, bos: int = BOS, eos: int = EOS, pad: int = PAD, prefix: int | list[int] = 1) -> None:
    """Shape `[N, <= L]`, BOS first, no mask, pad after the length, each sequence ends at the first EOS generated
    after its prompt (`prefix` tokens, per row or for all), or fills the canvas and is flagged."""
    sequences, lengths = out.sequences, out.lengths
    assert sequences.dim() == 2 and sequences.shape[1] == int(lengths.max()) <= CANVAS
    prefixes = [prefix] * len(lengths) if isinstance(prefix, int) else prefix
    for row, length, hit, start in zip(sequences, lengths.tolist(), out.hit_max_length.tolist(), prefixes, strict=True):
        assert row[0] == bos and not (row[:length] == MASK).any() and (row[length:] == pad).all()
        assert not (row[start : length - 1] == eos).any()
        assert (length == CANVAS and row[length - 1] != eos) if hit else row[length - 1] == eos


def test_unconditional(model) -> None:
    out = model.generate(num_return_sequences=6, num_steps=8, seed=0, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 6
    check_samples(out)
    assert len(set(out.lengths.tolist())) > 1, "lengths should vary"
    assert 1 <= out.num_passes <= 8 and out.tokens_processed <= 8 * 6 * CANVAS


def test_prompted(model) -> None:
    prompts = [[BOS, 5, 6, 7], [BOS, 8]]
    out = model.generate(prompts, num_return_sequences=2, num_steps=6, seed=1, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 4
    check_samples(out, prefix=[len(prompts[i // 2]) for i in range(4)])
    for i, row in enumerate(out.sequences):  # each prompt repeated num_return_sequences times, in order
        assert row[: len(prompts[i // 2])].tolist() == prompts[i // 2]


def test_trajectory_is_the_canvas(model) -> None:
    out = model.generate([[BOS, 5]], num_steps=4, seed=0, return_dict_in_generate=True, output_trajectory=True)
    assert len(out.trajectory) == 4 + 1
    assert out.trajectory[0][0].tolist() == [BOS, 5] + [MASK] * (CANVAS - 2)
    masks = [int((step[0] == MASK).sum()) for step in out.trajectory]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0
    final = out.trajectory[-1][0]
    assert out.sequences[0, : out.lengths[0]].tolist() == final[: out.lengths[0]].tolist()


@pytest.mark.parametrize("prompt", [False, True])
def test_step_cache_is_exact_and_saves_work(prompt: bool) -> None:
    """Same seed, same samples with and without the cache; K >> L leaves most steps with nothing to reveal."""
    model = tiny_mdlm(seed=2)
    inputs = [[BOS, 5, 6], [BOS]] if prompt else None
    kwargs = dict(num_return_sequences=3, num_steps=64, seed=11, return_dict_in_generate=True)
    cached, fresh = cached_and_fresh(model, inputs, **kwargs)
    assert fresh.num_passes == 64 and fresh.tokens_processed == 64 * cached.sequences.shape[0] * CANVAS
    assert cached.tokens_processed < fresh.tokens_processed / 2


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("template", [False, True], ids=["prompt", "template"])
def test_step_loop_reads_the_device_once_per_step(monkeypatch, model, use_cache: bool, template: bool) -> None:
    """docs/design.md §8, as for Elastic-MDM: one `host_read` per step (revealed count and pass size) and no other
    read-back inside the loop; building the canvas and cutting the result read the device outside it."""
    inputs = dict(template_ids=[[BOS, MASK, ANCHORS[0], MASK, EOS]], mdlm_gap_budget=3) if template else {}
    with HostSyncRecorder(monkeypatch, loop_only=True) as recorder:
        out = model.generate(
            **inputs, num_return_sequences=3, num_steps=12, seed=0, use_cache=use_cache, return_dict_in_generate=True
        )
    assert recorder.syncs == []
    assert recorder.reads == 1 + 12
    assert out.num_passes == 12 if not use_cache else 1 <= out.num_passes <= 12


def test_time_conditioned_model_never_caches() -> None:
    model = tiny_mdlm(time_conditioning=True)
    kwargs = dict(num_return_sequences=2, num_steps=12, seed=4, return_dict_in_generate=True)
    cached, fresh = model.generate(use_cache=True, **kwargs), model.generate(use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert cached.tokens_processed == fresh.tokens_processed == 12 * 2 * CANVAS


def test_template_with_gap_budget_keeps_anchors(model) -> None:
    # BOS 5 [open] 6 7 [open] EOS, 4 masks per open gap: closed gaps stay empty, anchors stay in order
    template, budget = [BOS, 5, MASK, 6, 7, MASK, EOS], 4
    out = model.generate(template_ids=[template], mdlm_gap_budget=budget, num_steps=6, output_trajectory=True,
                         num_return_sequences=8, seed=0, return_dict_in_generate=True)  # fmt: skip
    gap = [MASK] * budget
    assert out.trajectory[0][0].tolist() == [BOS, 5, *gap, 6, 7, *gap, EOS] + [PAD] * (CANVAS - 13)
    shortened = 0
    for row, length, hit in zip(out.sequences, out.lengths.tolist(), out.hit_max_length.tolist(), strict=True):
        seq = row[:length].tolist()
        anchors = [i for i, t in enumerate(seq) if t in (BOS, *ANCHORS)] + [length - 1]
        assert [seq[i] for i in anchors] == [BOS, 5, 6, 7, EOS]
        assert anchors[1] == 1 and anchors[3] == anchors[2] + 1  # closed gaps stay empty
        assert not any(t in (PAD, EOS, MASK) for t in seq[1:-1])  # stop tokens inside gaps are dropped
        gaps = (anchors[2] - anchors[1] - 1, anchors[4] - anchors[3] - 1)
        assert max(gaps) <= budget and hit == (budget in gaps)
        shortened += length < 5 + 2 * budget
    assert shortened > 0, "no gap was shortened by a stop token"


def test_bos_equal_eos_gpt2_style() -> None:
    model = tiny_mdlm(bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None)
    out = model.generate([[EOS, 5]], num_return_sequences=4, num_steps=6, seed=0, return_dict_in_generate=True)
    check_samples(out, bos=EOS, eos=EOS, pad=EOS, prefix=2)  # the BOS is not the end; pad falls back to EOS
    assert (out.sequences[:, :2] == torch.tensor([EOS, 5])).all() and (out.lengths >= 3).all()


def test_objective_is_saved(tmp_path) -> None:
    tiny_mdlm().config.save_pretrained(tmp_path)
    assert ElasticMDMConfig.from_pretrained(str(tmp_path)).objective == "mdlm"
    assert ElasticMDMConfig().objective == "elastic"


def test_unknown_objective_raises() -> None:
    with pytest.raises(ValueError, match="objective"):
        ElasticMDMConfig(objective="autoregressive")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(template_ids=[[BOS, 5, MASK, EOS]]), "mdlm_gap_budget"),
        (dict(template_ids=[[BOS, 5, MASK, EOS]], mdlm_gap_budget=0), "mdlm_gap_budget"),
        (dict(template_ids=[[BOS, 5, MASK, EOS]], mdlm_gap_budget=2.5), "mdlm_gap_budget"),
        (dict(template_ids=[[BOS, 5, MASK, EOS]], mdlm_gap_budget=CANVAS), "max_length"),
        (dict(input_ids=[[BOS, *range(10, 30)]], max_length=16), "max_length"),
        (dict(max_length=CANVAS + 1), "max_length"),
    ],
)
def test_bad_input_raises(model, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model.generate(num_steps=4, **kwargs)


def test_streamer_drafts_show_the_canvas_with_its_masks(model) -> None:
    """An MDLM draft is the canvas after the prompt as it stands after each step's fill: fixed width, masks at the
    positions not revealed yet (fewer at every step, none at the end); the samples do not change."""
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self) -> None:
            self.puts, self.drafts, self.ends = [], [], 0

        def put(self, value):
            self.puts.append(value)

        def put_draft(self, value):
            self.drafts.append(value)

        def end(self):
            self.ends += 1

    streamer, kwargs = Recorder(), dict(num_steps=6, seed=0, return_dict_in_generate=True)
    out = model.generate([[BOS, 5]], streamer=streamer, **kwargs)
    assert torch.equal(out.sequences, model.generate([[BOS, 5]], **kwargs).sequences)
    assert streamer.puts[0].tolist() == [[BOS, 5]] and streamer.ends == 1 and len(streamer.drafts) == 6
    masks = [int((draft == MASK).sum()) for draft in streamer.drafts]
    assert all(draft.shape == (1, CANVAS - 2) for draft in streamer.drafts)
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0 and masks[0] > 0
    assert streamer.puts[1].tolist() == [out.sequences[0, 2 : int(out.lengths[0])].tolist()]


def test_tokens_per_forward_on_the_canvas(model) -> None:
    """MDLM without the cache encodes every canvas at each of the K steps: generated tokens over K per sequence."""
    out = model.generate(
        [[BOS, 5]], num_return_sequences=3, num_steps=6, seed=0, use_cache=False, return_dict_in_generate=True
    )
    assert (out.sequence_passes == 6).all() and out.num_passes == 6
    assert out.tokens_per_forward == pytest.approx(float((out.lengths - 3).clamp_min(0).sum()) / 18)
