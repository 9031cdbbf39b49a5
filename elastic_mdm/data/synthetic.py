"""A built-in synthetic structured-output task, so training and evaluation run offline on a fresh machine.

Records are JSON instances of six JSON Schemas (`SCHEMAS`, draft 2020-12). Every value is drawn from a known
distribution (words from small built-in lists, word counts and array sizes uniform in a range, numbers uniform in
the schema's bounds; see `sample_instance`), so the record length distribution is known and varied: with the
default tokenizer records span about 11 to 68 tokens, median 28 (BOS and EOS included). The text of a record is
its compact canonical JSON (`json.dumps(instance, separators=(",", ":"), ensure_ascii=True)`, keys in schema
order).

The tokenizer is a small byte-level BPE (no prefix space, so decoding is exact) whose pre-tokenizer first splits
off runs of JSON structural characters (`STRUCTURAL_RUN`): no token ever spans the boundary between structure and
a value, so tokenizing a record equals concatenating the tokenizations of its structural pieces and of its values.
That is what makes templates (paper §5.4, docs/design.md §5) line up with real data: a template is `BOS` + structural
pieces + `EOS` with one `[MASK]` per value, each mask marking one open gap of variable length (see
`parse_template` in `sampling_state_elastic_mdm.py`).

Arrays in templates: the whole array content between `[` and `]` is ONE open gap (the model chooses how many
elements to write, and their quotes and commas), so templates never fix an array length.

`jsonschema` and `datasets` are optional dependencies, imported inside the functions that need them.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging

from ..loading.tokenizers import load_tokenizer
from .arguments import SYNTHETIC_DATASET, DataArguments
from .json_templates import fill_template_with_anchors, json_template, template_ids, template_values, to_text

logger = logging.get_logger(__name__)

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, MASK_TOKEN, UNK_TOKEN = "<s>", "</s>", "<pad>", "<mask>", "<unk>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, MASK_TOKEN, UNK_TOKEN)  # ids 0..4, in this order
# Pre-tokens of structure: runs of `{ } : , "`, where `[` may only end a run and `]` only start one. A value (a
# non-empty string's content, a number, a boolean, an array's content) therefore always starts and ends on a
# pre-token boundary, and BPE can still merge frequent runs such as `":"` or `","` into single tokens.
STRUCTURAL_RUN = r'\][{}:,"]*\[?|[{}:,"]+\[?|\['
DEFAULT_VOCAB_SIZE = 768
DEFAULT_TOKENIZER_RECORDS = 4000
DEFAULT_TOKENIZER_SEED = 1234

# ---------------------------------------------------------------------------------------------------------------
# Word lists (all ASCII, none containing a structural character)
# ---------------------------------------------------------------------------------------------------------------

FIRST_NAMES = (
    "Alice Bob Carla David Emma Felix Grace Hugo Iris Jack Kara Liam Maya Noah Olga Paul Quinn Rosa Sam Tara "
    "Umar Vera Will Xena Yuri Zoe"
).split()
LAST_NAMES = (
    "Smith Jones Brown Garcia Miller Davis Lopez Wilson Moore Taylor Thomas White Harris Martin Clark Lewis "
    "Walker Young King Wright"
).split()
WORDS = (
    "red blue green small large fast slow bright dark quiet happy old new warm cold soft hard simple smart "
    "solar river mountain garden coffee paper music market winter summer spring autumn ocean forest city "
    "night morning light stone glass metal wood cloud storm signal data robot travel kitchen studio"
).split()
TAGS = "sale new eco kids home sport tech gift bulk premium organic local vintage".split()
CITIES = "paris berlin tokyo lima cairo oslo madrid boston sydney toronto nairobi seoul".split()
STREET_KINDS = "street road avenue lane way".split()
DOMAINS = "example.com mail.org post.net web.io".split()
COUNTRIES = ["FR", "DE", "JP", "PE", "EG", "NO", "ES", "US", "AU", "CA", "KE", "KR"]
DATE_RANGE = (datetime.date(2000, 1, 1).toordinal(), datetime.date(2030, 12, 31).toordinal())

# ---------------------------------------------------------------------------------------------------------------
# Schemas (draft 2020-12; every property required, no extra properties, keys serialised in schema order)
# ---------------------------------------------------------------------------------------------------------------

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_NAME = {"type": "string", "pattern": "^[A-Z][a-z]+ [A-Z][a-z]+$"}
_EMAIL = {"type": "string", "pattern": "^[a-z]+(\\.[a-z]+)?@[a-z]+\\.(com|org|net|io)$"}
_WORDS = {"type": "string", "pattern": "^[a-z]+( [a-z]+)*$"}


def _integer(low: int, high: int) -> dict[str, Any]:
    """An integer schema bounded to [low, high]."""
    return {"type": "integer", "minimum": low, "maximum": high}


def _object(properties: dict[str, Any], title: str | None = None) -> dict[str, Any]:
    """A closed object schema requiring every one of `properties` (in their order); a top-level one if titled."""
    head = {} if title is None else {"$schema": _DIALECT, "title": title}
    return {
        **head,
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "point": _object({"x": _integer(-999, 999), "y": _integer(-999, 999)}, "point"),
    "person": _object({"name": _NAME, "age": _integer(0, 120), "email": _EMAIL}, "person"),
    "product": _object(
        {
            "id": _integer(1, 99999),
            "title": _WORDS,
            "tags": {"type": "array", "items": {"type": "string", "enum": TAGS}, "minItems": 0, "maxItems": 5},
            "price": {"type": "number", "minimum": 0.5, "maximum": 999.99},
            "in_stock": {"type": "boolean"},
        },
        "product",
    ),
    "event": _object(
        {
            "title": _WORDS,
            "date": {"type": "string", "format": "date", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "attendees": {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 4},
        },
        "event",
    ),
    "address": _object(
        {
            "street": {"type": "string", "pattern": "^[0-9]+ [a-z]+( [a-z]+)* (street|road|avenue|lane|way)$"},
            "city": {"type": "string", "enum": CITIES},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"type": "string", "enum": COUNTRIES},
        },
        "address",
    ),
    "order": _object(
        {
            "id": _integer(1, 999999),
            "customer": _object({"name": _NAME, "email": _EMAIL}),
            "items": {
                "type": "array",
                "items": _object({"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, "qty": _integer(1, 9)}),
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "order",
    ),
}
SCHEMA_NAMES = tuple(SCHEMAS)

# ---------------------------------------------------------------------------------------------------------------
# Value distributions
# ---------------------------------------------------------------------------------------------------------------


def _words(rng: random.Random, low: int, high: int) -> str:
    """`U{low..high}` words drawn uniformly (with replacement) from `WORDS`, joined by spaces."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _person_name(rng: random.Random) -> str:
    """A uniform first name and a uniform last name."""
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _email(rng: random.Random) -> str:
    """`first@domain` or `first.last@domain` (each with probability 1/2), lower case."""
    local = rng.choice(FIRST_NAMES).lower()
    if rng.random() < 0.5:
        local += "." + rng.choice(LAST_NAMES).lower()
    return f"{local}@{rng.choice(DOMAINS)}"


