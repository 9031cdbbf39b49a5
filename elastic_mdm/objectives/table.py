"""The training objectives, defined once: for each, its collators, its NELBO per sequence and what its samplers need.

| objective   | training batches        | held-out NELBO batches            | NELBO of one sequence             |
|-------------|-------------------------|-----------------------------------|-----------------------------------|
| `"elastic"` | `ElasticMDMCollator`    | `ElasticNELBOCollator` (K steps)  | `Σ_copies w (CE + Σ_gaps l_k)`    |
| `"mdlm"`    | `MDLMCollator` (canvas) | `MDLMCollator`                    | `(1/t) Σ_masks CE`                |

The objective names are those of `ElasticMDMConfig` (`configuration_elastic_mdm.OBJECTIVES`: a checkpoint records
the objective it was trained with, and its remote code reads it); this module is their one table for the tools.
Every collator built from a model config goes through `make_collator` (docs/design.md §2, NELBO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..configuration_elastic_mdm import OBJECTIVES
from ..schedules_elastic_mdm import NoiseLevelSampler
from .collators import ElasticMDMCollator, MDLMCollator, PackingCollator
from .nelbo import ElasticNELBOCollator, elastic_nelbo_terms

SequenceNELBO = Callable[[Any, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def elastic_sequence_nelbo(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(token_loss, gap_loss, nelbo)` `[2B]` nats of an `ElasticNELBOCollator` batch: every sequence at step 0 and
    at `k ~ U{1..K}`, `nelbo = nelbo_weight · (token_loss + gap_loss)` (weights 1 and K)."""
    token_loss, gap_loss = elastic_nelbo_terms(model, batch)
    return token_loss, gap_loss, batch["nelbo_weight"] * (token_loss + gap_loss)


def mdlm_sequence_nelbo(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(token_loss, gap_loss, nelbo)` `[B]` nats of an `MDLMCollator` batch: with the token weights `1/t`, the
    per-sequence token loss is MDLM's continuous-time bound `(1/t) Σ_masks CE`."""
    out = model(**batch, loss_reduction="sequence")
    return out.token_loss, out.gap_loss, out.token_loss


@dataclass(frozen=True)
class Objective:
    """One training objective of the backbone.

    `learns_gaps`: the gap head is trained (Elastic-MDM): the NELBO is that of a discrete K-step process and the gap
    head can be calibrated. `fixed_canvas`: samples fill a canvas of `max_length` (MDLM): a template's open gaps take
    a fixed `mdlm_gap_budget` of masks each."""

    name: str
    training_collator: type[PackingCollator]
    nelbo_collator: type[PackingCollator]
    sequence_nelbo: SequenceNELBO
    learns_gaps: bool
    fixed_canvas: bool

    def collator_options(
        self,
        config,
        nelbo: bool,
        noise_sampler: NoiseLevelSampler | None,
        schedule: str,
        num_steps: int,
    ) -> dict[str, Any]:
        """The keywords of this objective's collator beyond the special ids, length, seed and `defer_noise`."""
        if self.fixed_canvas:
            return {"pad_token_id": config.pad_token_id}
        if nelbo:
            return {"schedule": schedule, "num_steps": num_steps}
        return {"noise_sampler": noise_sampler or NoiseLevelSampler()}


OBJECTIVE_TABLE: dict[str, Objective] = {
    "elastic": Objective(
        "elastic",
        ElasticMDMCollator,
        ElasticNELBOCollator,
        elastic_sequence_nelbo,
        learns_gaps=True,
        fixed_canvas=False,
    ),
    "mdlm": Objective("mdlm", MDLMCollator, MDLMCollator, mdlm_sequence_nelbo, learns_gaps=False, fixed_canvas=True),
}
if tuple(OBJECTIVE_TABLE) != OBJECTIVES:
    raise ImportError(f"The objectives table {tuple(OBJECTIVE_TABLE)} must match ElasticMDMConfig's {OBJECTIVES}.")


def get_objective(name: str) -> Objective:
    """The table entry of objective `name`; a ValueError lists the known ones."""
    if name not in OBJECTIVE_TABLE:
        raise ValueError(f"objective={name!r} is unknown; use one of {OBJECTIVES}.")
    return OBJECTIVE_TABLE[name]


def make_collator(
    objective: str,
    config,
    *,
    nelbo: bool = False,
    max_length: int | None = None,
    seed: int | None = None,
    defer_noise: bool = False,
    noise_sampler: NoiseLevelSampler | None = None,
    schedule: str = "linear",
    num_steps: int = 128,
) -> PackingCollator:
    """The collator of `objective` for a model of `config` (its mask / BOS / EOS ids, pad id for MDLM).

    `nelbo=False`: training batches (Elastic: noise levels from `noise_sampler`, default `NoiseLevelSampler()`);
    `nelbo=True`: held-out batches of the NELBO estimator (Elastic: the K-step process of `schedule`, `num_steps`).
    `max_length` defaults to `config.max_position_embeddings`; `seed` fixes the noise (None: the global RNG);
    `defer_noise` leaves the corruption to `apply_noise` on the batch's device (the trainer's training batches).
    """
    spec = get_objective(objective)
    collator = spec.nelbo_collator if nelbo else spec.training_collator
    return collator(
        mask_token_id=config.mask_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        max_length=config.max_position_embeddings if max_length is None else max_length,
        seed=seed,
        defer_noise=defer_noise,
        vocab_size=config.vocab_size,
        **spec.collator_options(config, nelbo, noise_sampler, schedule, num_steps),
    )


__all__ = [
    "OBJECTIVES",
    "Objective",
    "OBJECTIVE_TABLE",
    "get_objective",
    "make_collator",
    "elastic_sequence_nelbo",
    "mdlm_sequence_nelbo",
]
