"""Training benchmark: per objective, at equal batches of clean sequences, the time of one optimiser step as
`ElasticMDMTrainer` takes it (noise drawn on the device, forward, backward, AdamW), clean tokens/s, tokens encoded
per step, TFLOP/s and MFU (`counting.FlopModel`, `3 ×` the forward)."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from elastic_mdm.configuration_elastic_mdm import ElasticMDMConfig
from elastic_mdm.modeling_elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.objectives.collators import TARGET_TOKENS
from elastic_mdm.objectives.table import make_collator

from .counting import FlopModel
from .timing import H100_BF16_DENSE_TFLOPS, autocast, efficiency, timed


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
        collator = make_collator(objective, model.config, max_length=length, defer_noise=True)
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
