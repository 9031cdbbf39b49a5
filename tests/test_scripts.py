"""Entry points in one process: scripts/train.py and scripts/generate.py (two processes: tests/test_distributed.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICK

from elastic_mdm.commands import generate as generate_cli
from elastic_mdm.commands import train as train_cli

pytest.importorskip("jsonschema")
pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(trained_tiny: Path) -> Path:
    """The session's quick run of the main job's config (`conftest.trained_tiny`)."""
    return trained_tiny


def test_train_script_saves_a_complete_checkpoint(trained: Path) -> None:
    files = ["config.json", "model.safetensors", "generation_config.json", "modeling_elastic_mdm.py", "tokenizer.json"]
    for name in files + ["README.md", "report/sample_report.json", "report/length_histogram.png"]:
        assert (trained / name).exists(), name
    report = json.loads((trained / "report" / "sample_report.json").read_text())
    assert report["num_samples"] == 16 and set(report) >= {"total_variation", "wasserstein1", "ks"}
    config = json.loads((trained / "config.json").read_text())
    assert config["objective"] == "elastic" and config["num_hidden_layers"] == 1  # the flag beat the YAML


def test_generate_script(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    rows = generate_cli.main(
        [str(trained), "--num_return_sequences", "3", "--num_steps", "4", "--schedule", "cosine", "--output", str(out)]
    )
    assert len(rows) == 3 and len(out.read_text().splitlines()) == 3
    template = [str(trained), "--template", '{"x":<mask>}', "--num_steps", "2", "--greedy_gaps"]
    rows = generate_cli.main(template)
    assert all(row["text"].startswith('{"x":') and row["text"].endswith("}") for row in rows)


def test_generate_script_streams_one_sample(trained: Path, capsys) -> None:
    """`--stream`: drafts drawn in place (cursor saved, overwritten), then the final text, through Transformers'
    `TextDiffusionStreamer`; more than one sample is refused."""
    script = generate_cli
    rows = script.main([str(trained), "--stream", "--stream_delay", "0", "--num_steps", "4", "--prompt", '{"'])
    printed = capsys.readouterr().out
    assert len(rows) == 1 and "\0337" in printed and "\033[33m" in printed
    assert printed.rstrip("\n").endswith(rows[0]["text"][2:])  # the prompt was put first, the rest after it
    with pytest.raises(SystemExit):
        script.main([str(trained), "--stream", "--num_return_sequences", "2"])


def test_yaml_then_flags(tmp_path: Path) -> None:
    model_args, data_args, training_args, report_args = train_cli.parse_arguments(
        ["configs/tiny.yaml", "--learning_rate", "0.5", "--schedule_families", "linear", "cosine"]
    )
    assert training_args.learning_rate == 0.5 and training_args.schedule_families == ["linear", "cosine"]
    assert model_args.hidden_size == 128 and data_args.dataset_name == "synthetic-json"
    assert report_args.report_num_samples == 512


RELOAD_AND_GENERATE = """
import sys
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
out = model.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
sequences, lengths = out.sequences, out.lengths
assert not any("lora" in name for name, _ in model.named_parameters())
print("LENGTHS=" + ",".join(map(str, lengths.tolist())))
"""


def test_lora_fine_tune_merges_and_reloads(trained: Path, tmp_path: Path, isolated_python) -> None:
    """LoRA on a llama-flavour checkpoint with adaLN (a retrofit's shape): a few steps, merge, save, reload, sample."""
    from transformers import AutoTokenizer

    from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM

    tokenizer = AutoTokenizer.from_pretrained(trained)
    config = ElasticMDMConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=80, block_type="llama", adaln=True, mask_token_id=tokenizer.mask_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    base = ElasticMDMForDiffusionLM(config)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    output = tmp_path / "lora"
    base_dir = str(tmp_path / "base")
    flags = ["--model_name_or_path", base_dir, "--tokenizer_name", base_dir, "--lora_r", "4", "--learning_rate", "0.01"]
    flags += ["--gradient_checkpointing", "true", "--output_dir", str(output), "--report_num_samples", "0"]
    train_cli.main(["configs/tiny.yaml", *flags, *QUICK])
    merged = ElasticMDMForDiffusionLM.from_pretrained(output).state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert any(k.startswith("gap_head.") for k in changed)  # modules_to_save: trained in full
    assert any(".attn.q_proj." in k for k in changed)  # LoRA deltas merged into the block linears
    assert "model.embed_tokens.weight" not in changed  # frozen
    result = isolated_python(RELOAD_AND_GENERATE, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LENGTHS=" in result.stdout


def test_train_script_mdlm_objective_reports(tmp_path: Path) -> None:
    """The MDLM baseline through the same entry point: its sampler, and templates with a gap budget (too-long
    templates count as failures, not errors)."""
    metrics = train_cli.main(
        [
            "configs/tiny.yaml",
            "--objective",
            "mdlm",
            "--output_dir",
            str(tmp_path),
            "--report_num_samples",
            "8",
            "--report_num_steps",
            "4",
            *QUICK,
        ]  # fmt: skip
    )
    assert metrics["eval_nelbo_bits_per_token"] > 0 and metrics["report"]["num_samples"] == 8
    assert metrics["report"]["templates_too_long"] >= 1  # 16 masks per gap do not fit the 80-token canvas for all
    assert json.loads((tmp_path / "config.json").read_text())["objective"] == "mdlm"


HIDE_MATPLOTLIB = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):  # what a machine without matplotlib gives
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Refuse())
from elastic_mdm.commands.train import main
main(sys.argv[1:])
"""


def test_report_without_matplotlib_is_refused_before_training(tmp_path: Path) -> None:
    """`pip install elastic-mdm[train]` has no matplotlib: the report's PNG cannot be written, which the run says
    before training (it used to train, save, then exit non-zero on the ImportError); `--report_num_samples 0`
    trains without the report."""
    output = tmp_path / "run"
    flags = ["configs/tiny.yaml", "--output_dir", str(output), "--report_num_samples", "8", *QUICK]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = [sys.executable, "-c", HIDE_MATPLOTLIB]
    refused = subprocess.run([*run, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "needs matplotlib" in refused.stderr, refused.stderr[-2000:]
    assert "--report_num_samples 0" in refused.stderr and "pip install elastic-mdm[eval]" in refused.stderr
    assert not (output / "model.safetensors").exists() and "train_runtime" not in refused.stdout  # nothing trained
    trained = subprocess.run([*run, *flags, "--report_num_samples", "0"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert trained.returncode == 0 and (output / "model.safetensors").exists(), trained.stderr[-2000:]


def test_elastic_mdm_dispatches_to_the_command_modules(monkeypatch, capsys) -> None:
    """`elastic-mdm COMMAND ARGS` runs `elastic_mdm.commands.COMMAND.main(ARGS)`; an unknown command or converter
    format is refused naming the choices; the console-script target of older installs is the same dispatcher."""
    from elastic_mdm import commands
    from elastic_mdm.commands import convert as convert_command
    from elastic_mdm.conversion.writer import DEFAULT_MAX_SHARD_SIZE
    from elastic_mdm.serving import cli as old_target

    seen = []
    monkeypatch.setattr(generate_cli, "main", lambda argv: seen.append(argv))
    commands.main(["generate", "outputs/x", "--seed", "3"])
    assert seen == [["outputs/x", "--seed", "3"]]
    with pytest.raises(SystemExit) as exit_:
        commands.main(["fine-tune"])
    assert exit_.value.code == 2
    assert "invalid choice: 'fine-tune'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        commands.main(["convert", "gguf", "src", "dst"])
    assert "invalid choice: 'gguf'" in capsys.readouterr().err
    converted = []
    monkeypatch.setitem(convert_command.CONVERTERS, "mdlm", lambda src, dst, **kw: converted.append((src, dst, kw)))
    commands.main(["convert", "mdlm", "a", "b", "--seed", "4", "--max_gap", "64", "--adaln=true"])
    assert converted == [
        (
            "a",
            "b",
            {"max_shard_size": DEFAULT_MAX_SHARD_SIZE, "seed": 4, "overwrite": False, "max_gap": 64, "adaln": True},
        )
    ]
    assert old_target.main is commands.main


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_run_config_parses(path: str) -> None:
    """Every `configs/*.yaml` is a valid `scripts/train.py` argument list (a renamed or misspelt flag fails here,
    not after a long data build). The GPU configs' bf16 is turned off where there is no GPU: Transformers refuses it
    at parse time."""
    cpu = [] if torch.cuda.is_available() else ["--bf16", "false"]
    model_args, data_args, training_args, _ = train_cli.parse_arguments([path, "--output_dir", "unused", *cpu])
    assert training_args.objective in ("elastic", "mdlm")
    assert data_args.train_files or data_args.dataset_name or data_args.structured_train_file
