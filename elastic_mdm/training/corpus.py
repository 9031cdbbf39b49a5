"""Text corpora for Elastic-MDM: data arguments, tokenizer set-up, document chunking and dataset loading.

Every example this module produces is one clean sequence `x0 = (BOS, y_1 .. y_n, EOS)` with
`0 <= n <= max_length - 2` (design §1), stored as a single `input_ids` column at its natural length (never padded to
a canvas): the features `ElasticMDMCollator` and `MDLMCollator` consume, with `max_length` the model's
`max_position_embeddings`.

Documents are tokenized WITHOUT special tokens and with `split_special_tokens=True` (a literal `"<mask>"` in raw text
is text, not the mask id). A document of more than `max_length - 2` tokens is split into consecutive chunks of at
most `max_length - 2` tokens, each wrapped as `BOS + chunk + EOS`: nothing is truncated or dropped, so the chunk
interiors concatenate back to the document's ids. Empty documents (blank after `strip()`) are dropped (and counted
in the log) unless `keep_empty_documents` is set, in which case each becomes an `n = 0` example `[BOS, EOS]`.

Sources (`DataArguments`): the built-in synthetic JSON task (`dataset_name="synthetic-json"`, see `synthetic.py`), a
Hub dataset (`dataset_name="lm1b"`, found in the local cache when offline), or local files (`train_files`,
`eval_files`: txt, json, jsonl, parquet, csv, optionally compressed). When the eval split is missing, a seeded
`eval_fraction` of the training documents (at least one) is carved off before tokenization, so the chunks of one
document never land in both splits.

`datasets` is an optional dependency, imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import glob
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging

from . import synthetic

logger = logging.get_logger(__name__)

SYNTHETIC_DATASET = "synthetic-json"
# Tokens `ensure_special_tokens` adds when a tokenizer lacks them.
ADDED_BOS_TOKEN, ADDED_EOS_TOKEN, ADDED_MASK_TOKEN = "<|bos|>", "<|eos|>", "<|mask|>"
# File extension -> `datasets` packaged builder.
FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")
SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003  # eval records use `seed + offset`, train records `seed`


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


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

    @property
    def is_synthetic(self) -> bool:
        """True for the built-in synthetic JSON task."""
        return self.dataset_name == SYNTHETIC_DATASET


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and config
# ---------------------------------------------------------------------------------------------------------------


def load_tokenizer(
    data_args: DataArguments, model_name_or_path: str | None = None, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """The tokenizer `data_args.tokenizer_name` (else `model_name_or_path`) names, or the synthetic task's BPE.

    A name is a local folder or a Hub id (`AutoTokenizer.from_pretrained`, extra `kwargs` passed on). With neither,
    `synthetic.build_tokenizer()` is trained (a few seconds). The tokenizer is returned as loaded: call
    `ensure_special_tokens` next and resize the model's embeddings if it added tokens.
    """
    name = data_args.tokenizer_name or model_name_or_path
    if name is None:
        if not data_args.is_synthetic:
            logger.warning(
                "No --tokenizer_name given: building the synthetic JSON task's byte-level BPE, which fits "
                f"'{SYNTHETIC_DATASET}' but tokenizes natural text poorly."
            )
        return synthetic.build_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=data_args.cache_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the tokenizer {name!r}: it is not a local folder with tokenizer files and could not be "
            f"found {_where_hub()}. Pass a local tokenizer folder with --tokenizer_name, or leave it unset to build "
            f"the synthetic tokenizer. Cause: {err}"
        ) from err


def _lacks(tokenizer: PreTrainedTokenizerBase, role: str) -> bool:
    """True when `tokenizer` has no `role` ('bos', 'eos', 'mask', 'pad') token with an id."""
    return getattr(tokenizer, f"{role}_token", None) is None or getattr(tokenizer, f"{role}_token_id", None) is None


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give `tokenizer` the BOS, EOS, mask and pad tokens Elastic-MDM needs; return the tokens new to its vocabulary.

    The automatic fix, in place:

    * EOS but no BOS: BOS := EOS (the GPT-2 convention, where `<|endoftext|>` opens and closes every document);
    * BOS but no EOS: add `<|eos|>`; neither: add `<|bos|>` and `<|eos|>`;
    * no mask token: add `<|mask|>`;
    * no pad token: pad := EOS (collators never need a distinct pad).

    Tokens already in the vocabulary are reused and not reported. When the returned list is non-empty,
    `len(tokenizer)` grew: call `model.resize_token_embeddings(len(tokenizer))` (or build a new config with
    `sync_config_with_tokenizer`).
    """
    old_size = len(tokenizer)
    new: dict[str, str] = {}
    if _lacks(tokenizer, "eos"):
        new["eos_token"] = ADDED_EOS_TOKEN
    if _lacks(tokenizer, "bos") and "eos_token" in new:
        new["bos_token"] = ADDED_BOS_TOKEN
    if _lacks(tokenizer, "mask"):
        new["mask_token"] = ADDED_MASK_TOKEN
    if new:
        tokenizer.add_special_tokens(new)
    if _lacks(tokenizer, "bos"):
        tokenizer.bos_token = tokenizer.eos_token
        logger.info(f"The tokenizer has no BOS token: using EOS {tokenizer.eos_token!r} as BOS.")
    if _lacks(tokenizer, "pad"):
        tokenizer.pad_token = tokenizer.eos_token
    added = [token for token in new.values() if tokenizer.convert_tokens_to_ids(token) >= old_size]
    if added:
        logger.warning(
            f"Added special tokens {added} to the tokenizer ({old_size} -> {len(tokenizer)} tokens); resize the "
            "model's embeddings with model.resize_token_embeddings(len(tokenizer))."
        )
    return added


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """`{"bos_token_id", "eos_token_id", "mask_token_id"}` of `tokenizer`; a ValueError names any that is missing."""
    missing = [role for role in ("bos", "eos", "mask") if _lacks(tokenizer, role)]
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(missing)} token; call ensure_special_tokens(tokenizer) to add them "
            "(then resize the model's embeddings)."
        )
    return {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "mask")}


