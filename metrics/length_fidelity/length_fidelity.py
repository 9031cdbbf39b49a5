"""Length fidelity of generated sequences against data: an `evaluate` metric over `elastic_mdm.evaluation.lengths`.

    import evaluate
    metric = evaluate.load("metrics/length_fidelity")          # a local folder of this repository
    metric.compute(predictions=[generated_lengths], references=[data_lengths])   # one pair of samples
    metric.compute(predictions=[31, 40, 28], references=[30, 41, 27])           # or equal-sized flat lists

Needs the `elastic_mdm` package (pip install -e . in this repository).
"""

import datasets
import evaluate
import torch

from elastic_mdm.evaluation.lengths import length_report

_DESCRIPTION = """Compares two samples of sequence lengths (integer token counts): generated vs data. Returns the
means and medians of both, the total variation `TV = ½ Σ_n |p(n) - q(n)|`, the Wasserstein-1 distance
`W1 = Σ_n |P(n) - Q(n)|` and the Kolmogorov-Smirnov statistic `KS = max_n |P(n) - Q(n)|` of their empirical
distributions (P, Q the CDFs on the integers). All rows of a batch are pooled."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated lengths: one list of lengths per row (rows are pooled, a row may be empty), or one
        length per row.
    references: data lengths, in the same layout and number of rows (as lists, the two samples may differ in size).
Returns:
    generated_mean, data_mean, generated_median, data_median, total_variation, wasserstein1, ks.
Examples:
    >>> metric = evaluate.load("metrics/length_fidelity")
    >>> metric.compute(predictions=[[2, 2, 3, 5]], references=[[2, 3, 3, 3]])["total_variation"]
    0.5
"""

_CITATION = """Elastic-MDM: Efficient Masked Diffusion Models with Variable Sequence Lengths (§5.2)."""


def _pooled(values) -> torch.Tensor:
    """All lengths of the rows, flattened (rows may be lists or single ints)."""
    flat = [v for row in values for v in (row if isinstance(row, (list, tuple)) else [row])]
    return torch.tensor(flat, dtype=torch.long)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LengthFidelity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("int64")),
                        "references": datasets.Sequence(datasets.Value("int64")),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],  # fmt: skip
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return length_report(_pooled(predictions), _pooled(references))
