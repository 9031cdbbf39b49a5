"""`CUDAGraphDenoiser` on a CPU through a fake CUDA graph (docs/design.md §8): the graph logic (static buffers, input
copies, output reads, the bounded cache, device and inference-mode handling, autocast) is checked where no GPU is.

`FakeGraphCalls` stands in for the CUDA calls of `cuda_graphs.GRAPH_CALLS`. Its capture records every aten op the
pass runs (a `TorchDispatchMode`) and its replay re-runs exactly those ops on the same tensors: functional ops write
their result into the tensor they returned at capture, in-place ops write their arguments again, views keep aliasing.
Like a real graph it replays what was captured, not the Python that captured it: a pass whose inputs were not copied
into the static buffers replays on stale inputs, an output read from any other tensor than the captured output is
stale, and a host read inside the capture raises (CUDA forbids syncs while capturing).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from helpers import MASK, HostSyncRecorder, random_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from elastic_mdm import cuda_graphs_elastic_mdm as cuda_graphs
from elastic_mdm.attention_elastic_mdm import without_autocast
from elastic_mdm.cuda_graphs_elastic_mdm import CUDAGraphCalls, CUDAGraphDenoiser, StaticShapeDenoiser
from elastic_mdm.packing_elastic_mdm import PackedSequences

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OpTape(TorchDispatchMode):
    """Records `(op, args, kwargs, output)` of every aten op; a host read raises, as it would while capturing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if HostSyncRecorder.reads_back(func, args, kwargs):
            raise RuntimeError(f"{func} reads the device back inside a graph capture (not permitted on CUDA)")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out, replay_kind(func, args, kwargs, out)))
        return out


def replay_kind(func, args, kwargs, out) -> str:
    """`"rerun"` (in-place / out=: writes its arguments), `"view"` (its output shares an input's memory: nothing to
    redo) or `"copy"` (a new tensor: recomputed into the captured one). Decided on the captured tensors, since ops
    such as `to` alias only when nothing is converted."""
    if func._schema.is_mutable:
        return "rerun"
    inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if outputs and all(t.untyped_storage().data_ptr() in inputs for t in outputs):
        return "view"
    return "copy"


class FakeGraph:
    """A captured op tape that `replay()` re-runs on the captured tensors."""

    def __init__(self, calls: FakeGraphCalls, device: torch.device, ops: list[tuple]) -> None:
        self.calls, self.device, self.ops = calls, device, ops

    def replay(self) -> None:
        assert self.calls.current == self.device, f"replay on {self.calls.current}, captured on {self.device}"
        self.calls.replays += 1
        with without_autocast(self.device):  # the tape holds the casts autocast made at capture
            for func, args, kwargs, out, kind in self.ops:
                if kind == "rerun":
                    func(*args, **kwargs)
                elif kind == "copy":
                    fresh = func(*args, **kwargs)
                    for old, new in zip(tree_leaves(out), tree_leaves(fresh), strict=True):
                        if isinstance(old, torch.Tensor):
                            old.copy_(new)

    def weight_casts(self, weights: set[int]) -> int:
        """Ops of one replay that copy one of the weight matrices `weights` (data pointers): what autocast re-casts
        at every replay."""
        return sum(
            func.overloadpacket.__name__ in ("to", "_to_copy") and kind == "copy" and args[0].data_ptr() in weights
            for func, args, _, _, kind in self.ops
        )


class FakeGraphCalls(CUDAGraphCalls):
    """`GRAPH_CALLS` for any device: captures record an `OpTape`, the device guard is tracked (capture and replay
    must run under the guard of the inputs' device)."""

    def __init__(self) -> None:
        self.current: torch.device | None = None
        self.captures = self.replays = 0
        self.graphs: list[FakeGraph] = []

    def supports(self, device: torch.device) -> bool:
        return True

    @contextmanager
    def device(self, device: torch.device):
        outer, self.current = self.current, device
        try:
            yield
        finally:
            self.current = outer

    def warm_up(self, forward, device: torch.device, runs: int) -> None:
        for _ in range(runs):
            forward()

    def pool(self, device: torch.device) -> object:
        return object()

    def capture(self, forward, pool, device: torch.device) -> tuple[FakeGraph, torch.Tensor]:
        assert self.current == device, f"captured on {device} under the device guard of {self.current}"
        tape = OpTape()
        with tape:
            output = forward()
        self.captures += 1
        graph = FakeGraph(self, self.current, tape.ops)
        self.graphs.append(graph)
        return graph, output


