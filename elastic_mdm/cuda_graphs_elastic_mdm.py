"""Static shape buckets and CUDA graphs for the denoiser passes of the samplers (docs/design.md §8).

A sampling step is one backbone pass and a handful of small kernels. In eager mode the pass costs ~17 ms on an H100
however short its input is (kernel launches and Python), so the shorter inputs of Elastic-MDM only pay once that
overhead is gone. `CUDAGraphDenoiser` replays every pass from a CUDA graph, captured once per *shape bucket*:

* bucket: the token count `T` and the longest sequence `n` are rounded up on a geometric grid (`bucket_size`):
  multiples of `max(granularity, 2^⌊log2 x⌋ / 8)`, so padding adds at most 12.5 % (plus `granularity`) and a
  trajectory that grows to 32k tokens visits about 60 token buckets;
* batch bucket (`batch_bucket`): the sequence count `B` rounded up to a power of two (the first pass of a sampler
  encodes every sequence; later passes only the changed ones, so `B` varies from pass to pass and call to call);
* padding (`pad_to_bucket`): `B_b - B` empty sequences, then `D = ⌈T_b / n_b⌉` dummy sequences of pad tokens, each
  at most `n_b` long and some possibly empty, fill the rows up to `T_b`. Attention never crosses sequences, so the
  real rows are unchanged; the dummy rows are dropped.

`StaticShapeDenoiser` does the padding alone (any device: it is how the padding is tested on CPU);
`CUDAGraphDenoiser` adds the capture and replay, through the CUDA calls of `GRAPH_CALLS` (on a CPU the tests put a
recording fake there). Both wrap any denoiser of the samplers' protocol (the model, or the
benchmark's oracle) and leave its heads alone: the token and gap heads run eagerly on the few selected rows.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .packing_elastic_mdm import PackedSequences


def bucket_size(value: int, granularity: int = 64) -> int:
    """`value` rounded up to a multiple of `max(granularity, 2^⌊log2 value⌋ / 8)` (at least `granularity`)."""
    step = max(granularity, 2 ** max(value.bit_length() - 4, 0))
    return max(step, -(-value // step) * step)


def batch_bucket(batch: int) -> int:
    """`batch` rounded up to a power of two: `2^⌈log2 batch⌉` (1 for 0 or 1)."""
    return 1 << max(batch - 1, 0).bit_length()


@dataclass(frozen=True)
class ShapeBucket:
    """The static shape of a padded pass: `tokens` rows, `longest` sequence, `batch` sequences before the dummies
    (the real ones, then empty ones; a power of two)."""

    tokens: int
    longest: int
    batch: int

    @classmethod
    def of(cls, packed: PackedSequences, num_tokens: int, granularity: int) -> ShapeBucket:
        """The bucket of a pass of `num_tokens` tokens: geometric token and longest-sequence buckets, the batch
        rounded up to a power of two."""
        longest = bucket_size(packed.max_seqlen, granularity)
        return cls(max(bucket_size(num_tokens, granularity), longest), longest, batch_bucket(packed.batch_size))

    @property
    def dummies(self) -> int:
        """Dummy sequences that hold the padding: each is at most `longest` tokens."""
        return math.ceil(self.tokens / self.longest)


def pad_to_bucket(
    input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor, bucket: ShapeBucket, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ids [T_b], cu_seqlens [B_b + D + 1], noise_level [B_b + D])`: the real stream first, `B_b - B` empty
    sequences, then `D` dummy sequences of `pad_token_id` that fill it up to `T_b` rows, none longer than `n_b`.
    Built from host integers and device tensors only (no read-back)."""
    tokens = input_ids.numel()
    extra = bucket.tokens - tokens
    ids = torch.cat([input_ids, input_ids.new_full((extra,), pad_token_id)])  # [T_b]
    ends = torch.arange(1, bucket.dummies + 1, device=input_ids.device, dtype=torch.int32) * bucket.longest
    empty = bucket.batch - packed.batch_size
    cu_seqlens = torch.cat(
        [packed.cu_seqlens, packed.cu_seqlens.new_full((empty,), tokens), ends.clamp_max(extra) + tokens]
    )  # [B_b + D + 1]
    level = torch.cat([noise_level, noise_level.new_ones(empty + bucket.dummies)])  # [B_b + D]
    return ids, cu_seqlens, level


