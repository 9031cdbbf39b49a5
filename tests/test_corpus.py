"""Tests of corpus loading: chunking, local files, synthetic task, eval carving, errors, special tokens, streaming."""

import json
import math
import time

import pytest
import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast

from elastic_mdm import ElasticMDMConfig
from elastic_mdm.data import synthetic
from elastic_mdm.data.arguments import DataArguments
from elastic_mdm.data.chunking import split_into_examples, tokenize_documents
from elastic_mdm.data.corpus import infer_builder, length_statistics, length_summary, load_datasets
from elastic_mdm.data.synthetic import data_tokenizer
from elastic_mdm.loading.tokenizers import (
    ADDED_BOS_TOKEN,
    ADDED_EOS_TOKEN,
    ADDED_MASK_TOKEN,
    check_vocab,
    ensure_special_tokens,
    sync_config_with_tokenizer,
)
from elastic_mdm.objectives.collators import ElasticMDMCollator

datasets = pytest.importorskip("datasets")

WORDS = [f"w{i}" for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.build_tokenizer(num_records=300)


def word_tokenizer(**special_tokens) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer (one token per whitespace-separated word of `WORDS`) with only the given specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    for token in special_tokens.values():
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special_tokens)


@pytest.fixture
def words():
    tok = word_tokenizer()
    ensure_special_tokens(tok)
    return tok


