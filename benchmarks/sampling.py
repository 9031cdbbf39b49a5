"""Sampling benchmark: the three samplers on one backbone, one batch, one horizon K and one schedule.

* `Elastic-MDM`: `sample_elastic` (active tokens only, step cache on);
* `MDLM (cached)`: `sample_mdlm` on a canvas of L tokens, re-encoding a sequence only when a position of it is
  revealed (MDLM's `ddpm_cache`);
* `MDLM (no cache)`: `sample_mdlm` with one full pass per step (K · B · L tokens).

Two modes. `checkpoint`: a trained model (its gap head sets the lengths). `oracle`: a random-weight model driven by
`oracle.OracleDenoiser` (exact forward-process lengths).

Timing: each configuration first runs once, untimed, through a `counting.CountingDenoiser` (passes, active lengths,
FLOPs), then `warmup` untimed times, then `repeats` timed times, always with the same seed (hence the same
trajectory); medians are reported. The oracle's own work (a cummax and two one-hot scatters per pass) is included in
the Elastic time; it is small next to a backbone pass.

Overhead (docs/design.md §8): in eager mode a pass costs ~17 ms on an H100 however short its input is, so the Elastic
savings only show once the per-step overhead is gone. Both samplers read the device once per step; on top of that,
`static_shape_wrapper` pads every pass to a shape bucket (`cuda_graphs.StaticShapeDenoiser`) or replays it from a
CUDA graph captured per bucket (`cuda_graphs_elastic_mdm.CUDAGraphDenoiser`), for Elastic-MDM and MDLM alike, and
`oracle.compile_backbone` runs `torch.compile` on the backbone.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessorList

from elastic_mdm.cuda_graphs_elastic_mdm import CUDAGraphDenoiser, StaticShapeDenoiser
from elastic_mdm.modeling_elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.sampler_elastic_mdm import sample_elastic
from elastic_mdm.sampler_loop_elastic_mdm import ElasticMDMGenerateOutput, SamplerOptions, tokens_per_forward
from elastic_mdm.sampler_mdlm_elastic_mdm import sample_mdlm
from elastic_mdm.sampling_state_elastic_mdm import ActiveState
from elastic_mdm.schedules_elastic_mdm import RevealSchedule

from .counting import CountingDenoiser, FlopModel, OpCounter, PassLog
from .oracle import OracleDenoiser
from .timing import H100_BF16_DENSE_TFLOPS, autocast, efficiency, time_calls


def static_shape_wrapper(pad_token_id: int, granularity: int = 64, cuda_graphs: bool = False) -> Callable[[Any], Any]:
    """A `SamplingSetup.run` `wrap` that pads every pass to its shape bucket (`StaticShapeDenoiser`) or replays it
    from a CUDA graph (`CUDAGraphDenoiser`). One wrapper per denoiser, kept across runs: the warm-up runs capture
    the graphs, the timed runs replay them."""
    kind = CUDAGraphDenoiser if cuda_graphs else StaticShapeDenoiser
    wrappers: dict[int, tuple[Any, Any]] = {}  # id(inner) -> (inner, wrapper); inner kept alive so ids stay unique

    def wrap(inner):
        if id(inner) not in wrappers:
            wrappers[id(inner)] = (inner, kind(inner, pad_token_id, granularity))
        return wrappers[id(inner)][1]

    return wrap


@dataclass(frozen=True)
class Variant:
    """A timed sampler: its table name, `sample_elastic` or `sample_mdlm`, and whether its step cache is on."""

    name: str
    sampler: str  # "elastic" | "mdlm"
    use_cache: bool


VARIANTS = (
    Variant("Elastic-MDM", "elastic", True),
    Variant("MDLM (cached)", "mdlm", True),
    Variant("MDLM (no cache)", "mdlm", False),
)


def start_state(first: torch.Tensor, last: torch.Tensor) -> ActiveState:
    """`[first_b, last_b]` per sequence with the gap between them open (unconditional generation)."""
    batch = first.numel()
    return ActiveState(
        tokens=torch.stack([first, last], dim=1).flatten(),
        sequence_ids=torch.arange(batch, device=first.device).repeat_interleave(2),
        open_after=torch.tensor([True, False], device=first.device).repeat(batch),
        lengths=torch.full((batch,), 2, dtype=torch.long, device=first.device),
    )


@dataclass
class SamplingSetup:
    """One sampling configuration: the denoiser of each sampler, their start states, and the loop settings."""

    model: ElasticMDMForDiffusionLM  # MDLM runs on it (same backbone)
    elastic: Any  # the denoiser of the Elastic sampler (the model, or an OracleDenoiser around it)
    elastic_state: ActiveState
    mdlm_state: ActiveState
    length: int
    num_steps: int
    schedule: RevealSchedule
    seed: int = 0
    autocast_dtype: torch.dtype | None = None
    mdlm_model: ElasticMDMForDiffusionLM | None = None

    def run(self, variant: Variant, wrap: Callable[[Any], Any] = lambda d: d) -> ElasticMDMGenerateOutput:
        """One sampling run of `variant` (its denoiser wrapped by `wrap`), seeded."""
        device = self.model.device
        mdlm = self.mdlm_model or self.model
        config = (self.model if variant.sampler == "elastic" else mdlm).config
        options = SamplerOptions(
            mask_token_id=config.mask_token_id,
            num_steps=self.num_steps,
            schedule=self.schedule,
            token_processors=LogitsProcessorList(),
            max_length=self.length,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
            use_cache=variant.use_cache,
            generator=torch.Generator(device=device).manual_seed(self.seed),
        )
        with torch.no_grad(), autocast(device, self.autocast_dtype):
            if variant.sampler == "elastic":
                return sample_elastic(wrap(self.elastic), clone(self.elastic_state), options)
            return sample_mdlm(wrap(mdlm), clone(self.mdlm_state), options, eos_token_id=config.eos_token_id)


def clone(state: ActiveState) -> ActiveState:
    """A copy of `state` (the samplers change their state in place; every run starts from the same one)."""
    return ActiveState(*(t.clone() for t in (state.tokens, state.sequence_ids, state.open_after, state.lengths)))


def oracle_setup(
    model: ElasticMDMForDiffusionLM,
    lengths: torch.Tensor,
    *,
    num_steps: int,
    schedule: RevealSchedule,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> SamplingSetup:
    """Oracle mode: the Elastic sampler starts from `BOS = 0, EOS = n + 1` (positions) of the given interior counts
    `lengths` `[batch]`; MDLM from the model's `BOS EOS` on a canvas of `max_position_embeddings` tokens."""
    config, device = model.config, model.device
    lengths = lengths.to(device)
    length = config.max_position_embeddings
    ones = torch.ones_like(lengths)
    return SamplingSetup(
        model=model,
        elastic=OracleDenoiser(model),
        elastic_state=start_state(torch.zeros_like(lengths), lengths + 1),
        mdlm_state=start_state(ones * config.bos_token_id, ones * config.eos_token_id),
        length=length,
        num_steps=num_steps,
        schedule=schedule,
        seed=seed,
        autocast_dtype=autocast_dtype,
    )


