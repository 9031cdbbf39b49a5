import math
from pathlib import Path

import pytest
import torch

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.training.arguments import ElasticMDMTrainingArguments
from elastic_mdm.training.trainer import ElasticMDMTrainer

pytest.importorskip("jsonschema")
from elastic_mdm.data import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.build_tokenizer(num_records=400)


@pytest.fixture(scope="module")
def records(tokenizer):
    return synthetic.synthetic_dataset(tokenizer, 600, seed=0), synthetic.synthetic_dataset(tokenizer, 64, seed=1)


def tiny_model(tokenizer, seed: int = 0) -> ElasticMDMForDiffusionLM:
    torch.manual_seed(seed)
    config = ElasticMDMConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=80,
        mask_token_id=tokenizer.mask_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return ElasticMDMForDiffusionLM(config)


def arguments(output_dir: Path, **overrides) -> ElasticMDMTrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        max_steps=20,
        logging_steps=10,
        horizon_min=4,
        horizon_max=64,
        length_share=0.1,
        eval_num_steps=16,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return ElasticMDMTrainingArguments(**values)


def logged(trainer: ElasticMDMTrainer, key: str) -> list[float]:
    return [float(log[key]) for log in trainer.state.log_history if key in log]


@pytest.mark.parametrize("objective", ["elastic", "mdlm"])
def test_losses_fall_on_builtin_task(tmp_path, tokenizer, records, objective: str) -> None:
    """A few hundred steps of a tiny model: the loss terms fall, the NELBO bound is finite and falls."""
    train, held_out = records
    args = arguments(tmp_path, objective=objective, max_steps=150, logging_steps=25)
    trainer = ElasticMDMTrainer(model=tiny_model(tokenizer), args=args, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert logged(trainer, "token_loss")[-1] < logged(trainer, "token_loss")[0]
    assert after["eval_token_loss"] < 0.8 * before["eval_token_loss"]
    if objective == "elastic":
        assert logged(trainer, "gap_loss")[-1] < logged(trainer, "gap_loss")[0]
        assert after["eval_gap_loss"] < 0.5 * before["eval_gap_loss"]
    for metrics in (before, after):
        assert math.isfinite(metrics["eval_nelbo_bits_per_token"]) and metrics["eval_ppl_bound"] > 1.0
    assert after["eval_nelbo_bits_per_token"] < 0.8 * before["eval_nelbo_bits_per_token"]
    assert trainer.model.config.objective == objective


def straight_and_resumed(tmp_path, tokenizer, train, **overrides) -> tuple[ElasticMDMTrainer, ElasticMDMTrainer]:
    """A run straight through (checkpoint every 3 steps) and a run from another init resumed from its step 3."""
    common = dict(save_strategy="steps", save_steps=3, **overrides)
    straight = ElasticMDMTrainer(
        model=tiny_model(tokenizer), args=arguments(tmp_path / "a", **common), train_dataset=train
    )
    straight.train()
    resumed = ElasticMDMTrainer(
        model=tiny_model(tokenizer, seed=123), args=arguments(tmp_path / "b", **common), train_dataset=train
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    return straight, resumed


def test_resume_continues_identically(tmp_path, tokenizer, records) -> None:
    """Training 6 steps straight and resuming from the step-3 checkpoint give the same losses, weights and count of
    encoded tokens."""
    straight, resumed = straight_and_resumed(tmp_path, tokenizer, records[0], max_steps=6, logging_steps=1)
    assert logged(straight, "loss")[3:] == logged(resumed, "loss")[-3:]
    assert logged(straight, "token_loss")[3:] == logged(resumed, "token_loss")[-3:]
    assert logged(straight, "tokens_encoded")[3:] == logged(resumed, "tokens_encoded")[-3:]  # the count resumes
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_tokens_encoded_resumes_from_a_checkpoint_between_logs(tmp_path, tokenizer, records) -> None:
    """A checkpoint saved between two logs holds the count up to its step: the run resumed from step 3 logs the
    same `tokens_encoded` at step 4 as the run that went straight through."""
    straight, resumed = straight_and_resumed(tmp_path, tokenizer, records[0], max_steps=4, logging_steps=4)
    assert logged(resumed, "tokens_encoded") == logged(straight, "tokens_encoded") != []


def test_trainer_features_bf16_accumulation_checkpointing(tmp_path, tokenizer, records) -> None:
    """bf16 autocast, gradient accumulation and gradient checkpointing run together and log both terms."""
    train, held_out = records
    args = arguments(
        tmp_path, max_steps=4, logging_steps=2, bf16=True, gradient_accumulation_steps=2, gradient_checkpointing=True
    )
    trainer = ElasticMDMTrainer(model=tiny_model(tokenizer), args=args, train_dataset=train, eval_dataset=held_out)
    trainer.train()
    assert len(logged(trainer, "gap_loss")) == 2 and all(math.isfinite(x) for x in logged(trainer, "loss"))
    assert math.isfinite(trainer.evaluate()["eval_nelbo_bits_per_token"])


CHECKPOINT_SCRIPT = """
import sys
import torch
from transformers import AutoModel, AutoTokenizer
path = sys.argv[1]
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
out = model.generate(num_return_sequences=3, num_steps=8, seed=0, return_dict_in_generate=True)
sequences, lengths = out.sequences, out.lengths
assert model.config.objective == "elastic"
for row, n in zip(sequences, lengths.tolist()):
    assert row[0] == tokenizer.bos_token_id and row[n - 1] == tokenizer.eos_token_id
print("DECODED=" + repr(tokenizer.batch_decode([r[:n] for r, n in zip(sequences, lengths)], skip_special_tokens=True)))
"""


def test_saved_checkpoint_reloads_with_remote_code_and_generates(tmp_path, tokenizer, records, isolated_python) -> None:
    train, held_out = records
    trainer = ElasticMDMTrainer(
        model=tiny_model(tokenizer),
        args=arguments(tmp_path / "run", max_steps=3),
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
    )
    trainer.dataset_name = "synthetic-json"
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "elastic-mdm" in card and "eval_nelbo_bits_per_token" in card and "synthetic-json" in card
    assert "pipeline_tag: text-generation" in card and 'pipeline("text-generation"' in card
    assert 'model.generate(template_ids=[[bos, *piece(\'{"name":"\'), mask' in card  # the template example
    result = isolated_python(CHECKPOINT_SCRIPT, str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DECODED=" in result.stdout


def test_bad_training_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="objective"):
        arguments(tmp_path, objective="ar")
    with pytest.raises(ValueError, match="schedule_families"):
        arguments(tmp_path, schedule_families=["linear", "square"])
    with pytest.raises(ValueError, match="eval_num_steps"):
        arguments(tmp_path, eval_num_steps=0)


@pytest.mark.slow
def test_torch_compile(tmp_path, tokenizer, records) -> None:
    """`torch_compile=True` trains (dynamic packed shapes recompile; ~1-2 min on CPU)."""
    train, _ = records
    trainer = ElasticMDMTrainer(
        model=tiny_model(tokenizer),
        args=arguments(tmp_path, max_steps=3, logging_steps=1, torch_compile=True),
        train_dataset=train,
    )
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_tokens_encoded_counts_the_positions_each_objective_encodes(tmp_path, tokenizer, records) -> None:
    """MDLM encodes its whole canvas (batch x max_length per step); Elastic only the active tokens, at most the clean
    sequences; the count is cumulative in the logs."""
    train, _ = records
    counts = {}
    for objective in ("elastic", "mdlm"):
        args = arguments(tmp_path / objective, objective=objective, max_steps=4, logging_steps=1)
        trainer = ElasticMDMTrainer(model=tiny_model(tokenizer), args=args, train_dataset=train)
        trainer.train()
        counts[objective] = logged(trainer, "tokens_encoded")
    canvas = 32 * 80  # per_device_train_batch_size x max_position_embeddings
    assert counts["mdlm"] == [canvas * (step + 1) for step in range(4)]
    steps = [b - a for a, b in zip([0.0, *counts["elastic"]], counts["elastic"], strict=False)]
    longest_batch = 32 * max(len(f["input_ids"]) for f in train)
    assert all(0 < s <= longest_batch for s in steps) and counts["elastic"][-1] < counts["mdlm"][-1]


@pytest.mark.parametrize("objective", ["elastic", "mdlm"])
def test_a_training_step_reads_the_device_once(monkeypatch, tmp_path, tokenizer, records, objective: str) -> None:
    """`compute_loss` and the backward pass of a step read the device once: the collator's `host_read` (active
    tokens, longest sequence, masks). The noise is drawn on the batch's device; the model trusts the bounds the
    collator built and selects the loss rows from the counts it read (no `nonzero`, no `.tolist()`)."""
    from helpers import HostSyncRecorder

    from elastic_mdm.objectives.collators import PackingCollator

    train, _ = records
    trainer = ElasticMDMTrainer(model=tiny_model(tokenizer), args=arguments(tmp_path, objective=objective))
    batch = trainer.data_collator([train[i] for i in range(16)])
    assert PackingCollator.is_clean(batch)  # the noise is drawn in compute_loss, on the batch's device
    with HostSyncRecorder(monkeypatch) as recorder:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    assert recorder.syncs == [] and recorder.reads == 1
    assert torch.isfinite(loss)


def test_the_training_loop_reads_nothing_more_per_step(monkeypatch, tmp_path, tokenizer, records) -> None:
    """The Trainer's own loop adds no read per step (its nan/inf loss filter, one read per step, is off): the
    read-backs outside `host_read` of a 2-step and a 6-step run are the same. The data collator is not recorded: it
    checks host data in the data loader, which never touches the device."""
    from helpers import HostSyncRecorder

    train, _ = records
    counts = {}
    for steps in (2, 6):
        args = arguments(tmp_path / str(steps), max_steps=steps, logging_steps=100, per_device_train_batch_size=8)
        trainer = ElasticMDMTrainer(model=tiny_model(tokenizer), args=args, train_dataset=train)
        with HostSyncRecorder(monkeypatch) as recorder:
            collator_class = type(trainer.data_collator)

            def unrecorded(self, features, collate=collator_class.__call__):
                recorder.recording = False
                try:
                    return collate(self, features)
                finally:
                    recorder.recording = True

            monkeypatch.setattr(collator_class, "__call__", unrecorded)
            trainer.train()
        counts[steps] = (len(recorder.syncs), recorder.reads)
    assert counts[6][0] == counts[2][0], counts
    assert counts[6][1] - counts[2][1] == 4, counts  # one host_read per step


def test_noise_levels_are_drawn_on_the_requested_device() -> None:
    from elastic_mdm.schedules_elastic_mdm import NoiseLevelSampler

    s, s_next = NoiseLevelSampler()(5, device="meta")
    assert s.device.type == s_next.device.type == "meta" and s.shape == (5,)


def test_a_collated_batch_goes_through_a_stock_trainer(tmp_path, tokenizer, records) -> None:
    """`ElasticMDMCollator` as the `data_collator` of a plain `Trainer`: its batch survives the Trainer's device move
    (the host counts it carries are passed through, not rebuilt) and gives the loss of the batch as collated."""
    from transformers import Trainer, TrainingArguments

    from elastic_mdm.objectives.collators import ElasticMDMCollator

    train, _ = records
    model = tiny_model(tokenizer).eval()
    collator = ElasticMDMCollator(
        tokenizer.mask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, max_length=80, seed=0
    )
    batch = collator([train[i] for i in range(8)])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    moved = Trainer(model=model, args=args, data_collator=collator)._prepare_inputs(batch)
    assert moved["target_rows"] == batch["target_rows"]
    inputs = lambda b: {k: v for k, v in b.items() if k != "num_target_tokens"}  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(moved)).loss, model(**inputs(batch)).loss)
