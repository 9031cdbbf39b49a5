"""What the tools trust (docs/security.md): no checkpoint code runs unasked, no checkpoint is overwritten, fine-tuning
keeps the checkpoint's tokenizer, resumes are exact or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SPECIALS, VOCAB, save_checkpoint, tiny_config, word_tokenizer

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.commands import generate as generate_cli
from elastic_mdm.commands import train as train_cli
from elastic_mdm.loading.checkpoints import load_checkpoint, local_or_hub, looks_local
from elastic_mdm.loading.tokenizers import check_vocab
from elastic_mdm.training.outputs import check_output_dir, check_resume_checkpoint, check_resume_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


# ---------------------------------------------------------------------------------------------------------------
# 1. No code from a checkpoint runs unasked
# ---------------------------------------------------------------------------------------------------------------


def test_load_checkpoint_refuses_another_model_type_without_running_its_code(tmp_path: Path) -> None:
    folder, marker = tmp_path / "evil", tmp_path / "ran.txt"
    folder.mkdir()
    (folder / "evil_model.py").write_text(MARKER_CODE.format(marker=str(marker)))
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "evil_model.Config", "AutoModel": "evil_model.Model"}}
    (folder / "config.json").write_text(json.dumps(config))
    for trust in (False, True):
        with pytest.raises(ValueError, match="model_type='evil'"):
            load_checkpoint(str(folder), trust_remote_code=trust)
    assert not marker.exists()


def test_load_checkpoint_uses_the_installed_class_not_the_folder_code(checkpoint: Path, tmp_path: Path) -> None:
    folder, marker = tmp_path / "tampered", tmp_path / "ran.txt"
    save_checkpoint(folder)
    code = folder / "modeling_elastic_mdm.py"
    code.write_text(MARKER_CODE.format(marker=str(marker)) + code.read_text())
    model = load_checkpoint(str(folder))
    assert type(model) is ElasticMDMForDiffusionLM and not model.training
    assert not marker.exists()


def test_scripts_refuse_tokenizer_code(checkpoint: Path, tmp_path: Path) -> None:
    from elastic_mdm.commands.evaluate import main as evaluate_main

    folder, marker = tmp_path / "tok", tmp_path / "ran.txt"
    save_checkpoint(folder)
    (folder / "evil_tokenizer.py").write_text(MARKER_CODE.format(marker=str(marker)))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        generate_cli.main([str(folder), "--num_return_sequences", "1", "--num_steps", "2"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        evaluate_main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "eval")])
    assert not marker.exists()


def test_missing_local_checkpoint_is_an_error_not_a_hub_lookup(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("outputs/tiny-elastic", "./tiny", str(tmp_path / "nowhere"), "~/no-such-elastic-mdm-run"):
        assert looks_local(name)
        with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
            local_or_hub(name)
    assert local_or_hub("user/model") == "user/model" and not looks_local("user/model")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        generate_cli.main(["outputs/tiny-elastic", "--num_steps", "2"])


def test_generate_script_loads_with_the_installed_classes(checkpoint: Path) -> None:
    rows = generate_cli.main([str(checkpoint), "--num_return_sequences", "2", "--num_steps", "2"])
    assert len(rows) == 2


# ---------------------------------------------------------------------------------------------------------------
# 2. train.py never overwrites or deletes a checkpoint unasked
# ---------------------------------------------------------------------------------------------------------------


def test_check_output_dir(checkpoint: Path, tmp_path: Path) -> None:
    check_output_dir(str(tmp_path / "new"))  # a fresh folder
    run = tmp_path / "run"
    (run / "checkpoint-40").mkdir(parents=True)
    with pytest.raises(ValueError, match="checkpoint-40.*--overwrite_output_dir.*--resume_from_checkpoint"):
        check_output_dir(str(run))
    check_output_dir(str(run), overwrite_output_dir=True)
    check_output_dir(str(run), resume_from_checkpoint=str(run / "checkpoint-40"))
    with pytest.raises(ValueError, match="model.safetensors"):
        check_output_dir(str(checkpoint), resume_from_checkpoint=str(run / "checkpoint-40"))
    with pytest.raises(ValueError, match="overwrite the source checkpoint"):
        check_output_dir(str(checkpoint), overwrite_output_dir=True, sources=[str(checkpoint)])


def test_train_script_refuses_an_output_dir_holding_a_model(checkpoint: Path, tmp_path: Path) -> None:
    output = save_checkpoint(tmp_path / "other-run")
    before = (output / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a model"):
        train_cli.main(["configs/tiny.yaml", "--output_dir", str(output), "--max_steps", "1"])
    with pytest.raises(ValueError, match="overwrite the source checkpoint"):
        train_cli.main(["configs/tiny.yaml", "--model_name_or_path", str(output), "--output_dir", str(output),
                        "--overwrite_output_dir", "true", "--max_steps", "1"])  # fmt: skip
    assert (output / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 3. Fine-tuning keeps the checkpoint's tokenizer
# ---------------------------------------------------------------------------------------------------------------


class Captured(Exception):
    """Stops the training command (`commands.train.main`) once the tokenizer is chosen."""


def test_train_script_fine_tunes_with_the_checkpoint_tokenizer(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    def capture(model_args, tokenizer):
        raise Captured(tokenizer)

    monkeypatch.setattr(train_cli, "build_model", capture)
    with pytest.raises(Captured) as caught:
        train_cli.main(
            ["configs/tiny.yaml", "--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "o")]
        )
    assert caught.value.args[0].get_vocab() == word_tokenizer().get_vocab()


def test_check_vocab_compares_the_vocabulary_not_only_its_size(checkpoint: Path) -> None:
    other = word_tokenizer([f"v{i}" for i in range(VOCAB - len(SPECIALS))])  # same size, same special ids
    config = tiny_config()
    check_vocab(config, other)  # sizes and special ids agree
    check_vocab(config, word_tokenizer(), word_tokenizer())
    with pytest.raises(ValueError, match="not the checkpoint's: 60 of the checkpoint tokenizer's 64 tokens"):
        check_vocab(config, other, word_tokenizer())


def test_train_script_refuses_another_tokenizer_for_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-tokenizer"
    word_tokenizer([f"v{i}" for i in range(VOCAB - len(SPECIALS))]).save_pretrained(other)
    with pytest.raises(ValueError, match="not the checkpoint's"):
        train_cli.main(["configs/tiny.yaml", "--model_name_or_path", str(checkpoint), "--tokenizer_name",
                                   str(other), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 9. Resumes are exact or refused
# ---------------------------------------------------------------------------------------------------------------


def fake_trainer_checkpoint(folder: Path, **overrides) -> Path:
    """A checkpoint-* folder with every file an exact resume reads (contents are not read by the checks)."""
    save_checkpoint(folder, **overrides)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (folder / name).write_text("{}")
    return folder


def test_resume_refuses_a_checkpoint_without_its_training_state(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer state.*scheduler state.*RNG state.*trainer state"):
        check_resume_checkpoint(str(checkpoint))
    check_resume_checkpoint(str(fake_trainer_checkpoint(tmp_path / "checkpoint-5")))
    with pytest.raises(ValueError, match="lacks its optimizer state"):
        train_cli.main(["configs/tiny.yaml", "--resume_from_checkpoint", str(checkpoint),
                                   "--output_dir", str(tmp_path / "o")])  # fmt: skip


def test_resume_refuses_changed_model_flags(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = fake_trainer_checkpoint(run / "checkpoint-5", time_conditioning=False)
    check_resume_config(str(ckpt), {"time_conditioning": False, "hidden_size": 32})
    with pytest.raises(ValueError, match="time_conditioning: False in the checkpoint, True from the flags"):
        check_resume_config(str(ckpt), {"time_conditioning": True})
    with pytest.raises(ValueError, match="time_conditioning"):
        train_cli.main(["configs/tiny.yaml", "--resume_from_checkpoint", str(ckpt), "--output_dir",
                                   str(run), "--time_conditioning", "true"])  # fmt: skip
