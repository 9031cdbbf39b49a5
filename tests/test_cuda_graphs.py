"""Static shape buckets and CUDA graphs (`elastic_mdm/cuda_graphs.py`): padding leaves the real rows' features
unchanged, the samplers return the same samples through it, the bucket grid is geometric, and misuse raises. The
CUDA graph replay itself is checked on a GPU (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch
from helpers import EOS, MASK, PAD, tiny_config

from benchmarks.oracle import oracle_config, random_model
from benchmarks.sampling import VARIANTS, oracle_setup
from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.cuda_graphs import (
    CUDAGraphDenoiser,
    ShapeBucket,
    StaticShapeDenoiser,
    batch_bucket,
    bucket_size,
    pad_to_bucket,
)
from elastic_mdm.packing import PackedSequences
from elastic_mdm.schedules import get_schedule

LENGTH, VOCAB = 48, 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def perturbed(model: ElasticMDMForDiffusionLM) -> ElasticMDMForDiffusionLM:
    """Fresh models have zero adaLN gates, so attention (the only place padding could leak) adds nothing: perturb
    every weight so that each token's features depend on the rest of its sequence."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    return perturbed(random_model(oracle_config(32, 2, 2, VOCAB, LENGTH), seed=0))


def test_bucket_grid_is_geometric() -> None:
    """Multiples of max(granularity, 2^⌊log2 x⌋ / 8): padding under 1/8 above the granularity, few buckets."""
    assert [bucket_size(v, 64) for v in (0, 1, 64, 65, 1000, 1024, 1025, 5000, 32768)] == [
        64, 64, 64, 128, 1024, 1024, 1152, 5120, 32768
    ]  # fmt: skip
    sizes = range(1, 32769)
    buckets = {bucket_size(v, 64) for v in sizes}
    assert len(buckets) <= 64
    assert all(v <= bucket_size(v, 64) <= max(v + 64, v * 9 / 8) for v in sizes)


def test_padding_adds_dummy_sequences_only() -> None:
    lengths = torch.tensor([5, 0, 17, 2])  # a cached sequence enters with length 0
    packed = PackedSequences.from_cu_seqlens(torch.tensor([0, 5, 5, 22, 24]), max_seqlen=17, num_tokens=24)
    bucket = ShapeBucket.of(packed, 24, granularity=16)
    assert (bucket.tokens, bucket.longest, bucket.batch, bucket.dummies) == (32, 32, 4, 1)
    ids = torch.arange(24)
    padded_ids, cu, level = pad_to_bucket(ids, packed, torch.full((4,), 0.5), bucket, pad_token_id=PAD)
    assert torch.equal(padded_ids[:24], ids) and (padded_ids[24:] == PAD).all() and padded_ids.numel() == 32
    assert cu.tolist() == [0, 5, 5, 22, 24, 32] and level.tolist() == [0.5] * 4 + [1.0]
    assert torch.equal(cu[1:5] - cu[:4], lengths.int())
    # many short sequences: 24 empty ones make the batch a power of two (64), then the padding is cut into
    # pieces no longer than the bucket's longest sequence
    packed = PackedSequences.from_lengths(torch.full((40,), 3))
    bucket = ShapeBucket.of(packed, 120, granularity=16)
    _, cu, level = pad_to_bucket(torch.zeros(120, dtype=torch.long), packed, torch.ones(40), bucket, PAD)
    assert bucket.batch == 64 and (cu[41:65] == 120).all() and level.numel() == 64 + bucket.dummies
    pieces = (cu[65:] - cu[64:-1]).tolist()
    assert (bucket.tokens, bucket.longest) == (128, 16) and sum(pieces) == 8 and max(pieces) <= 16
    assert len(pieces) == bucket.dummies == 8


