"""Static shape buckets and CUDA graphs (`elastic_mdm/cuda_graphs_elastic_mdm.py`): padding leaves the real rows'
features unchanged, the samplers return the same samples through it, the bucket grid is geometric, and misuse
raises. The CUDA graph replay itself is checked on a GPU (`-m gpu`)."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from helpers import EOS, MASK, PAD, tiny_config

from benchmarks.oracle import oracle_config, random_model
from benchmarks.sampling import VARIANTS, oracle_setup
from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.cuda_graphs_elastic_mdm import (
    CUDAGraphDenoiser,
    ShapeBucket,
    StaticShapeDenoiser,
    batch_bucket,
    bucket_size,
    pad_to_bucket,
)
from elastic_mdm.packing_elastic_mdm import PackedSequences
from elastic_mdm.schedules_elastic_mdm import get_schedule

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


PRECISIONS = {  # (weights dtype, autocast dtype, tolerance against the eager padded pass, against the unpadded one)
    "fp32": (torch.float32, None, 1e-5, 1e-4),
    "bf16-autocast": (torch.float32, torch.bfloat16, 1e-2, 5e-2),  # fp32 weights re-cast at every replay (warned)
    "bf16-weights": (torch.bfloat16, torch.bfloat16, 1e-2, 5e-2),  # cast once: what the benchmarks time
}


def gpu_model(attn: str, precision: str, time_conditioning: bool, device: str = "cuda") -> ElasticMDMForDiffusionLM:
    """The oracle-sized random model on `device`, its weights perturbed (so that every block mixes its sequence:
    padding leaks and stale replays show), in the weights dtype of `precision`."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    config = oracle_config(64, 2, 2, VOCAB, LENGTH)
    config._attn_implementation, config.time_conditioning = attn, time_conditioning
    model = perturbed(random_model(config, device=device, seed=0))
    return model.to(PRECISIONS[precision][0])


def autocast_of(precision: str):
    dtype = PRECISIONS[precision][1]
    return torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:CUDA graphs captured under")  # bf16-autocast: fp32 weights, re-cast (warned)
@pytest.mark.parametrize("time_conditioning", [False, True], ids=["plain", "time-conditioned"])
@pytest.mark.parametrize("attn", ["sdpa", "varlen_attn", "flash_attention_2"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_cuda_graph_replay_matches_eager(precision: str, attn: str, time_conditioning: bool) -> None:
    """On CUDA, a perturbed model: every replayed pass equals the eager padded pass of ITS inputs (several inputs of
    one bucket, empty sequences included), also after a call under `inference_mode`, and the unpadded pass up to
    the round-off of another shape (no padding leaks through this attention kernel); the oracle samplers give
    identical trajectories through graphs; generate(cuda_graphs=True) samples what the same padded passes give
    eagerly (fp32), and its graph count stays bounded over calls of other batch sizes."""
    model = gpu_model(attn, precision, time_conditioning)
    pad, (tolerance, unpadded_tolerance) = model.config.eos_token_id, PRECISIONS[precision][2:]
    if attn != "sdpa":  # the flash kernels attend in bf16 whatever the weights: another shape may move a bf16 ulp
        unpadded_tolerance = PRECISIONS["bf16-weights"][3]
    graphs = CUDAGraphDenoiser(model, pad, granularity=16)
    generator = torch.Generator("cuda").manual_seed(0)
    lengths = torch.tensor([5, 17, 0, 2], device="cuda")
    packed = PackedSequences.from_lengths(lengths)
    with torch.no_grad(), autocast_of(precision):
        replays = []
        for replay in range(3):
            ids = torch.randint(0, VOCAB - 2, (24,), device="cuda", generator=generator)
            level = torch.rand(4, device="cuda", generator=generator)
            eager = StaticShapeDenoiser(model, pad, 16).diffusion_features(ids, packed, level)
            with torch.inference_mode() if replay == 1 else torch.no_grad():
                replays.append(graphs.diffusion_features(ids, packed, level))
            torch.testing.assert_close(replays[-1], eager, atol=tolerance, rtol=tolerance)
            unpadded = model.diffusion_features(ids, packed, level)
            torch.testing.assert_close(replays[-1], unpadded, atol=unpadded_tolerance, rtol=unpadded_tolerance)
    assert len(graphs.graphs) == 1 and not torch.equal(replays[0], replays[1])
    setup = oracle_setup(
        model, torch.tensor([0, 3, 20, LENGTH - 2]), num_steps=12, schedule=get_schedule("linear"), seed=3,
        autocast_dtype=PRECISIONS[precision][1],
    )  # fmt: skip
    cached = {}
    for variant in VARIANTS:
        plain = setup.run(variant)
        graphed = setup.run(variant, lambda d: cached.setdefault(id(d), CUDAGraphDenoiser(d, PAD, granularity=16)))
        assert torch.equal(plain.sequences, graphed.sequences) and torch.equal(plain.lengths, graphed.lengths)
    kwargs = dict(num_steps=8, seed=0, max_length=LENGTH, return_dict_in_generate=True)
    for batch in (3, 1, 6, 3):
        out = model.generate(num_return_sequences=batch, cuda_graphs=True, **kwargs)
        assert out.sequences.shape[0] == batch and (out.lengths >= 2).all()
        if precision == "fp32":
            with patch.object(model, "_cuda_graph_denoiser", lambda pad_id: StaticShapeDenoiser(model, pad_id)):
                same = model.generate(num_return_sequences=batch, cuda_graphs=True, **kwargs)
            assert torch.equal(out.sequences, same.sequences) and torch.equal(out.lengths, same.lengths)
    denoiser = model._cuda_graph_denoiser(pad)
    assert 0 < len(denoiser.graphs) <= denoiser.max_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graphs_on_a_second_device() -> None:
    """A model on `cuda:1` while `cuda:0` is current: graphs, streams and pool belong to `cuda:1` and replays equal
    eager passes."""
    model = gpu_model("sdpa", "fp32", False, device="cuda:1")
    graphs = CUDAGraphDenoiser(model, model.config.eos_token_id, granularity=16)
    packed = PackedSequences.from_lengths(torch.tensor([5, 17, 2], device="cuda:1"))
    ids = torch.randint(0, VOCAB - 2, (24,), device="cuda:1")
    level = torch.rand(3, device="cuda:1")
    with torch.no_grad(), torch.cuda.device(0):
        eager = StaticShapeDenoiser(model, model.config.eos_token_id, 16).diffusion_features(ids, packed, level)
        for _ in range(2):
            torch.testing.assert_close(graphs.diffusion_features(ids, packed, level), eager, atol=1e-5, rtol=1e-5)
    assert {key[1] for key in graphs.graphs} == {torch.device("cuda:1")}