class StaticShapeDenoiser:
    """Runs `inner.diffusion_features` on inputs padded to their shape bucket and returns the real rows: the same
    features (up to the round-off of a different matmul shape), on a handful of static shapes."""

    def __init__(self, inner, pad_token_id: int, granularity: int = 64):
        self.inner, self.pad_token_id, self.granularity = inner, pad_token_id, granularity

    def diffusion_features(
        self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor
    ) -> torch.Tensor:
        bucket = ShapeBucket.of(packed, input_ids.numel(), self.granularity)
        padded = pad_to_bucket(input_ids, packed, noise_level, bucket, self.pad_token_id)
        return self.run(bucket, *padded, num_tokens=input_ids.numel())

    def run(
        self, bucket: ShapeBucket, ids: torch.Tensor, cu_seqlens: torch.Tensor, level: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """The features `[num_tokens, ...]` of the real rows of one padded pass."""
        return self.padded_pass(bucket, ids, cu_seqlens, level)[:num_tokens]

    def padded_pass(
        self, bucket: ShapeBucket, ids: torch.Tensor, cu_seqlens: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor:
        """`inner`'s features of every row of a padded pass `[T_b, ...]`."""
        packed = PackedSequences.from_cu_seqlens(cu_seqlens, bucket.longest, bucket.tokens)
        return self.inner.diffusion_features(ids, packed, level)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.token_logits(hidden)

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor:
        return self.inner.gap_logits(hidden, left, noise_level)


class CUDAGraphCalls:
    """The CUDA calls of a capture and a replay, in one place: `CUDAGraphDenoiser` makes them through `GRAPH_CALLS`
    only, so that a test can stand in a recording fake on a CPU (tests/test_fake_cuda_graphs.py)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def device(self, device: torch.device) -> AbstractContextManager:
        """Make `device` the current CUDA device (capture streams, pools and replays belong to it)."""
        return torch.cuda.device(device)

    def warm_up(self, forward: Callable[[], torch.Tensor], device: torch.device, runs: int) -> None:
        """`runs` eager calls on a side stream, as `torch.cuda.graphs` requires before a capture."""
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(runs):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)

    def pool(self, device: torch.device) -> Any:
        """A memory pool for the graphs of `device` (the current device)."""
        return torch.cuda.graph_pool_handle()

    def capture(self, forward: Callable[[], torch.Tensor], pool: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
        """`(graph, output)`: `forward` captured on a side stream of `device` into a new graph that allocates from
        `pool`; `graph.replay()` reruns its kernels on the same buffers and rewrites `output`. The stream is given:
        `torch.cuda.graph`'s default one is made once, on whichever device was current the first time."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device=device)):
            output = forward()
        return graph, output


GRAPH_CALLS = CUDAGraphCalls()


@dataclass
class CapturedPass:
    """One graph and its static buffers: inputs are copied in, the graph replayed, the output read."""

    graph: Any  # torch.cuda.CUDAGraph
    ids: torch.Tensor
    cu_seqlens: torch.Tensor
    level: torch.Tensor
    output: torch.Tensor


class CUDAGraphDenoiser(StaticShapeDenoiser):
    """`StaticShapeDenoiser` whose passes replay CUDA graphs, one per bucket, captured the first time a bucket is met
    (after `warmup` eager runs on a side stream, as `torch.cuda.graphs` requires).

    * Bounded: at most `max_graphs` graphs, the least recently replayed dropped first (LRU). A sampler run visits
      about one bucket per token bucket and batch bucket it passes through (~100 for batch 32 at L = 1024).
    * All graphs of a device share one memory pool (they never run concurrently), so the memory is about that of
      the largest pass plus the outputs of the kept graphs. A graph's output may sit where a graph captured before
      it keeps its temporaries, so it is copied out right after its replay, before any other graph runs.
    * Device: capture, copies and replay run under `torch.cuda.device(inputs.device)`; the key holds the device, so a
      model on `cuda:1` gets graphs, streams and a pool of `cuda:1`.
    * Mode: static buffers, capture, input copies and replay all run under `torch.inference_mode()` whatever the
      caller's mode; `diffusion_features` returns a copy of the output made in the caller's mode (the output buffer
      is overwritten by the next replay of the same graph).
    * Autocast: the capture runs under the caller's autocast dtype with the cast cache off (a cached cast would live
      outside the graph); the key includes the autocast state, so fp32 and bf16 passes get their own graphs. Over
      weights of another dtype (fp32 master weights under bf16 autocast) every replay re-casts every weight: cast
      the model once instead (`model.to(torch.bfloat16)`), as a warning at the first such capture says.
    * The weights are baked in by address: call `reset()` after replacing parameters (in-place updates are fine).
    * Inference only.
    """

    def __init__(self, inner, pad_token_id: int, granularity: int = 64, warmup: int = 2, max_graphs: int = 256):
        super().__init__(inner, pad_token_id, granularity)
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs}: keep at least one graph (max_graphs >= 1).")
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: OrderedDict[tuple, CapturedPass] = OrderedDict()  # least recently replayed first
        self.pools: dict[torch.device, Any] = {}
        self.calls = GRAPH_CALLS
        self.warned_cast = False

    def reset(self) -> None:
        """Drop every captured graph (and, with the last reference, their memory)."""
        self.graphs.clear()
        self.pools.clear()

    def run(
        self, bucket: ShapeBucket, ids: torch.Tensor, cu_seqlens: torch.Tensor, level: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        device = ids.device
        if not self.calls.supports(device):
            raise ValueError(
                f"CUDA graphs need the model and its inputs on a CUDA device (got {device}); "
                "use StaticShapeDenoiser, or plain eager passes, elsewhere."
            )
        key = (bucket, device, *autocast_state(device.type))
        with self.calls.device(device), torch.inference_mode():
            captured = self.graphs.get(key)
            if captured is None:
                captured = self.graphs[key] = self.capture(bucket, ids, cu_seqlens, level)
            self.graphs.move_to_end(key)
            while len(self.graphs) > self.max_graphs:  # the least recently replayed go first
                self.graphs.popitem(last=False)
            captured.ids.copy_(ids)
            captured.cu_seqlens.copy_(cu_seqlens)
            captured.level.copy_(level)
            captured.graph.replay()
            output = captured.output[:num_tokens]
        return output.clone()

    def capture(
        self, bucket: ShapeBucket, ids: torch.Tensor, cu_seqlens: torch.Tensor, level: torch.Tensor
    ) -> CapturedPass:
        """Warm up, then capture one pass of `bucket` reading static copies of the inputs (called under the device
        and `inference_mode` of `run`)."""
        static = [ids.clone(), cu_seqlens.clone(), level.clone()]
        device = ids.device
        enabled, dtype = autocast_state(device.type)
        cast = torch.autocast(device.type, dtype=dtype, cache_enabled=False) if enabled else nullcontext()
        if enabled:
            self.warn_weight_casts(dtype)

        def forward() -> torch.Tensor:
            with cast:
                return self.padded_pass(bucket, *static)

        self.calls.warm_up(forward, device, self.warmup)
        if device not in self.pools:
            self.pools[device] = self.calls.pool(device)
        graph, output = self.calls.capture(forward, self.pools[device], device)
        return CapturedPass(graph, *static, output)

    def warn_weight_casts(self, dtype: torch.dtype) -> None:
        """Warn once when autocast to `dtype` runs over floating weights of another dtype (re-cast at every replay)."""
        module = self.inner if isinstance(self.inner, torch.nn.Module) else getattr(self.inner, "model", None)
        if self.warned_cast or not isinstance(module, torch.nn.Module):
            return
        others = {p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype != dtype}
        if others:
            self.warned_cast = True
            warnings.warn(
                f"CUDA graphs captured under {dtype} autocast over {sorted(map(str, others))} weights re-cast every "
                f"weight at every replay (no cast cache inside a graph); cast the model once instead, e.g. "
                f"model.to({dtype}).",
                stacklevel=5,
            )


def model_graph_denoiser(model: torch.nn.Module, pad_token_id: int) -> CUDAGraphDenoiser:
    """The graph denoiser `generate(cuda_graphs=True)` keeps on `model` across calls (bounded, see
    `CUDAGraphDenoiser`); rebuilt when the weights moved (dtype or device change) or the pad id changed."""
    if not GRAPH_CALLS.supports(model.device):
        raise ValueError(
            f"cuda_graphs=True needs the model on a CUDA device (it is on {model.device}); move it with "
            "model.to('cuda') or drop cuda_graphs."
        )
    weights = next(model.parameters())
    key = (weights.data_ptr(), weights.dtype, weights.device, pad_token_id)
    cached = getattr(model, "_cuda_graphs", None)
    if cached is None or cached[0] != key:
        cached = model._cuda_graphs = (key, CUDAGraphDenoiser(model, pad_token_id))
    return cached[1]


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for `device_type`, and its dtype (off where autocast does not exist, e.g. `meta`)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


__all__ = [
    "GRAPH_CALLS",
    "CUDAGraphCalls",
    "CUDAGraphDenoiser",
    "ShapeBucket",
    "StaticShapeDenoiser",
    "batch_bucket",
    "bucket_size",
    "model_graph_denoiser",
    "pad_to_bucket",
]