def documents(count: int, seed: int = 0) -> list[str]:
    """`count` sentences of synthetic-record text (exact round trip through the synthetic tokenizer)."""
    return [r["text"] for r in synthetic.generate_records(count, seed)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ids_of(dataset) -> list[list[int]]:
    """The `input_ids` column of a map-style dataset as a list of lists."""
    return dataset[:]["input_ids"]


def check_examples(rows, tokenizer, max_length: int) -> None:
    for ids in rows:
        assert 2 <= len(ids) <= max_length
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.mask_token_id not in ids


# ---------------------------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------------------------


def test_long_document_is_chunked_exactly(words):
    text = " ".join(WORDS[i % 50] for i in range(1000))
    original = words(text, add_special_tokens=False)["input_ids"]
    assert len(original) == 1000
    examples = tokenize_documents([text], words, max_length=64)["input_ids"]
    assert len(examples) == math.ceil(1000 / 62) == 17
    check_examples(examples, words, 64)
    assert all(len(ids) == 64 for ids in examples[:-1]) and len(examples[-1]) == 1000 - 16 * 62 + 2
    assert [t for ids in examples for t in ids[1:-1]] == original


def test_split_into_examples_counts_and_keeps_empty():
    docs = [list(range(10, 15)), [], list(range(20, 23))]
    examples, dropped = split_into_examples(docs, 0, 1, max_length=4)
    assert dropped == 1
    assert examples == [[0, 10, 11, 1], [0, 12, 13, 1], [0, 14, 1], [0, 20, 21, 1], [0, 22, 1]]
    examples, dropped = split_into_examples(docs, 0, 1, max_length=4, keep_empty=True)
    assert dropped == 0 and examples[3] == [0, 1]
    with pytest.raises(ValueError, match="max_length"):
        split_into_examples(docs, 0, 1, max_length=2)


def test_blank_documents_dropped_or_kept(tokenizer):
    batch = {"text": ["", "   \n", None, '{"x":1}'], "other": [1, 2, 3, 4]}
    assert len(tokenize_documents(batch, tokenizer, 32)["input_ids"]) == 1
    kept = tokenize_documents(batch, tokenizer, 32, keep_empty=True)["input_ids"]
    assert kept[:3] == [[tokenizer.bos_token_id, tokenizer.eos_token_id]] * 3
    assert kept[3] == tokenizer('{"x":1}')["input_ids"]


def test_special_token_text_is_not_special(tokenizer):
    (ids,) = tokenize_documents("a <mask> b </s> c", tokenizer, 64)["input_ids"]
    assert tokenizer.mask_token_id not in ids and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a <mask> b </s> c"


def test_missing_column_in_batch_names_available(tokenizer):
    with pytest.raises(ValueError, match=r"available columns: \['body', 'id'\]"):
        tokenize_documents({"body": ["x"], "id": [1]}, tokenizer, 32)


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def test_synthetic_json_splits(tokenizer):
    args = DataArguments(dataset_name="synthetic-json", num_synthetic_records=300, num_synthetic_eval_records=40)
    train, eval_ = load_datasets(args, tokenizer, max_length=128, seed=3)
    assert train.column_names == ["input_ids"] and len(train) == 300 and len(eval_) == 40
    assert train[:5]["input_ids"] == [f["input_ids"] for f in synthetic.synthetic_dataset(tokenizer, 5, seed=3)]
    train_lengths, eval_lengths = length_statistics(train), length_statistics(eval_)
    assert train_lengths.dtype == torch.long and train_lengths.shape == (300,)
    assert 8 <= int(train_lengths.min()) <= 16 and 50 <= int(train_lengths.max()) <= 80
    assert 5 <= int(eval_lengths.min()) and int(eval_lengths.max()) <= 80
    assert set(map(tuple, ids_of(eval_))) != set(map(tuple, ids_of(train)[:40]))
    summary = length_summary(train_lengths)
    assert summary["count"] == 300 and summary["min"] <= summary["median"] <= summary["max"]
    batch = ElasticMDMCollator(tokenizer.mask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, 128, seed=0)(
        list(train.select(range(8)))
    )
    assert batch["num_target_tokens"].tolist() == (train_lengths[:8] - 1).tolist()


def test_local_text_jsonl_parquet(tokenizer, tmp_path):
    texts = documents(30)
    (tmp_path / "train.txt").write_text("\n".join(texts[:20]) + "\n\n")  # a trailing blank line
    (tmp_path / "eval.txt").write_text("\n".join(texts[20:]) + "\n")
    write_jsonl(tmp_path / "train.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[:20])])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts[20:])])
    datasets.Dataset.from_dict({"content": texts[:20], "n": list(range(20))}).to_parquet(tmp_path / "train.parquet")
    datasets.Dataset.from_dict({"content": texts[20:], "n": list(range(10))}).to_parquet(tmp_path / "eval.parquet")
    cache = str(tmp_path / "cache")
    for extension, column in (("txt", "text"), ("jsonl", "text"), ("parquet", "content")):
        args = DataArguments(
            train_files=[str(tmp_path / f"train.{extension}")],
            eval_files=[str(tmp_path / f"eval.{extension}")],
            text_column=column,
            cache_dir=cache,
        )
        train, eval_ = load_datasets(args, tokenizer, max_length=128)
        assert train.column_names == ["input_ids"] == eval_.column_names, extension
        assert len(train) == 20 and len(eval_) == 10, extension
        check_examples(ids_of(train), tokenizer, 128)
        assert tokenizer.batch_decode(ids_of(train), skip_special_tokens=True) == texts[:20]
        assert tokenizer.batch_decode(ids_of(eval_), skip_special_tokens=True) == texts[20:]


def test_long_documents_in_files_are_chunked(tokenizer, tmp_path):
    texts = documents(40, seed=1)
    long_text = " ".join(texts)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": long_text}, {"text": texts[0]}])
    args = DataArguments(train_files=[path], eval_files=[path], cache_dir=str(tmp_path / "cache"))
    train, _ = load_datasets(args, tokenizer, max_length=32)
    check_examples(ids_of(train), tokenizer, 32)
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    chunks = math.ceil(len(ids) / 30)
    assert len(train) == chunks + 1
    assert [t for row in ids_of(train)[:chunks] for t in row[1:-1]] == ids


def test_num_proc_gives_same_examples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in documents(60)])
    base = {"train_files": [path], "eval_files": [path], "cache_dir": str(tmp_path / "cache")}
    one, _ = load_datasets(DataArguments(**base), tokenizer, 24)
    two, _ = load_datasets(DataArguments(**base, preprocessing_num_workers=2), tokenizer, 24)
    assert ids_of(one) == ids_of(two)


def test_eval_carved_from_train(tokenizer, tmp_path):
    texts = documents(200, seed=2)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    cache = str(tmp_path / "cache")
    train, eval_ = load_datasets(DataArguments(train_files=[path], eval_fraction=0.05, cache_dir=cache), tokenizer, 128)
    assert (len(train), len(eval_)) == (190, 10)
    train_texts = tokenizer.batch_decode(ids_of(train), skip_special_tokens=True)
    eval_texts = tokenizer.batch_decode(ids_of(eval_), skip_special_tokens=True)
    assert sorted(train_texts + eval_texts) == sorted(texts)
    again, _ = load_datasets(DataArguments(train_files=[path], eval_fraction=0.05, cache_dir=cache), tokenizer, 128)
    assert ids_of(again) == ids_of(train)  # seeded
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in texts[:10]] + [{"text": " "}] * 90)
    train, eval_ = load_datasets(DataArguments(train_files=[small], cache_dir=cache), tokenizer, 128)
    assert (len(train), len(eval_)) == (9, 1)  # at least one eval document, carved from the non-blank ones


