"""Structured output (paper §5.4): templates whose structure tokens are anchors and whose values are open gaps,
filled by `generate(template_ids=...)`, scored by the share of fills that parse as JSON and validate against
their schema (`data.json_templates.validate_text`, formats checked).

A template is `BOS .. EOS` with the mask token at each open gap (`json_templates.template_ids`); its pieces come
from the schema (`json_template`) or from an instance (`instance_template`, arrays keep their length). An MDLM
checkpoint fills a fixed canvas: each open gap takes `mdlm_gap_budget` masks, so a template fits the model's
length `L` only when `#anchors + #gaps · budget <= L`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.json_templates import instance_template, json_template, template_ids, validate_text
from ..data.schema_prompts import iter_rows, prompt_text, with_schema_prompt
from ..data.synthetic import SCHEMAS, template_token_ids
from ..objectives.table import get_objective
from .samples import decode_samples


@dataclass
class StructuredTask:
    """One structured-output prompt: a template (`BOS .. EOS`, a mask at each open gap) and the schema its fill must
    validate against."""

    name: str
    template_ids: list[int]
    schema: dict
    prompt: str = ""  # text before the JSON (the schema prompt), cut from each fill before it is scored


def builtin_structured_tasks(tokenizer) -> list[StructuredTask]:
    """The six schemas of the built-in synthetic task, with their schema templates (`synthetic.template_token_ids`)."""
    return [StructuredTask(name, template_token_ids(tokenizer, name), schema) for name, schema in SCHEMAS.items()]


def load_structured_tasks(
    path: str | Path, tokenizer, limit: int | None = None, schema_prompt: bool = False
) -> list[StructuredTask]:
    """Tasks of a JSONL file of `{"schema": ..., "instance": ...}` rows (optional `"name"`). The template comes from
    the instance (`instance_template`); rows without an instance use the schema's template (`json_template`:
    objects, arrays as one gap, strings, scalars). With `schema_prompt`, the compact schema text and a newline come
    first, as anchors (`data.schema_prompts`, the schema-only setting the model was trained on)."""
    tasks: list[StructuredTask] = []
    if limit == 0:
        return tasks
    for number, row in iter_rows(path, required=("schema",)):  # a bad line is an error naming the file and line
        pieces = instance_template(row["instance"]) if "instance" in row else json_template(row["schema"])
        ids = template_ids(tokenizer, with_schema_prompt(row["schema"], pieces, schema_prompt))
        prompt = prompt_text(row["schema"]) if schema_prompt else ""
        tasks.append(StructuredTask(row.get("name", f"row{number - 1}"), ids, row["schema"], prompt))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def template_fits(template: Sequence[int], mask_token_id: int, max_length: int, gap_budget: int | None) -> bool:
    """Whether a template fits `max_length` tokens: its anchors, plus `gap_budget` masks per open gap for MDLM."""
    gaps = sum(t == mask_token_id for t in template)
    return len(template) - gaps + gaps * (gap_budget or 0) <= max_length


def fill_templates(
    model,
    tokenizer,
    templates: Sequence[Sequence[int]],
    *,
    num_per_template: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> list[str]:
    """Texts of `num_per_template` fills of every template (template 0's fills first), `generate(template_ids=...)`
    in batches of about `batch_size` sequences."""
    per_call = max(1, batch_size // num_per_template)
    texts = []
    for start in range(0, len(templates), per_call):
        out = model.generate(
            template_ids=[list(t) for t in templates[start : start + per_call]],
            num_return_sequences=num_per_template,
            generator=generator,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        texts += decode_samples(tokenizer, out.sequences, out.lengths)[1]
    return texts


def structured_validity(
    model,
    tokenizer,
    tasks: Sequence[StructuredTask],
    *,
    num_per_template: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> dict[str, Any]:
    """Fill every task's template `num_per_template` times; return `parse_rate` (share of fills that are strict JSON),
    `json_validity` (share that also validate against the task's schema, formats checked), their count, and per
    task name the validity share. With `mdlm_gap_budget` (MDLM checkpoints), templates whose budgeted canvas exceeds
    the model's length are not run and count as failures (`too_long`)."""
    limit = generate_kwargs.get("max_length") or model.config.max_position_embeddings
    budget = generate_kwargs.get("mdlm_gap_budget") if get_objective(model.config.objective).fixed_canvas else None
    fits = [template_fits(t.template_ids, model.config.mask_token_id, limit, budget) for t in tasks]
    runnable = [t.template_ids for t, ok in zip(tasks, fits, strict=True) if ok]
    texts = iter(
        fill_templates(
            model, tokenizer, runnable, num_per_template=num_per_template, batch_size=batch_size, generator=generator,
            **generate_kwargs,
        )
    )  # fmt: skip
    parsed, valid, by_name = [], [], defaultdict(list)
    for task, ok in zip(tasks, fits, strict=True):
        for _ in range(num_per_template):
            text = without_prompt(next(texts), task.prompt) if ok else None
            parsed.append(text is not None and validate_text(text, {}))  # the empty schema accepts any JSON value
            valid.append(parsed[-1] and validate_text(text, task.schema))  # only what parses is validated
            by_name[task.name].append(valid[-1])
    outputs = max(len(valid), 1)
    return {
        "num_outputs": len(valid),
        "parse_rate": sum(parsed) / outputs,
        "json_validity": sum(valid) / outputs,
        "too_long": fits.count(False),
        "by_name": {name: sum(v) / len(v) for name, v in by_name.items()},
    }


def without_prompt(text: str, prompt: str) -> str | None:
    """The fill after its prompt; None if the text does not start with the prompt (a failed fill)."""
    return text[len(prompt) :] if text.startswith(prompt) else None


def json_validity(texts: Sequence[str], schemas: Sequence[dict]) -> float:
    """Share of texts that parse as JSON and validate against at least one of `schemas` (needs jsonschema)."""
    if not texts:
        return 0.0
    return sum(any(validate_text(text, schema) for schema in schemas) for text in texts) / len(texts)


__all__ = [
    "StructuredTask",
    "builtin_structured_tasks",
    "fill_templates",
    "json_validity",
    "load_structured_tasks",
    "structured_validity",
    "template_fits",
]
