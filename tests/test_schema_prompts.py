"""The schema-prompt structured task: training features reconstruct the row exactly, anchors are the prompt and the
structure, the MDLM budget pads each value; and the SchemaStore builder's pure parts (annotation stripping, remote
references, the split by schema, instance draws that validate)."""

from __future__ import annotations

import json

import pytest

from benchmarks import schemastore
from elastic_mdm.data import schema_prompts
from elastic_mdm.data.json_templates import (
    encode_piece,
    instance_template,
    instance_values,
    template_ids,
    to_text,
    validate_text,
)
from elastic_mdm.data.synthetic import build_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                   "size": {"type": "integer", "minimum": 0}, "ok": {"type": "boolean"}, "note": {"type": "null"}},
}  # fmt: skip
INSTANCE = {"name": 'a "quoted" name', "tags": ["x", "yz"], "size": 12, "ok": True, "note": None}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(num_records=300)


def test_instance_template_and_values_rebuild_the_instance_text() -> None:
    pieces = instance_template(INSTANCE)
    values = iter(instance_values(INSTANCE))
    rebuilt = "".join(next(values) if p is None else p for p in pieces)
    assert rebuilt == to_text(INSTANCE)
    assert pieces.count(None) == 6  # name, two tags, size, ok, note
    assert all(a is not None or b is not None for a, b in zip(pieces, pieces[1:], strict=False))  # gaps apart


@pytest.mark.parametrize("schema_prompt", [True, False])
def test_features_decode_to_prompt_plus_instance_with_anchors_on_the_template(tokenizer, schema_prompt) -> None:
    feature = schema_prompts.structured_feature(tokenizer, SCHEMA, INSTANCE, schema_prompt=schema_prompt)
    ids, anchors = feature["input_ids"], feature["anchor_mask"]
    prompt = to_text(SCHEMA) + schema_prompts.PROMPT_SEPARATOR if schema_prompt else ""
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + to_text(INSTANCE)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    template = template_ids(tokenizer, schema_prompts.structured_pieces(SCHEMA, INSTANCE))
    anchored = [t for t, a in zip(ids, anchors, strict=True) if a]
    expected = template if schema_prompt else template_ids(
        tokenizer, schema_prompts.structured_pieces(SCHEMA, INSTANCE, schema_prompt=False))  # fmt: skip
    assert anchored == [t for t in expected if t != tokenizer.mask_token_id]
    free = "".join(tokenizer.decode([t]) for t, a in zip(ids, anchors, strict=True) if not a)
    assert free == "".join(instance_values(INSTANCE))


def test_mdlm_budget_pads_every_value_and_refuses_longer_values(tokenizer) -> None:
    longest = max(len(encode_piece(tokenizer, v)) for v in instance_values(INSTANCE))
    budget = longest + 2
    feature = schema_prompts.structured_feature(tokenizer, SCHEMA, INSTANCE, gap_budget=budget)
    plain = schema_prompts.structured_feature(tokenizer, SCHEMA, INSTANCE)
    free = [not a for a in feature["anchor_mask"]]
    assert sum(free) == budget * len(instance_values(INSTANCE))
    unpadded = [t for t, f in zip(feature["input_ids"], free, strict=True) if not (f and t == tokenizer.pad_token_id)]
    assert unpadded == plain["input_ids"]
    assert schema_prompts.structured_feature(tokenizer, SCHEMA, INSTANCE, gap_budget=longest - 1) is None
    features, left_out = schema_prompts.structured_features(
        tokenizer, [{"schema": SCHEMA, "instance": INSTANCE}] * 3, max_length=10_000, gap_budget=longest - 1
    )
    assert (features, left_out) == ([], 3)


def test_structured_features_leave_out_rows_longer_than_max_length(tokenizer) -> None:
    rows = [{"schema": SCHEMA, "instance": INSTANCE}, {"schema": {"type": "integer"}, "instance": 3}]
    features, left_out = schema_prompts.structured_features(tokenizer, rows, max_length=20)
    assert left_out == 1 and len(features) == 1 and len(features[0]["input_ids"]) <= 20


def test_read_rows_names_the_bad_line(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"schema": {}, "instance": 1}) + "\n\n" + json.dumps({"schema": {}}) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:3: .*'instance'"):
        schema_prompts.read_rows(path)


def test_strip_annotations_keeps_names_and_data() -> None:
    schema = {
        "title": "t", "description": "d", "x-tool": 1, "type": "object", "required": ["title"],
        "properties": {"title": {"type": "string", "description": "a property named title", "enum": ["description"]},
                       "default": {"default": 3, "type": "integer"}},
        "definitions": {"examples": {"examples": [1], "type": "number"}},
        "anyOf": [{"$comment": "c", "minProperties": 1}],
    }  # fmt: skip
    assert schemastore.strip_annotations(schema) == {
        "type": "object", "required": ["title"],
        "properties": {"title": {"type": "string", "enum": ["description"]}, "default": {"type": "integer"}},
        "definitions": {"examples": {"type": "number"}}, "anyOf": [{"minProperties": 1}],
    }  # fmt: skip


