"""The command-line arguments of training: data, model, training and report (`HfArgumentParser` dataclasses).

* `DataArguments` (defined in `data/arguments.py`): where the text comes from and how it is tokenized;
* `ModelArguments`: a checkpoint to start from, or the shape of a new model, and LoRA (`lora.py`);
* `ElasticMDMTrainingArguments`: `TrainingArguments` plus the objective and the diffusion knobs (`trainer.py`);
* `ReportArguments`: the samples drawn after training (`commands/train.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..configuration_elastic_mdm import OBJECTIVES
from ..data.arguments import DataArguments
from ..schedules_elastic_mdm import SCHEDULES, NoiseLevelSampler, RevealSchedule, check_num_steps


@dataclass
class ElasticMDMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the diffusion knobs (paper §4.4)."""

    objective: str = field(
        default="elastic", metadata={"help": "'elastic' (docs/design.md §2) or 'mdlm' (fixed canvas)."}
    )
    schedule_families: list[str] = field(
        default_factory=lambda: ["linear", "cosine", "exponential", "p-linear"],
        metadata={"help": "Schedule families drawn per example."},
    )
    horizon_min: int = field(default=16, metadata={"help": "Smallest horizon K drawn per example."})
    horizon_max: int = field(default=1024, metadata={"help": "Largest horizon K drawn per example."})
    length_share: float = field(default=0.05, metadata={"help": "Share of step-0 (length model) examples."})
    clipped_share: float = field(default=0.0, metadata={"help": "Share of examples with s' = 1 - U[β, ω]."})
    mask_rate_min: float = field(default=0.0, metadata={"help": "β of the clipped mask rate U[β, ω]."})
    mask_rate_max: float = field(default=1.0, metadata={"help": "ω of the clipped mask rate U[β, ω]."})
    token_mask_share: str = field(
        default="schedule",
        metadata={
            "help": "Masks among the active positions: 'schedule' (s = F(k-1), ~n/K token targets per example) or "
            "'uniform' (mask share (s' - s)/s' ~ U(0, 1], ~n s'/2 token targets)."
        },
    )
    gap_loss_weight: float | None = field(default=None, metadata={"help": "λ_gap; default: the model config's."})
    eval_num_steps: int = field(default=128, metadata={"help": "K of the NELBO reported at evaluation."})
    eval_schedule: str = field(default="linear", metadata={"help": "Schedule of the NELBO reported at evaluation."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collators need every column."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP: search the autograd graph for unused parameters at every step. Not needed: both objectives "
            "use every trainable parameter (MDLM freezes the gap head it never reads); Transformers' default (on "
            "without gradient checkpointing) pays that search at every step."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Transformers' filter of nan/inf losses from the logged loss; it reads the loss back every step, "
            "so it is off: a non-finite loss shows in the logs."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that already holds a model or checkpoint-* folders, replacing them "
            "(refused otherwise, unless the run resumes from a checkpoint inside it)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; use one of {OBJECTIVES}.")
        unknown = sorted(set(self.schedule_families) - set(SCHEDULES))
        if unknown:
            raise ValueError(f"schedule_families has unknown schedules {unknown}; use some of {SCHEDULES}.")
        if self.eval_schedule not in SCHEDULES:
            raise ValueError(f"eval_schedule={self.eval_schedule!r} is unknown; use one of {SCHEDULES}.")
        check_num_steps(self.eval_num_steps, "--eval_num_steps")

    def noise_sampler(self) -> NoiseLevelSampler:
        """The training-time randomisation of `(s, s')`."""
        return NoiseLevelSampler(
            families=tuple(RevealSchedule(name) for name in self.schedule_families),
            min_steps=self.horizon_min,
            max_steps=self.horizon_max,
            length_share=self.length_share,
            clipped_share=self.clipped_share,
            beta=self.mask_rate_min,
            omega=self.mask_rate_max,
            mask_share=self.token_mask_share,
        )


@dataclass
class ModelArguments:
    """A checkpoint to start from, or the shape of a new model."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint folder or Hub id."})
    block_type: str = field(default="dit", metadata={"help": "'dit' (MDLM) or 'llama' (LLaDA) blocks."})
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    time_conditioning: bool = field(default=False, metadata={"help": "Noise level s' conditions the backbone (adaLN)."})
    gap_noise_conditioning: bool = field(
        default=True, metadata={"help": "Noise level s' conditions the gap head only (step caching stays exact)."}
    )
    cond_dim: int = 128
    gap_head_type: str = "concat"
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa | eager | varlen_attn | flash_attention_2"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: train every weight)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator."})
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=list, metadata={"help": "Linears that get adapters (default: attention and MLP of the block)."}
    )
    lora_merge: bool = field(default=True, metadata={"help": "Merge the adapters and save a plain checkpoint."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let the tokenizer run its own code (auto_map); the model always loads the installed class."},
    )


NOT_SHAPE = ("model_name_or_path", "attn_implementation", "trust_remote_code")  # ModelArguments not in the config


@dataclass
class ReportArguments:
    """Samples drawn after training to compare lengths with the data (and JSON validity on the built-in task)."""

    report_num_samples: int = field(default=0, metadata={"help": "Unconditional samples for the report (0: none)."})
    report_num_steps: int = 64
    report_schedule: str = "linear"
    lock_length: bool = field(
        default=True,
        metadata={"help": "Saved generation config: keep the step-0 length (True) or re-draw gaps every step (False)."},
    )
    mdlm_gap_budget: int = field(default=16, metadata={"help": "MDLM objective: masks per open gap of a template."})


__all__ = [
    "DataArguments",
    "ElasticMDMTrainingArguments",
    "ModelArguments",
    "ReportArguments",
    "NOT_SHAPE",
]
