"""Measuring an Elastic-MDM: length fidelity of samples against the data, and structured-output validity.

Lengths are integer token counts (anchors included). Distances are between the two empirical distributions:

* total variation `TV = ½ Σ_n |p(n) - q(n)|`
* Wasserstein-1 `W1 = Σ_n |P(n) - Q(n)|` (P, Q the CDFs on the integers)
* Kolmogorov-Smirnov `KS = max_n |P(n) - Q(n)|`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def empirical_cdfs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CDFs of two integer samples on their common support `0..max`: `[max + 1]` each."""
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("Length statistics need at least one generated and one data length.")
    size = int(max(a.max(), b.max())) + 1
    pa = torch.bincount(a.long(), minlength=size).double() / a.numel()
    pb = torch.bincount(b.long(), minlength=size).double() / b.numel()
    return pa.cumsum(0), pb.cumsum(0)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    """`½ Σ_n |p_a(n) - p_b(n)|` of two integer samples."""
    ca, cb = empirical_cdfs(a, b)
    return 0.5 * float((ca.diff(prepend=ca.new_zeros(1)) - cb.diff(prepend=cb.new_zeros(1))).abs().sum())


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """`Σ_n |P_a(n) - P_b(n)|`: the earth mover's distance of two integer samples."""
    ca, cb = empirical_cdfs(a, b)
    return float((ca - cb).abs().sum())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """`max_n |P_a(n) - P_b(n)|`."""
    ca, cb = empirical_cdfs(a, b)
    return float((ca - cb).abs().max())


def length_report(generated: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """Means, medians and the three distances between generated and data lengths."""
    generated, data = generated.long().cpu(), data.long().cpu()
    return {
        "generated_mean": float(generated.double().mean()),
        "data_mean": float(data.double().mean()),
        "generated_median": float(generated.median()),
        "data_median": float(data.median()),
        "total_variation": total_variation(generated, data),
        "wasserstein1": wasserstein1(generated, data),
        "ks": ks_statistic(generated, data),
    }


def length_histogram_table(generated: torch.Tensor, data: torch.Tensor, num_bins: int = 12) -> str:
    """A text table of both length histograms over shared bins (shares in %, with bars)."""
    low, high = int(min(generated.min(), data.min())), int(max(generated.max(), data.max())) + 1
    edges = torch.linspace(low, high, num_bins + 1).floor().long().unique()
    rows = ["length bin   | data %  | generated %"]
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        shares = [float(((x >= lo) & (x < hi)).double().mean()) * 100 for x in (data, generated)]
        bars = "".join(f"{s:6.1f}  " for s in shares)
        rows.append(f"[{lo:4d}, {hi:4d}) | {bars}{'#' * round(shares[1] / 2)}")
    return "\n".join(rows)


def save_length_histogram(generated: torch.Tensor, data: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Both length histograms in one PNG (needs matplotlib: pip install elastic-mdm[eval])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError("Writing the histogram PNG needs matplotlib: pip install matplotlib") from error
    low, high = int(min(generated.min(), data.min())), int(max(generated.max(), data.max())) + 1
    bins = list(range(low, high + 1, max(1, (high - low) // 40)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(data.tolist(), bins=bins, alpha=0.5, density=True, label=f"data (n={data.numel()})")
    ax.hist(generated.tolist(), bins=bins, alpha=0.5, density=True, label=f"generated (n={generated.numel()})")
    ax.set_xlabel("sequence length (tokens, BOS/EOS included)")
    ax.set_ylabel("share")
    ax.set_title(title or "Length distribution: generated vs data")
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def json_validity(texts: Sequence[str], schemas: Sequence[dict]) -> float:
    """Share of texts that parse as JSON and validate against at least one of `schemas` (needs jsonschema)."""
    from .synthetic import validate_text

    if not texts:
        return 0.0
    return sum(any(validate_text(text, schema) for schema in schemas) for text in texts) / len(texts)


def template_validity(
    model,
    tokenizer,
    templates: dict[str, tuple[list[int], dict]],
    *,
    num_per_template: int,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> dict[str, float]:
    """Structured output (paper §5.4): fill each template (anchors = JSON structure, open gaps = values) and return
    the share of outputs that validate against the template's schema, per template and overall (`all`)."""
    shares = {}
    for name, (template, schema) in templates.items():
        sequences, lengths = model.generate(
            template_ids=[template], num_return_sequences=num_per_template, generator=generator, **generate_kwargs
        )
        texts = tokenizer.batch_decode(
            [seq[:n].tolist() for seq, n in zip(sequences, lengths, strict=True)], skip_special_tokens=True
        )
        shares[name] = json_validity(texts, [schema])
    shares["all"] = sum(shares.values()) / max(len(shares), 1)
    return shares


def sample_report(
    model,
    tokenizer,
    data_lengths: torch.Tensor,
    *,
    num_samples: int,
    output_dir: str | Path,
    schemas: Sequence[dict] | None = None,
    templates: dict[str, tuple[list[int], dict]] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **generate_kwargs,
) -> dict:
    """Sample `num_samples` unconditional sequences; report their lengths against the data (table, PNG), with
    `schemas` the share of valid JSON, and with `templates` (name -> (template ids, schema)) the share of valid
    template fills. Writes `length_histogram.png`, `samples.jsonl` and `sample_report.json`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    lengths, texts = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        sequences, lens = model.generate(num_return_sequences=count, generator=generator, **generate_kwargs)
        lengths.append(lens.cpu())
        texts += tokenizer.batch_decode(
            [seq[:n].tolist() for seq, n in zip(sequences, lens, strict=True)], skip_special_tokens=True
        )
    generated = torch.cat(lengths)
    report = {"num_samples": num_samples, **length_report(generated, data_lengths)}
    if schemas:
        report["json_validity"] = json_validity(texts, schemas)
    if templates:
        per_template = max(1, num_samples // (4 * len(templates)))
        shares = template_validity(
            model, tokenizer, templates, num_per_template=per_template, generator=generator, **generate_kwargs
        )
        report["template_json_validity"] = shares.pop("all")
        report["template_json_validity_by_schema"] = shares
    report["histogram_png"] = str(save_length_histogram(generated, data_lengths, output_dir / "length_histogram.png"))
    report["table"] = length_histogram_table(generated, data_lengths)
    with open(output_dir / "samples.jsonl", "w") as f:
        for text, n in zip(texts, generated.tolist(), strict=True):
            f.write(json.dumps({"length": n, "text": text}) + "\n")
    with open(output_dir / "sample_report.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


__all__ = [
    "total_variation",
    "wasserstein1",
    "ks_statistic",
    "length_report",
    "length_histogram_table",
    "save_length_histogram",
    "json_validity",
    "template_validity",
    "sample_report",
]