def _date(rng: random.Random) -> str:
    """A uniform calendar day in 2000-01-01 .. 2030-12-31, ISO format."""
    return datetime.date.fromordinal(rng.randint(*DATE_RANGE)).isoformat()


def _street(rng: random.Random) -> str:
    """`U{1..9999}` house number, 1-3 words, and a street kind."""
    return f"{rng.randint(1, 9999)} {_words(rng, 1, 3)} {rng.choice(STREET_KINDS)}"


def _sku(rng: random.Random) -> str:
    """Two upper-case letters and three digits, uniform."""
    letters = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
    return f"{letters}{rng.randint(0, 999):03d}"


# String values are sampled by the name of the property (or of the array) that holds them.
STRING_SAMPLERS: dict[str, Callable[[random.Random], str]] = {
    "name": _person_name,
    "attendees": _person_name,
    "email": _email,
    "title": lambda rng: _words(rng, 1, 6),
    "date": _date,
    "street": _street,
    "zip": lambda rng: f"{rng.randint(0, 99999):05d}",
    "sku": _sku,
}


def sample_instance(schema: dict[str, Any], rng: random.Random, key: str = "") -> Any:
    """Draw one value of `schema` (the subset of JSON Schema used by `SCHEMAS`); `key` names its property.

    enum: uniform choice; integer: uniform in [minimum, maximum]; number: uniform on the cent grid of
    [minimum, maximum]; boolean: fair coin; array: `U{minItems..maxItems}` items; string: `STRING_SAMPLERS[key]`.
    """
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema["type"]
    if kind == "object":
        return {name: sample_instance(sub, rng, name) for name, sub in schema["properties"].items()}
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 5))
        return [sample_instance(schema["items"], rng, key) for _ in range(count)]
    if kind == "integer":
        return rng.randint(schema["minimum"], schema["maximum"])
    if kind == "number":
        return rng.randint(round(schema["minimum"] * 100), round(schema["maximum"] * 100)) / 100
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        return STRING_SAMPLERS[key](rng)
    raise ValueError(f"Unsupported schema type {kind!r} for property {key!r}.")


