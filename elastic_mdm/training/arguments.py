"""The command-line arguments of training: data, model, training and report (`HfArgumentParser` dataclasses).

* `DataArguments`: where the training and evaluation text comes from and how it is tokenized (`corpus.py`);
* `ModelArguments`: a checkpoint to start from, or the shape of a new model, and LoRA (`lora.py`);
* `ElasticMDMTrainingArguments`: `TrainingArguments` plus the objective and the diffusion knobs (`trainer.py`);
* `ReportArguments`: the samples drawn after training (`cli.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..configuration_elastic_mdm import OBJECTIVES
from ..schedules import SCHEDULES, NoiseLevelSampler, RevealSchedule, check_num_steps

SYNTHETIC_DATASET = "synthetic-json"
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


@dataclass
class DataArguments:
    """Where the training and evaluation text comes from and how it is tokenized (parse with `HfArgumentParser`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Hub dataset id (e.g. 'lm1b', 'openwebtext'; read from the local cache when HF_HUB_OFFLINE=1) or "
            f"'{SYNTHETIC_DATASET}' for the built-in synthetic JSON task. Leave unset to use --train_files."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of the Hub dataset (the second argument of load_dataset)."}
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local training files (txt: one document per line by default, json/jsonl, parquet, csv; "
            "optionally .gz/.bz2/.xz/.zst). The datasets builder is inferred from the extension."
        },
    )
    eval_files: list[str] | None = field(
        default=None, metadata={"help": "Local evaluation files (same format as --train_files)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text of each document."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(
        default="validation",
        metadata={
            "help": "Split used for evaluation; if missing, --eval_fraction of the training documents is held out."
        },
    )
    eval_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Share of the training documents carved off (seeded, at least one) as the eval set when the "
            "dataset has no --eval_split."
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset (IterableDataset) instead of loading and caching it."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many training examples (chunks), for quick runs."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many evaluation examples (chunks)."}
    )
    num_synthetic_records: int = field(default=20000, metadata={"help": f"Training records of '{SYNTHETIC_DATASET}'."})
    synthetic_anchor_share: float = field(
        default=0.0,
        metadata={"help": f"Share of '{SYNTHETIC_DATASET}' training records whose JSON structure is anchored."},
    )
    num_synthetic_eval_records: int = field(
        default=1000, metadata={"help": f"Evaluation records of '{SYNTHETIC_DATASET}' (drawn with another seed)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc); not used when streaming."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id. Unset: the model's tokenizer when a model path is given, else the "
            "synthetic task's byte-level BPE is built."
        },
    )
    keep_empty_documents: bool = field(
        default=False,
        metadata={"help": "Keep blank documents as n=0 examples [BOS, EOS] instead of dropping them."},
    )
    text_sample_by: str = field(
        default="line",
        metadata={
            "help": "For .txt files: one document per line, per paragraph (blank-line separated) or per file.",
            "choices": list(TEXT_SAMPLE_BY),
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for datasets and tokenizers."})
    structured_train_file: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of {schema, instance} rows (benchmarks/schemastore.py): train on the structured task, the "
            "instance's JSON structure anchored and (--structured_schema_prompt) the schema text as prompt."
        },
    )
    structured_eval_file: str | None = field(
        default=None, metadata={"help": "Held-out JSONL of {schema, instance} rows (default: none, no eval set)."}
    )
    structured_schema_prompt: bool = field(
        default=False,
        metadata={
            "help": "Put the compact schema text before the instance, as an anchored prompt (training rows, and the "
            "templates of scripts/evaluate.py --structured_tasks FILE)."
        },
    )
    structured_gap_budget: int | None = field(
        default=None,
        metadata={
            "help": "MDLM baseline: pad every value to this many tokens with the pad token (rows with a longer value "
            "are left out), the canvas generate(mdlm_gap_budget=...) fills."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.eval_files, str):
            self.eval_files = [self.eval_files]
        if self.dataset_name is not None and self.train_files:
            raise ValueError("Give either --dataset_name or --train_files, not both.")
        if self.eval_files and not self.train_files:
            raise ValueError("--eval_files needs --train_files (or use --dataset_name with --eval_split).")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must lie strictly between 0 and 1.")
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(f"text_sample_by={self.text_sample_by!r} is unknown; use one of {TEXT_SAMPLE_BY}.")
        if not 0.0 <= self.synthetic_anchor_share <= 1.0:
            raise ValueError(f"synthetic_anchor_share={self.synthetic_anchor_share} must lie in [0, 1].")
        if self.structured_train_file and (self.dataset_name or self.train_files):
            raise ValueError("Give --structured_train_file alone, without --dataset_name or --train_files.")
        if self.structured_eval_file and not self.structured_train_file:
            raise ValueError("--structured_eval_file needs --structured_train_file.")
        if self.structured_gap_budget is not None and self.structured_gap_budget < 1:
            raise ValueError(f"structured_gap_budget={self.structured_gap_budget} must be at least 1 (tokens a value).")

    @property
    def is_synthetic(self) -> bool:
        """True for the built-in synthetic JSON task."""
        return self.dataset_name == SYNTHETIC_DATASET


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
    "SYNTHETIC_DATASET",
    "TEXT_SAMPLE_BY",
    "DataArguments",
    "ElasticMDMTrainingArguments",
    "ModelArguments",
    "ReportArguments",
    "NOT_SHAPE",
]
