"""Pictures of lengths, of a sampler run and of the length sweep (matplotlib: `pip install elastic-mdm[eval]`).

* `save_length_histogram`: the length histograms of generated sequences and of the data, in one chart.
* `save_trajectory_plot`: the active length of a few samples against the reverse step `k` (docs/design.md §3:
  each sequence grows from its anchors to its own length; with an oracle its interior length at step `k` is
  `Binomial(n, F(k))`).
* `save_sweep_chart`: the rows of `evaluation.lengths.length_sweep` as a chart: mean length and total variation to
  the data against the horizon `K`, one line per schedule, the data (and its data-vs-data floor) as dashed lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend, or a clear error naming the missing extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError("Writing PNG charts needs matplotlib: pip install elastic-mdm[eval]") from error
    return plt


def save_length_histogram(generated: torch.Tensor, data: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Both length histograms (`[N]` generated, `[M]` data lengths) as densities over shared bins, in one PNG."""
    low, high = int(min(generated.min(), data.min())), int(max(generated.max(), data.max())) + 1
    bins = list(range(low, high + 1, max(1, (high - low) // 40)))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(data.tolist(), bins=bins, alpha=0.5, density=True, label=f"data (n={data.numel()})")
    ax.hist(generated.tolist(), bins=bins, alpha=0.5, density=True, label=f"generated (n={generated.numel()})")
    ax.set_xlabel("sequence length (tokens, BOS/EOS included)")
    ax.set_ylabel("share")
    ax.set_title(title or "Length distribution: generated vs data")
    ax.legend()
    return save(fig, plt, path)


def trajectory_lengths(trajectory: Sequence[Sequence[torch.Tensor]]) -> list[list[int]]:
    """`lengths[b][k]`: the tokens sequence `b` holds at step `k` (`trajectory[k][b]`, as `generate(...,
    output_trajectory=True, return_dict_in_generate=True).trajectory` returns it)."""
    if not trajectory or not trajectory[0]:
        raise ValueError("trajectory is empty; generate with output_trajectory=True and return_dict_in_generate=True.")
    return [[int(step[b].numel()) for step in trajectory] for b in range(len(trajectory[0]))]


def save_trajectory_plot(
    trajectory: Sequence[Sequence[torch.Tensor]], path: str | Path, max_samples: int = 8, title: str = ""
) -> Path:
    """Active length (tokens encoded, anchors included) against the step `k = 0..K` for the first `max_samples`
    sequences of `trajectory`, one line each, in one PNG at `path`."""
    lengths = trajectory_lengths(trajectory)[:max_samples]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for b, row in enumerate(lengths):
        ax.step(range(len(row)), row, where="post", label=f"sample {b} (final {row[-1]})")
    ax.set_xlabel("reverse step k")
    ax.set_ylabel("active length (tokens)")
    ax.set_title(title or "Sequences growing: active length per step")
    if len(lengths) <= 10:
        ax.legend(fontsize="small")
    return save(fig, plt, path)


def save_sweep_chart(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """The `length_sweep` rows as a chart at `path`: mean length (left) and total variation to the data (right)
    against `K` (log scale), one line per schedule; the data mean and the data-vs-data TV floor (the row whose `K`
    is not a number) are dashed."""
    sampled = [row for row in rows if isinstance(row["K"], int)]
    floors = [row for row in rows if not isinstance(row["K"], int)]
    if not sampled:
        raise ValueError("rows has no sampled row (K an integer); pass the rows of evaluation.lengths.length_sweep.")
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for schedule in dict.fromkeys(row["schedule"] for row in sampled):
        line = sorted((row for row in sampled if row["schedule"] == schedule), key=lambda row: row["K"])
        steps = [row["K"] for row in line]
        left.plot(steps, [row["mean"] for row in line], marker="o", label=schedule)
        right.plot(steps, [row["tv"] for row in line], marker="o", label=schedule)
    left.axhline(sampled[0]["data_mean"], color="gray", linestyle="--", label="data")
    for floor in floors:
        right.axhline(floor["tv"], color="gray", linestyle="--", label=str(floor["schedule"]))
    for ax, name in ((left, "mean length (tokens)"), (right, "total variation to the data")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps K")
        ax.set_ylabel(name)
        ax.legend(fontsize="small")
    fig.suptitle(title or "Length fidelity against the number of steps")
    return save(fig, plt, path)


def save(fig, plt, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["save_length_histogram", "save_sweep_chart", "save_trajectory_plot", "trajectory_lengths"]
