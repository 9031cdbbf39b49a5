"""Sampling and training benchmarks of Elastic-MDM against MDLM on the same backbone (paper §5.1, §5.3; design §8).

Sampling: the three samplers run on one backbone, one batch, one horizon K and one schedule:

* `Elastic-MDM`: `sample_elastic` (active tokens only, step cache on);
* `MDLM (cached)`: `sample_mdlm` on a canvas of L tokens, re-encoding a sequence only when a position of it is
  revealed (MDLM's `ddpm_cache`);
* `MDLM (no cache)`: `sample_mdlm` with one full pass per step (K · B · L tokens).

Two modes. `checkpoint`: a trained model (its gap head sets the lengths). `oracle`: a random-weight model of the
requested size whose token fills and gap counts are replaced by those of the exact forward process of clean
sequences of given lengths (`OracleDenoiser`); the backbone and both heads still run on every pass, so the time is
the real one while the Elastic trajectory has the active lengths of real data at every step
(`Binomial(n, F(k))` interior tokens at step k) without a trained model.

FLOPs (matmul only; elementwise work, softmax and the embedding gather are left out). With `P_block` the weights
of the linear layers of the transformer blocks applied per token (adaLN modulation runs per sequence and is left
out), `d` the width, `N_layers` the depth, `V` the vocabulary and `P_gap` the gap-head weights:

    forward(pass) = Σ_sequences [ 2 · P_block · n  +  4 · d · N_layers · n² ]     (n = active length)
                  + 2 · d · V · (rows through the token head) + 2 · P_gap · (pairs through the gap head)

(the `4 · d · n` per token and layer is `q kᵀ` and `softmax · v`, `2 · n · d` each); a training step costs
`3 ×` its forward (backward = 2 × forward). MFU = FLOPs / time / peak (`peak_tflops`, default H100 SXM bf16 dense
989 TFLOP/s).

Timing: each configuration first runs once, untimed, through a `CountingDenoiser` (passes, active lengths, FLOPs),
then `warmup` untimed times, then `repeats` timed times, always with the same seed (hence the same trajectory);
medians are reported. On CUDA the clock is read after `torch.cuda.synchronize()`. The oracle's own work (a cummax
and two one-hot scatters per pass) is included in the Elastic time; it is small next to a backbone pass.

Overhead (design §8): in eager mode a pass costs ~17 ms on an H100 however short its input is, so the Elastic
savings only show once the per-step overhead is gone. Both samplers read the device once per step; on top of that,
`static_shape_wrapper` pads every pass to a shape bucket (`cuda_graphs.StaticShapeDenoiser`) or replays it from a
CUDA graph captured per bucket (`cuda_graphs.CUDAGraphDenoiser`), for Elastic-MDM and MDLM alike, and
`compile_backbone` runs `torch.compile` on the backbone.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from transformers.generation.logits_process import LogitsProcessorList

from elastic_mdm.configuration_elastic_mdm import ElasticMDMConfig
from elastic_mdm.cuda_graphs import CUDAGraphDenoiser, StaticShapeDenoiser
from elastic_mdm.evaluation.core import markdown_table
from elastic_mdm.generation_elastic_mdm import (
    ActiveState,
    ElasticMDMGenerateOutput,
    sample_elastic,
    sample_mdlm,
    tokens_per_forward,
)
from elastic_mdm.modeling_elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.packing import PackedSequences
from elastic_mdm.schedules import NoiseLevelSampler, RevealSchedule
from elastic_mdm.training.collators import TARGET_TOKENS, ElasticMDMCollator, MDLMCollator

H100_BF16_DENSE_TFLOPS = 989.0

# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def oracle_config(
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    vocab_size: int,
    length: int,
    block_type: str = "dit",
    intermediate_size: int | None = None,
) -> ElasticMDMConfig:
    """A config of the requested size for sequences of at most `length` tokens: mask = `V - 1`, BOS = EOS = `V - 2`
    (GPT-2 style), gap classes `0..length`. The oracle writes position indices as tokens, so `V > length + 2`."""
    if vocab_size < length + 3:
        raise ValueError(f"The oracle needs vocab_size >= length + 3 = {length + 3} (tokens are positions).")
    return ElasticMDMConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=length,
        block_type=block_type,
        mask_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 2,
    )


def random_model(
    config: ElasticMDMConfig, device: str | torch.device = "cpu", seed: int = 0
) -> ElasticMDMForDiffusionLM:
    """A randomly initialised model in eval mode (fp32 weights; `--dtype bf16` runs it under autocast)."""
    torch.manual_seed(seed)
    return ElasticMDMForDiffusionLM(config).to(device).eval()


def compile_backbone(model: ElasticMDMForDiffusionLM, mode: str | None = None) -> ElasticMDMForDiffusionLM:
    """`torch.compile` the packed backbone forward with dynamic shapes (packed lengths change every step). Static
    shapes and CUDA graphs come from `--cuda_graphs` (`cuda_graphs.CUDAGraphDenoiser`, which captures the compiled
    kernels too), so `mode` should be one without graphs (default, `max-autotune-no-cudagraphs`)."""
    if mode not in (None, "default", "max-autotune-no-cudagraphs"):
        raise ValueError(
            f"compile mode {mode!r} captures CUDA graphs of its own; use --cuda_graphs with the default mode or "
            "'max-autotune-no-cudagraphs' instead."
        )
    model.model.forward_packed = torch.compile(model.model.forward_packed, dynamic=True, mode=mode)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Denoisers: oracle, counting, static shapes
# ---------------------------------------------------------------------------------------------------------------


class OracleDenoiser:
    """Runs the real backbone and heads (so the time is real) but answers with the exact forward process.

    Tokens are positions: an active token's id is its index in `x0 = (BOS, y_1..y_n, EOS)` (BOS = 0, EOS = n + 1),
    so a packed sequence carries its own length in its last token and nothing else is stored. A run of masks after
    the known token at position `p` is given positions `p + 1, p + 2, ...` (the sampler draws how many masks a gap
    gets, not which positions: any choice gives the same active-length law). Features are the backbone's `h` with
    the true position appended as a last fp32 column; the token head returns all mass on the position and the gap
    head on `position(b) - position(a) - 1`.
    """

    def __init__(self, model: ElasticMDMForDiffusionLM):
        self.model = model
        self.mask_token_id = model.config.mask_token_id

    def diffusion_features(self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor):
        hidden = self.model.diffusion_features(input_ids, packed, noise_level)
        rows = torch.arange(input_ids.numel(), device=input_ids.device)
        known = input_ids != self.mask_token_id  # every sequence starts with a known BOS
        last_known = torch.where(known, rows, torch.zeros_like(rows)).cummax(0).values
        position = input_ids[last_known] + (rows - last_known)
        return torch.cat([hidden.float(), position.float()[:, None]], dim=-1)

    def _backbone(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :-1].to(self.model.dtype)

    @staticmethod
    def _one_hot_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, float("-inf")).scatter_(-1, target[:, None], 0.0)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.token_logits(self._backbone(hidden))
        return self._one_hot_logits(logits, hidden[:, -1].long())

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor:
        logits = self.model.gap_logits(self._backbone(hidden), left, noise_level)
        gap = (hidden[left + 1, -1] - hidden[left, -1] - 1).long()
        return self._one_hot_logits(logits, gap)


@dataclass
class PassLog:
    """What a sampling run encoded: the active length of every sequence of every pass, the rows through each head."""

    lengths: list[list[int]] = field(default_factory=list)
    token_rows: int = 0
    gap_rows: int = 0
    ops_outside_passes: int = 0


class OpCounter(TorchDispatchMode):
    """Counts the tensor ops dispatched while active, views left out. On a GPU each is a kernel launch (a few µs of
    host time), so the ops of a sampling step outside its denoiser pass are the launch overhead that a CUDA graph of
    the pass leaves (heads, draws, insertion, bookkeeping)."""

    NO_KERNEL = frozenset({"lift_fresh", "detach", "alias"})

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not (func.is_view or func.overloadpacket.__name__ in self.NO_KERNEL)
        return func(*args, **(kwargs or {}))


class CountingDenoiser:
    """Wraps a denoiser and logs every pass and head call (reads lengths back to the host: not for timed runs)."""

    def __init__(self, inner=None):
        self.inner, self.log = inner, PassLog()

    def around(self, inner) -> CountingDenoiser:
        """Wrap `inner` (returns self: usable as `SamplingSetup.run`'s `wrap`)."""
        self.inner = inner
        return self

    def diffusion_features(self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor):
        self.log.lengths.append(packed.lengths.tolist())
        with _disable_current_modes():  # the pass itself is not counted by an `OpCounter`
            return self.inner.diffusion_features(input_ids, packed, noise_level)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.log.token_rows += hidden.shape[0]
        return self.inner.token_logits(hidden)

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor:
        self.log.gap_rows += left.numel()
        return self.inner.gap_logits(hidden, left, noise_level)


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


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOP coefficients of a model (see the module docstring)."""

    per_token: float  # 2 · P_block
    per_token_squared: float  # 4 · d · N_layers
    per_token_head_row: float  # 2 · d · V
    per_gap_row: float  # 2 · P_gap

    @classmethod
    def of(cls, model: ElasticMDMForDiffusionLM) -> FlopModel:
        block_weights = sum(
            module.weight.numel()
            for name, module in model.model.layers.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("adaln")
        )
        config = model.config
        gap_weights = sum(m.weight.numel() for m in model.gap_head.modules() if isinstance(m, torch.nn.Linear))
        return cls(
            per_token=2.0 * block_weights,
            per_token_squared=4.0 * config.hidden_size * config.num_hidden_layers,
            per_token_head_row=2.0 * model.lm_head.weight.numel(),
            per_gap_row=2.0 * gap_weights,
        )

    def backbone(self, lengths: Sequence[int]) -> float:
        """`Σ_s 2 · P_block · n_s + 4 · d · N_layers · n_s²` of one pass."""
        return sum(self.per_token * n + self.per_token_squared * n * n for n in lengths)

    def run(self, log: PassLog) -> float:
        """Forward FLOPs of a logged sampling run."""
        backbone = sum(self.backbone(lengths) for lengths in log.lengths)
        return backbone + self.per_token_head_row * log.token_rows + self.per_gap_row * log.gap_rows


# ---------------------------------------------------------------------------------------------------------------
# Lengths of the data
# ---------------------------------------------------------------------------------------------------------------


def length_sampler(spec: str, length: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Draws `[batch]` interior counts `n` (sequence length `n + 2` <= `length`) from `spec`:

    * `fixed`: every sequence fills the canvas, `n = length - 2` (the equal-output comparison with MDLM);
    * `uniform:LO:HI`: sequence lengths uniform in `LO..HI` (BOS and EOS included);
    * `synthetic`: the record lengths of the built-in synthetic JSON task (its tokenizer, 4000 records);
    * a path: a JSON list or one integer per line of sequence lengths (BOS/EOS included), e.g. from
      `corpus.length_statistics`; lengths over `length` are clipped.
    """
    if spec == "fixed":
        pool = torch.tensor([length])
    elif spec.startswith("uniform:"):
        low, high = (int(v) for v in spec.split(":")[1:])
        pool = torch.arange(low, high + 1)
    elif spec == "synthetic":
        from .synthetic import build_tokenizer, generate_records, record_length_distribution

        pool = record_length_distribution(build_tokenizer(), generate_records(4000, seed=1))
    else:
        text = Path(spec).read_text()
        pool = torch.tensor(json.loads(text) if text.lstrip().startswith("[") else [int(v) for v in text.split()])
    pool = pool.clamp(2, length) - 2

    def draw(batch: int, generator: torch.Generator) -> torch.Tensor:
        return pool[torch.randint(pool.numel(), (batch,), generator=generator)]

    return draw


# ---------------------------------------------------------------------------------------------------------------
# Sampling benchmark
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
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
        common = dict(
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
                return sample_elastic(wrap(self.elastic), clone(self.elastic_state), **common)
            return sample_mdlm(wrap(mdlm), clone(self.mdlm_state), eos_token_id=config.eos_token_id, **common)


def clone(state: ActiveState) -> ActiveState:
    return ActiveState(*(t.clone() for t in (state.tokens, state.sequence_ids, state.open_after, state.lengths)))


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """`(wall-clock seconds, result)` of one call of `fn`, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[0] for _ in range(repeats)]


def efficiency(flops: float, seconds: float, peak_tflops: float) -> dict[str, float]:
    """Achieved TFLOP/s and MFU (%) of `flops` done in `seconds` against `peak_tflops`."""
    achieved = flops / seconds / 1e12 if seconds > 0 else float("nan")
    return {"tflops_per_s": achieved, "mfu_percent": 100.0 * achieved / peak_tflops}


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
    tokens per forward pass (`generation_elastic_mdm.tokens_per_forward`), tokens encoded per sequence, mean active
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


# ---------------------------------------------------------------------------------------------------------------
# Training benchmark
# ---------------------------------------------------------------------------------------------------------------


def random_features(lengths: torch.Tensor, config: ElasticMDMConfig, generator: torch.Generator) -> list[dict]:
    """Clean sequences `BOS y_1..y_n EOS` with `y_i` uniform over the ids that are not special."""
    allowed = torch.ones(config.vocab_size, dtype=torch.bool)
    for special in (config.bos_token_id, config.eos_token_id, config.mask_token_id, config.pad_token_id):
        if special is not None:
            allowed[special] = False
    allowed = allowed.nonzero().squeeze(-1)
    features = []
    for n in lengths.tolist():
        interior = allowed[torch.randint(allowed.numel(), (n,), generator=generator)].tolist()
        features.append({"input_ids": [config.bos_token_id, *interior, config.eos_token_id]})
    return features


def training_collator(objective: str, config: ElasticMDMConfig, length: int) -> ElasticMDMCollator | MDLMCollator:
    """The deferred-noise training collator of `objective` (noise drawn on the device at step time, as
    `ElasticMDMTrainer`): Elastic with the default schedule randomisation, MDLM on a canvas of `length`."""
    ids = dict(
        mask_token_id=config.mask_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        max_length=length,
        defer_noise=True,
    )
    if objective == "mdlm":
        return MDLMCollator(**ids, pad_token_id=config.pad_token_id)
    return ElasticMDMCollator(**ids, noise_sampler=NoiseLevelSampler())


def clean_batches(
    collator,
    config: ElasticMDMConfig,
    lengths_fn: Callable[[int, torch.Generator], torch.Tensor],
    batch_size: int,
    count: int,
    device: torch.device,
    seed: int = 0,
) -> list[dict]:
    """`count` packed clean batches (the same for every objective at a given seed), on `device`."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = collator(random_features(lengths_fn(batch_size, generator), config, generator))
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return batches


def training_flops(batch: dict, flops: FlopModel) -> float:
    """`3 ×` the forward FLOPs of one noisy batch (token head on masks only, gap head on supervised pairs)."""
    lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).tolist()
    forward = flops.backbone(lengths) + flops.per_token_head_row * int((batch["labels"] != -100).sum())
    if batch.get("gap_labels") is not None:
        forward += flops.per_gap_row * int((batch["gap_labels"] != -100).sum())
    return 3.0 * forward


def benchmark_training(
    model: ElasticMDMForDiffusionLM,
    lengths_fn: Callable[[int, torch.Generator], torch.Tensor],
    *,
    batch_size: int,
    length: int,
    objectives: Sequence[str] = ("elastic", "mdlm"),
    warmup: int = 2,
    repeats: int = 5,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per objective, at equal batches of clean sequences: median step time (noise on the device, forward, backward,
    AdamW step), clean tokens/s, tokens encoded per step, TFLOP/s and MFU (FLOPs of the timed batches)."""
    device = model.device
    flops = FlopModel.of(model)
    rows = []
    for objective in objectives:
        collator = training_collator(objective, model.config, length)
        clean = clean_batches(collator, model.config, lengths_fn, batch_size, warmup + repeats, device, seed)
        step = TrainingStep(model, collator, autocast_dtype)
        for batch in clean[:warmup]:
            step(batch)
        times, work, encoded = [], 0.0, 0
        for batch in clean[warmup:]:
            seconds, noisy = timed(functools.partial(step, batch), device)
            times.append(seconds)
            work += training_flops(noisy, flops)
            encoded += noisy["input_ids"].numel()
        seconds = statistics.median(times)
        clean_tokens = sum(int(b["clean_cu_seqlens"][-1]) for b in clean[warmup:]) / repeats
        rows.append(
            {
                "objective": objective,
                "median_step_s": seconds,
                "clean_tokens_per_s": clean_tokens / seconds,
                "tokens_encoded_per_step": encoded / repeats,
                **efficiency(work / repeats, seconds, peak_tflops),
            }
        )
    model.eval()
    return rows


class TrainingStep:
    """One optimiser step as `ElasticMDMTrainer` takes it: noise on the device, one forward, backward, AdamW."""

    def __init__(self, model: ElasticMDMForDiffusionLM, collator, autocast_dtype: torch.dtype | None):
        self.model, self.collator, self.autocast_dtype = model, collator, autocast_dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def __call__(self, clean: dict) -> dict:
        self.model.train()
        batch = self.collator.apply_noise(clean)
        with autocast(self.model.device, self.autocast_dtype):
            loss = self.model(**{k: v for k, v in batch.items() if k != TARGET_TOKENS}).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def machine_name(device: torch.device | str) -> str:
    """The GPU name on CUDA, else the CPU (processor, cores, torch threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"CPU {processor} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def expected_elastic_token_share(schedule: RevealSchedule, num_steps: int) -> float:
    """`Σ_{k=0..K} F(k) / K`: tokens Elastic-MDM encodes without caching relative to MDLM's `K` full passes, for
    full-length sequences (anchors and caching ignored); e.g. ~0.5 for linear (design §8)."""
    return float(schedule.table(num_steps).sum()) / num_steps


def markdown_summary(settings: dict[str, Any], sampling: list[dict], training: list[dict]) -> str:
    """The settings table, the sampling table with its ratios, and the training table."""
    lines = ["## Settings", "", markdown_table([{"setting": k, "value": v} for k, v in settings.items()])]
    if sampling:
        ratios = [{"ratio": k, "value": v} for k, v in sampling_ratios(sampling).items()]
        lines += ["", "## Sampling", "", markdown_table(sampling), "", markdown_table(ratios)]
    if training:
        lines += ["", "## Training", "", markdown_table(training)]
        if len(training) == 2:
            ratio = training[0]["median_step_s"] / training[1]["median_step_s"]
            lines += ["", f"Step time {training[0]['objective']} / {training[1]['objective']}: {ratio:.3f}"]
    return "\n".join(lines) + "\n"


__all__ = [
    "H100_BF16_DENSE_TFLOPS",
    "oracle_config",
    "random_model",
    "compile_backbone",
    "OracleDenoiser",
    "CountingDenoiser",
    "PassLog",
    "static_shape_wrapper",
    "FlopModel",
    "length_sampler",
    "Variant",
    "VARIANTS",
    "start_state",
    "SamplingSetup",
    "oracle_setup",
    "checkpoint_setup",
    "timed",
    "time_calls",
    "efficiency",
    "benchmark_sampling",
    "counted_run",
    "sampling_ratios",
    "active_tokens_per_pass",
    "random_features",
    "training_collator",
    "clean_batches",
    "training_flops",
    "benchmark_training",
    "TrainingStep",
    "machine_name",
    "expected_elastic_token_share",
    "markdown_summary",
]
