"""`torch.compile` of the packed backbone (`ElasticMDMModel.forward_packed`), as training and the benchmarks use it:
`fullgraph=True` (a graph break raises), `dynamic=True` (packed lengths change every step), forward and backward
under bf16 autocast, backend `aot_eager` (the AOT-autograd graphs Inductor would get, without code generation).
Over batches of different token counts, sequence counts and longest sequences it compiles once, recompiles at most
once, and gives eager's features and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK, random_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from elastic_mdm.packing_elastic_mdm import PackedSequences

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (lengths of the packed sequences): token counts 16..57, 2..5 sequences, longest 4..30
SHAPES = ([5, 9, 3], [17, 2], [4, 4, 4, 4], [30, 11, 6, 2, 8])


def packed_batch(lengths: list[int], seed: int, vocab: int) -> tuple[torch.Tensor, PackedSequences, torch.Tensor]:
    """`(ids [T], packed, noise_level [B])` of a random batch, about a third of the tokens masked."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(4, vocab, (int(lengths.sum()),), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < 0.3] = MASK
    return ids, PackedSequences.from_lengths(lengths), torch.rand(lengths.shape, generator=generator)


def loss_and_grads(forward, model, ids, packed, level) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Features under bf16 autocast, and the gradients of their mean square."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = forward(ids, packed, level)  # [T, d]
    features.float().square().mean().backward()
    return features.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    ("overrides", "shapes"),
    [
        (dict(time_conditioning=True), SHAPES),
        # a single sequence (batch 1: dynamo specializes sizes 0 and 1) is the one recompile allowed
        pytest.param(dict(block_type="llama"), (*SHAPES, [12]), marks=pytest.mark.slow),
    ],
    ids=["dit-time-conditioned", "llama-and-one-sequence"],
)
def test_forward_packed_compiles_once_over_shapes(overrides: dict, shapes: tuple[list[int], ...]) -> None:
    torch._dynamo.reset()
    counters.clear()
    model = random_model(tame=False, **overrides).train()
    compiles = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.model.forward_packed, backend=compiles, fullgraph=True, dynamic=True)
    after_first = None
    for seed, lengths in enumerate(shapes):
        batch = packed_batch(lengths, seed, model.config.vocab_size)
        features, grads = loss_and_grads(compiled, model, *batch)
        after_first = compiles.frame_count if after_first is None else after_first
        eager_features, eager_grads = loss_and_grads(model.model.forward_packed, model, *batch)
        assert features.dtype == eager_features.dtype and features.shape == (sum(lengths), model.config.hidden_size)
        torch.testing.assert_close(features, eager_features, atol=2e-2, rtol=2e-2)
        assert len(grads) == len(eager_grads) > 0
        for grad, eager in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(grad, eager, atol=2e-2, rtol=5e-2)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiles.frame_count - after_first <= 1, f"{compiles.frame_count - after_first} recompiles"
