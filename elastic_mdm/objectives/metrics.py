"""The held-out NELBO as metrics: the objective's seeded evaluation collator and the bound over batches.

`nelbo_metrics` is what `ElasticMDMTrainer.evaluate` logs and what `evaluation.nelbo.nelbo_report` returns: for the
elastic objective `Σ_gaps l_0 + K · [Σ_masks CE + Σ_gaps l_k(g, m)]` at one `k ~ U{1..K}` per sequence
(`objectives/nelbo.py`, docs/design.md), MDLM's bound `E_t[(1/t) Σ_masks CE]`, divided by the `n + 1` tokens of each
sequence. Summing over processes is a plain `reduce` function, so one process needs no accelerator.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from .collators import TARGET_TOKENS, PackingCollator
from .table import get_objective, make_collator


def identity(tensor: torch.Tensor) -> torch.Tensor:
    """The reduce of one process: it already holds every term."""
    return tensor


def evaluation_collator(objective: str, config, schedule: str, num_steps: int, seed: int) -> PackingCollator:
    """The NELBO collator of the K-step process (`num_steps`, `schedule`) of a run seeded `seed`: its noise is
    seeded with `seed + 1`, so a checkpoint's held-out NELBO is the same number in training and afterwards."""
    return make_collator(objective, config, nelbo=True, schedule=schedule, num_steps=num_steps, seed=seed + 1)


def nelbo_metrics(
    model,
    batches: Iterable[dict],
    objective: str,
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] = identity,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, float]:
    """Mean per-sequence step terms and the NELBO as bits per token and perplexity bound over `batches`.

    Elastic: `Σ_gaps l_0 + K · [token CE at step k + Σ_gaps l_k(g, m)]` at one `k ~ U{1..K}` per sequence (`nelbo.py`);
    MDLM: its continuous-time bound `E_t[(1/t) Σ_masks CE]`. Both are divided by `n + 1` tokens per sequence.

    `reduce` sums a `[5]` tensor of per-batch totals over processes (the identity for one process, the Trainer's
    `accelerator.reduce(., "sum")` in a run); `autocast` is the mixed-precision context of the forward passes (none:
    the model runs in its own dtype)."""
    model.eval()
    sequence_nelbo = get_objective(objective).sequence_nelbo
    totals = defaultdict(float)
    for batch in batches:
        tokens = batch.pop(TARGET_TOKENS).float()  # [B] n + 1
        with autocast():
            token_loss, gap_loss, nelbo = sequence_nelbo(model, batch)  # elastic: [2B], step 0 and step k of each
        sequences = (tokens > 0).sum().float()  # the NELBO batches hold each sequence twice, counted once
        stats = torch.stack([nelbo.sum(), tokens.sum(), token_loss.sum(), gap_loss.sum(), sequences])
        stats = reduce(stats.float())  # [5]
        for name, value in zip(("nelbo", "tokens", "token_loss", "gap_loss", "sequences"), stats.tolist(), strict=True):
            totals[name] += value
    nats_per_token = totals["nelbo"] / max(totals["tokens"], 1.0)
    return {
        "token_loss": totals["token_loss"] / max(totals["sequences"], 1.0),
        "gap_loss": totals["gap_loss"] / max(totals["sequences"], 1.0),
        "nelbo_bits_per_token": nats_per_token / math.log(2),
        "ppl_bound": math.exp(min(nats_per_token, 50.0)),
    }


__all__ = ["evaluation_collator", "identity", "nelbo_metrics"]
