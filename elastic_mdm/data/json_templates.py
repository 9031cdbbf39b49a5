"""JSON text and templates (paper §5.4, docs/design.md §5): compact canonical JSON, strict validation against a
schema, and templates: the compact JSON of a value as text pieces with a `GAP` at each value, tokenized piece by
piece into the `BOS .. EOS` layout `generate(template_ids=...)` fills (one mask per open gap).

Two templates: `json_template(schema)` (from a schema: an array is one gap, the model picks its length) and
`instance_template(instance)` (from an instance: arrays keep their elements, every scalar is a gap).
`template_values` / `instance_values` give the text a perfect model writes in each gap, so `fill_template` of a
template and its values is the tokenized record, with the template tokens as anchors.

`jsonschema` is an optional dependency, imported where validation needs it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerFast

GAP = None  # a value slot in a template


def to_text(value: Any) -> str:
    """Compact canonical JSON of `value` (no spaces, ASCII only, keys in insertion order)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def schema_validator(schema: dict[str, Any]) -> Any:
    """A `jsonschema` validator for `schema` (dialect from `$schema`, 2020-12 by default) that checks formats."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _reject_constant(name: str) -> Any:
    """Refuse `NaN`, `Infinity` and `-Infinity`, which Python's json accepts but JSON does not."""
    raise ValueError(f"{name} is not valid JSON")


def validate_text(text: str, schema: dict[str, Any]) -> bool:
    """True iff `text` parses as strict JSON and the value validates against `schema` (formats checked)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, TypeError, RecursionError):  # JSONDecodeError is a ValueError
        return False
    return _validator_of(json.dumps(schema, sort_keys=True)).is_valid(value)


@functools.lru_cache(maxsize=256)
def _validator_of(schema_text: str) -> Any:
    """`schema_validator` of a schema given as JSON text, built once per schema (evaluation validates many samples
    against each)."""
    return schema_validator(json.loads(schema_text))


def encode_piece(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of `text` alone, without BOS/EOS; special tokens written in it (a literal `<mask>` in a JSON value) are
    tokenized as text (`split_special_tokens=True`, as the corpus path), so that data never holds the mask id."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def json_template(schema: dict[str, Any]) -> list[str | None]:
    """Pieces of the compact JSON of any instance of `schema`: text, with `GAP` at values.

    Keys, braces, colons and commas are text; the quotes of a string value are text around its gap; a number or
    boolean value is one gap; an array is `[`, ONE gap for its whole content, `]`. Adjacent text pieces are
    merged, so two gaps are never adjacent. The pieces tokenize like the record wherever string values are
    non-empty (true of every generated record).
    """
    return merge_text(_template_parts(schema))


def _template_parts(schema: dict[str, Any]) -> list[str | None]:
    """Unmerged template pieces of `schema` (see `json_template`)."""
    if schema.get("type") == "object":
        return _object_parts(schema["properties"].items(), _template_parts)
    if schema.get("type") == "array":
        return ["[", GAP, "]"]
    if schema.get("type") == "string":
        return ['"', GAP, '"']
    return [GAP]


def instance_template(instance: Any) -> list[str | None]:
    """Pieces of the compact JSON of `instance` (`to_text`) with every scalar value an open gap (`GAP`): keys,
    braces, brackets, colons, commas and the quotes of strings are text; a string's content, a number, a boolean or
    null is one gap. Unlike `json_template`, arrays keep the instance's number of elements. Adjacent text pieces
    are merged."""
    return merge_text(_instance_parts(instance))


def _instance_parts(instance: Any) -> list[str | None]:
    """Unmerged template pieces of `instance` (see `instance_template`)."""
    if isinstance(instance, dict):
        return _object_parts(instance.items(), _instance_parts)
    if isinstance(instance, list):
        parts: list[str | None] = ["["]
        for i, value in enumerate(instance):
            parts += [","] * bool(i) + _instance_parts(value)
        return [*parts, "]"]
    return ['"', GAP, '"'] if isinstance(instance, str) else [GAP]


def _object_parts(items: Iterable[tuple[str, Any]], parts_of: Callable[[Any], list]) -> list[str | None]:
    """`{"key":<parts_of(value)>,...}` as unmerged pieces: the keys, colons, commas and braces are text."""
    parts: list[str | None] = ["{"]
    for i, (key, value) in enumerate(items):
        parts += [("," if i else "") + to_text(key) + ":", *parts_of(value)]
    return [*parts, "}"]


def instance_values(instance: Any) -> list[str]:
    """Text of each gap of `instance_template(instance)`, in order: a string's JSON-escaped content without its
    quotes, any other scalar's compact JSON. `"".join` of template text and values is `to_text(instance)`."""
    if isinstance(instance, dict):
        return [v for value in instance.values() for v in instance_values(value)]
    if isinstance(instance, list):
        return [v for value in instance for v in instance_values(value)]
    text = to_text(instance)
    return [text[1:-1]] if isinstance(instance, str) else [text]


