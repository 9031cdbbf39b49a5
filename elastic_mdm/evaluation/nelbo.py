"""The held-out NELBO of a checkpoint, outside a training run, with the training run's own code.

`nelbo_report` computes exactly what `ElasticMDMTrainer.evaluate` logs as `eval_nelbo_bits_per_token`
(`objectives.metrics.nelbo_metrics` over the objective's seeded evaluation collator): for the elastic objective
`Σ_gaps l_0 + K · [Σ_masks CE + Σ_gaps l_k(g, m)]` at one `k ~ U{1..K}` per sequence (`objectives/nelbo.py`,
docs/design.md), MDLM's bound `E_t[(1/t) Σ_masks CE]` for `mdlm`, divided by the `n + 1` tokens of each sequence.

It calls `objectives.metrics` directly (one process: the identity reduce, no autocast) rather than building an
`ElasticMDMTrainer`, which reseeds the global RNGs (`Trainer.__init__` calls `set_seed`) and creates its
`output_dir` on disk, side effects a measuring function must not have.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from ..objectives.metrics import evaluation_collator, nelbo_metrics


def heldout_batches(
    dataset: Iterable[dict], collator, batch_size: int, device: torch.device | str, max_batches: int | None = None
) -> Iterator[dict]:
    """Collated batches of `dataset` in order (at most `max_batches`), tensors moved to `device`."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def nelbo_report(
    model,
    dataset: Iterable[dict],
    *,
    num_steps: int = 128,
    schedule: str = "linear",
    batch_size: int = 32,
    seed: int = 0,
    num_draws: int = 1,
    max_batches: int | None = None,
) -> dict[str, float]:
    """The held-out NELBO of the K-step process (K = `num_steps`, `schedule`) as bits per token and perplexity bound,
    with the objective's evaluation collator and seeded noise (see the module docstring). With `num_draws > 1` the
    metrics average that many independent noise draws of the data (seeds `seed`, `seed + 1`, ...) and
    `nelbo_bits_per_token_se = std(bits) / √num_draws` is the standard error of the bits per token between draws."""
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}.")
    draws = []
    for draw_seed in range(seed, seed + num_draws):
        collator = evaluation_collator(model.config.objective, model.config, schedule, num_steps, draw_seed)
        batches = heldout_batches(dataset, collator, batch_size, model.device, max_batches)
        with torch.no_grad():
            draws.append(nelbo_metrics(model, batches, model.config.objective))
    report = {key: sum(d[key] for d in draws) / num_draws for key in draws[0]}
    if num_draws > 1:
        bits = torch.tensor([d["nelbo_bits_per_token"] for d in draws], dtype=torch.float64)
        report["nelbo_bits_per_token_se"] = float(bits.std() / math.sqrt(num_draws))
    return report


__all__ = ["heldout_batches", "nelbo_report"]
