"""Training features of structured-output rows `{"schema": ..., "instance": ...}` (the layout of
`benchmarks/schemastore.py` and `scripts/evaluate.py --structured_tasks`), in the schema-only setting of the paper
(§5.4): the compact schema text is a prompt, the instance's JSON structure (braces, brackets, keys, colons, commas,
the quotes of strings) is anchored, and the scalar values are what the model learns to write.

A row becomes `BOS + schema_text + "\n" + structure-with-values + EOS` with `anchor_mask` True on the prompt and the
structure, so the collators never noise them and the model is trained exactly on the infilling problem that
`generate(template_ids=...)` poses at evaluation (`evaluation` builds the same template with `schema_prompt=True`).

For the MDLM baseline (`gap_budget=B`), every value is followed by `B - len(value)` pad tokens (values longer than
`B` tokens make the row unusable): MDLM fills a template through fixed placeholders of `B` masks per gap and
writes pads where a value is shorter, so it is trained on the same canvas it samples (pads in a gap are dropped
from its output).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .json_templates import (
    ValueTooLong,
    fill_template_with_anchors,
    instance_template,
    instance_values,
    merge_text,
    template_ids,
    to_text,
)

logger = logging.get_logger(__name__)

PROMPT_SEPARATOR = "\n"


def prompt_text(schema: dict) -> str:
    """The schema prompt: the compact schema text and `PROMPT_SEPARATOR`."""
    return to_text(schema) + PROMPT_SEPARATOR


def with_schema_prompt(schema: dict, pieces: list[str | None], schema_prompt: bool = True) -> list[str | None]:
    """Template `pieces` with the schema prompt in front (when `schema_prompt`), merged into the first text piece."""
    return merge_text([prompt_text(schema), *pieces]) if schema_prompt else pieces


def structured_pieces(schema: dict, instance: Any, schema_prompt: bool = True) -> list[str | None]:
    """Template pieces of a row: the schema prompt (when `schema_prompt`), then the instance's structure with a
    `GAP` at each value."""
    return with_schema_prompt(schema, instance_template(instance), schema_prompt)


def structured_feature(
    tokenizer, schema: dict, instance: Any, *, schema_prompt: bool = True, gap_budget: int | None = None
) -> dict[str, list] | None:
    """`{"input_ids", "anchor_mask"}` of one row (`json_templates.fill_template_with_anchors`): template tokens are
    anchors, each value's tokens are not (padded to `gap_budget` tokens when given). None if a value is longer than
    `gap_budget` tokens."""
    template = template_ids(tokenizer, structured_pieces(schema, instance, schema_prompt))
    try:
        ids, anchors = fill_template_with_anchors(tokenizer, template, instance_values(instance), gap_budget)
    except ValueTooLong:
        return None
    return {"input_ids": ids, "anchor_mask": anchors}


def iter_rows(path: str | Path, required: tuple[str, ...] = ("schema", "instance")) -> Iterator[tuple[int, dict]]:
    """`(line number, row)` of every row of a JSONL file of `{"schema", "instance"}` objects (blank lines skipped).
    A line that is not JSON, or a row that is not an object with the `required` keys, is a ValueError naming the file
    and the line."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg} at column {err.colno}).") from err
            if not isinstance(row, dict) or any(key not in row for key in required):
                keys = " and ".join(repr(key) for key in required)
                raise ValueError(f"{path}:{number}: a structured row is a JSON object with the keys {keys}.")
            yield number, row


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a `{"schema", "instance"}` JSONL file (`iter_rows`: errors name the file and line)."""
    return [row for _, row in iter_rows(path)]


def structured_features(
    tokenizer,
    rows: Iterable[dict],
    *,
    max_length: int,
    schema_prompt: bool = True,
    gap_budget: int | None = None,
) -> tuple[list[dict[str, list]], int]:
    """Features of every row that fits: at most `max_length` tokens and (with `gap_budget`) no value longer than the
    budget. Returns the features and how many rows were left out, so that callers can report it."""
    features, left_out = [], 0
    for row in rows:
        feature = structured_feature(
            tokenizer, row["schema"], row["instance"], schema_prompt=schema_prompt, gap_budget=gap_budget
        )
        if feature is None or len(feature["input_ids"]) > max_length:
            left_out += 1
        else:
            features.append(feature)
    return features, left_out


def check_gap_budget(data_args, objective: str) -> None:
    """Refuse a `--structured_gap_budget` that would be ignored or misapplied: it pads every value for the fixed
    canvas of the MDLM baseline, so it needs `--structured_train_file` and a fixed-canvas objective (an Elastic-MDM
    model learns the lengths the padding would erase, and the rows with a longer value would be dropped)."""
    from ..objectives.table import get_objective

    budget = data_args.structured_gap_budget
    if budget is None:
        return
    if not data_args.structured_train_file:
        raise ValueError(
            f"--structured_gap_budget {budget} pads the values of --structured_train_file rows; give that file, or "
            "leave the budget unset."
        )
    if not get_objective(objective).fixed_canvas:
        raise ValueError(
            f"--structured_gap_budget {budget} is for the MDLM baseline (--objective mdlm, a fixed canvas of budget "
            f"tokens per value); --objective {objective} learns each value's length, which the padding would erase "
            "(and rows with a longer value would be dropped). Leave --structured_gap_budget unset."
        )


def structured_datasets(data_args, tokenizer, max_length: int) -> tuple[Any, Any]:
    """`(train, eval)` `structured_dataset`s of `data_args.structured_train_file` and `structured_eval_file` (eval
    None without one)."""
    train, eval_ = data_args.structured_train_file, data_args.structured_eval_file
    return (
        structured_dataset(train, data_args, tokenizer, max_length),
        structured_dataset(eval_, data_args, tokenizer, max_length) if eval_ else None,
    )


def structured_dataset(path: str, data_args, tokenizer, max_length: int) -> Any:
    """A `datasets.Dataset` of the `structured_features` of the rows of `path`. Rows that do not fit are left out
    with a warning that counts them; a file with no row that fits is an error naming the flags to change."""
    import datasets

    budget = data_args.structured_gap_budget
    features, left_out = structured_features(
        tokenizer,
        read_rows(path),
        max_length=max_length,
        schema_prompt=data_args.structured_schema_prompt,
        gap_budget=budget,
    )
    if not features:
        raise ValueError(
            f"No row of {path} fits max_length={max_length} tokens"
            + (f" with structured_gap_budget={budget}" if budget else "")
            + "; raise max_position_embeddings or the budget."
        )
    if left_out:
        logger.warning(f"{left_out} rows of {path} do not fit max_length={max_length} (or the gap budget); left out.")
    return datasets.Dataset.from_list(features)


__all__ = [
    "PROMPT_SEPARATOR",
    "prompt_text",
    "with_schema_prompt",
    "structured_pieces",
    "structured_feature",
    "iter_rows",
    "read_rows",
    "structured_features",
    "check_gap_budget",
    "structured_datasets",
    "structured_dataset",
]
