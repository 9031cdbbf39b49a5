"""Length fidelity (paper §5.2): how far the lengths of generated sequences are from the data's.

Lengths are integer token counts (anchors included). The distances are between the two empirical distributions
`p`, `q` on the integers, with CDFs `P`, `Q` (docs/design.md):

* total variation `TV = ½ Σ_n |p(n) - q(n)|`
* Wasserstein-1 `W1 = Σ_n |P(n) - Q(n)|`
* Kolmogorov-Smirnov `KS = max_n |P(n) - Q(n)|`

`length_sweep` measures them for unconditional samples at several horizons `K` and schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .samples import draw_samples

SWEEP_STEPS = (1, 4, 16, 64, 256)
SWEEP_SCHEDULES = ("linear", "exponential")


def empirical_cdfs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CDFs `P_a(n) = #{a_i <= n} / |a|` of two integer samples on their common support `0..max`: `[max + 1]` each."""
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("Length statistics need at least one generated and one data length.")
    size = int(max(a.max(), b.max())) + 1
    pa = torch.bincount(a.long(), minlength=size).double() / a.numel()
    pb = torch.bincount(b.long(), minlength=size).double() / b.numel()
    return pa.cumsum(0), pb.cumsum(0)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    """`½ Σ_n |p_a(n) - p_b(n)|` of two integer samples."""
    ca, cb = empirical_cdfs(a, b)
    return 0.5 * float((ca.diff(prepend=ca.new_zeros(1)) - cb.diff(prepend=cb.new_zeros(1))).abs().sum())


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """`Σ_n |P_a(n) - P_b(n)|`: the earth mover's distance of two integer samples."""
    ca, cb = empirical_cdfs(a, b)
    return float((ca - cb).abs().sum())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """`max_n |P_a(n) - P_b(n)|`."""
    ca, cb = empirical_cdfs(a, b)
    return float((ca - cb).abs().max())


def length_report(generated: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """Means, medians and the three distances between generated `[N]` and data `[M]` lengths."""
    generated, data = generated.long().cpu(), data.long().cpu()
    return {
        "generated_mean": float(generated.double().mean()),
        "data_mean": float(data.double().mean()),
        "generated_median": float(generated.median()),
        "data_median": float(data.median()),
        "total_variation": total_variation(generated, data),
        "wasserstein1": wasserstein1(generated, data),
        "ks": ks_statistic(generated, data),
    }


def length_histogram_table(generated: torch.Tensor, data: torch.Tensor, num_bins: int = 12) -> str:
    """A text table of both length histograms over shared bins (shares in %, with bars)."""
    low, high = int(min(generated.min(), data.min())), int(max(generated.max(), data.max())) + 1
    edges = torch.linspace(low, high, num_bins + 1).floor().long().unique()
    rows = ["length bin   | data %  | generated %"]
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        shares = [float(((x >= lo) & (x < hi)).double().mean()) * 100 for x in (data, generated)]
        bars = "".join(f"{s:6.1f}  " for s in shares)
        rows.append(f"[{lo:4d}, {hi:4d}) | {bars}{'#' * round(shares[1] / 2)}")
    return "\n".join(rows)


def sweep_row(
    schedule: str, num_steps: int | str, lengths: torch.Tensor, data: torch.Tensor, capped: torch.Tensor | None = None
) -> dict[str, Any]:
    """One row of `length_sweep`: rounded mean, TV, W1, KS of `lengths` `[N]` against `data` `[M]`, and the share
    of samples stopped by the length cap (`capped` `[N]`, bool)."""
    report = length_report(lengths, data)
    return {
        "schedule": schedule,
        "K": num_steps,
        "mean": round(report["generated_mean"], 2),
        "data_mean": round(report["data_mean"], 2),
        "tv": round(report["total_variation"], 3),
        "w1": round(report["wasserstein1"], 2),
        "ks": round(report["ks"], 3),
        "capped": round(float(capped.double().mean()), 4) if capped is not None and capped.numel() else 0.0,
    }


def length_sweep(
    model,
    tokenizer,
    data_lengths: torch.Tensor,
    *,
    num_samples: int,
    steps: Sequence[int] = SWEEP_STEPS,
    schedules: Sequence[str] = SWEEP_SCHEDULES,
    reference_lengths: torch.Tensor | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **generate_kwargs,
) -> list[dict[str, Any]]:
    """Length fidelity of unconditional samples at every horizon `K` in `steps` and schedule in `schedules`: mean,
    TV, W1, KS against `data_lengths`, the share stopped by the length cap, and the tokens per forward pass
    (`tokens_per_forward`). `K = 1` is the length model alone (the final length is the step-0 prediction); larger K
    show what the re-predictions of the gaps add. With `reference_lengths` (an independent draw of the data), a
    first row gives the data-vs-data floor of each distance at this sample size."""
    rows = []
    if reference_lengths is not None:
        rows.append(sweep_row("data (fresh draw)", "-", reference_lengths, data_lengths))
    for schedule in schedules:
        for num_steps in steps:
            generator = torch.Generator(device=model.device).manual_seed(seed)
            samples = draw_samples(
                model, tokenizer, num_samples, batch_size=batch_size, generator=generator, num_steps=num_steps,
                schedule=schedule, **generate_kwargs,
            )  # fmt: skip
            row = sweep_row(schedule, num_steps, samples.lengths, data_lengths, samples.hit_max_length)
            rows.append({**row, "tokens_per_forward": round(samples.tokens_per_forward or 0.0, 2)})
    return rows


__all__ = [
    "SWEEP_SCHEDULES",
    "SWEEP_STEPS",
    "empirical_cdfs",
    "ks_statistic",
    "length_histogram_table",
    "length_report",
    "length_sweep",
    "sweep_row",
    "total_variation",
    "wasserstein1",
]
