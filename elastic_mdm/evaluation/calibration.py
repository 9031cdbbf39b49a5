"""Gap-head calibration on held-out corrupted batches.

For each adjacent active pair `(a, b)` of a corrupted sequence at noise level `s'`, the gap head predicts
`pφ(c | h_a, h_b)` over the count `c` of tokens removed between them. Against the true count `g`:

* expected count `E_pφ[g] = Σ_c c · pφ(c | h_a, h_b)`, bias `mean(E[g] - g)`, mean absolute error `mean |E[g] - g|`;
* gap cross-entropy `mean -log pφ(g | h_a, h_b)` (nats);

each per bin of `s'` (step 0, the length model, in its own bin) and overall.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..objectives.collators import IGNORE_INDEX, ElasticMDMCollator
from ..objectives.table import make_collator
from ..packing_elastic_mdm import PackedSequences
from ..schedules_elastic_mdm import NoiseLevelSampler, get_schedule


def calibration_collator(
    config, *, num_steps: int = 128, schedule: str = "linear", length_share: float = 0.1, seed: int = 0
) -> ElasticMDMCollator:
    """An `ElasticMDMCollator` of a fixed K-step `schedule` (step 0, the length model, with probability
    `length_share`, else `k ~ U{1..K}`), seeded: the corrupted held-out batches of the gap calibration."""
    sampler = NoiseLevelSampler(
        families=(get_schedule(schedule),), min_steps=num_steps, max_steps=num_steps, length_share=length_share
    )
    return make_collator("elastic", config, noise_sampler=sampler, seed=seed)


def noise_bins(noise_level: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin of each noise level `s'`: 0 for `s' = 0` (the length model, step 0), `i` for `s'` in
    `((i - 1)/num_bins, i/num_bins]` (to 1e-6, so that fp32 grid values such as 0.1 land in their own bin)."""
    return (noise_level.double() * num_bins - 1e-6).ceil().long().clamp(0, num_bins)


def calibration_table(
    expected: torch.Tensor, true: torch.Tensor, nll: torch.Tensor, noise_level: torch.Tensor, num_bins: int = 10
) -> list[dict[str, float]]:
    """Per bin of `s'` (`noise_bins`) and overall (`bin = "all"`): number of pairs, mean true count, mean expected
    count, bias `mean(E[g] - g)`, mean absolute error `mean |E[g] - g|` and gap CE `mean -log pφ(g)` (nats).
    All inputs are `[pairs]`; empty bins are left out."""
    bins = noise_bins(noise_level, num_bins)
    error = expected.double() - true.double()
    rows = []
    for b in [*range(num_bins + 1), None]:
        pick = torch.ones_like(bins, dtype=torch.bool) if b is None else bins == b
        if not bool(pick.any()):
            continue
        low, high = (0.0, 1.0) if b is None else (max(b - 1, 0) / num_bins, b / num_bins)
        rows.append(
            {
                "bin": "all" if b is None else "s'=0" if b == 0 else f"({low:.2f}, {high:.2f}]",
                "pairs": int(pick.sum()),
                "true_mean": float(true[pick].double().mean()),
                "expected_mean": float(expected[pick].double().mean()),
                "bias": float(error[pick].mean()),
                "mae": float(error[pick].abs().mean()),
                "gap_ce": float(nll[pick].double().mean()),
            }
        )
    return rows


@torch.no_grad()
def gap_predictions(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(E_pφ[g], g, -log pφ(g), s')`, each `[pairs]`, for every supervised adjacent pair of one
    `ElasticMDMCollator` batch."""
    packed = PackedSequences.from_cu_seqlens(batch["cu_seqlens"], batch["max_seqlen"], batch["input_ids"].numel())
    hidden = model.diffusion_features(batch["input_ids"], packed, batch["noise_level"])
    true = batch["gap_labels"]
    rows = ((true != IGNORE_INDEX) & ~packed.last_token_mask()).nonzero().squeeze(-1)
    levels = batch["noise_level"][packed.sequence_ids[rows]]  # [pairs] s'
    log_probs = model.gap_logits(hidden, rows, levels).float().log_softmax(-1)  # [pairs, max_gap + 1]
    classes = torch.arange(log_probs.shape[-1], device=log_probs.device, dtype=log_probs.dtype)
    expected = (log_probs.exp() * classes).sum(-1)
    nll = -log_probs.gather(-1, true[rows, None]).squeeze(-1)
    return expected, true[rows], nll, levels


def gap_calibration(model, batches: Iterable[dict], num_bins: int = 10) -> list[dict[str, float]]:
    """`calibration_table` over held-out batches of an `ElasticMDMCollator` (on the model's device)."""
    model.eval()
    parts = [tuple(t.cpu() for t in gap_predictions(model, batch)) for batch in batches]
    if not parts:
        raise ValueError("Gap calibration needs at least one batch.")
    return calibration_table(*(torch.cat(column) for column in zip(*parts, strict=True)), num_bins=num_bins)


__all__ = ["calibration_collator", "calibration_table", "gap_calibration", "gap_predictions", "noise_bins"]
