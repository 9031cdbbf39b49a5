"""Reports of measurements: the sample report a training run writes next to its checkpoint, and the JSON and
Markdown reports of `elastic_mdm.commands.evaluate` (every model's metrics side by side).

An evaluation report is `{"settings": {...}, "models": {label: {section: metrics}}}`; its Markdown has one table of
the scalar metrics (`"section.name"` rows, one column per model), then each model's calibration table and length
histogram.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lengths import length_histogram_table, length_report, sweep_row
from .plots import save_length_histogram
from .samples import draw_samples, write_samples
from .structured import StructuredTask, json_validity, structured_validity


def sample_report(
    model,
    tokenizer,
    data_lengths: torch.Tensor,
    *,
    num_samples: int,
    output_dir: str | Path,
    schemas: Sequence[dict] | None = None,
    structured_tasks: Sequence[StructuredTask] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **generate_kwargs,
) -> dict:
    """Sample `num_samples` unconditional sequences; report their lengths against the data (table, PNG), with
    `schemas` the share of valid JSON, and with `structured_tasks` the share of valid template fills (MDLM checkpoints:
    pass `mdlm_gap_budget`). Writes `length_histogram.png`, `samples.jsonl` and `sample_report.json`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples = draw_samples(model, tokenizer, num_samples, batch_size=batch_size, generator=generator, **generate_kwargs)
    generated = samples.lengths
    report = {"num_samples": num_samples, **length_report(generated, data_lengths)}
    steps = generate_kwargs.get("num_steps", model.generation_config.num_steps)
    schedule = generate_kwargs.get("schedule", model.generation_config.schedule)
    report["length_row"] = sweep_row(schedule, steps, generated, data_lengths, samples.hit_max_length)
    if schemas:
        report["json_validity"] = json_validity(samples.texts, schemas)
    if structured_tasks:
        per_template = max(1, num_samples // (4 * len(structured_tasks)))
        structured = structured_validity(
            model, tokenizer, structured_tasks, num_per_template=per_template, generator=generator, **generate_kwargs
        )
        report["template_json_validity"] = structured["json_validity"]
        report["template_json_validity_by_schema"] = structured["by_name"]
        report["templates_too_long"] = structured["too_long"]
    report["histogram_png"] = str(save_length_histogram(generated, data_lengths, output_dir / "length_histogram.png"))
    report["table"] = length_histogram_table(generated, data_lengths)
    write_samples(samples, output_dir / "samples.jsonl")
    with open(output_dir / "sample_report.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


def _cell(value: Any) -> str:
    """A Markdown table cell: floats with 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (columns: those of the first row unless given)."""
    if not rows:
        return ""
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], title: str = "Elastic-MDM evaluation") -> str:
    """Markdown of an evaluation report `{"settings": {...}, "models": {label: {section: metrics}}}`: one table of
    the scalar metrics of every model side by side, then each model's calibration table and length histogram."""
    models = report["models"]
    lines = [f"# {title}", "", markdown_table([{"setting": k, "value": v} for k, v in report["settings"].items()])]
    keys = [key for m in models.values() for key in _scalar_keys(m)]
    rows = [{"metric": key, **{label: _lookup(m, key) for label, m in models.items()}} for key in dict.fromkeys(keys)]
    lines += ["", "## Metrics", "", markdown_table(rows, ["metric", *models])]
    for label, metrics in models.items():
        if "gap_calibration" in metrics:
            lines += ["", f"## Gap-head calibration: {label}", "", markdown_table(metrics["gap_calibration"])]
        if "length_table" in metrics:
            lines += ["", f"## Lengths, generated vs data: {label}", "", "```", metrics["length_table"], "```"]
    return "\n".join(lines) + "\n"


def _scalar_keys(metrics: dict[str, Any]) -> list[str]:
    """`"section.name"` of every number in the sections (dicts) of one model's metrics, in order."""
    return [
        f"{section}.{name}"
        for section, values in metrics.items()
        if isinstance(values, dict)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _lookup(metrics: dict, key: str) -> Any:
    """`metrics[section][name]` for `key = "section.name"`, '' when absent."""
    section, name = key.split(".", 1)
    value = metrics.get(section, {})
    return value.get(name, "") if isinstance(value, dict) else ""


def write_reports(report: dict[str, Any], output_dir: str | Path, stem: str = "evaluation") -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.md` in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(markdown_report(report))
    return json_path, md_path


__all__ = ["markdown_report", "markdown_table", "sample_report", "write_reports"]
