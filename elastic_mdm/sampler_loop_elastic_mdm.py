"""What the two samplers share: their options, their output and the bookkeeping of their step loops.

`sample_elastic` (`sampler_elastic_mdm.py`) and `sample_mdlm` (`sampler_mdlm_elastic_mdm.py`) take the same
`SamplerOptions`, run their passes through the same `Stepper` (`stepper_elastic_mdm.py`: pass counters, step cache,
token fill, trajectory, drafts) and return the same `ElasticMDMGenerateOutput`, so that the two are compared on
identical code.

Host syncs (docs/design.md §8): a step loop reads the device back only through `host_read`, once per step, a few
integer scalars at once; every other index is taken at a size the host already knows (`rows_where`): both in
`device_reads_elastic_mdm.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.utils import ModelOutput

from .device_reads_elastic_mdm import host_read
from .sampling_state_elastic_mdm import ActiveState
from .schedules_elastic_mdm import RevealSchedule, reveal_probability


class TokenDenoiser(Protocol):
    """What `sample_mdlm` needs of a model: features of a packed stream and the token head on selected rows."""

    def diffusion_features(self, input_ids: torch.Tensor, packed, noise_level: torch.Tensor) -> torch.Tensor: ...

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class Denoiser(TokenDenoiser, Protocol):
    """What `sample_elastic` needs: a `TokenDenoiser` with the gap head too."""

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor: ...


@dataclass
class SamplerOptions:
    """The settings both samplers take (`generate()` builds them once from its `ElasticMDMGenerationConfig`).

    Args:
        mask_token_id, pad_token_id: The mask id, and the id that pads the output sequences.
        max_length: Cap on the length of a sequence, anchors included (MDLM: the canvas length `L`).
        num_steps: Number of reverse steps `K` (at most `schedules.MAX_NUM_STEPS`).
        schedule: The reveal schedule `F`.
        token_processors: Logits processors applied before every token draw.
        do_sample: Sample tokens (`True`) or take the most likely one.
        use_cache: Reuse a sequence's last pass when its input did not change (exact unless time-conditioned).
        generator: Drives every random draw.
        output_trajectory: Keep the state fed to every step.
        progress_bar: Show a tqdm bar over the steps.
        on_draft: Called with the state after the token fill of every step that runs a pass.
    """

    mask_token_id: int
    pad_token_id: int
    max_length: int
    num_steps: int
    schedule: RevealSchedule
    token_processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    do_sample: bool = True
    use_cache: bool = True
    generator: torch.Generator | None = None
    output_trajectory: bool = False
    progress_bar: bool = False
    on_draft: Callable[[ActiveState], None] | None = None


@dataclass
class ElasticMDMGenerateOutput(ModelOutput):
    """`sequences` `[batch, max_len]` padded with the pad (or EOS) id; `lengths` `[batch]` true lengths (anchors
    included); `hit_max_length` `[batch]` whether a sequence was stopped by `max_length` (MDLM: no EOS on the canvas;
    MDLM templates: a gap used its whole budget); `trajectory[k][b]` the sequence `b` fed at step `k` (the active
    sequence for Elastic, the whole canvas for MDLM; the last entry is the final state), when asked; `num_passes`
    denoiser passes run and `tokens_processed` the tokens they encoded; `sequence_passes` `[batch]` the passes that
    encoded each sequence (a packed pass counts once for every sequence in it; the step cache skips the others);
    `tokens_per_forward` the generated tokens over those passes (`tokens_per_forward()`; filled by `generate`)."""

    sequences: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    hit_max_length: torch.Tensor | None = None
    trajectory: list[list[torch.Tensor]] | None = None
    num_passes: int | None = None
    tokens_processed: int | None = None
    sequence_passes: torch.Tensor | None = None
    tokens_per_forward: float | None = None


def tokens_per_forward(output: ElasticMDMGenerateOutput, input_lengths: torch.Tensor | list[int]) -> float:
    """Tokens per forward pass, as dLLM leaderboards report it: the generated tokens (each final length minus its
    input length `input_lengths` `[batch]`, the sampler's start state: prompt or template anchors with BOS and EOS, so
    neither the prompt nor padding counts) divided by the denoiser passes. A packed pass counts once for every
    sequence it encodes (`output.sequence_passes`), so the figure does not depend on the batch size; for one sequence
    it is `generated / num_passes`. 0 when nothing was encoded."""
    start = torch.as_tensor(input_lengths, device=output.lengths.device)
    generated = int((output.lengths - start).clamp_min(0).sum())
    passes = int(output.sequence_passes.sum())
    return generated / passes if passes else 0.0


def sample_categorical(
    logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None, overwrite: bool = False
) -> torch.Tensor:
    """One draw per row of `softmax(logits)` (`argmax` when not sampling).

    Exponential race: `argmax_v p_v / E_v` with `E_v ~ Exp(1)` is a draw of `p` (the Gumbel-max trick after `exp`).
    It is what `torch.multinomial(p, 1)` computes, draw for draw, without its validity check, which reads the
    device back (a host sync per step on CUDA). With `overwrite` (the caller never reads `logits` again), the race
    is drawn into the float32 `logits` once `p` is computed: the same draws, with no buffer of its own."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    buffer = logits if overwrite and logits.dtype == torch.float32 else torch.empty_like(probs)
    race = buffer.exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def reveal_tables(schedule: RevealSchedule, num_steps: int) -> tuple[list[float], list[float]]:
    """`F(0..K)` and `q_0..q_K` with `q_k = (F(k+1) - F(k)) / (1 - F(k))` and `q_K = 0`, as host floats (the step
    loop then reads them without a device sync). `q_{K-1} = 1` unless everything was revealed before."""
    reveal = schedule.table(num_steps)  # float64 on the host; K <= MAX_NUM_STEPS (schedules.check_num_steps)
    share = reveal_probability(reveal[:-1], reveal[1:]).tolist() + [0.0]
    return reveal.tolist(), share


def step_range(num_steps: int, desc: str, progress_bar: bool):
    """`range(num_steps)`, wrapped in a tqdm bar when asked."""
    steps = range(num_steps)
    if not progress_bar:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, total=num_steps)


@dataclass
class PassWork:
    """What the next denoiser pass encodes, known on the host: its sequences, tokens and longest sequence."""

    sequences: int
    tokens: int
    longest: int

    @staticmethod
    def counts(lengths: torch.Tensor, dirty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the device, the three scalars of the work of the `dirty` sequences of `lengths` `[B]`."""
        selected = lengths * dirty  # [B] zero for the sequences a pass reuses
        return dirty.sum(), selected.sum(), selected.max()

    @classmethod
    def of(cls, lengths: torch.Tensor, dirty: torch.Tensor, *more: torch.Tensor) -> tuple[PassWork, list[int]]:
        """The work of the `dirty` sequences of `lengths` `[B]`, read in one go with the scalars `more`."""
        sequences, tokens, longest, *values = host_read(*cls.counts(lengths, dirty), *more)
        return cls(sequences, tokens, longest), values


def run_to_end(stepper, cohort, desc: str) -> ElasticMDMGenerateOutput:
    """Step `stepper` (`stepper_elastic_mdm.Stepper`) until `cohort` has run its `total_steps` (in a tqdm bar with
    `progress_bar`), then collect its output (the read of the final sequences comes after the step loop)."""
    for _ in step_range(cohort.total_steps, desc, cohort.options.progress_bar):
        stepper.step()
    stepper.collect()
    return cohort.output
