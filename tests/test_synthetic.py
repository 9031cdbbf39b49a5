"""Tests of the built-in synthetic JSON task: records, tokenizer, templates, datasets."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from elastic_mdm.data import synthetic
from elastic_mdm.data.json_templates import GAP, fill_template, json_template, template_values, validate_text
from elastic_mdm.data.synthetic import (
    SCHEMA_NAMES,
    SCHEMAS,
    build_tokenizer,
    generate_records,
    record_length_distribution,
    synthetic_dataset,
    template_token_ids,
)

pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(num_records=1500, seed=11)


@pytest.fixture(scope="module")
def records():
    return generate_records(600, seed=5)


def test_every_record_validates(records):
    assert {r["schema_name"] for r in records} == set(SCHEMA_NAMES)
    for r in records:
        assert r["schema"] is SCHEMAS[r["schema_name"]]
        assert json.loads(r["text"]) == r["instance"]
        assert validate_text(r["text"], r["schema"]), r["text"]


def test_generation_is_deterministic_by_seed():
    assert generate_records(50, seed=3) == generate_records(50, seed=3)
    assert [r["text"] for r in generate_records(50, seed=3)] != [r["text"] for r in generate_records(50, seed=4)]
    only = generate_records(20, seed=3, schema_names=["point"])
    assert {r["schema_name"] for r in only} == {"point"}


def test_length_distribution_has_spread(tokenizer, records):
    lengths = record_length_distribution(tokenizer, records)
    assert lengths.dtype == torch.long and lengths.shape == (len(records),)
    assert int(lengths.min()) <= 16 and int(lengths.max()) >= 50
    assert float(lengths.float().std()) > 8.0
    assert record_length_distribution(tokenizer, [r["text"] for r in records]).equal(lengths)


def test_special_tokens_are_distinct_low_ids(tokenizer):
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id]
    ids.append(tokenizer.unk_token_id)
    assert ids == list(range(5))
    assert len(tokenizer) <= synthetic.DEFAULT_VOCAB_SIZE


def test_tokenizer_adds_bos_eos_and_round_trips(tokenizer):
    for r in generate_records(200, seed=99):  # records unseen in training
        ids = tokenizer(r["text"])["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids and tokenizer.mask_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == r["text"]


def test_tokenizer_save_and_reload(tokenizer, records, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [r["text"] for r in records[:100]]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert reloaded.mask_token_id == tokenizer.mask_token_id and reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.decode(reloaded(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_template_structure(tokenizer, name):
    pieces = json_template(SCHEMAS[name])
    assert all(a is not GAP or b is not GAP for a, b in zip(pieces, pieces[1:], strict=False))
    ids = template_token_ids(tokenizer, name)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    masks = [t == tokenizer.mask_token_id for t in ids]
    assert sum(masks) == pieces.count(GAP) > 0
    assert not any(a and b for a, b in zip(masks, masks[1:], strict=False))
    assert not masks[1]  # the first gap follows a structural token, never BOS directly


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_filled_template_equals_record_tokens(tokenizer, name):
    template = template_token_ids(tokenizer, name)
    for r in generate_records(40, seed=21, schema_names=[name]):
        values = template_values(r["schema"], r["instance"])
        filled = fill_template(tokenizer, template, values)
        assert filled == tokenizer(r["text"])["input_ids"]  # anchors line up with real data
        text = tokenizer.decode(filled, skip_special_tokens=True)
        assert text == r["text"] and validate_text(text, r["schema"])


def test_template_parses_as_open_gaps(tokenizer):
    from elastic_mdm.sampling_state_elastic_mdm import parse_template

    ids = template_token_ids(tokenizer, "product")
    b, e, m = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id
    tokens, open_after = parse_template(ids, b, e, m, "template")
    assert len(tokens) == len(ids) - json_template(SCHEMAS["product"]).count(GAP)
    assert sum(open_after) == json_template(SCHEMAS["product"]).count(GAP)


def test_fill_template_checks_value_count(tokenizer):
    with pytest.raises(ValueError):
        fill_template(tokenizer, template_token_ids(tokenizer, "point"), ["1"])


@pytest.mark.parametrize(
    "name, text",
    [
        ("point", '{"x":1,"y":2'),  # truncated
        ("point", '{"x":1,"y":"2"}'),  # wrong type
        ("point", '{"x":1,"y":2,"z":3}'),  # extra property
        ("point", '{"x":1}'),  # missing property
        ("person", '{"name":"alice","age":30,"email":"alice@example.com"}'),  # pattern
        ("person", '{"name":"Alice Smith","age":300,"email":"alice@example.com"}'),  # maximum
        ("event", '{"title":"a b","date":"2023-02-30","attendees":["Alice Smith"]}'),  # format: no such day
        ("event", '{"title":"a b","date":"2023-02-03","attendees":[]}'),  # minItems
        ("address", '{"street":"1 a road","city":"atlantis","zip":"12345","country":"FR"}'),  # enum
        ("product", '{"id":1,"title":"a","tags":[],"price":NaN,"in_stock":true}'),  # not JSON
        ("point", "not json"),
    ],
)
def test_corrupted_text_fails_validation(name, text):
    assert not validate_text(text, SCHEMAS[name])


def test_synthetic_dataset_features(tokenizer):
    features = synthetic_dataset(tokenizer, 30, seed=2)
    assert len(features) == 30 and all(set(f) == {"input_ids"} for f in features)
    texts = [r["text"] for r in generate_records(30, seed=2)]
    assert [tokenizer.decode(f["input_ids"], skip_special_tokens=True) for f in features] == texts
    for f in features:
        ids = f["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.mask_token_id not in ids


def test_as_hf_dataset(tokenizer):
    pytest.importorskip("datasets")
    dataset = synthetic.as_hf_dataset(tokenizer, 10, seed=2)
    assert dataset.column_names == ["input_ids"] and len(dataset) == 10
    assert dataset[0]["input_ids"] == synthetic_dataset(tokenizer, 10, seed=2)[0]["input_ids"]