@pytest.fixture
def fake_graphs(monkeypatch) -> FakeGraphCalls:
    calls = FakeGraphCalls()
    monkeypatch.setattr(cuda_graphs, "GRAPH_CALLS", calls)
    return calls


def graphed(model, calls: FakeGraphCalls, **kwargs) -> CUDAGraphDenoiser:
    denoiser = CUDAGraphDenoiser(model, model.config.pad_token_id, granularity=16, **kwargs)
    assert denoiser.calls is calls
    return denoiser


def test_the_fake_graph_replays_what_it_captured(fake_graphs) -> None:
    """The stand-in itself: a replay recomputes the captured ops from the static input's current values into the
    captured output, and nothing the Python of the capture did afterwards (a missed input copy shows)."""
    static = torch.arange(4.0)
    with fake_graphs.device(static.device):
        graph, output = fake_graphs.capture(
            lambda: (static * 2).add_(1).exp().sum(0, keepdim=True), None, static.device
        )
        static.copy_(torch.ones(4))
        graph.replay()
    torch.testing.assert_close(output, (torch.ones(4) * 2 + 1).exp().sum(0, keepdim=True))
    with pytest.raises(RuntimeError, match="inside a graph capture"), fake_graphs.device(static.device):
        fake_graphs.capture(lambda: static[static > 0], None, static.device)


