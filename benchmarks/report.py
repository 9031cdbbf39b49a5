"""The benchmark reports: the machine, the expected token share, the Markdown tables."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from elastic_mdm.evaluation.reports import markdown_table

from .sampling import sampling_ratios


def machine_name(device: torch.device | str) -> str:
    """The GPU name on CUDA, else the CPU (processor, cores, torch threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"CPU {processor} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def markdown_summary(settings: dict[str, Any], sampling: list[dict], training: list[dict]) -> str:
    """The settings table, the sampling table with its ratios, and the training table."""
    lines = ["## Settings", "", markdown_table([{"setting": k, "value": v} for k, v in settings.items()])]
    if sampling:
        ratios = [{"ratio": k, "value": v} for k, v in sampling_ratios(sampling).items()]
        lines += ["", "## Sampling", "", markdown_table(sampling), "", markdown_table(ratios)]
    if training:
        lines += ["", "## Training", "", markdown_table(training)]
        if len(training) == 2:
            ratio = training[0]["median_step_s"] / training[1]["median_step_s"]
            lines += ["", f"Step time {training[0]['objective']} / {training[1]['objective']}: {ratio:.3f}"]
    return "\n".join(lines) + "\n"
