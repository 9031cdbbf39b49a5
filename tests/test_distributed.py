"""Training on two real CPU processes (gloo): DDP, DeepSpeed ZeRO-2 / ZeRO-3, streamed data, the end-of-run report.

Every test launches `scripts/train.py`'s command through this file run as a script (`probe`, below): each rank
records the world size it trained in and the packed batches it was given, so a test can assert that two processes
really ran and what each one saw. Launchers: `torch.distributed.run` (torchrun) and `accelerate launch` with the
repository's CPU configs (run from the repository root: the DeepSpeed JSON paths are relative). One torch thread per
rank, a free port per launch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from helpers import QUICK  # noqa: E402  (run as a rank by a launcher, tests/ is the script's folder)

NEXT = ":::"  # separates the runs of one launch


def probe(record_dir: str, argv: list[str]) -> None:
    """One rank: run the training command once per `NEXT`-separated argument list of `argv`, recording for run `i`
    the world size it trained in (read inside the run), every clean packed batch `compute_loss` got and the report's
    numbers, into `record_dir/{i}-rank{RANK}.json`. The runs share the process group (one start-up for several
    trainings): the last one ends it as the command does."""
    from accelerate import Accelerator

    from elastic_mdm.commands import train as cli
    from elastic_mdm.objectives.collators import PackingCollator
    from elastic_mdm.training.trainer import ElasticMDMTrainer

    runs = [[]]
    for arg in argv:
        runs.append([]) if arg == NEXT else runs[-1].append(arg)
    compute_loss, end_training = ElasticMDMTrainer.compute_loss, Accelerator.end_training
    rank = int(os.environ.get("RANK", "0"))
    for index, run in enumerate(runs):
        seen: dict = {"world_size": None, "batches": []}

        def recording(self, model, inputs, *args, seen=seen, **kwargs):
            if model.training and PackingCollator.is_clean(inputs):
                seen["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                seen["batches"].append(
                    {"ids": inputs["clean_ids"].tolist(), "cu_seqlens": inputs["clean_cu_seqlens"].tolist()}
                )
            return compute_loss(self, model, inputs, *args, **kwargs)

        ElasticMDMTrainer.compute_loss = recording
        Accelerator.end_training = end_training if index == len(runs) - 1 else lambda self: None
        report = cli.main(run).get("report", {})
        seen["report"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
        Path(record_dir, f"{index}-rank{rank}.json").write_text(json.dumps(seen))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, *runs: tuple[str, ...], config: str | None = None, timeout: int = 300):
    """Train `configs/tiny.yaml` (or the YAML file a run's flags start with) with the quick flags on 2 processes,
    once per tuple of `runs` (its flags; run `i` writes to `tmp_path / f"run{i}"`), with
    `accelerate launch --config_file config` or, without `config`, torchrun. Returns the finished launch."""
    records = tmp_path / "ranks"
    records.mkdir()
    if config is None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        launcher = [accelerate, "launch", "--config_file", config, "--main_process_port"]
    command = [*launcher, str(free_port()), __file__, str(records)]
    for index, flags in enumerate(runs):
        base, flags = (flags[0], flags[1:]) if flags and flags[0].endswith(".yaml") else ("configs/tiny.yaml", flags)
        command += [NEXT] * bool(index) + [base, "--output_dir", str(tmp_path / f"run{index}"),
                    "--report_num_samples", "0", "--disable_tqdm", "true", *QUICK, *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung run: end the launcher and every rank it started
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def two_processes(tmp_path: Path, *runs: tuple[str, ...], config: str | None = None) -> list[list[dict]]:
    """`launch(...)`, which must succeed; each run's records in rank order, after checking that both ranks trained
    in a world of 2."""
    result = launch(tmp_path, *runs, config=config)
    errors = [line for line in result.stderr.splitlines() if "Error" in line]  # each rank's, above the summary
    assert result.returncode == 0, "\n".join(errors[-20:]) + result.stderr[-1500:]
    records = tmp_path / "ranks"
    missing = [
        path.name for i in range(len(runs)) for r in range(2) if not (path := records / f"{i}-rank{r}.json").exists()
    ]
    assert not missing, f"no record {missing}: the launch started fewer than 2 training processes"
    ranks = [[json.loads((records / f"{i}-rank{r}.json").read_text()) for r in range(2)] for i in range(len(runs))]
    for index, run in enumerate(ranks):
        assert [r["world_size"] for r in run] == [2, 2], f"run {index} did not train on two processes"
    return ranks


def saved_and_loadable(output: Path) -> dict[str, torch.Tensor]:
    """The saved folder loads with the installed class, has finite weights and generates; its state dict."""
    from elastic_mdm import ElasticMDMForDiffusionLM

    model = ElasticMDMForDiffusionLM.from_pretrained(output)
    out = model.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 2 and bool((out.lengths >= 2).all())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model.state_dict()


def base_checkpoint(folder: Path, block_type: str = "dit", **overrides) -> dict[str, torch.Tensor]:
    """A random tiny checkpoint on the synthetic task's tokenizer (what a LoRA run fine-tunes); its state dict."""
    from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
    from elastic_mdm.data.synthetic import build_tokenizer
    from elastic_mdm.loading.tokenizers import ensure_special_tokens, sync_config_with_tokenizer

    tokenizer = build_tokenizer()
    ensure_special_tokens(tokenizer)
    config = ElasticMDMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=80,
                              block_type=block_type, cond_dim=16, **overrides)  # fmt: skip
    torch.manual_seed(0)
    base = ElasticMDMForDiffusionLM(sync_config_with_tokenizer(config, tokenizer))
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {k: v.clone() for k, v in base.state_dict().items()}


