"""Static shape buckets and CUDA graphs for the denoiser passes of the samplers (docs/design.md §8).

A sampling step is one backbone pass and a handful of small kernels. In eager mode the pass costs ~17 ms on an H100
however short its input is (kernel launches and Python), so the shorter inputs of Elastic-MDM only pay once that
overhead is gone. `CUDAGraphDenoiser` replays every pass from a CUDA graph, captured once per *shape bucket*:

* bucket: the token count `T` and the longest sequence `n` are rounded up on a geometric grid (`bucket_size`):
  multiples of `max(granularity, 2^⌊log2 x⌋ / 8)`, so padding adds at most 12.5 % (plus `granularity`) and a
  trajectory that grows to 32k tokens visits about 60 token buckets;
* padding (`pad_to_bucket`): empty sequences bring the batch up to the largest one the denoiser has seen (the
  first pass of a sampler encodes every sequence; later passes only the changed ones), then `D = ⌈T_b / n_b⌉`
  dummy sequences of pad tokens, each at most `n_b` long and some possibly empty, fill the rows up to `T_b`.
  Attention never crosses sequences, so the real rows are unchanged; the dummy rows are dropped.

`StaticShapeDenoiser` does the padding alone (any device: it is how the padding is tested on CPU);
`CUDAGraphDenoiser` adds the capture and replay. Both wrap any denoiser of the samplers' protocol (the model, or the
benchmark's oracle) and leave its heads alone: the token and gap heads run eagerly on the few selected rows.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .packing import PackedSequences


def bucket_size(value: int, granularity: int = 64) -> int:
    """`value` rounded up to a multiple of `max(granularity, 2^⌊log2 value⌋ / 8)` (at least `granularity`)."""
    step = max(granularity, 2 ** max(value.bit_length() - 4, 0))
    return max(step, -(-value // step) * step)


@dataclass(frozen=True)
class ShapeBucket:
    """The static shape of a padded pass: `tokens` rows, `longest` sequence, `batch` sequences before the dummies
    (the real ones, then empty ones)."""

    tokens: int
    longest: int
    batch: int

    @classmethod
    def of(cls, packed: PackedSequences, num_tokens: int, granularity: int, batch: int = 0) -> ShapeBucket:
        """The bucket of a pass of `num_tokens` tokens, its batch padded up to `batch`."""
        longest = bucket_size(packed.max_seqlen, granularity)
        return cls(max(bucket_size(num_tokens, granularity), longest), longest, max(batch, packed.batch_size))

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
        self.batch = 0  # the largest batch seen: smaller ones are padded up to it with empty sequences

    def diffusion_features(
        self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor
    ) -> torch.Tensor:
        self.batch = max(self.batch, packed.batch_size)
        bucket = ShapeBucket.of(packed, input_ids.numel(), self.granularity, self.batch)
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


@dataclass
class CapturedPass:
    """One CUDA graph and its static buffers: inputs are copied in, the graph replayed, the output read."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    cu_seqlens: torch.Tensor
    level: torch.Tensor
    output: torch.Tensor


class CUDAGraphDenoiser(StaticShapeDenoiser):
    """`StaticShapeDenoiser` whose passes replay CUDA graphs, one per bucket, captured the first time a bucket is met
    (after `warmup` eager runs on a side stream, as `torch.cuda.graphs` requires).

    * All graphs share one memory pool (they never run concurrently; each keeps its own output buffer), so the
      memory is about that of the largest pass.
    * The output buffer is overwritten by the next replay of the same graph: `diffusion_features` returns a copy.
    * Autocast: the capture runs under the caller's autocast dtype with the cast cache off (a cached cast would live
      outside the graph); the key includes the autocast state, so fp32 and bf16 passes get their own graphs.
    * The weights are baked in by address: call `reset()` after replacing parameters (in-place updates are fine).
    * Inference only: captured under `torch.no_grad()`.
    """

    def __init__(self, inner, pad_token_id: int, granularity: int = 64, warmup: int = 2):
        super().__init__(inner, pad_token_id, granularity)
        self.warmup = warmup
        self.graphs: dict[tuple, CapturedPass] = {}
        self.pool = None

    def reset(self) -> None:
        """Drop every captured graph (and, with the last reference, their memory)."""
        self.graphs.clear()
        self.pool = None

    def run(
        self, bucket: ShapeBucket, ids: torch.Tensor, cu_seqlens: torch.Tensor, level: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        if not ids.is_cuda:
            raise ValueError(
                f"CUDA graphs need the model and its inputs on a CUDA device (got {ids.device}); "
                "use StaticShapeDenoiser, or plain eager passes, elsewhere."
            )
        key = (bucket, *autocast_state())
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self.capture(bucket, ids, cu_seqlens, level)
        captured.ids.copy_(ids)
        captured.cu_seqlens.copy_(cu_seqlens)
        captured.level.copy_(level)
        captured.graph.replay()
        return captured.output[:num_tokens].clone()

    def capture(
        self, bucket: ShapeBucket, ids: torch.Tensor, cu_seqlens: torch.Tensor, level: torch.Tensor
    ) -> CapturedPass:
        """Warm up on a side stream, then capture one pass of `bucket` reading static copies of the inputs."""
        static = [ids.clone(), cu_seqlens.clone(), level.clone()]
        enabled, dtype = autocast_state()
        cast = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if enabled else nullcontext()

        def forward() -> torch.Tensor:
            return self.padded_pass(bucket, *static)

        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.no_grad(), cast, torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream(ids.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), cast, torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return CapturedPass(graph, *static, output)


def autocast_state() -> tuple[bool, torch.dtype]:
    """Whether CUDA autocast is on, and its dtype."""
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


__all__ = ["CUDAGraphDenoiser", "ShapeBucket", "StaticShapeDenoiser", "bucket_size", "pad_to_bucket"]
