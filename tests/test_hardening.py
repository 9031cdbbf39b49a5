"""Hardening, second round: each test reproduces one defect a hostile or careless user hit (an adapter overwritten,
unbounded NELBO steps, streams left open, flags ignored, values that pass validation and break later, weights and
tokenizers, messages that name nothing) and checks the clear refusal or the correct behaviour instead."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from helpers import BOS, EOS, MASK, VOCAB, random_model, save_checkpoint, tiny_config, word_tokenizer
from safetensors.torch import load_file, save_file
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from elastic_mdm import ElasticMDMCollator, ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.schedules_elastic_mdm import MAX_NUM_STEPS, RevealSchedule
from elastic_mdm.training.outputs import check_output_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOO_MANY = 10**9  # steps: a [K + 1] float64 table of 8 GB


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    return random_model()


# ---------------------------------------------------------------------------------------------------------------
# 1. Every model artefact in an output folder is protected (a LoRA adapter was overwritten)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "artefacts",
    [
        ("adapter_model.safetensors", "adapter_config.json"),  # train.py --lora_r 2 --lora_merge false
        ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),  # shards without their index
        ("global_step3/", "latest"),  # DeepSpeed engine states
    ],
)
def test_an_output_dir_holding_any_model_artefact_is_refused(tmp_path: Path, artefacts: tuple[str, ...]) -> None:
    for name in artefacts:
        (tmp_path / name.rstrip("/")).mkdir() if name.endswith("/") else (tmp_path / name).write_text("{}")
    names = ", ".join(sorted(name.rstrip("/") for name in artefacts))
    with pytest.raises(ValueError, match=f"already holds a model \\({names}\\)"):
        check_output_dir(str(tmp_path))
    check_output_dir(str(tmp_path), overwrite_output_dir=True)  # asked for: allowed


def test_train_refuses_a_folder_holding_a_trained_adapter_before_any_work(tmp_path: Path) -> None:
    from elastic_mdm.commands import train as train_cli

    (tmp_path / "adapter_model.safetensors").write_bytes(b"trained")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a model .*adapter_config.json, adapter_model.safetensors"):
        train_cli.main(["configs/tiny.yaml", "--output_dir", str(tmp_path), "--lora_r", "2", "--max_steps", "1"])
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"trained"


# ---------------------------------------------------------------------------------------------------------------
# 2. One num_steps bound for every path that builds a schedule table, checked before any allocation
# ---------------------------------------------------------------------------------------------------------------


def test_schedule_table_is_bounded_before_it_is_allocated(monkeypatch) -> None:
    assert RevealSchedule().table(MAX_NUM_STEPS).shape == (MAX_NUM_STEPS + 1,)
    arange = torch.arange

    def guarded(end, *args, **kwargs):  # a regression fails here instead of allocating 16 GB
        assert end <= MAX_NUM_STEPS + 1, f"a table of {end} entries was allocated before the bound was checked"
        return arange(end, *args, **kwargs)

    monkeypatch.setattr(torch, "arange", guarded)
    with pytest.raises(ValueError, match=f"num_steps={TOO_MANY} is above the limit of {MAX_NUM_STEPS}"):
        RevealSchedule().table(TOO_MANY)


def test_nelbo_and_calibration_collators_refuse_unbounded_steps() -> None:
    from elastic_mdm.evaluation.calibration import calibration_collator
    from elastic_mdm.objectives.table import make_collator

    with pytest.raises(ValueError, match="num_steps=1000000000 is above the limit"):
        make_collator("elastic", tiny_config(), nelbo=True, num_steps=TOO_MANY)
    with pytest.raises(ValueError, match="steps=1000000000 is above the limit"):
        calibration_collator(tiny_config(), num_steps=TOO_MANY)


def test_evaluate_and_train_refuse_unbounded_steps_at_parse_time(tmp_path: Path) -> None:
    from elastic_mdm.commands.evaluate import parse_arguments
    from elastic_mdm.training.arguments import ElasticMDMTrainingArguments

    with pytest.raises(ValueError, match="--num_steps=1000000000 is above the limit"):
        parse_arguments(["--model_name_or_path", "x", "--metrics", "nelbo", "--num_steps", str(TOO_MANY)])
    with pytest.raises(ValueError, match="--sweep_steps=1000000000 is above the limit"):
        parse_arguments(["--model_name_or_path", "x", "--sweep_steps", "8", str(TOO_MANY)])
    with pytest.raises(ValueError, match="--eval_num_steps=1000000000 is above the limit"):
        ElasticMDMTrainingArguments(output_dir=str(tmp_path), eval_num_steps=TOO_MANY)


@pytest.mark.parametrize(("steps", "message"), [(TOO_MANY, "is above the limit"), (0, "must be an integer >= 1")])
def test_lm_eval_nelbo_num_steps_is_bounded_and_zero_is_not_the_default(steps: int, message: str) -> None:
    """Checked before the checkpoint loads (the path does not exist); 0 was `x or default`, the default."""
    pytest.importorskip("lm_eval")
    from elastic_mdm.integrations.lm_eval import ElasticMDMLM

    with pytest.raises(ValueError, match=f"nelbo_num_steps.*{message}"):
        ElasticMDMLM("/no/such/checkpoint", nelbo_num_steps=steps)


# ---------------------------------------------------------------------------------------------------------------
# 3. A stream ends on every exit of generate
# ---------------------------------------------------------------------------------------------------------------


class Recorder(BaseStreamer):
    """Records the calls; raises at the `fail_at`-th `put` or at the first `put_draft` when asked."""

    def __init__(self, fail_at: int | None = None, fail_draft: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_at, self.fail_draft = fail_at, fail_draft

    def put(self, value: torch.Tensor) -> None:
        self.calls.append("put")
        if self.fail_at is not None and self.calls.count("put") == self.fail_at:
            raise RuntimeError("put failed")

    def put_draft(self, value: torch.Tensor) -> None:
        self.calls.append("draft")
        if self.fail_draft:
            raise RuntimeError("put_draft failed")

    def end(self) -> None:
        self.calls.append("end")


@pytest.mark.parametrize(
    ("streamer", "error"),
    [(Recorder(fail_at=1), "put failed"), (Recorder(fail_at=2), "put failed"), (Recorder(fail_draft=True), "draft")],
)
def test_a_streamer_that_raises_still_gets_end_once(model, streamer: Recorder, error: str) -> None:
    with pytest.raises(RuntimeError, match=error):
        model.generate(num_steps=4, streamer=streamer, seed=0)
    assert streamer.calls[-1] == "end" and streamer.calls.count("end") == 1


def test_a_validation_error_comes_before_the_first_put_and_ends_the_stream() -> None:
    """An MDLM model given templates without `mdlm_gap_budget` failed after the prefix was put, and never ended."""
    mdlm = random_model(objective="mdlm")
    streamer = Recorder()
    with pytest.raises(ValueError, match="mdlm_gap_budget"):
        mdlm.generate(template_ids=[[BOS, 5, MASK, 6, EOS]], num_steps=4, streamer=streamer)
    assert streamer.calls == ["end"]


def test_a_text_iterator_consumer_does_not_block_when_generate_fails(model) -> None:
    streamer = TextIteratorStreamer(word_tokenizer(), timeout=5)  # old code: queue.Empty after 5 s
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(input_ids=[[BOS, VOCAB + 3]], num_steps=4, streamer=streamer)
    assert "".join(streamer) == ""


def test_a_successful_stream_still_ends_once(model) -> None:
    streamer = Recorder()
    model.generate(num_steps=4, streamer=streamer, seed=0)
    assert streamer.calls[0] == "put" and streamer.calls[-2:] == ["put", "end"] and streamer.calls.count("end") == 1


# ---------------------------------------------------------------------------------------------------------------
# 4. Flags that were accepted and silently ignored or misapplied
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
        ("top_p", 1.5, r"top_p must lie in \(0, 1\]"),
        ("top_p", 0.0, r"top_p must lie in \(0, 1\]"),
        ("max_length", 3.7, "max_length must be an integer >= 2"),
        ("top_k", -1, "top_k must be an integer >= 0"),
        ("temperature", 0.0, "temperature must be > 0"),
    ],
)
def test_generate_refuses_values_it_would_ignore_or_round(model, field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.generate(num_steps=2, **{field: value})


def test_evaluate_generate_kwargs_cannot_override_the_reported_flags() -> None:
    from elastic_mdm.commands.evaluate import parse_arguments

    base = ["--model_name_or_path", "x", "--num_steps", "4"]
    with pytest.raises(ValueError, match=r"--generate_kwargs sets num_steps \(--num_steps\)"):
        parse_arguments([*base, "--generate_kwargs", json.dumps({"num_steps": 8})])
    with pytest.raises(ValueError, match="unknown generate\\(\\) options \\['top_pp'\\]"):
        parse_arguments([*base, "--generate_kwargs", json.dumps({"top_pp": 0.9})])
    with pytest.raises(ValueError, match="top_p must lie in"):
        parse_arguments([*base, "--generate_kwargs", json.dumps({"top_p": 1.5})])
    with pytest.raises(ValueError, match="--generate_kwargs is not JSON"):
        parse_arguments([*base, "--generate_kwargs", "{top_p: 0.9}"])
    args, _ = parse_arguments([*base, "--generate_kwargs", json.dumps({"top_p": 0.9})])
    assert args.sampling_kwargs() == {"num_steps": 4, "schedule": "linear", "top_p": 0.9}


def test_evaluate_structured_tasks_from_an_empty_file_is_an_error(tmp_path: Path) -> None:
    from elastic_mdm.commands.evaluate import parse_arguments, structured_tasks

    empty = tmp_path / "EMPTY.jsonl"
    empty.write_text("\n")
    args, data_args = parse_arguments(["--model_name_or_path", "x", "--metrics", "structured",
                                       "--structured_tasks", str(empty)])  # fmt: skip
    with pytest.raises(ValueError, match="EMPTY.jsonl' holds no row"):
        structured_tasks(args, data_args, word_tokenizer())
    args.max_structured_tasks = 0  # 0 turns the section off
    assert structured_tasks(args, data_args, word_tokenizer()) == []


def test_structured_gap_budget_is_refused_for_the_elastic_objective(tmp_path: Path) -> None:
    """It padded every value of an Elastic-MDM run (and dropped the rows with a longer value) without a word."""
    from elastic_mdm.commands.train import check_training_paths
    from elastic_mdm.training.arguments import DataArguments, ElasticMDMTrainingArguments, ModelArguments

    rows = str(tmp_path / "rows.jsonl")
    data = DataArguments(structured_train_file=rows, structured_gap_budget=4)
    for objective, refused in (("elastic", True), ("mdlm", False)):
        training = ElasticMDMTrainingArguments(output_dir=str(tmp_path / objective), objective=objective)
        if refused:
            with pytest.raises(ValueError, match="--structured_gap_budget 4 is for the MDLM baseline"):
                check_training_paths(ModelArguments(), data, training)
        else:
            check_training_paths(ModelArguments(), data, training)
    with pytest.raises(ValueError, match="--structured_gap_budget 4 pads the values of --structured_train_file"):
        check_training_paths(ModelArguments(), DataArguments(structured_gap_budget=4), training)


# ---------------------------------------------------------------------------------------------------------------
# 5. Values that passed validation and broke later
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_gap": 100000}, "max_gap=100000 exceeds max_position_embeddings=64"),
        ({"norm_eps": 0.0}, "norm_eps must be a finite number > 0"),
        ({"norm_eps": -1e-5}, "norm_eps must be a finite number > 0"),
        ({"gap_loss_weight": math.nan}, "gap_loss_weight must be a finite number >= 0"),
        ({"gap_loss_weight": -1.0}, "gap_loss_weight must be a finite number >= 0"),
    ],
)
def test_config_refuses_values_that_break_later(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_forward_refuses_a_nan_noise_level(model) -> None:
    ids = torch.tensor([[BOS, 5, 6, EOS]])
    assert not model(ids, noise_level=torch.tensor([0.5])).logits.isnan().any()
    with pytest.raises(ValueError, match=r"noise_level must hold .* \[0, 1\]"):
        model(ids, noise_level=torch.tensor([math.nan]))


@pytest.mark.parametrize("name", ["input_ids", "template_ids"])
@pytest.mark.parametrize("bad", [VOCAB, -100])
def test_generate_refuses_ids_outside_the_vocabulary(model, name: str, bad: int) -> None:
    row = [BOS, 5, bad] + ([MASK, EOS] if name == "template_ids" else [])
    with pytest.raises(ValueError, match=f"{name}\\[0\\] holds the id {bad}, outside the vocabulary 0..63"):
        model.generate(num_steps=2, **{name: [row]})


@pytest.mark.parametrize("bad", [VOCAB, -100])
def test_collator_refuses_ids_outside_the_vocabulary_naming_the_feature(bad: int) -> None:
    from elastic_mdm.objectives.table import make_collator

    collator = make_collator("elastic", tiny_config(), seed=0)
    good = {"input_ids": [BOS, 5, 6, EOS]}
    with pytest.raises(ValueError, match=f"Feature 1 of the batch holds the id {bad} \\(the vocabulary is 0..63\\)"):
        collator([good, {"input_ids": [BOS, 7, bad, EOS]}])
    with pytest.raises(ValueError, match="Feature 1 of the batch contains the mask token"):
        collator([good, {"input_ids": [BOS, MASK, EOS]}])
    assert collator([good])["input_ids"].max() < VOCAB


def test_collator_without_a_vocabulary_still_refuses_negative_ids() -> None:
    collator = ElasticMDMCollator(MASK, BOS, EOS, max_length=16, seed=0)
    with pytest.raises(ValueError, match="Feature 0 of the batch holds the id -100"):
        collator([{"input_ids": [BOS, -100, EOS]}])


def test_mask_id_set_to_bos_after_construction_is_caught_by_generate_and_save(tmp_path: Path) -> None:
    broken = random_model()
    broken.config.mask_token_id = BOS  # some Transformers versions do not validate on attribute set
    with pytest.raises(ValueError, match="mask_token_id=1 equals bos_token_id"):
        broken.generate(num_steps=2)
    with pytest.raises(ValueError, match="mask_token_id=1 equals bos_token_id"):
        broken.config.save_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 6. Weights and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_library_from_pretrained_warns_naming_the_nan_tensor(tmp_path: Path, caplog) -> None:
    folder = save_checkpoint(tmp_path / "nan")
    weights = load_file(folder / "model.safetensors")
    name = sorted(key for key in weights if key.endswith("proj.weight"))[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        loaded = ElasticMDMForDiffusionLM.from_pretrained(folder)
    assert isinstance(loaded, ElasticMDMForDiffusionLM)
    assert f"non-finite weights: {name} holds 1 NaN/inf values" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ElasticMDMForDiffusionLM.from_pretrained(save_checkpoint(tmp_path / "fine"))
    assert "non-finite" not in caplog.text


def test_convert_overwrite_removes_the_old_tokenizer_and_adapter(tmp_path: Path) -> None:
    from test_convert import mdlm_checkpoint

    from elastic_mdm.conversion.convert import convert_mdlm_checkpoint

    trained = save_checkpoint(tmp_path / "trained")  # weights, config, remote code and a tokenizer
    (trained / "adapter_config.json").write_text("{}")
    (trained / "adapter_model.safetensors").write_bytes(b"old")
    (trained / "notes.txt").write_text("kept")
    src, _, _ = mdlm_checkpoint(tmp_path / "mdlm", "safetensors")  # no tokenizer of its own
    convert_mdlm_checkpoint(src, trained, overwrite=True)
    left = {p.name for p in trained.iterdir()}
    assert not left & {"tokenizer.json", "tokenizer_config.json", "adapter_config.json", "adapter_model.safetensors"}
    assert {"model.safetensors", "config.json", "notes.txt"} <= left
    assert ElasticMDMConfig.from_pretrained(trained).vocab_size != VOCAB  # the new model, not the old one


# ---------------------------------------------------------------------------------------------------------------
# 7. Messages that name the file, the line or the row
# ---------------------------------------------------------------------------------------------------------------


def test_a_garbage_line_in_structured_rows_names_the_file_and_line(tmp_path: Path) -> None:
    from elastic_mdm.data.schema_prompts import read_rows
    from elastic_mdm.evaluation.structured import load_structured_tasks

    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"schema": {"type": "object"}, "instance": {"a": "b"}})
    rows.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:3: not a JSON line"):
        read_rows(rows)
    with pytest.raises(ValueError, match=r"rows.jsonl:3: not a JSON line"):
        load_structured_tasks(rows, word_tokenizer())


def test_a_literal_mask_token_in_a_structured_row_is_text() -> None:
    from elastic_mdm.data.schema_prompts import structured_feature

    tokenizer = word_tokenizer()
    feature = structured_feature(tokenizer, {"type": "object"}, {"a": "<mask> w5"}, schema_prompt=False)
    assert MASK not in feature["input_ids"]


def test_a_tokenizer_with_an_auto_map_loads_with_the_stock_class_and_its_code_never_runs(tmp_path: Path) -> None:
    """What docs/security.md says: without --trust_remote_code the `auto_map` is ignored; a tokenizer that only its
    own code can read is refused, with Transformers' request for trust_remote_code=True as the cause."""
    from elastic_mdm.loading.checkpoints import load_checkpoint_tokenizer

    word_tokenizer().save_pretrained(tmp_path)
    ran = tmp_path / "RAN"
    (tmp_path / "own_tokenizer.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass OwnTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_file = tmp_path / "tokenizer_config.json"
    auto_map = {"AutoTokenizer": ["own_tokenizer.OwnTokenizer", None]}
    config = {**json.loads(config_file.read_text()), "auto_map": auto_map}
    config_file.write_text(json.dumps(config))
    tokenizer = load_checkpoint_tokenizer(str(tmp_path))
    assert type(tokenizer).__module__.startswith("transformers.") and len(tokenizer) == VOCAB and not ran.exists()
    config_file.write_text(json.dumps({**config, "tokenizer_class": "OwnTokenizer"}))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_checkpoint_tokenizer(str(tmp_path))
    assert not ran.exists()