def test_ddp_two_processes_both_objectives_checkpointing_and_lora(tmp_path: Path) -> None:
    """`accelerate launch --config_file configs/accelerate/ddp_cpu.yaml` starts two DDP ranks. Four runs cover each
    pair of {elastic, mdlm} x {gradient checkpointing, none} x {LoRA, full} (an orthogonal array; the full cross
    product is 8 runs): each trains in a world of 2 on different batches per rank, saves and reloads; MDLM leaves
    the gap head it never reads as it was (frozen: DDP has no unused parameter), Elastic-MDM trains it."""
    before = base_checkpoint(tmp_path / "base")
    lora = ("--model_name_or_path", str(tmp_path / "base"), "--lora_r", "4", "--learning_rate", "0.01")
    cases = [
        ("elastic", False, False),
        ("elastic", True, True),
        ("mdlm", True, False),
        ("mdlm", False, True),
    ]
    runs = [("--objective", objective, "--gradient_checkpointing", str(checkpointing).lower(), *(lora * with_lora))
            for objective, checkpointing, with_lora in cases]  # fmt: skip
    ranks = two_processes(tmp_path, *runs, config="configs/accelerate/ddp_cpu.yaml")
    for index, ((objective, _, with_lora), (first, second)) in enumerate(zip(cases, ranks, strict=True)):
        assert len(first["batches"]) == len(second["batches"]) == 3
        assert first["batches"][0]["ids"] != second["batches"][0]["ids"]  # each rank its own share of the data
        state = saved_and_loadable(tmp_path / f"run{index}")
        if with_lora:
            gap = [k for k in state if k.startswith("gap_head.")]
            changed = {k for k in gap if not torch.equal(state[k], before[k])}
            assert changed == (set(gap) if objective == "elastic" else set()), (objective, changed)
            assert any(".attn.qkv_proj." in k and not torch.equal(state[k], before[k]) for k in state)


def sequences(batch: dict) -> list[tuple[int, ...]]:
    """The packed sequences of a clean batch, split at its `cu_seqlens`."""
    ids, cu = batch["ids"], batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == len(ids) and all(a < b for a, b in zip(cu, cu[1:], strict=False)), cu
    return [tuple(ids[a:b]) for a, b in zip(cu, cu[1:], strict=False)]


def test_streaming_two_processes_whole_disjoint_batches(tmp_path: Path) -> None:
    """`--streaming true` on 2 torchrun processes, from a stream of one shard (the synthetic task: every process
    keeps its own batches of the stream) and from two files (one shard per process): each rank packs whole examples
    of the data (every sequence it trains on is one tokenized example, BOS .. EOS), the ranks see disjoint examples,
    and the run trains and saves. (accelerate's default, dispatching, sliced the packed batches of rank 0 across both
    ranks: rank 0 got cu_seqlens of two batches for one batch's tokens, rank 1 an IndexError.)"""
    import yaml

    from elastic_mdm.data import synthetic
    from elastic_mdm.data.chunking import tokenize_documents
    from elastic_mdm.loading.tokenizers import ensure_special_tokens

    records = [record["text"] for record in synthetic.generate_records(240, 7)]
    files = []
    for name, part in (("a", records[:120]), ("b", records[120:200]), ("eval", records[200:])):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": text}) + "\n" for text in part))
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for key in ("dataset_name", "num_synthetic_records", "num_synthetic_eval_records", "synthetic_anchor_share"):
        config.pop(key)
    files_yaml = tmp_path / "files.yaml"
    files_yaml.write_text(yaml.safe_dump(config))
    ranks = two_processes(
        tmp_path,
        ("--streaming", "true", "--synthetic_anchor_share", "0"),
        (str(files_yaml), "--streaming", "true", "--train_files", str(files[0]), str(files[1]), "--eval_files",
         str(files[2])),
    )  # fmt: skip
    tokenizer = synthetic.build_tokenizer()
    ensure_special_tokens(tokenizer)
    synthetic_texts = [record["text"] for record in synthetic.generate_records(300, 0)]
    for index, texts in enumerate((synthetic_texts, records[:200])):
        examples = Counter(map(tuple, tokenize_documents(texts, tokenizer, max_length=80)["input_ids"]))
        seen = [Counter(s for batch in rank["batches"] for s in sequences(batch)) for rank in ranks[index]]
        assert all(sum(counts.values()) == 3 * 8 for counts in seen)  # 3 steps of 8 whole sequences
        assert not seen[0] - examples and not seen[1] - examples  # every sequence is an example of the data
        assert not (seen[0] + seen[1]) - examples  # no example twice: the ranks' examples are disjoint
        saved_and_loadable(tmp_path / f"run{index}")