class ShapeSpy:
    """A denoiser that records the padded passes it gets."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, list[int], list[float]]] = []

    def diffusion_features(self, ids: torch.Tensor, packed: PackedSequences, level: torch.Tensor) -> torch.Tensor:
        self.passes.append((ids.numel(), packed.cu_seqlens.tolist(), level.tolist()))
        return torch.zeros(ids.numel(), 1)


def test_batches_are_padded_to_a_power_of_two() -> None:
    """Passes encode varying numbers of sequences (the step cache, calls of other batch sizes): empty sequences
    bring each up to its power-of-two batch bucket, whatever was seen before (a batch of 1 after one of 3 is not
    padded to 4)."""
    assert [batch_bucket(b) for b in (0, 1, 2, 3, 4, 5, 31, 32, 33)] == [1, 1, 2, 4, 4, 8, 32, 32, 64]
    spy = ShapeSpy()
    static = StaticShapeDenoiser(spy, PAD, granularity=16)
    for lengths in ([4, 3, 3], [5]):
        lengths = torch.tensor(lengths)
        ids = torch.ones(int(lengths.sum()), dtype=torch.long)
        static.diffusion_features(ids, PackedSequences.from_lengths(lengths), torch.full(lengths.shape, 0.5))
    assert spy.passes == [
        (16, [0, 4, 7, 10, 10, 16], [0.5, 0.5, 0.5, 1.0, 1.0]),  # one empty sequence, then the dummy
        (16, [0, 5, 16], [0.5, 1.0]),
    ]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_static_shapes_give_the_same_features(model, attn: str) -> None:
    model.config._attn_implementation = attn
    lengths = torch.tensor([5, 17, 0, 2])
    packed = PackedSequences.from_lengths(lengths)
    ids = torch.randint(0, VOCAB - 2, (24,), generator=torch.Generator().manual_seed(0))
    level = torch.tensor([0.1, 0.5, 0.7, 1.0])
    with torch.no_grad():
        plain = model.diffusion_features(ids, packed, level)
        padded = StaticShapeDenoiser(model, VOCAB - 2, granularity=16).diffusion_features(ids, packed, level)
    assert padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_samplers_through_static_shapes_match(model, schedule: str) -> None:
    """The oracle trajectories (exact forward process) are identical with and without padding, for Elastic-MDM and
    both MDLM variants: padding changes no draw and no count."""
    setup = oracle_setup(
        model, torch.tensor([0, 3, 20, LENGTH - 2]), num_steps=12, schedule=get_schedule(schedule), seed=3
    )

    def static(denoiser):
        return StaticShapeDenoiser(denoiser, model.config.eos_token_id, granularity=16)

    for variant in VARIANTS:
        plain, padded = setup.run(variant), setup.run(variant, static)
        assert torch.equal(plain.sequences, padded.sequences) and torch.equal(plain.lengths, padded.lengths)
        assert (plain.num_passes, plain.tokens_processed) == (padded.num_passes, padded.tokens_processed)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_model_samples_through_static_shapes_match(time_conditioning: bool) -> None:
    """A real (random) model through `generate(cuda_graphs=True)`, its graph denoiser swapped for the CPU-capable
    padding alone: with the same seed, both samplers draw the same sequences as with plain passes (the features
    differ by fp32 round-off only, far below any sampling boundary here)."""
    torch.manual_seed(0)
    model = perturbed(ElasticMDMForDiffusionLM(tiny_config(time_conditioning=time_conditioning)).eval())
    model._cuda_graph_denoiser = lambda pad: StaticShapeDenoiser(model, pad, granularity=16)
    for objective in ("elastic", "mdlm"):
        model.config.objective = objective
        kwargs = dict(num_return_sequences=3, num_steps=12, seed=5, max_length=40, return_dict_in_generate=True)
        plain, padded = model.generate(**kwargs), model.generate(cuda_graphs=True, **kwargs)
        assert torch.equal(plain.sequences, padded.sequences) and torch.equal(plain.lengths, padded.lengths)
        assert plain.tokens_processed == padded.tokens_processed


def test_graphs_need_cuda() -> None:
    model = ElasticMDMForDiffusionLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        model.generate(num_steps=4, cuda_graphs=True)
    packed = PackedSequences.from_lengths(torch.tensor([3]))
    with pytest.raises(ValueError, match="CUDA graphs need the model and its inputs on a CUDA device"):
        CUDAGraphDenoiser(model, PAD).diffusion_features(torch.tensor([1, MASK, EOS]), packed, torch.ones(1))


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "varlen_attn"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_cuda_graph_replay_matches_eager(dtype, attn: str) -> None:
    """On CUDA: replayed passes equal eager ones (empty sequences included), the oracle samplers give identical
    trajectories through graphs, a bucket is captured once and replayed afterwards, and generate(cuda_graphs=True)
    runs."""
    config = oracle_config(64, 2, 2, VOCAB, LENGTH)
    config._attn_implementation = attn
    model = random_model(config, device="cuda", seed=0)
    graphs = CUDAGraphDenoiser(model, model.config.eos_token_id, granularity=16)
    autocast = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
    lengths = torch.tensor([5, 17, 0, 2], device="cuda")
    packed = PackedSequences.from_lengths(lengths)
    ids = torch.randint(0, VOCAB - 2, (24,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    level = torch.rand(4, device="cuda")
    with torch.no_grad(), autocast:
        eager = StaticShapeDenoiser(model, model.config.eos_token_id, 16).diffusion_features(ids, packed, level)
        first = graphs.diffusion_features(ids, packed, level)
        second = graphs.diffusion_features(ids.flip(0), packed, level)  # same bucket: replayed, not captured
    assert len(graphs.graphs) == 1
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    assert not torch.equal(first, second)
    setup = oracle_setup(
        model, torch.tensor([0, 3, 20, LENGTH - 2]), num_steps=12, schedule=get_schedule("linear"), seed=3,
        autocast_dtype=dtype,
    )  # fmt: skip
    cached = {}
    for variant in VARIANTS:
        plain = setup.run(variant)
        graphed = setup.run(variant, lambda d: cached.setdefault(id(d), CUDAGraphDenoiser(d, PAD, granularity=16)))
        assert torch.equal(plain.sequences, graphed.sequences) and torch.equal(plain.lengths, graphed.lengths)
    out = model.generate(num_return_sequences=3, num_steps=8, seed=0, cuda_graphs=True, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    assert sequences.shape[0] == 3 and (lengths >= 2).all()
