"""Structured-output validity: an `evaluate` metric over `elastic_mdm.data.json_templates.validate_text` (§5.4).

    import evaluate
    metric = evaluate.load("metrics/json_validity")
    metric.compute(predictions=['{"a":1}', "oops"], references=[json.dumps(schema)] * 2)

Needs the `elastic_mdm` package (pip install -e . in this repository) and jsonschema.
"""

import json

import datasets
import evaluate

from elastic_mdm.data.json_templates import validate_text

_DESCRIPTION = """Share of texts that parse as strict JSON (`parse_rate`) and share that also validate against
their JSON Schema with formats checked (`json_validity`), as in the paper's schema-only JSON generation task."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts.
    references: the JSON Schema of each text, serialized as a JSON string.
Returns:
    parse_rate, json_validity.
Examples:
    >>> metric = evaluate.load("metrics/json_validity")
    >>> schema = json.dumps({"type": "object", "required": ["a"]})
    >>> metric.compute(predictions=['{"a":1}', '{"b":1}', "{"], references=[schema] * 3)
    {'parse_rate': 0.6666666666666666, 'json_validity': 0.3333333333333333}
"""

_CITATION = """Elastic-MDM: Efficient Masked Diffusion Models with Variable Sequence Lengths (§5.4)."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class JsonValidity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        count = max(len(predictions), 1)
        parsed = sum(validate_text(text, {}) for text in predictions)  # the empty schema accepts any JSON value
        valid = sum(
            validate_text(text, json.loads(schema)) for text, schema in zip(predictions, references, strict=True)
        )
        return {"parse_rate": parsed / count, "json_validity": valid / count}
