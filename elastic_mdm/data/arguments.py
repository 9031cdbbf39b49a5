"""Where the training and evaluation text comes from and how it is tokenized: `DataArguments` (an
`HfArgumentParser` dataclass read by `corpus.py`) and the name of the built-in synthetic JSON task."""

from __future__ import annotations

from dataclasses import dataclass, field

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


__all__ = ["SYNTHETIC_DATASET", "TEXT_SAMPLE_BY", "DataArguments"]
