"""Documents -> examples: tokenization and chunking (pure functions, for `datasets.map(batched=True, num_proc=...)`).

Every example is one clean sequence `x0 = (BOS, y_1 .. y_n, EOS)` with `0 <= n <= max_length - 2`
(docs/design.md §1). Documents are tokenized WITHOUT special tokens and with `split_special_tokens=True` (a literal
`"<mask>"` in raw text is text, not the mask id). A document of more than `max_length - 2` tokens is split into
consecutive chunks of at most `max_length - 2` tokens, each wrapped as `BOS + chunk + EOS`: nothing is truncated or
dropped, so the chunk interiors concatenate back to the document's ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..loading.tokenizers import anchor_ids


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
    bos, eos = anchor_ids(tokenizer)
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


__all__ = [
    "check_max_length",
    "split_into_examples",
    "tokenize_documents",
]
