"""Bad input gets a clear error naming the argument: config, forward inputs, generate() fields, step counts,
non-finite values, and the smaller gaps of the collator and the scripts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import BOS, EOS, MASK, MAX_POS, VOCAB, save_checkpoint, tiny_config
from safetensors.torch import load_file, save_file

from elastic_mdm import ElasticMDMCollator, ElasticMDMForDiffusionLM
from elastic_mdm.commands import generate as generate_cli
from elastic_mdm.loading.checkpoints import load_checkpoint
from elastic_mdm.schedules_elastic_mdm import MAX_NUM_STEPS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    torch.manual_seed(0)
    return ElasticMDMForDiffusionLM(tiny_config()).eval()


# ---------------------------------------------------------------------------------------------------------------
# 4. Config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_token_id": BOS}, "mask_token_id=1 equals bos_token_id"),
        ({"mask_token_id": EOS}, "mask_token_id=2 equals eos_token_id"),
        ({"mask_token_id": VOCAB}, "mask_token_id=64 is not a token id"),
        ({"eos_token_id": -1}, "eos_token_id=-1 is not a token id"),
        ({"pad_token_id": 100}, "pad_token_id=100 is not a token id"),
        ({"max_gap": -1}, "max_gap must be an integer >= 0"),
        ({"max_position_embeddings": 2}, "max_position_embeddings must be an integer >= 3"),
        ({"vocab_size": 0}, "vocab_size must be an integer >= 1"),
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1"),
    ],
)
def test_config_refuses_ids_and_sizes_that_break_the_model(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_accepts_gpt2_style_bos_equal_eos() -> None:
    assert tiny_config(bos_token_id=EOS).bos_token_id == EOS


# ---------------------------------------------------------------------------------------------------------------
# 5. Forward inputs
# ---------------------------------------------------------------------------------------------------------------


def test_forward_refuses_a_mismatched_attention_mask(model) -> None:
    ids = torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, 0]])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\) but input_ids \(2, 4\)"):
        model(ids, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_forward_refuses_bad_packed_boundaries(model) -> None:
    ids = torch.tensor([BOS, 5, EOS, BOS, 6, 7, EOS])
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        model(ids, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen=2 is smaller than the longest sequence \\(4 tokens\\)"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=2)
    out = model(ids, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4)
    assert out.logits.shape == (7, VOCAB)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_forward_names_out_of_range_token_ids(model, bad: int) -> None:
    with pytest.raises(ValueError, match="input_ids holds ids .* outside the vocabulary 0..63"):
        model(torch.tensor([[BOS, bad, EOS]]))


# ---------------------------------------------------------------------------------------------------------------
# 6. generate() honours or refuses Transformers fields
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_beams", 4),
        ("repetition_penalty", 1.3),
        ("no_repeat_ngram_size", 2),
        ("min_new_tokens", 5),
        ("min_length", 10),
        ("typical_p", 0.5),
        ("output_scores", True),
    ],
)
def test_generate_refuses_fields_it_cannot_honour(model, field: str, value) -> None:
    with pytest.raises(ValueError, match=f"generate\\(\\) does not support {field}="):
        model.generate(num_steps=2, seed=0, **{field: value})


def test_generate_accepts_neutral_transformers_values(model) -> None:
    model.generate(num_steps=2, seed=0, num_beams=1, repetition_penalty=1.0, min_new_tokens=0)


def test_max_new_tokens_bounds_the_growth_of_every_input(model) -> None:
    out = model.generate(num_return_sequences=16, num_steps=8, seed=0, max_new_tokens=3, return_dict_in_generate=True)
    assert int(out.lengths.max()) <= 2 + 3 and bool(out.hit_max_length.any())
    assert bool((out.hit_max_length == (out.lengths == 5)).all())
    prompts = [[BOS, 5], [BOS, 5, 6, 7, 8, 9, 10]]
    out = model.generate(
        input_ids=prompts, num_return_sequences=4, num_steps=8, seed=0, max_new_tokens=2, return_dict_in_generate=True
    )
    limits = torch.tensor([len(p) + 1 + 2 for p in prompts for _ in range(4)])
    assert bool((out.lengths <= limits).all()) and bool(out.hit_max_length.any())
    for row, n, prompt in zip(out.sequences, out.lengths, [p for p in prompts for _ in range(4)], strict=True):
        assert row[: len(prompt)].tolist() == prompt and int(row[n - 1]) == EOS
    baseline = model.generate(num_return_sequences=16, num_steps=8, seed=0, return_dict_in_generate=True)
    assert int(baseline.lengths.max()) > 5  # without the bound the same draws grow further


def test_suppress_tokens_and_single_token_bad_words_are_never_sampled(model) -> None:
    allowed = {BOS, EOS, 10}
    banned = [t for t in range(VOCAB) if t not in allowed and t != MASK]
    for kwargs in ({"suppress_tokens": banned + [MASK]}, {"bad_words_ids": [[t] for t in banned + [MASK]]}):
        out = model.generate(num_return_sequences=8, num_steps=8, seed=0, **kwargs, return_dict_in_generate=True)
        sequences, lengths = out.sequences, out.lengths
        tokens = {t for row, n in zip(sequences, lengths, strict=True) for t in row[:n].tolist()}
        assert int(lengths.max()) > 2 and tokens <= allowed


def test_multi_token_bad_words_are_refused(model) -> None:
    with pytest.raises(ValueError, match="bad_words_ids may only hold single tokens"):
        model.generate(num_steps=2, bad_words_ids=[[5, 6]])
    with pytest.raises(ValueError, match="suppress_tokens must hold token ids in 0..63"):
        model.generate(num_steps=2, suppress_tokens=[VOCAB])


# ---------------------------------------------------------------------------------------------------------------
# 7. num_steps is bounded
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10**9, MAX_NUM_STEPS + 1])
def test_num_steps_above_the_limit_is_refused_up_front(model, steps: int) -> None:
    with pytest.raises(ValueError, match=f"num_steps={steps} is above the limit of {MAX_NUM_STEPS}"):
        model.generate(num_steps=steps)


def test_num_steps_from_a_checkpoint_generation_config_is_bounded(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "steps")
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "num_steps": 10**9}))
    with pytest.raises(ValueError, match="above the limit"):
        generate_cli.main([str(folder), "--num_return_sequences", "1"])


# ---------------------------------------------------------------------------------------------------------------
# 8. Non-finite values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gap_temperature": math.nan}, "gap_temperature"),
        ({"gap_temperature": math.inf}, "gap_temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"schedule": "p-linear", "schedule_kwargs": {"p": math.nan}}, "schedule_kwargs\\['p'\\]"),
        ({"schedule": "exponential", "schedule_kwargs": {"sigma": math.nan}}, "schedule_kwargs\\['sigma'\\]"),
    ],
)
def test_non_finite_generation_arguments_are_refused(model, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        model.generate(num_steps=4, seed=0, **kwargs)


def test_non_finite_weights_are_detected_at_load(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "nan")
    weights = load_file(folder / "model.safetensors")
    weights["gap_head.out.weight" if "gap_head.out.weight" in weights else sorted(weights)[-1]][0, 0] = math.nan
    bad_name = next(name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all()))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"non-finite weights: {bad_name.replace('.', '[.]')}"):
        load_checkpoint(str(folder))
    with pytest.raises(ValueError, match="non-finite weights"):
        generate_cli.main([str(folder), "--num_steps", "2"])


# ---------------------------------------------------------------------------------------------------------------
# 9. Smaller gaps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -2])
def test_num_return_sequences_below_one_is_refused(model, count: int) -> None:
    with pytest.raises(ValueError, match=f"num_return_sequences must be an integer >= 1, got {count}"):
        model.generate(num_steps=2, num_return_sequences=count)


def test_generate_script_checks_the_tokenizer_against_the_config(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mask_token_id": 9}))
    with pytest.raises(ValueError, match="config.mask_token_id=9 but tokenizer.mask_token_id=3"):
        generate_cli.main([str(folder), "--num_steps", "2"])


def test_generate_script_never_overwrites_a_checkpoint_file(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "keep")
    before = (folder / "config.json").read_bytes()
    with pytest.raises(ValueError, match="is a file of the checkpoint folder"):
        generate_cli.main([str(folder), "--num_steps", "2", "--output", str(folder / "config.json")])
    assert (folder / "config.json").read_bytes() == before
    with pytest.raises(SystemExit):
        generate_cli.main([str(folder), "--num_return_sequences", "0"])


def test_evaluate_script_refuses_negative_counts() -> None:
    from elastic_mdm.commands.evaluate import main as evaluate_main

    with pytest.raises(ValueError, match="--num_samples must be >= 0, got -3"):
        evaluate_main(["--model_name_or_path", "unused", "--num_samples", "-3"])


def test_collator_refuses_misaligned_anchor_masks() -> None:
    collator = ElasticMDMCollator(MASK, BOS, EOS, max_length=MAX_POS, seed=0)
    features = [
        {"input_ids": [BOS, 5, 6, 7, EOS], "anchor_mask": [True, False, False, EOS]},  # 4 entries for 5 tokens
        {"input_ids": [BOS, 8, EOS], "anchor_mask": [True, False, False, True]},  # 4 entries for 3 tokens
    ]
    with pytest.raises(ValueError, match="anchor_mask of feature 0 has 4 entries but its input_ids 5 tokens"):
        collator(features)