def checkpoint_setup(
    model: ElasticMDMForDiffusionLM,
    batch_size: int,
    length: int,
    *,
    num_steps: int,
    schedule: RevealSchedule,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    mdlm_model: ElasticMDMForDiffusionLM | None = None,
) -> SamplingSetup:
    """Checkpoint mode: both samplers start from the model's `BOS EOS`; lengths come from its gap head (capped at
    `length`, the MDLM canvas)."""
    config = model.config
    ones = torch.ones(batch_size, dtype=torch.long, device=model.device)
    state = start_state(ones * config.bos_token_id, ones * config.eos_token_id)
    return SamplingSetup(
        model=model,
        elastic=model,
        elastic_state=state,
        mdlm_state=state,
        length=length,
        num_steps=num_steps,
        schedule=schedule,
        seed=seed,
        autocast_dtype=autocast_dtype,
        mdlm_model=mdlm_model,
    )


def benchmark_sampling(
    setup: SamplingSetup,
    *,
    warmup: int = 1,
    repeats: int = 3,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    variants: Sequence[Variant] = VARIANTS,
    wrap: Callable[[Any], Any] = lambda d: d,
) -> list[dict[str, Any]]:
    """One row per variant: median seconds per batch, ms per sequence, sequences/s, generated tokens/s, passes,
    tokens per forward pass (`sampler_loop_elastic_mdm.tokens_per_forward`), tokens encoded per sequence, mean active
    length per pass, GFLOP per sequence, tensor ops per step outside the denoiser passes (`OpCounter`), TFLOP/s and
    MFU."""
    flops = FlopModel.of(setup.model)
    batch = setup.elastic_state.lengths.numel()
    rows = []
    for variant in variants:
        counted, log = counted_run(setup, variant, wrap)
        seconds = statistics.median(
            time_calls(functools.partial(setup.run, variant, wrap), setup.model.device, warmup, repeats)
        )
        work = flops.run(log)
        start = setup.elastic_state if variant.sampler == "elastic" else setup.mdlm_state
        rows.append(
            {
                "variant": variant.name,
                "median_s": seconds,
                "ms_per_sequence": 1e3 * seconds / batch,
                "sequences_per_s": batch / seconds,
                "generated_tokens_per_s": float(counted.lengths.sum()) / seconds,
                "mean_length": float(counted.lengths.double().mean()),
                "passes": counted.num_passes,
                "tokens_per_forward": tokens_per_forward(counted, start.lengths),
                "tokens_encoded_per_sequence": counted.tokens_processed / batch,
                "mean_active_length": counted.tokens_processed / max(sum(len(p) for p in log.lengths), 1),
                "gflop_per_sequence": work / batch / 1e9,
                "ops_per_step": log.ops_outside_passes / setup.num_steps,
                **efficiency(work, seconds, peak_tflops),
            }
        )
    return rows


def counted_run(
    setup: SamplingSetup, variant: Variant, wrap: Callable[[Any], Any] = lambda d: d
) -> tuple[ElasticMDMGenerateOutput, PassLog]:
    """One run of `variant` through a `CountingDenoiser`, its ops outside the passes counted: its output and its
    pass log."""
    counter = CountingDenoiser()
    with OpCounter() as ops:
        output = setup.run(variant, lambda denoiser: counter.around(wrap(denoiser)))
    counter.log.ops_outside_passes = ops.ops
    return output, counter.log


def sampling_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Time and tokens-encoded ratios of Elastic-MDM to each MDLM variant (below 1: Elastic is cheaper)."""
    by_name = {row["variant"]: row for row in rows}
    elastic = by_name.get("Elastic-MDM")
    ratios = {}
    for name, row in by_name.items():
        if elastic is None or name == "Elastic-MDM":
            continue
        ratios[f"time Elastic / {name}"] = elastic["median_s"] / row["median_s"]
        ratios[f"tokens Elastic / {name}"] = elastic["tokens_encoded_per_sequence"] / row["tokens_encoded_per_sequence"]
    return ratios


def active_tokens_per_pass(setup: SamplingSetup) -> list[int]:
    """Tokens encoded by each pass of the Elastic sampler without caching (pass k encodes step k's active state):
    with the oracle, `2B + Σ_b Binomial(n_b, F(k))`."""
    _, log = counted_run(setup, Variant("Elastic-MDM (no cache)", "elastic", False))
    return [sum(lengths) for lengths in log.lengths]