def test_max_samples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in documents(50)])
    args = DataArguments(
        train_files=[path], eval_files=[path], max_train_samples=7, max_eval_samples=3, cache_dir=str(tmp_path / "c")
    )
    train, eval_ = load_datasets(args, tokenizer, 16)  # chunking makes more examples than documents
    assert (len(train), len(eval_)) == (7, 3)


def test_streaming_local_jsonl(tokenizer, tmp_path):
    texts = documents(25, seed=4)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    args = DataArguments(train_files=[path], eval_files=[path], streaming=True, cache_dir=str(tmp_path / "cache"))
    train, eval_ = load_datasets(args, tokenizer, 128)
    assert isinstance(train, datasets.IterableDataset)
    rows = [row["input_ids"] for row in train]
    assert [set(row) for row in train.take(1)] == [{"input_ids"}]
    check_examples(rows, tokenizer, 128)
    assert tokenizer.batch_decode(rows, skip_special_tokens=True) == texts
    assert length_statistics(eval_, n=5).tolist() == [len(r) for r in rows[:5]]
    carved = DataArguments(train_files=[path], streaming=True, max_eval_samples=4, cache_dir=str(tmp_path / "cache"))
    train, eval_ = load_datasets(carved, tokenizer, 128)
    assert len(list(eval_)) == 4 and len(list(train)) == 21


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_dataset_fails_fast_offline(tokenizer, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="could not be found.*offline.*--train_files"):
        load_datasets(DataArguments(dataset_name="no-such-user/no-such-corpus-xyz"), tokenizer, 64)
    assert time.perf_counter() - start < 15


def test_missing_column_names_available(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "id": 1}] * 3)
    args = DataArguments(train_files=[path], eval_files=[path], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"no text column 'text'; available columns: \['body', 'id'\]"):
        load_datasets(args, tokenizer, 64)


def test_empty_split_is_an_error(tokenizer, tmp_path):
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}])
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in documents(3)])
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="train split is empty"):
        load_datasets(DataArguments(train_files=[blank], eval_files=[good], cache_dir=cache), tokenizer, 64)
    with pytest.raises(ValueError, match="eval split is empty"):
        load_datasets(DataArguments(train_files=[good], eval_files=[blank], cache_dir=cache), tokenizer, 64)
    kept, _ = load_datasets(
        DataArguments(train_files=[blank], eval_files=[good], keep_empty_documents=True, cache_dir=cache),
        tokenizer,
        64,
    )
    assert ids_of(kept) == [[tokenizer.bos_token_id, tokenizer.eos_token_id]] * 2


def test_argument_and_file_errors(tokenizer, tmp_path):
    assert infer_builder(["a.jsonl.gz", "b.json"]) == "json" and infer_builder(["x.TXT"]) == "text"
    with pytest.raises(ValueError, match="Unsupported file extension '.xml'"):
        infer_builder(["data.xml"])
    with pytest.raises(ValueError, match="one format"):
        infer_builder(["a.txt", "b.parquet"])
    with pytest.raises(ValueError, match="Unsupported"):
        load_datasets(DataArguments(train_files=[str(tmp_path / "d.xml")]), tokenizer, 64)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_datasets(DataArguments(train_files=[str(tmp_path / "missing.jsonl")]), tokenizer, 64)
    with pytest.raises(ValueError, match="either"):
        DataArguments(dataset_name="lm1b", train_files=["a.txt"])
    with pytest.raises(ValueError, match="No data"):
        load_datasets(DataArguments(), tokenizer, 64)
    with pytest.raises(ValueError, match="ensure_special_tokens"):
        load_datasets(DataArguments(dataset_name="synthetic-json"), word_tokenizer(), 64)


def test_hf_argument_parser():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_files", "a.txt", "b.txt", "--streaming", "--max_eval_samples", "5", "--text_sample_by", "paragraph"]
    )
    assert args.train_files == ["a.txt", "b.txt"] and args.streaming and args.max_eval_samples == 5
    assert args.text_sample_by == "paragraph" and args.eval_fraction == 0.01


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and config
# ---------------------------------------------------------------------------------------------------------------


def test_ensure_special_tokens_adds_missing():
    tok = word_tokenizer()
    size = len(tok)
    added = ensure_special_tokens(tok)
    assert sorted(added) == sorted([ADDED_BOS_TOKEN, ADDED_EOS_TOKEN, ADDED_MASK_TOKEN])
    assert len(tok) == size + 3
    ids = {tok.bos_token_id, tok.eos_token_id, tok.mask_token_id}
    assert len(ids) == 3 and min(ids) >= size and tok.pad_token_id == tok.eos_token_id
    assert ensure_special_tokens(tok) == []