def merge_text(parts: list[str | None]) -> list[str | None]:
    """Concatenate consecutive text pieces."""
    merged: list[str | None] = []
    for part in parts:
        if part is not GAP and merged and merged[-1] is not GAP:
            merged[-1] += part
        else:
            merged.append(part)
    return merged


def template_values(schema: dict[str, Any], instance: Any) -> list[str]:
    """Text of each gap of `json_template(schema)` for `instance`, in order (what a perfect model writes)."""
    if schema.get("type") == "object":
        return [v for name, sub in schema["properties"].items() for v in template_values(sub, instance[name])]
    if schema.get("type") in ("array", "string"):
        return [to_text(instance)[1:-1]]  # without the brackets or quotes, which are template text
    return [to_text(instance)]


def template_ids(tokenizer: PreTrainedTokenizerFast, pieces: Sequence[str | None]) -> list[int]:
    """`BOS` + each text piece tokenized on its own (no special tokens) + `EOS`, with `tokenizer.mask_token_id` at
    each `GAP`: the layout `generate(template_ids=...)` takes.

    Each mask marks one open gap of variable length (`parse_template` removes it and opens the gap after the
    token before it). Pieces are tokenized separately and concatenated, which matches how records tokenize.
    """
    ids = [tokenizer.bos_token_id]
    for piece in pieces:
        ids += [tokenizer.mask_token_id] if piece is GAP else encode_piece(tokenizer, piece)
    return [*ids, tokenizer.eos_token_id]


def fill_template(tokenizer: PreTrainedTokenizerFast, template: Sequence[int], values: Sequence[str]) -> list[int]:
    """Replace the i-th mask of `template` by the separately tokenized `values[i]`."""
    return fill_template_with_anchors(tokenizer, template, values)[0]


class ValueTooLong(ValueError):
    """A value has more tokens than the fixed gap budget it must fit (`fill_template_with_anchors(gap_budget=...)`)."""


def fill_template_with_anchors(
    tokenizer: PreTrainedTokenizerFast,
    template: Sequence[int],
    values: Sequence[str],
    gap_budget: int | None = None,
) -> tuple[list[int], list[bool]]:
    """`fill_template`, and for each token whether it is template text (an anchor) or part of a value. With
    `gap_budget`, every value is followed by pad tokens (EOS without a pad token) up to `gap_budget` tokens, the
    fixed-canvas layout an MDLM template fill uses; a longer value raises `ValueTooLong`."""
    if sum(t == tokenizer.mask_token_id for t in template) != len(values):
        raise ValueError("Give exactly one value per mask of the template.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fills = iter(values)
    ids: list[int] = []
    anchors: list[bool] = []
    for t in template:
        if t != tokenizer.mask_token_id:
            ids.append(t)
            anchors.append(True)
            continue
        piece = encode_piece(tokenizer, next(fills))
        if gap_budget is not None:
            if len(piece) > gap_budget:
                raise ValueTooLong(f"a value of {len(piece)} tokens does not fit gap_budget={gap_budget}")
            piece += [pad] * (gap_budget - len(piece))
        ids += piece
        anchors += [False] * len(piece)
    return ids, anchors


__all__ = [
    "GAP",
    "to_text",
    "schema_validator",
    "validate_text",
    "encode_piece",
    "json_template",
    "instance_template",
    "instance_values",
    "merge_text",
    "template_values",
    "template_ids",
    "fill_template",
    "fill_template_with_anchors",
    "ValueTooLong",
]