def test_deepspeed_zero2_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    (first, second), *_ = two_processes(tmp_path, (), config="configs/accelerate/deepspeed_zero2_cpu.yaml")
    assert first["batches"][0]["ids"] != second["batches"][0]["ids"]
    saved_and_loadable(tmp_path / "run0")


def test_deepspeed_zero3_two_processes_report_and_lora(tmp_path: Path, isolated_python) -> None:
    """The documented ZeRO-3 path (partitioned init, 16-bit gathered save) on two ranks, in one launch:

    * a new model trains, saves a plain folder and writes the end-of-training report (process 0 samples with the
      saved folder; sampling with the partitioned model on process 0 alone waited for the other rank forever);
    * the LLaDA retrofit recipe in small: LoRA with modules_to_save, gradient checkpointing, merged save.
    Both folders reload and generate; the merged one through AutoModel(..., trust_remote_code=True)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    from test_scripts import RELOAD_AND_GENERATE

    before = base_checkpoint(tmp_path / "base", block_type="llama", adaln=True)
    report = ("--report_num_samples", "8", "--report_num_steps", "4")
    lora = ("--model_name_or_path", str(tmp_path / "base"), "--lora_r", "4", "--learning_rate", "0.01",
            "--gradient_checkpointing", "true")  # fmt: skip
    ranks = two_processes(tmp_path, report, lora, config="configs/accelerate/deepspeed_zero3_cpu.yaml")
    assert ranks[0][0]["report"]["num_samples"] == 8 and 0.0 <= ranks[0][0]["report"]["json_validity"] <= 1.0
    assert (tmp_path / "run0" / "report" / "sample_report.json").exists()
    saved_and_loadable(tmp_path / "run0")
    merged = saved_and_loadable(tmp_path / "run1")
    assert set(merged) == set(before)  # plain names, no peft wrapper prefix
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert any(k.startswith("gap_head.") for k in changed) and any(".attn.q_proj." in k for k in changed)
    assert "model.embed_tokens.weight" not in changed
    reloaded = isolated_python(RELOAD_AND_GENERATE, str(tmp_path / "run1"))
    assert reloaded.returncode == 0 and "LENGTHS=" in reloaded.stdout, reloaded.stderr[-3000:]


def test_processes_launched_together_that_would_train_alone_are_refused(tmp_path: Path) -> None:
    """`accelerate launch --config_file configs/accelerate/ddp_cpu.yaml` on a machine without a GPU and without
    --use_cpu true: accelerate's GPU state sees no GPU, so each process takes itself for the only one (a world of 1)
    and all would write the same folder; the command refuses on every rank, naming the flag."""
    result = launch(tmp_path, ("--use_cpu", "false"), config="configs/accelerate/ddp_cpu.yaml", timeout=120)
    assert result.returncode != 0 and result.stderr.count("pass --use_cpu true") >= 2, result.stderr[-3000:]
    assert not (tmp_path / "run0").exists()


def test_dispatching_a_stream_is_refused(tmp_path: Path) -> None:
    """An explicit `dispatch_batches=True` would slice packed batches across processes: refused, naming the fix;
    unset, a stream is read per process."""
    from elastic_mdm.training.arguments import ElasticMDMTrainingArguments
    from elastic_mdm.training.trainer import read_streams_per_process

    args = ElasticMDMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    read_streams_per_process(args)
    assert args.accelerator_config.dispatch_batches is False
    args = ElasticMDMTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", accelerator_config={"dispatch_batches": True}
    )
    with pytest.raises(ValueError, match="dispatch_batches=True slices the packed batches"):
        read_streams_per_process(args)


if __name__ == "__main__":
    probe(sys.argv[1], sys.argv[2:])