def features_pair(model, calls, lengths: list[int], seed: int):
    """`(graphed, eager)` features of one random packed pass with noise levels in (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(4, model.config.vocab_size, (int(lengths.sum()),), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < 0.3] = MASK
    packed = PackedSequences.from_lengths(lengths)
    level = torch.rand(lengths.shape, generator=generator)
    eager = StaticShapeDenoiser(model, model.config.pad_token_id, 16).diffusion_features(ids, packed, level)
    return ids, packed, level, eager


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_replayed_passes_equal_eager_ones(fake_graphs, time_conditioning: bool) -> None:
    """Every pass of a bucket after its capture is a replay, and it gives the eager padded features of ITS inputs
    (bitwise: the same ops), empty sequences included; the returned features are a copy (the next replay does not
    change them)."""
    model = random_model(time_conditioning=time_conditioning)
    denoiser = graphed(model, fake_graphs)
    results = []
    with torch.no_grad():
        for seed, lengths in enumerate([[5, 9, 0, 2], [7, 3, 4, 1], [1, 0, 12, 3], [16], [2, 5]]):
            ids, packed, level, eager = features_pair(model, fake_graphs, lengths, seed)
            features = denoiser.diffusion_features(ids, packed, level)
            assert torch.equal(features, eager), lengths
            results.append((features, features.clone()))
    assert fake_graphs.captures == len(denoiser.graphs) == 3 and fake_graphs.replays == 5
    assert all(torch.equal(kept, copy) for kept, copy in results)


def test_buffers_and_writes_share_one_inference_mode(fake_graphs) -> None:
    """A first call under `torch.inference_mode()` (static buffers made there), then one outside it under
    `no_grad` (as `generate` runs): the copies into the buffers must not raise, and both equal eager."""
    model = random_model()
    denoiser = graphed(model, fake_graphs)
    ids, packed, level, eager = features_pair(model, fake_graphs, [5, 9, 2], 0)
    with torch.inference_mode():
        first = denoiser.diffusion_features(ids, packed, level)
    with torch.no_grad():
        second = denoiser.diffusion_features(ids, packed, level)
    assert torch.equal(first, eager) and torch.equal(second, eager) and not second.is_inference()
    assert fake_graphs.replays == 2 and fake_graphs.captures == 1


def test_autocast_over_fp32_weights_warns_and_bf16_weights_cast_nothing(fake_graphs) -> None:
    """Under bf16 autocast a graph over fp32 weights re-casts every weight matrix at every replay (the capture has no
    cast cache): the denoiser says so once. With the weights cast once (`model.to(bfloat16)`) a replay copies no
    weight. fp32 and bf16 passes of one bucket get their own graphs."""
    model = random_model()
    ids, packed, level, _ = features_pair(model, fake_graphs, [5, 9, 2], 0)
    denoiser = graphed(model, fake_graphs)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"re-cast every weight at every replay.*model.to"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            denoiser.diffusion_features(ids, packed, level)
            denoiser.diffusion_features(ids, packed, level)
        denoiser.diffusion_features(ids, packed, level)
    matrices = {p.data_ptr() for p in model.parameters() if p.dim() == 2}  # norms upcast their vectors on purpose
    assert len(denoiser.graphs) == 2 and fake_graphs.graphs[0].weight_casts(matrices) >= 4 * len(model.model.layers)
    model = random_model().to(torch.bfloat16)
    denoiser = graphed(model, fake_graphs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _no_warning():
        denoiser.diffusion_features(ids, packed, level)
    matrices = {p.data_ptr() for p in model.parameters() if p.dim() == 2}
    assert fake_graphs.graphs[-1].weight_casts(matrices) == 0


@contextmanager
def _no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


SAMPLERS = {  # the generate() settings of the three samplers
    "elastic": dict(objective="elastic", lock_length=False),
    "elastic-locked": dict(objective="elastic", lock_length=True),
    "mdlm": dict(objective="mdlm", lock_length=False),
}


@pytest.mark.parametrize("time_conditioning", [False, True])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_through_fake_graphs_equal_eager(fake_graphs, sampler: str, time_conditioning: bool) -> None:
    """`generate(cuda_graphs=True)` (the model's own graph cache) draws the samples eager passes draw, for the
    paper's Elastic sampler, the length-locked one and MDLM, on a model whose every block mixes its sequence; most
    passes are replays."""
    settings = SAMPLERS[sampler]
    model = random_model(time_conditioning=time_conditioning, objective=settings["objective"])
    kwargs = dict(
        num_return_sequences=3, num_steps=10, seed=4, max_length=40, return_dict_in_generate=True,
        lock_length=settings["lock_length"],
    )  # fmt: skip
    plain, graphs = model.generate(**kwargs), model.generate(cuda_graphs=True, **kwargs)
    assert torch.equal(plain.sequences, graphs.sequences) and torch.equal(plain.lengths, graphs.lengths)
    assert plain.tokens_processed == graphs.tokens_processed and (plain.lengths > 2).any()
    assert fake_graphs.replays == graphs.num_passes >= 5 and fake_graphs.captures < fake_graphs.replays


def test_graph_count_stays_bounded_over_calls(fake_graphs) -> None:
    """Repeated generate calls of different batch sizes reuse the model's graphs (power-of-two batch buckets: a
    second round of the same sizes captures nothing), never keep more than `max_graphs`, and still sample what eager
    passes sample once the least recently used graphs are being evicted."""
    model = random_model()
    kwargs = dict(num_steps=6, max_length=32, return_dict_in_generate=True)
    for batch in (1, 5, 2, 8, 3):
        model.generate(num_return_sequences=batch, seed=batch, cuda_graphs=True, **kwargs)
    denoiser = model._cuda_graph_denoiser(model.config.pad_token_id)
    first_round = fake_graphs.captures
    assert len(denoiser.graphs) == first_round <= denoiser.max_graphs
    for batch in (3, 8, 2, 5, 1):
        model.generate(num_return_sequences=batch, seed=batch, cuda_graphs=True, **kwargs)
    assert fake_graphs.captures == first_round  # every bucket of the second round was already there
    denoiser.max_graphs = 2
    for batch in (6, 1, 4):
        plain = model.generate(num_return_sequences=batch, seed=batch, **kwargs)
        graphs = model.generate(num_return_sequences=batch, seed=batch, cuda_graphs=True, **kwargs)
        assert len(denoiser.graphs) <= 2 and torch.equal(plain.sequences, graphs.sequences)
    assert fake_graphs.captures > first_round


def test_capture_and_replay_run_under_the_inputs_device(fake_graphs) -> None:
    """Every capture and replay happens under the device guard of its inputs (a model on `cuda:1`), and graphs are
    keyed by device."""
    model = random_model()
    ids, packed, level, _ = features_pair(model, fake_graphs, [5, 9, 2], 0)
    denoiser = graphed(model, fake_graphs)
    with torch.no_grad():
        denoiser.diffusion_features(ids, packed, level)
        denoiser.diffusion_features(ids, packed, level)
    assert fake_graphs.replays == 2 and fake_graphs.current is None
    assert {key[1] for key in denoiser.graphs} == {ids.device} and set(denoiser.pools) == {ids.device}
