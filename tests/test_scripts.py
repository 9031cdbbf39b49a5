"""Entry points: scripts/train.py (plain python, accelerate DDP, DeepSpeed ZeRO-2 on CPU) and scripts/generate.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICK

from elastic_mdm.loading import cli as generate_cli
from elastic_mdm.training import cli as train_cli

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


def launch(
    config: str, output: Path, extra_env: dict | None = None, extra_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    command = [accelerate, "launch", "--config_file", config, "scripts/train.py", "configs/tiny.yaml",
               "--output_dir", str(output), "--report_num_samples", "0", "--disable_tqdm", "true", *QUICK,
               *extra_args]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_saved_and_loadable(output: Path) -> None:
    from elastic_mdm import ElasticMDMForDiffusionLM

    model = ElasticMDMForDiffusionLM.from_pretrained(output)
    out = model.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
    sequences, lengths = out.sequences, out.lengths
    assert sequences.shape[0] == 2 and bool((lengths >= 2).all())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerate_ddp_two_cpu_processes(tmp_path: Path) -> None:
    result = launch("configs/accelerate/ddp_cpu.yaml", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_saved_and_loadable(tmp_path / "ddp")


def test_deepspeed_zero2_two_cpu_processes(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    result = launch("configs/accelerate/deepspeed_zero2_cpu.yaml", tmp_path / "zero2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_saved_and_loadable(tmp_path / "zero2")


def test_deepspeed_zero3_two_cpu_processes(tmp_path: Path, isolated_python) -> None:
    """The documented ZeRO-3 path (partitioned init, 16-bit gathered save) trains, saves a plain folder, and that
    folder reloads through AutoModel(..., trust_remote_code=True) and generates."""
    pytest.importorskip("deepspeed")
    result = launch("configs/accelerate/deepspeed_zero3_cpu.yaml", tmp_path / "zero3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_saved_and_loadable(tmp_path / "zero3")
    reloaded = isolated_python(RELOAD_AND_GENERATE, str(tmp_path / "zero3"))
    assert reloaded.returncode == 0 and "LENGTHS=" in reloaded.stdout, reloaded.stderr[-3000:]


def test_deepspeed_zero3_lora_merges_and_reloads(tmp_path: Path, isolated_python) -> None:
    """The LLaDA retrofit recipe in small: ZeRO-3, LoRA with modules_to_save, gradient checkpointing, merged save."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
    from elastic_mdm.training.synthetic import build_tokenizer
    from elastic_mdm.training.tokenizer import ensure_special_tokens, sync_config_with_tokenizer

    tokenizer = build_tokenizer()
    ensure_special_tokens(tokenizer)
    config = ElasticMDMConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=80, block_type="llama",
        adaln=True, cond_dim=16,
    )  # fmt: skip
    base = ElasticMDMForDiffusionLM(sync_config_with_tokenizer(config, tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    output = tmp_path / "lora"
    flags = ("--model_name_or_path", str(tmp_path / "base"), "--lora_r", "4", "--learning_rate", "0.01",
             "--gradient_checkpointing", "true")  # fmt: skip
    result = launch("configs/accelerate/deepspeed_zero3_cpu.yaml", output, extra_args=flags)
    assert result.returncode == 0, result.stderr[-4000:]
    merged = ElasticMDMForDiffusionLM.from_pretrained(output).state_dict()
    assert set(merged) == set(before)  # plain names, no peft wrapper prefix
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert any(k.startswith("gap_head.") for k in changed) and any(".attn.q_proj." in k for k in changed)
    assert "model.embed_tokens.weight" not in changed
    reloaded = isolated_python(RELOAD_AND_GENERATE, str(output))
    assert reloaded.returncode == 0 and "LENGTHS=" in reloaded.stdout, reloaded.stderr[-3000:]


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