def vocabulary_differences(
    tokenizer: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase, limit: int = 5
) -> tuple[int, list[str]]:
    """How many tokens of `reference` have another id (or none) in `tokenizer`, and the first `limit` of them.

    Tokens `tokenizer` adds beyond `reference` (e.g. a mask token `ensure_special_tokens` appended) are allowed."""
    vocab = tokenizer.get_vocab()
    differing = sorted(
        (token_id, token) for token, token_id in reference.get_vocab().items() if vocab.get(token) != token_id
    )
    examples = [f"{token!r}: id {token_id} in the checkpoint, {vocab.get(token)} here" for token_id, token in differing]
    return len(differing), examples[:limit]


def check_vocab(
    config: PreTrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise a ValueError listing every way `config` and `tokenizer` disagree, with the fix for each.

    Checked: `len(tokenizer) <= config.vocab_size` (a larger tokenizer emits ids without an embedding), that the
    config's BOS, EOS and mask ids equal the tokenizer's (the collator and the sampler use the config's), and, given
    the tokenizer saved with the checkpoint (`checkpoint_tokenizer`), that every one of its tokens keeps its id: the
    same vocabulary, not only the same size.
    """
    problems = []
    if checkpoint_tokenizer is not None:
        count, examples = vocabulary_differences(tokenizer, checkpoint_tokenizer)
        if count:
            problems.append(
                f"the tokenizer is not the checkpoint's: {count} of the checkpoint tokenizer's "
                f"{len(checkpoint_tokenizer)} tokens have another id ({'; '.join(examples)}), so the embeddings "
                "would be read with the wrong tokens: use the checkpoint's own tokenizer (leave --tokenizer_name "
                "unset, or point it at the checkpoint folder)"
            )
    if len(tokenizer) > config.vocab_size:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but config.vocab_size is {config.vocab_size}, so ids >= "
            f"{config.vocab_size} have no embedding: call model.resize_token_embeddings(len(tokenizer)) (e.g. after "
            "ensure_special_tokens added tokens), or build a new config with sync_config_with_tokenizer"
        )
    for role in ("bos", "eos", "mask"):
        tokenizer_id = None if _lacks(tokenizer, role) else getattr(tokenizer, f"{role}_token_id")
        config_id = getattr(config, f"{role}_token_id", None)
        if tokenizer_id is None:
            problems.append(f"the tokenizer has no {role} token: call ensure_special_tokens(tokenizer) first")
        elif config_id != tokenizer_id:
            problems.append(
                f"config.{role}_token_id={config_id} but tokenizer.{role}_token_id={tokenizer_id}: set "
                f"config.{role}_token_id = tokenizer.{role}_token_id (sync_config_with_tokenizer(config, tokenizer) "
                "sets every special id) or load the tokenizer the model was trained with"
            )
    if problems:
        raise ValueError("The model config and the tokenizer disagree:\n- " + "\n- ".join(problems))


def sync_config_with_tokenizer(
    config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> PreTrainedConfig:
    """Set a NEW model's `vocab_size` and special ids from `tokenizer` (in place) and return the config.

    `vocab_size = len(tokenizer)`, rounded up to a multiple of `pad_to_multiple_of` when given (unused rows are never
    produced by the tokenizer); `bos/eos/mask_token_id` from the tokenizer (which must have them, see
    `ensure_special_tokens`) and `pad_token_id` from the tokenizer's pad (possibly None).
    """
    ids = special_token_ids(tokenizer)
    size = len(tokenizer)
    if pad_to_multiple_of:
        size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    config.vocab_size = size
    for key, value in ids.items():
        setattr(config, key, value)
    config.pad_token_id = tokenizer.pad_token_id
    return config


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and chunking (pure functions, usable with datasets.map(batched=True, num_proc=...))
# ---------------------------------------------------------------------------------------------------------------


def check_max_length(max_length: int) -> None:
    """Refuse a `max_length` that leaves no room for one interior token between BOS and EOS."""
    if max_length < 3:
        raise ValueError(f"max_length={max_length} must be >= 3 (BOS, at least one token, EOS).")


def split_into_examples(
    token_lists: Iterable[Sequence[int]],
    bos_token_id: int,
    eos_token_id: int,
    max_length: int,
    keep_empty: bool = False,
) -> tuple[list[list[int]], int]:
    """Cut each document's ids into consecutive chunks of at most `max_length - 2` ids, each as `BOS + chunk + EOS`.

    A document of `m > 0` ids gives `ceil(m / (max_length - 2))` examples whose interiors concatenate back to its ids.
    An empty document gives `[BOS, EOS]` when `keep_empty`, else nothing. Returns the examples (in document order)
    and the number of empty documents dropped.
    """
    check_max_length(max_length)
    width = max_length - 2
    examples: list[list[int]] = []
    dropped = 0
    for ids in token_lists:
        ids = list(ids)
        if not ids:
            if keep_empty:
                examples.append([bos_token_id, eos_token_id])
            else:
                dropped += 1
            continue
        starts = range(0, len(ids), width)
        examples.extend([bos_token_id, *ids[start : start + width], eos_token_id] for start in starts)
    return examples, dropped


def _texts_of(texts_or_batch: str | Sequence[str | None] | Mapping[str, Sequence[Any]], text_column: str) -> list[str]:
    """The documents of a string, a list of strings or a `datasets` batch (its `text_column`); None counts as ''."""
    if isinstance(texts_or_batch, str):
        return [texts_or_batch]
    if isinstance(texts_or_batch, Mapping):
        if text_column not in texts_or_batch:
            raise ValueError(
                f"The data has no text column {text_column!r}; available columns: {sorted(texts_or_batch)}. "
                "Set --text_column to one of them."
            )
        texts_or_batch = texts_or_batch[text_column]
    texts = ["" if text is None else text for text in texts_or_batch]
    wrong = [type(text).__name__ for text in texts if not isinstance(text, str)]
    if wrong:
        raise ValueError(f"Column {text_column!r} must hold strings, found {wrong[0]}.")
    return texts


def tokenize_documents(
    texts_or_batch: str | Sequence[str | None] | Mapping[str, Sequence[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    text_column: str = "text",
    keep_empty: bool = False,
) -> dict[str, list[list[int]]]:
    """`{"input_ids": examples}`: the documents tokenized without special tokens, chunked, wrapped in BOS/EOS.

    See `split_into_examples` for the chunking (never truncates, never drops a token). Documents blank after
    `strip()` are dropped, or kept as `[BOS, EOS]` when `keep_empty`. Special-token strings inside the text are
    tokenized as text (`split_special_tokens=True`), so clean data never contains the mask id. Pure: use it with
    `datasets.map(functools.partial(tokenize_documents, tokenizer=..., max_length=...), batched=True,
    remove_columns=..., num_proc=...)`.
    """
    check_max_length(max_length)
    bos, eos = _anchor_ids(tokenizer)
    texts = _texts_of(texts_or_batch, text_column)
    nonblank = [i for i, text in enumerate(texts) if text.strip()]
    token_lists: list[list[int]] = [[] for _ in texts]
    if nonblank:
        encoded = tokenizer(
            [texts[i] for i in nonblank],
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]
        for i, ids in zip(nonblank, encoded, strict=True):
            token_lists[i] = ids
    examples, _ = split_into_examples(token_lists, bos, eos, max_length, keep_empty)
    return {"input_ids": examples}


def _anchor_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """`(bos_token_id, eos_token_id)` of `tokenizer`, or a ValueError pointing to `ensure_special_tokens`."""
    missing = [role for role in ("bos", "eos") if _lacks(tokenizer, role)]
    if missing:
        raise ValueError(
            f"The tokenizer has no {' or '.join(missing)} token, which every example needs; call "
            "ensure_special_tokens(tokenizer) first."
        )
    return tokenizer.bos_token_id, tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------------
# Raw (document-level) datasets
# ---------------------------------------------------------------------------------------------------------------


def infer_builder(files: Sequence[str]) -> str:
    """The `datasets` packaged builder ('text', 'json', 'parquet', 'csv') of `files`, from their extensions.

    Compression suffixes (.gz, .bz2, .xz, .zst, .lz4) are looked through. All files must share one builder.
    """
    builders = set()
    for path in files:
        name = path.lower()
        for suffix in COMPRESSION_SUFFIXES:
            name = name.removesuffix(suffix)
        extension = os.path.splitext(name)[1]
        if extension not in FILE_BUILDERS:
            raise ValueError(
                f"Unsupported file extension {extension or '(none)'!r} of {path!r}; supported: "
                f"{sorted(FILE_BUILDERS)} (optionally compressed with {list(COMPRESSION_SUFFIXES)})."
            )
        builders.add(FILE_BUILDERS[extension])
    if len(builders) != 1:
        raise ValueError(f"All data files must have one format; got {sorted(builders)} from {list(files)}.")
    return builders.pop()


def _check_files_exist(files: Sequence[str]) -> None:
    """Raise FileNotFoundError for a local path (not a URL or glob) that does not exist."""
    for path in files:
        if "://" not in path and not glob.has_magic(path) and not os.path.exists(path):
            raise FileNotFoundError(f"Data file {path!r} does not exist.")


def _where_hub() -> str:
    """'in the local cache (offline mode...)' or 'on the Hub', for error messages."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "in the local cache (offline mode is on: HF_HUB_OFFLINE=1, so the Hub is not contacted)"
    return "locally or on the Hugging Face Hub"


def _load_files(data_args: DataArguments) -> Any:
    """`DatasetDict` (or `IterableDatasetDict`) of the local files, keyed by `train_split` / `eval_split`."""
    import datasets

    files = [*data_args.train_files, *(data_args.eval_files or [])]
    builder = infer_builder(files)
    _check_files_exist(files)
    data_files = {data_args.train_split: list(data_args.train_files)}
    if data_args.eval_files:
        data_files[data_args.eval_split] = list(data_args.eval_files)
    kwargs = {"sample_by": data_args.text_sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files=data_files, streaming=data_args.streaming, cache_dir=data_args.cache_dir, **kwargs
        )
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as err:
        raise ValueError(f"Could not read the {builder} files {files}: {err}") from err


def _load_hub(data_args: DataArguments) -> Any:
    """`DatasetDict` (or `IterableDatasetDict`) of the Hub dataset, with an actionable error when it can't be had."""
    import datasets

    try:
        return datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            streaming=data_args.streaming,
            cache_dir=data_args.cache_dir,
        )
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as err:
        config = f" (config {data_args.dataset_config_name!r})" if data_args.dataset_config_name else ""
        raise ValueError(
            f"Could not load the dataset {data_args.dataset_name!r}{config}: it could not be found {_where_hub()}. "
            "Check the name and config, download it beforehand with network access, or pass local files with "
            f"--train_files/--eval_files ({', '.join(sorted(FILE_BUILDERS))}), or use --dataset_name "
            f"{SYNTHETIC_DATASET} for the built-in task. Cause: {type(err).__name__}: {err}"
        ) from err


def _synthetic_splits(data_args: DataArguments, seed: int) -> tuple[Any, Any]:
    """Train and eval documents (column 'text') of the synthetic JSON task, drawn with different seeds."""
    import datasets

    def texts(num_records: int, records_seed: int) -> Any:
        records = synthetic.generate_records(num_records, records_seed)
        return datasets.Dataset.from_dict({"text": [record["text"] for record in records]})

    train = texts(data_args.num_synthetic_records, seed)
    eval_ = texts(data_args.num_synthetic_eval_records, seed + SYNTHETIC_EVAL_SEED_OFFSET)
    if data_args.streaming:
        return train.to_iterable_dataset(), eval_.to_iterable_dataset()
    return train, eval_


def _carve_eval(train: Any, data_args: DataArguments, seed: int, available: Sequence[str]) -> tuple[Any, Any]:
    """Split `eval_fraction` of the training documents (at least one) off as the eval set.

    Map-style: a seeded shuffled split. Streaming: the first documents become the eval set and are skipped in
    training; their number comes from the split's known size, else from `max_eval_samples`.
    """
    logger.info(
        f"No eval split {data_args.eval_split!r} (available: {list(available)}): using {data_args.eval_fraction:.2%} "
        f"of {data_args.train_split!r} as the eval set."
    )
    if hasattr(train, "__len__"):
        if not data_args.keep_empty_documents:  # carve from real documents, so the eval set is never all blank
            _check_text_column(train, data_args.text_column, "train")
            train = _drop_empty_documents(train, data_args.text_column, "train", data_args.preprocessing_num_workers)
        if len(train) < 2:
            raise ValueError(
                f"The {data_args.train_split!r} split has {len(train)} non-empty document(s): too few to carve an eval "
                "set off; give eval data (--eval_files or --eval_split)."
            )
        num_eval = min(len(train) - 1, max(1, round(data_args.eval_fraction * len(train))))
        parts = train.train_test_split(test_size=num_eval, shuffle=True, seed=seed)
        return parts["train"], parts["test"]
    num_eval = _stream_eval_size(train, data_args)
    return train.skip(num_eval), train.take(num_eval)


def _stream_eval_size(train: Any, data_args: DataArguments) -> int:
    """Documents to take off a streamed training split for evaluation."""
    splits = getattr(getattr(train, "info", None), "splits", None) or {}
    known = splits.get(data_args.train_split)
    if known is not None and known.num_examples:
        return max(1, round(data_args.eval_fraction * known.num_examples))
    if data_args.max_eval_samples:
        return data_args.max_eval_samples
    raise ValueError(
        "Streaming a dataset of unknown size with no eval split: give --max_eval_samples (the number of leading "
        "documents to hold out), --eval_files, or an existing --eval_split."
    )


def load_raw_datasets(data_args: DataArguments, seed: int = 42) -> tuple[Any, Any, str]:
    """`(train_documents, eval_documents, text_column)` before tokenization, from the source `data_args` names."""
    if data_args.is_synthetic:
        return (*_synthetic_splits(data_args, seed), "text")
    if data_args.train_files:
        splits = _load_files(data_args)
    elif data_args.dataset_name is not None:
        splits = _load_hub(data_args)
    else:
        raise ValueError(
            f"No data: give --dataset_name (a Hub id or '{SYNTHETIC_DATASET}') or --train_files (local files)."
        )
    if data_args.train_split not in splits:
        raise ValueError(
            f"The dataset has no split {data_args.train_split!r}; available splits: {list(splits)}. Set --train_split."
        )
    train = splits[data_args.train_split]
    if data_args.eval_split in splits and data_args.eval_split != data_args.train_split:
        return train, splits[data_args.eval_split], data_args.text_column
    return (*_carve_eval(train, data_args, seed, list(splits)), data_args.text_column)


# ---------------------------------------------------------------------------------------------------------------
# Tokenized datasets
# ---------------------------------------------------------------------------------------------------------------


def _column_names(dataset: Any, split: str) -> list[str]:
    """Columns of `dataset`; for a stream of unknown features, those of its first row (empty stream: an error)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"The {split} split is empty: it has no documents.")
    return list(first)


def _check_text_column(dataset: Any, text_column: str, split: str) -> list[str]:
    """The columns of `dataset`, after checking that `text_column` is one of them (error naming the available)."""
    columns = _column_names(dataset, split)
    if text_column not in columns:
        raise ValueError(
            f"The {split} split has no text column {text_column!r}; available columns: {columns}. "
            "Set --text_column to one of them."
        )
    return columns


def _drop_empty_documents(dataset: Any, text_column: str, split: str, num_proc: int | None) -> Any:
    """`dataset` without its blank documents (map-style only), logging how many were dropped."""
    before = len(dataset)
    dataset = dataset.filter(
        _nonblank,
        batched=True,
        input_columns=[text_column],
        num_proc=num_proc,
        desc=f"Dropping empty {split} documents",
    )
    if len(dataset) < before:
        logger.warning(f"Dropped {before - len(dataset)} empty document(s) of {before} from the {split} split.")
    return dataset


def _nonblank(texts: Sequence[str | None]) -> list[bool]:
    """Per text: is it non-blank after `strip()`?"""
    return [bool(text and text.strip()) for text in texts]


def _limit(dataset: Any, count: int | None) -> Any:
    """The first `count` rows of `dataset` (all when `count` is None)."""
    if count is None:
        return dataset
    if hasattr(dataset, "__len__"):
        return dataset.select(range(min(count, len(dataset))))
    return dataset.take(count)


def tokenize_dataset(
    documents: Any,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    text_column: str = "text",
    split: str = "train",
    keep_empty: bool = False,
    max_samples: int | None = None,
    num_proc: int | None = None,
) -> Any:
    """Documents -> examples: a dataset (or stream) with the single column `input_ids` (`BOS .. EOS` chunks).

    At most `max_samples` documents are tokenized (each gives at least one example) and at most `max_samples`
    examples kept. A map-style result with no example raises a ValueError naming `split`.
    """
    import datasets

    columns = _check_text_column(documents, text_column, split)
    streaming = not hasattr(documents, "__len__")
    documents = _limit(documents, max_samples)
    if not streaming and not keep_empty:
        documents = _drop_empty_documents(documents, text_column, split, num_proc)
    function = functools.partial(
        tokenize_documents, tokenizer=tokenizer, max_length=max_length, text_column=text_column, keep_empty=keep_empty
    )
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    if streaming:
        examples = documents.map(function, batched=True, remove_columns=columns, features=features)
    else:
        examples = documents.map(
            function,
            batched=True,
            remove_columns=columns,
            features=features,
            num_proc=num_proc,
            desc=f"Tokenizing the {split} split",
        )
    examples = _limit(examples, max_samples)
    if not streaming and len(examples) == 0:
        raise ValueError(
            f"The {split} split is empty after tokenization: every one of its documents was blank (or the source "
            "has none). Check --text_column and the data files, or pass --keep_empty_documents."
        )
    return examples


def load_datasets(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int = 42
) -> tuple[Any, Any]:
    """`(train_dataset, eval_dataset)` of `BOS .. EOS` examples of at most `max_length` tokens, at natural lengths.

    Each is a `datasets.Dataset` (an `IterableDataset` when `data_args.streaming`) with the single column
    `input_ids`, ready for `ElasticMDMCollator(max_length=max_length, ...)`. `seed` draws the synthetic records and
    the carved-off eval documents. Errors (ValueError) name the problem: unknown dataset, missing split or column,
    unsupported file, empty split.
    """
    check_max_length(max_length)
    _anchor_ids(tokenizer)
    train_documents, eval_documents, text_column = load_raw_datasets(data_args, seed)
    common = {
        "tokenizer": tokenizer,
        "max_length": max_length,
        "text_column": text_column,
        "keep_empty": data_args.keep_empty_documents,
        "num_proc": data_args.preprocessing_num_workers,
    }
    if data_args.is_synthetic and data_args.synthetic_anchor_share > 0:
        train = anchored_synthetic_train(data_args, tokenizer, max_length, seed)
    else:
        train = tokenize_dataset(train_documents, split="train", max_samples=data_args.max_train_samples, **common)
    eval_ = tokenize_dataset(eval_documents, split="eval", max_samples=data_args.max_eval_samples, **common)
    if data_args.is_synthetic and not data_args.streaming and len(train) > data_args.num_synthetic_records:
        logger.warning(
            f"Some '{SYNTHETIC_DATASET}' records are longer than max_length={max_length} and were split into "
            "chunks (no longer whole JSON records); raise max_position_embeddings to keep them whole."
        )
    return train, eval_


def anchored_synthetic_train(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int
) -> Any:
    """The synthetic training records with `input_ids` and `anchor_mask` (`synthetic.anchored_features`): the same
    records and ids as the text path, plus anchored JSON structure in a share of them."""
    import datasets

    records = synthetic.generate_records(data_args.num_synthetic_records, seed)
    features = synthetic.anchored_features(tokenizer, records, data_args.synthetic_anchor_share, seed)
    longest = max(len(f["input_ids"]) for f in features)
    if longest > max_length:
        raise ValueError(
            f"A '{SYNTHETIC_DATASET}' record has {longest} tokens, more than max_length={max_length}: raise "
            "max_position_embeddings or set synthetic_anchor_share=0 (records are then split into chunks)."
        )
    train = datasets.Dataset.from_list(features[: data_args.max_train_samples])
    return train.to_iterable_dataset() if data_args.streaming else train


# ---------------------------------------------------------------------------------------------------------------
# Length statistics
# ---------------------------------------------------------------------------------------------------------------


def length_statistics(dataset: Any, n: int | None = None, column: str = "input_ids") -> torch.Tensor:
    """Lengths (BOS and EOS included, i.e. `n + 2`) of the first `n` examples (all when None) as a long tensor.

    Accepts a `datasets.Dataset` (read through Arrow, without decoding the ids), an `IterableDataset` (then `n` is
    required) or a list of features such as `synthetic.synthetic_dataset`'s.
    """
    if not hasattr(dataset, "__len__"):
        if n is None:
            raise ValueError("Give n (how many examples to read) for a streamed dataset.")
        return torch.tensor([len(row[column]) for row in itertools.islice(dataset, n)], dtype=torch.long)
    count = len(dataset) if n is None else min(n, len(dataset))
    if hasattr(dataset, "with_format"):
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:count]
        return torch.tensor(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False), dtype=torch.long)
    return torch.tensor([len(row[column]) for row in itertools.islice(dataset, count)], dtype=torch.long)


def length_summary(lengths: torch.Tensor) -> dict[str, float]:
    """Count, mean, std, min, 5% / 50% / 95% quantiles and max of a lengths tensor."""
    values = lengths.double()
    if values.numel() == 0:
        return {"count": 0.0}
    quantiles = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {
        "count": float(values.numel()),
        "mean": float(values.mean()),
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        "min": float(values.min()),
        "p05": quantiles[0],
        "median": quantiles[1],
        "p95": quantiles[2],
        "max": float(values.max()),
    }


__all__ = [
    "SYNTHETIC_DATASET",
    "DataArguments",
    "load_tokenizer",
    "ensure_special_tokens",
    "special_token_ids",
    "check_vocab",
    "sync_config_with_tokenizer",
    "split_into_examples",
    "tokenize_documents",
    "infer_builder",
    "load_raw_datasets",
    "tokenize_dataset",
    "load_datasets",
    "length_statistics",
    "length_summary",
]
