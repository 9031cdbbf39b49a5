"""The benchmark library and benchmarks/benchmark.py on tiny models (CPU, seconds): the oracle trajectory is the exact
forward process, the FLOP count is the stated formula, and both modes run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.counting import FlopModel, OpCounter, PassLog
from benchmarks.lengths import length_sampler
from benchmarks.oracle import OracleDenoiser, oracle_config, random_model
from benchmarks.sampling import (
    VARIANTS,
    SamplingSetup,
    Variant,
    active_tokens_per_pass,
    benchmark_sampling,
    counted_run,
    oracle_setup,
    sampling_ratios,
)
from benchmarks.training import benchmark_training
from elastic_mdm.schedules_elastic_mdm import get_schedule

LENGTH, VOCAB = 48, 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(oracle_config(32, 2, 2, VOCAB, LENGTH), seed=0)


def oracle(model, lengths: list[int], num_steps: int = 16, schedule: str = "linear") -> SamplingSetup:
    return oracle_setup(model, torch.tensor(lengths), num_steps=num_steps, schedule=get_schedule(schedule), seed=1)


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_oracle_returns_the_clean_sequences(model, schedule: str) -> None:
    """Tokens are positions: every sequence comes back as 0, 1, ..., n + 1, for every sampler variant of Elastic."""
    lengths = [0, 3, 20, LENGTH - 2]
    setup = oracle(model, lengths, num_steps=8, schedule=schedule)
    for use_cache in (True, False):
        out = setup.run(Variant("elastic", "elastic", use_cache))
        assert out.lengths.tolist() == [n + 2 for n in lengths] and not out.hit_max_length.any()
        for row, n in zip(out.sequences, lengths, strict=True):
            assert row[: n + 2].tolist() == list(range(n + 2))


def test_oracle_active_lengths_are_binomial(model) -> None:
    """Pass k (no cache) encodes 2B + Σ_b Binomial(n_b, F(k)) tokens: the mean over passes of the same k across
    seeds is within 4 standard errors of 2B + F(k) Σ n_b."""
    n, batch, num_steps, seeds = 30, 16, 8, 6
    schedule = get_schedule("exponential")
    table = schedule.table(num_steps).tolist()
    counts = torch.zeros(seeds, num_steps + 1)
    for seed in range(seeds):
        setup = oracle_setup(model, torch.full((batch,), n), num_steps=num_steps, schedule=schedule, seed=seed)
        counts[seed] = torch.tensor(active_tokens_per_pass(setup), dtype=torch.float)
    for k, p in enumerate(table):
        expected = 2 * batch + batch * n * p
        standard_error = math.sqrt(batch * n * p * (1 - p) / seeds)
        assert abs(float(counts[:, k].mean()) - expected) <= 4 * standard_error + 1e-6, (k, expected)


def test_flop_model_is_the_stated_formula(model) -> None:
    d, layers = 32, 2
    flops = FlopModel.of(model)
    assert flops.per_token == 2 * layers * 12 * d * d  # qkv 3d², out d², MLP 2 · 4d² (adaLN left out)
    assert flops.per_token_squared == 4 * d * layers
    assert flops.per_token_head_row == 2 * d * VOCAB
    assert flops.per_gap_row == 2 * (2 * d * d + d * (LENGTH + 1))  # dense [2d -> d], out [d -> max_gap + 1]
    log = PassLog(lengths=[[3, 5], [4]], token_rows=2, gap_rows=3)
    backbone = flops.per_token * 12 + flops.per_token_squared * (9 + 25 + 16)
    assert flops.run(log) == backbone + 2 * flops.per_token_head_row + 3 * flops.per_gap_row


def test_sampling_benchmark_rows(model) -> None:
    num_steps = 8
    setup = oracle(model, [LENGTH - 2] * 3, num_steps=num_steps)
    rows = benchmark_sampling(setup, warmup=0, repeats=1)
    by_name = {row["variant"]: row for row in rows}
    assert list(by_name) == [v.name for v in VARIANTS]
    assert by_name["MDLM (no cache)"]["tokens_encoded_per_sequence"] == num_steps * LENGTH
    assert by_name["MDLM (no cache)"]["passes"] == num_steps
    elastic = by_name["Elastic-MDM"]
    assert elastic["mean_length"] == LENGTH and elastic["passes"] <= num_steps + 1
    # every sequence generates its LENGTH - 2 interior tokens in at most K + 1 passes of its own
    assert elastic["tokens_per_forward"] >= (LENGTH - 2) / (num_steps + 1)
    assert all(row["tokens_per_forward"] > 0 for row in rows)
    assert elastic["tokens_encoded_per_sequence"] < by_name["MDLM (no cache)"]["tokens_encoded_per_sequence"]
    assert all(row["median_s"] > 0 and row["gflop_per_sequence"] > 0 and row["mfu_percent"] > 0 for row in rows)
    ratios = sampling_ratios(rows)
    assert ratios["tokens Elastic / MDLM (no cache)"] < 1.0
    assert set(ratios) == {f"{kind} Elastic / {name}" for kind in ("time", "tokens") for name in list(by_name)[1:]}


def test_ops_outside_the_passes_do_not_depend_on_the_backbone() -> None:
    """`ops_per_step` counts the step's own launches (heads, draws, bookkeeping), never the backbone's: the same
    trajectories on a 1-layer and a 3-layer backbone give the same counts, and they are positive."""
    counts = []
    for layers in (1, 3):
        deeper = random_model(oracle_config(32, layers, 2, VOCAB, LENGTH), seed=0)
        setup = oracle(deeper, [0, 3, 20, LENGTH - 2], num_steps=8)
        counts.append([counted_run(setup, variant)[1].ops_outside_passes for variant in VARIANTS])
    assert counts[0] == counts[1] and min(counts[0]) > 0


def test_elastic_steps_dispatch_no_more_ops_than_cached_mdlm_steps() -> None:
    """docs/benchmarks.md's `ops_per_step` run (L = 128, K = 128, a batch of 8 data lengths L - 2, linear schedule,
    seed 0, vocabulary 768) on a smaller backbone, which the counts do not depend on (test above): an Elastic-MDM
    step, its gap head, gap draws and insertion included, dispatches at most as many tensor ops outside its pass as
    a cached MDLM step (the ops of a run over `K`; Elastic-MDM runs `K + 1` steps)."""
    length, num_steps = 128, 128
    model = random_model(oracle_config(32, 1, 2, 768, length), seed=0)
    setup = oracle_setup(
        model, torch.full((8,), length - 2), num_steps=num_steps, schedule=get_schedule("linear"), seed=0
    )
    elastic, mdlm = (counted_run(setup, variant)[1].ops_outside_passes / num_steps for variant in VARIANTS[:2])
    assert elastic <= mdlm, (elastic, mdlm)


def test_the_oracle_answer_is_not_counted(model) -> None:
    """`ops_per_step` counts what a trained model's sampler runs: the oracle's heads count the ops of the model's
    heads and none of the one-hot answer it puts in their place (MDLM's benchmark runs the plain model)."""
    oracle, hidden = OracleDenoiser(model), torch.randn(6, model.config.hidden_size + 1)
    hidden[:, -1] = torch.arange(6.0)  # the oracle's position column
    left, level = torch.tensor([0, 2, 3]), torch.full((3,), 0.5)
    counts = []
    for heads in (oracle, model):
        rows = hidden if heads is oracle else hidden[:, :-1]
        with OpCounter() as token, torch.no_grad():
            heads.token_logits(rows)
        with OpCounter() as gap, torch.no_grad():
            heads.gap_logits(rows, left, level)
        counts.append((token.ops, gap.ops))
    assert counts[0] == counts[1] and min(counts[1]) > 0


def test_training_benchmark(model) -> None:
    rows = benchmark_training(
        model, length_sampler("uniform:4:40", LENGTH), batch_size=4, length=LENGTH, warmup=1, repeats=2
    )
    elastic, mdlm = rows
    assert (elastic["objective"], mdlm["objective"]) == ("elastic", "mdlm")
    assert mdlm["tokens_encoded_per_step"] == 4 * LENGTH  # the canvas
    assert elastic["tokens_encoded_per_step"] < mdlm["tokens_encoded_per_step"]
    assert all(row["median_step_s"] > 0 and row["mfu_percent"] > 0 for row in rows)


def test_length_sampler_specs(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    assert length_sampler("fixed", 64)(3, generator).tolist() == [62, 62, 62]
    drawn = length_sampler("uniform:4:6", 64)(200, generator)
    assert set(drawn.tolist()) == {2, 3, 4}
    (tmp_path / "lengths.txt").write_text("10\n200\n")
    assert set(length_sampler(str(tmp_path / "lengths.txt"), 64)(50, generator).tolist()) == {8, 62}
    (tmp_path / "lengths.json").write_text("[12]")
    assert length_sampler(str(tmp_path / "lengths.json"), 64)(2, generator).tolist() == [10, 10]
    with pytest.raises(ValueError, match="vocab_size"):
        oracle_config(32, 1, 2, 50, 64)


TINY = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--vocab_size", "96",
        "--length", "40", "--num_steps", "8", "--batch_size", "2", "--warmup", "0", "--repeats", "1",
        "--train_warmup", "1", "--train_repeats", "1", "--device", "cpu", "--threads", "1"]  # fmt: skip


def test_benchmark_script_oracle_mode(tmp_path: Path) -> None:
    from benchmarks import benchmark as benchmark_script

    output = tmp_path / "bench.md"
    results = benchmark_script.main(
        [
            "--oracle",
            *TINY,
            "--schedule",
            "linear",
            "exponential",
            "--lengths",
            "uniform:10:40",
            "--output",
            str(output),
        ]
    )
    assert set(results["sampling"]) == {"linear", "exponential"} and len(results["training"]) == 2
    markdown = output.read_text()
    assert "| machine | CPU" in markdown and "| K | 8 |" in markdown and "time Elastic / MDLM (cached)" in markdown
    saved = json.loads(output.with_suffix(".json").read_text())
    assert saved["sampling"]["linear"]["rows"][0]["variant"] == "Elastic-MDM"


def test_benchmark_script_checkpoint_mode(tmp_path: Path) -> None:
    from benchmarks import benchmark as benchmark_script

    config = oracle_config(32, 1, 2, 96, 40)
    random_model(config).save_pretrained(tmp_path / "random")
    results = benchmark_script.main(
        ["--checkpoint", str(tmp_path / "random"), *TINY, "--skip", "training", "--bucket", "16"]
    )
    rows = results["sampling"]["linear"]["rows"]
    assert [row["variant"] for row in rows] == [v.name for v in VARIANTS] and results["training"] == []
    assert all(2 <= row["mean_length"] <= 40 for row in rows)