def test_remote_refs_and_the_split_by_schema() -> None:
    assert schemastore.has_remote_ref({"items": [{"$ref": "https://example.com/a.json"}]})
    assert not schemastore.has_remote_ref({"properties": {"a": {"$ref": "#/definitions/a"}}})
    names = [f"schema-{i}.json" for i in range(2000)]
    splits = [schemastore.split_of(n, 0.2) for n in names]
    assert splits == [schemastore.split_of(n, 0.2) for n in names]  # a name always lands in the same split
    assert 0.17 < splits.count("validation") / len(names) < 0.23
    assert schemastore.count_scalars({"a": [1, "x", {"b": None}], "c": {}}) == 3


def test_draw_instances_are_distinct_plain_and_valid() -> None:
    pytest.importorskip("hypothesis_jsonschema")
    schema = {"type": "object", "required": ["n", "kind"],
              "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9},
                             "kind": {"enum": ["a", "b", "c"]}}}  # fmt: skip
    instances = schemastore.draw_instances(schema, count=5, seconds=20.0)
    texts = [to_text(i) for i in instances]
    assert len(instances) == 5 and len(set(texts)) == 5
    assert all(schemastore.is_plain(t) and validate_text(t, schema) for t in texts)


def test_structured_datasets_follow_the_data_arguments(tokenizer, tmp_path) -> None:
    from elastic_mdm.data.arguments import DataArguments

    rows = [{"schema": SCHEMA, "instance": INSTANCE}, {"schema": {"type": "integer"}, "instance": 7}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArguments(
        structured_train_file=str(path), structured_eval_file=str(path), structured_schema_prompt=False
    )
    train, eval_ = schema_prompts.structured_datasets(args, tokenizer, max_length=512)
    assert train.column_names == ["input_ids", "anchor_mask"] and len(train) == len(eval_) == 2
    assert tokenizer.decode(train[1]["input_ids"], skip_special_tokens=True) == "7"
    assert train[1]["anchor_mask"] == [True, False, True]
    with pytest.raises(ValueError, match="No row of .* fits max_length=2"):
        schema_prompts.structured_datasets(args, tokenizer, max_length=2)
    with pytest.raises(ValueError, match="--structured_train_file alone"):
        DataArguments(structured_train_file=str(path), dataset_name="synthetic-json")
    with pytest.raises(ValueError, match="structured_gap_budget=0"):
        DataArguments(structured_train_file=str(path), structured_gap_budget=0)


def test_evaluate_holds_out_the_structured_eval_file(tokenizer, tmp_path) -> None:
    """`scripts/evaluate.py --structured_eval_file F` measures NELBO, calibration and lengths on F's rows, featurized
    as in training (not silently on no data)."""
    from elastic_mdm.commands.evaluate import heldout_dataset
    from elastic_mdm.data.arguments import DataArguments

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"schema": SCHEMA, "instance": INSTANCE}) + "\n")
    args = DataArguments(structured_train_file=str(path), structured_eval_file=str(path), structured_schema_prompt=True)
    (row,) = heldout_dataset(args, tokenizer, max_length=512, seed=0)
    assert row == schema_prompts.structured_feature(tokenizer, SCHEMA, INSTANCE, schema_prompt=True)


@pytest.mark.parametrize("schema_prompt", [True, False])
def test_evaluation_templates_are_the_training_anchors(tokenizer, tmp_path, schema_prompt) -> None:
    """The template a structured task fills holds exactly the anchored tokens of the training feature of its row,
    masks where the values go; the prompt is cut from a fill before scoring."""
    from elastic_mdm.evaluation.structured import load_structured_tasks, without_prompt

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"name": "r", "schema": SCHEMA, "instance": INSTANCE}) + "\n")
    (task,) = load_structured_tasks(path, tokenizer, schema_prompt=schema_prompt)
    feature = schema_prompts.structured_feature(tokenizer, SCHEMA, INSTANCE, schema_prompt=schema_prompt)
    anchored = [t for t, a in zip(feature["input_ids"], feature["anchor_mask"], strict=True) if a]
    assert [t for t in task.template_ids if t != tokenizer.mask_token_id] == anchored
    assert task.template_ids.count(tokenizer.mask_token_id) == len(instance_values(INSTANCE))
    assert task.prompt == (schema_prompts.prompt_text(SCHEMA) if schema_prompt else "")
    text = tokenizer.decode(feature["input_ids"], skip_special_tokens=True)
    assert without_prompt(text, task.prompt) == to_text(INSTANCE)
    assert without_prompt("{}", "not the prompt") is None