def generate_records(num_records: int, seed: int = 0, schema_names: Sequence[str] | None = None) -> list[dict]:
    """`num_records` records `{"schema_name", "schema", "instance", "text"}`, each schema drawn uniformly.

    Deterministic given `seed` (and `schema_names`, default all of `SCHEMA_NAMES`).
    """
    names = list(schema_names or SCHEMA_NAMES)
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        name = rng.choice(names)
        instance = sample_instance(SCHEMAS[name], rng)
        records.append({"schema_name": name, "schema": SCHEMAS[name], "instance": instance, "text": to_text(instance)})
    return records


# ---------------------------------------------------------------------------------------------------------------
# Validation and lengths
# ---------------------------------------------------------------------------------------------------------------


def record_length_distribution(tokenizer: PreTrainedTokenizerFast, records: Iterable[dict | str]) -> torch.Tensor:
    """Token count of each record (or text) with BOS and EOS, as a `[num_records]` long tensor."""
    texts = [r if isinstance(r, str) else r["text"] for r in records]
    return torch.tensor([len(ids) for ids in tokenizer(texts)["input_ids"]], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def build_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_records: int = DEFAULT_TOKENIZER_RECORDS,
    seed: int = DEFAULT_TOKENIZER_SEED,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (default: `num_records` generated records) and wrap it for Transformers.

    Special tokens take ids 0..4 (`<s>`, `</s>`, `<pad>`, `<mask>`, `<unk>`); calling the tokenizer adds BOS and
    EOS. The pre-tokenizer isolates the JSON structural characters and adds no prefix space, so decoding with
    `skip_special_tokens=True` returns the exact text and tokenization composes over structural boundaries.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if texts is None:
        texts = [r["text"] for r in generate_records(num_records, seed)]
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(STRUCTURAL_RUN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(t, backend.token_to_id(t)) for t in (BOS_TOKEN, EOS_TOKEN)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


# ---------------------------------------------------------------------------------------------------------------
# Templates of the synthetic records (json_templates.py holds the general template algebra)
# ---------------------------------------------------------------------------------------------------------------


def template_token_ids(tokenizer: PreTrainedTokenizerFast, schema_name: str) -> list[int]:
    """`template_ids` of the schema's template (`json_template`)."""
    return template_ids(tokenizer, json_template(SCHEMAS[schema_name]))


def anchored_features(
    tokenizer: PreTrainedTokenizerFast, records: Sequence[dict], anchor_share: float, seed: int = 0
) -> list[dict[str, list]]:
    """Training features of `records` in which, for a share `anchor_share` of them, the template tokens (braces,
    brackets, quotes, keys) are anchors that are never noised: the training counterpart of filling templates."""
    rng = random.Random(seed)
    features = []
    for record in records:
        template = template_token_ids(tokenizer, record["schema_name"])
        values = template_values(record["schema"], record["instance"])
        ids, anchors = fill_template_with_anchors(tokenizer, template, values)
        anchored = rng.random() < anchor_share
        features.append({"input_ids": ids, "anchor_mask": [a and anchored for a in anchors]})
    return features


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def synthetic_dataset(
    tokenizer: PreTrainedTokenizerFast, num_records: int, seed: int = 0
) -> list[dict[str, list[int]]]:
    """Features `{"input_ids": BOS .. EOS}` of `generate_records(num_records, seed)`, for `ElasticMDMCollator`."""
    texts = [r["text"] for r in generate_records(num_records, seed)]
    return [{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]


def as_hf_dataset(tokenizer: PreTrainedTokenizerFast, num_records: int, seed: int = 0) -> Any:
    """`synthetic_dataset` as a `datasets.Dataset` with one `input_ids` column (needs `datasets`)."""
    import datasets

    return datasets.Dataset.from_list(synthetic_dataset(tokenizer, num_records, seed))


def data_tokenizer(
    data_args: DataArguments, model_name_or_path: str | None = None, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """The tokenizer `data_args.tokenizer_name` (else `model_name_or_path`) names, or the synthetic task's BPE.

    A name goes to `load_tokenizer` (with `data_args.cache_dir` and `kwargs`). With neither,
    `build_tokenizer()` is trained (a few seconds).
    """
    name = data_args.tokenizer_name or model_name_or_path
    if name is None:
        if not data_args.is_synthetic:
            logger.warning(
                "No --tokenizer_name given: building the synthetic JSON task's byte-level BPE, which fits "
                f"'{SYNTHETIC_DATASET}' but tokenizes natural text poorly."
            )
        return build_tokenizer()
    return load_tokenizer(name, cache_dir=data_args.cache_dir, **kwargs)


__all__ = [
    "data_tokenizer",
    "SCHEMAS",
    "SCHEMA_NAMES",
    "SPECIAL_TOKENS",
    "sample_instance",
    "generate_records",
    "record_length_distribution",
    "build_tokenizer",
    "template_token_ids",
    "anchored_features",
    "synthetic_dataset",
    "as_hf_dataset",
]