def test_ensure_special_tokens_gpt2_style_reuses_eos():
    tok = word_tokenizer(eos_token="<|endoftext|>")
    eos, size = tok.eos_token_id, len(tok)
    assert ensure_special_tokens(tok) == [ADDED_MASK_TOKEN]
    assert tok.bos_token_id == tok.eos_token_id == eos and tok.mask_token_id == size
    bos_only = word_tokenizer(bos_token="<s>", mask_token="<|mask|>")
    assert ensure_special_tokens(bos_only) == [ADDED_EOS_TOKEN]
    assert bos_only.bos_token_id != bos_only.eos_token_id


def test_ensure_special_tokens_reuses_existing_vocab_entry():
    tok = word_tokenizer(bos_token="<s>", eos_token="</s>")
    tok.add_tokens([ADDED_MASK_TOKEN])  # already a (plain) token
    size = len(tok)
    assert ensure_special_tokens(tok) == []
    assert len(tok) == size and tok.mask_token == ADDED_MASK_TOKEN


def test_check_vocab_and_sync(tokenizer):
    config = sync_config_with_tokenizer(ElasticMDMConfig(hidden_size=32, num_attention_heads=2), tokenizer)
    assert config.vocab_size == len(tokenizer) and config.mask_token_id == tokenizer.mask_token_id
    check_vocab(config, tokenizer)
    padded = sync_config_with_tokenizer(ElasticMDMConfig(), tokenizer, pad_to_multiple_of=64)
    assert padded.vocab_size % 64 == 0 and 0 <= padded.vocab_size - len(tokenizer) < 64
    check_vocab(padded, tokenizer)

    config.vocab_size = len(tokenizer) - 1
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} tokens but config.vocab_size is {len(tokenizer) - 1}"):
        check_vocab(config, tokenizer)
    config.vocab_size, config.mask_token_id = len(tokenizer), 7
    with pytest.raises(ValueError, match=r"config.mask_token_id=7 but tokenizer.mask_token_id=3"):
        check_vocab(config, tokenizer)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        no_ids = dict(mask_token_id=None, bos_token_id=None, eos_token_id=None)
        check_vocab(ElasticMDMConfig(vocab_size=10, **no_ids), tokenizer)
    with pytest.raises(ValueError, match="no mask token"):
        check_vocab(ElasticMDMConfig(), word_tokenizer(bos_token="<s>", eos_token="</s>"))


def test_load_tokenizer(tokenizer, tmp_path):
    built = data_tokenizer(DataArguments(dataset_name="synthetic-json"))
    assert built.mask_token_id == 3 and built.bos_token_id == 0
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = data_tokenizer(DataArguments(tokenizer_name=str(tmp_path / "tok")))
    assert loaded("{}")["input_ids"] == tokenizer("{}")["input_ids"]
    with pytest.raises(ValueError, match="Could not load the tokenizer"):
        data_tokenizer(DataArguments(tokenizer_name=str(tmp_path / "nothing-here")))


def test_length_statistics_inputs(tokenizer):
    features = synthetic.synthetic_dataset(tokenizer, 20, seed=0)
    expected = [len(f["input_ids"]) for f in features]
    assert length_statistics(features).tolist() == expected
    assert length_statistics(datasets.Dataset.from_list(features), n=5).tolist() == expected[:5]
    stream = datasets.Dataset.from_list(features).to_iterable_dataset()
    assert length_statistics(stream, n=7).tolist() == expected[:7]
    with pytest.raises(ValueError, match="Give n"):
        length_statistics(stream)


def test_synthetic_anchored_structure(tokenizer) -> None:
    """With synthetic_anchor_share, the train records keep their ids and mark the JSON structure as anchors in a share
    of them (the training counterpart of template filling)."""
    args = DataArguments(dataset_name="synthetic-json", num_synthetic_records=200, num_synthetic_eval_records=8,
                         synthetic_anchor_share=0.5)  # fmt: skip
    train, _ = load_datasets(args, tokenizer, max_length=80, seed=3)
    plain, _ = load_datasets(
        DataArguments(dataset_name="synthetic-json", num_synthetic_records=200, num_synthetic_eval_records=8),
        tokenizer,
        max_length=80,
        seed=3,
    )
    assert train[:]["input_ids"] == plain[:]["input_ids"]
    anchored = [any(mask) for mask in train[:]["anchor_mask"]]
    assert 0.3 < sum(anchored) / len(anchored) < 0.7
    ids, mask = train[anchored.index(True)]["input_ids"], train[anchored.index(True)]["anchor_mask"]
    structure = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
    assert structure.startswith("{") and structure.endswith("}") and '":' in structure
    with pytest.raises(ValueError, match="synthetic_anchor_share"):
        DataArguments(dataset_name="synthetic-json", synthetic_anchor_share=1.5)
