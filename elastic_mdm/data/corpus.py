"""Datasets for Elastic-MDM: the raw documents of a source, tokenized into examples, and their length statistics.

Every example this module produces is one clean sequence `x0 = (BOS, y_1 .. y_n, EOS)` with
`0 <= n <= max_length - 2` (docs/design.md §1; chunking in `chunking.py`), stored as a single `input_ids` column at
its natural length (never padded to a canvas): the features `ElasticMDMCollator` and `MDLMCollator` consume, with
`max_length` the model's `max_position_embeddings`. Empty documents (blank after `strip()`) are dropped (and counted
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
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from ..loading.tokenizers import anchor_ids, where_hub
from . import synthetic
from .arguments import SYNTHETIC_DATASET, DataArguments
from .chunking import check_max_length, tokenize_documents

logger = logging.get_logger(__name__)

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
SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003  # eval records use `seed + offset`, train records `seed`


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
            f"Could not load the dataset {data_args.dataset_name!r}{config}: it could not be found {where_hub()}. "
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
    anchor_ids(tokenizer)
    if data_args.structured_train_file:
        from .schema_prompts import structured_datasets

        return structured_datasets(data_args, tokenizer, max_length)
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
    "FILE_BUILDERS",
    "infer_builder",
    "load_raw_datasets",
    "tokenize_dataset",
    "load_datasets",
    "anchored_synthetic_train",
    "length_statistics",
    "length_summary",
]
