import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.commands.evaluate import main as evaluate_main
from elastic_mdm.data.json_templates import GAP, fill_template, instance_template, to_text
from elastic_mdm.data.synthetic import SCHEMAS, build_tokenizer, synthetic_dataset
from elastic_mdm.evaluation.calibration import calibration_collator, calibration_table, gap_calibration, noise_bins
from elastic_mdm.evaluation.lengths import (
    ks_statistic,
    length_histogram_table,
    length_report,
    total_variation,
    wasserstein1,
)
from elastic_mdm.evaluation.nelbo import heldout_batches, nelbo_report
from elastic_mdm.evaluation.perplexity import generative_perplexity, load_causal_lm, scorer_windows
from elastic_mdm.evaluation.plots import save_length_histogram
from elastic_mdm.evaluation.reports import write_reports
from elastic_mdm.evaluation.samples import sample_entropy, unigram_entropy
from elastic_mdm.evaluation.structured import (
    builtin_structured_tasks,
    json_validity,
    load_structured_tasks,
    structured_validity,
    template_fits,
)
from elastic_mdm.loading.tokenizers import sync_config_with_tokenizer


def test_distances_hand_computed() -> None:
    a = torch.tensor([2, 2, 3, 5])  # p = {2: .5, 3: .25, 5: .25}
    b = torch.tensor([2, 3, 3, 3])  # q = {2: .25, 3: .75}
    assert total_variation(a, b) == pytest.approx(0.5 * (0.25 + 0.5 + 0.25))
    # CDFs on 0..5: a = (0, 0, .5, .75, .75, 1), b = (0, 0, .25, 1, 1, 1)
    assert wasserstein1(a, b) == pytest.approx(0.25 + 0.25 + 0.25)
    assert ks_statistic(a, b) == pytest.approx(0.25)
    assert total_variation(a, a) == 0.0 and wasserstein1(a, a) == 0.0 and ks_statistic(a, a) == 0.0


def test_wasserstein_is_the_mean_shift_for_a_translate() -> None:
    a = torch.randint(5, 50, (1000,), generator=torch.Generator().manual_seed(0))
    assert wasserstein1(a + 7, a) == pytest.approx(7.0)
    assert total_variation(a + 100, a) == pytest.approx(1.0)


def test_length_report_and_table(tmp_path) -> None:
    generated, data = torch.tensor([10, 12, 14, 30]), torch.tensor([10, 11, 12, 13, 14])
    report = length_report(generated, data)
    assert report["generated_mean"] == pytest.approx(16.5) and report["data_median"] == 12.0
    table = length_histogram_table(generated, data, num_bins=4)
    assert table.count("\n") >= 2 and "generated" in table
    pytest.importorskip("matplotlib")
    png = save_length_histogram(generated, data, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_lengths_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        total_variation(torch.tensor([], dtype=torch.long), torch.tensor([3]))


def test_json_validity() -> None:
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    texts = ['{"a":1}', '{"a":"x"}', '{"a":1', "not json"]
    assert json_validity(texts, [schema]) == pytest.approx(0.25)
    assert json_validity([], [schema]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Sample entropy, generative perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_unigram_entropy_hand_computed() -> None:
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(1.5 * math.log(2))  # p = (1/2, 1/4, 1/4)
    assert unigram_entropy([7, 7, 7]) == 0.0 and unigram_entropy([]) == 0.0
    entropy = sample_entropy([[0, 1, 1, 2, 3, 9], [0, 5, 5, 9]], exclude_ids=(0, 9, None))
    assert entropy["entropy_mean"] == pytest.approx(0.75 * math.log(2))  # (1.5 ln 2 + 0) / 2
    # pooled 1 1 2 3 5 5: p = (1/3, 1/6, 1/6, 1/3)
    assert entropy["entropy_pooled"] == pytest.approx(2 / 3 * math.log(3) + 1 / 3 * math.log(6))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(num_records=400)


def save_tiny_gpt2(tokenizer, path: Path, zero_embeddings: bool = False) -> Path:
    """A randomly initialised 1-layer GPT-2 with the synthetic tokenizer (tied head: zero embeddings = uniform)."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if zero_embeddings:
        torch.nn.init.zeros_(model.transformer.wte.weight)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generative_perplexity_of_a_uniform_scorer_is_the_vocabulary(tokenizer, tmp_path) -> None:
    scorer = load_causal_lm(str(save_tiny_gpt2(tokenizer, tmp_path / "gpt2", zero_embeddings=True)))
    texts = ['{"x":12,"y":-3}', "", '{"name":"Alice Smith","age":30,"email":"alice@example.com"}']
    result = generative_perplexity(texts, *scorer, batch_size=2)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert result["gen_ppl_tokens"] == tokens  # context 16: windows of 15 tokens, each opened by BOS
    assert result["gen_ppl"] == pytest.approx(len(tokenizer), rel=1e-4)
    assert math.isnan(generative_perplexity([""], *scorer)["gen_ppl"])


def test_generative_perplexity_matches_the_models_own_loss(tokenizer, tmp_path) -> None:
    model, scorer_tokenizer = load_causal_lm(str(save_tiny_gpt2(tokenizer, tmp_path / "gpt2")))
    text = '{"x":12,"y":-3}'
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) <= 16  # one window
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    result = generative_perplexity([text], model, scorer_tokenizer)
    assert result["gen_ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    windows = scorer_windows(["a" * 40], scorer_tokenizer, context=4)
    assert all(w[0] == tokenizer.bos_token_id and 2 <= len(w) <= 4 for w in windows)
    assert sum(len(w) - 1 for w in windows) == len(scorer_tokenizer("a" * 40, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# Gap-head calibration
# ---------------------------------------------------------------------------------------------------------------


def test_noise_bins_edges() -> None:
    levels = torch.tensor([0.0, 0.05, 0.1, 0.11, 0.5, 1.0], dtype=torch.float32)
    assert noise_bins(levels, 10).tolist() == [0, 1, 1, 2, 5, 10]


class HalfHalfGapHead:
    """A stub model whose gap head puts probability 1/2 on counts 0 and 1: E[g] = 1/2, -log p(g) = ln 2 for g <= 1."""

    def eval(self) -> None:
        pass

    def diffusion_features(self, input_ids, packed, noise_level) -> torch.Tensor:
        return torch.zeros(input_ids.numel(), 1)

    def gap_logits(self, hidden, left, noise_level=None) -> torch.Tensor:
        logits = torch.full((left.numel(), 4), float("-inf"))
        logits[:, :2] = 0.0
        return logits


def test_gap_calibration_hand_example() -> None:
    batch = {  # two sequences: 3 tokens at s' = 0, 2 tokens at s' = 0.5
        "input_ids": torch.tensor([5, 6, 7, 5, 7]),
        "cu_seqlens": torch.tensor([0, 3, 5], dtype=torch.int32),
        "max_seqlen": 3,
        "gap_labels": torch.tensor([0, 1, -100, 1, -100]),
        "noise_level": torch.tensor([0.0, 0.5]),
    }
    rows = {row["bin"]: row for row in gap_calibration(HalfHalfGapHead(), [batch], num_bins=10)}
    assert set(rows) == {"s'=0", "(0.40, 0.50]", "all"}
    length_model, mid, overall = rows["s'=0"], rows["(0.40, 0.50]"], rows["all"]
    assert length_model["pairs"] == 2 and length_model["bias"] == pytest.approx(0.0)  # errors +1/2, -1/2
    assert length_model["mae"] == pytest.approx(0.5) and length_model["true_mean"] == pytest.approx(0.5)
    assert mid["pairs"] == 1 and mid["bias"] == pytest.approx(-0.5) and mid["expected_mean"] == pytest.approx(0.5)
    assert overall["pairs"] == 3 and overall["bias"] == pytest.approx(-1 / 6) and overall["mae"] == pytest.approx(0.5)
    assert overall["gap_ce"] == pytest.approx(math.log(2))


def test_calibration_table_hand_computed() -> None:
    expected, true = torch.tensor([1.0, 3.0, 0.5, 2.0]), torch.tensor([1, 1, 0, 4])
    nll, noise = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.0, 0.15, 0.15, 1.0])
    rows = {row["bin"]: row for row in calibration_table(expected, true, nll, noise, num_bins=10)}
    assert rows["(0.10, 0.20]"]["bias"] == pytest.approx(1.25) and rows["(0.10, 0.20]"]["gap_ce"] == pytest.approx(0.25)
    assert rows["(0.90, 1.00]"]["bias"] == pytest.approx(-2.0) and rows["(0.90, 1.00]"]["mae"] == pytest.approx(2.0)
    assert rows["all"]["bias"] == pytest.approx(0.125) and rows["all"]["mae"] == pytest.approx(1.125)


def test_gap_calibration_and_nelbo_on_a_tiny_model(tokenizer) -> None:
    config = sync_config_with_tokenizer(
        ElasticMDMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=80),
        tokenizer,
    )
    torch.manual_seed(0)
    model = ElasticMDMForDiffusionLM(config).eval()
    data = synthetic_dataset(tokenizer, 24, seed=3)
    batches = heldout_batches(data, calibration_collator(config, num_steps=8, length_share=0.5), 8, "cpu")
    table = gap_calibration(model, batches)
    assert table[-1]["bin"] == "all" and table[0]["bin"] == "s'=0" and table[-1]["pairs"] > 0
    assert table[-1]["gap_ce"] == pytest.approx(math.log(81), rel=0.05)  # a fresh head is nearly uniform
    first = nelbo_report(model, data, num_steps=8, batch_size=8)
    assert first == nelbo_report(model, data, num_steps=8, batch_size=8)  # seeded noise
    second = nelbo_report(model, data, num_steps=8, batch_size=8, seed=1)
    both = nelbo_report(model, data, num_steps=8, batch_size=8, num_draws=2)  # seeds 0 and 1, averaged
    mean = (first["nelbo_bits_per_token"] + second["nelbo_bits_per_token"]) / 2
    assert both["nelbo_bits_per_token"] == pytest.approx(mean)
    spread = abs(first["nelbo_bits_per_token"] - second["nelbo_bits_per_token"]) / 2  # s.e. of two draws
    assert both["nelbo_bits_per_token_se"] == pytest.approx(spread)
    assert first["nelbo_bits_per_token"] > 0 and math.isfinite(first["ppl_bound"])


# ---------------------------------------------------------------------------------------------------------------
# Structured output
# ---------------------------------------------------------------------------------------------------------------


INSTANCE = {"a": 1, "b": ["x", True], "c": {"d": None}, "e": []}


def test_instance_template_hand_computed() -> None:
    pieces = instance_template(INSTANCE)
    assert pieces == ['{"a":', GAP, ',"b":["', GAP, '",', GAP, '],"c":{"d":', GAP, '},"e":[]}']
    values = iter(["1", "x", "true", "null"])
    assert "".join(p if p is not GAP else next(values) for p in pieces) == to_text(INSTANCE)


def test_template_fits() -> None:
    template = [0, 10, 3, 11, 3, 1]  # BOS a [gap] b [gap] EOS, mask id 3: 4 anchors, 2 gaps
    assert template_fits(template, 3, 4, None) and not template_fits(template, 3, 3, None)
    assert template_fits(template, 3, 10, gap_budget=3) and not template_fits(template, 3, 9, gap_budget=3)


class TemplateFiller:
    """A stub `generate`: writes `values` into the gaps of every template (or drops the gaps when `values` is None)."""

    def __init__(self, tokenizer, values: list[str] | None, objective: str = "elastic", max_length: int = 512):
        self.tokenizer, self.values = tokenizer, values
        self.config = SimpleNamespace(
            objective=objective, max_position_embeddings=max_length, mask_token_id=tokenizer.mask_token_id
        )

    def generate(self, template_ids, num_return_sequences, generator=None, return_dict_in_generate=False, **kwargs):
        from elastic_mdm.sampler_loop_elastic_mdm import ElasticMDMGenerateOutput

        mask = self.tokenizer.mask_token_id
        rows = [
            fill_template(self.tokenizer, t, self.values) if self.values else [i for i in t if i != mask]
            for t in template_ids
            for _ in range(num_return_sequences)
        ]
        lengths = torch.tensor([len(r) for r in rows])
        sequences = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True)
        return ElasticMDMGenerateOutput(sequences=sequences, lengths=lengths) if return_dict_in_generate else sequences


def test_structured_validity_with_hand_fills(tokenizer, tmp_path) -> None:
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array"}}, "required": ["a"]}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"schema": schema, "instance": INSTANCE}) + "\n\n")
    tasks = load_structured_tasks(path, tokenizer)
    assert len(tasks) == 1 and tasks[0].template_ids.count(tokenizer.mask_token_id) == 4
    perfect = structured_validity(TemplateFiller(tokenizer, ["1", "x", "true", "null"]), tokenizer, tasks,
                                  num_per_template=3)  # fmt: skip
    assert perfect["parse_rate"] == perfect["json_validity"] == 1.0 and perfect["num_outputs"] == 3
    wrong_type = structured_validity(TemplateFiller(tokenizer, ['"1"', "x", "true", "null"]), tokenizer, tasks)
    assert wrong_type["parse_rate"] == 1.0 and wrong_type["json_validity"] == 0.0  # "a" is a string
    empty = structured_validity(TemplateFiller(tokenizer, None), tokenizer, tasks)
    assert empty["parse_rate"] == 0.0 and empty["by_name"] == {"row0": 0.0}
    budget = structured_validity(
        TemplateFiller(tokenizer, None, objective="mdlm", max_length=20), tokenizer, tasks, mdlm_gap_budget=8
    )
    assert budget["too_long"] == 1 and budget["json_validity"] == 0.0


def test_builtin_structured_tasks_fill_to_valid_records(tokenizer) -> None:
    pytest.importorskip("jsonschema")
    tasks = builtin_structured_tasks(tokenizer)
    assert [t.name for t in tasks] == list(SCHEMAS)
    point = tasks[0]
    result = structured_validity(TemplateFiller(tokenizer, ["12", "-3"]), tokenizer, [point], num_per_template=2)
    assert result["json_validity"] == 1.0


def test_reports(tmp_path) -> None:
    report = {
        "settings": {"K": 8},
        "models": {
            "elastic: a": {"nelbo": {"ppl_bound": 12.5}, "gap_calibration": [{"bin": "all", "bias": 0.5}],
                           "length_table": "table"},
            "mdlm: b": {"nelbo": {"ppl_bound": 20.0}, "structured": {"json_validity": 0.25, "by_name": {"x": 0.25}}},
        },
    }  # fmt: skip
    json_path, md_path = write_reports(report, tmp_path)
    assert json.loads(json_path.read_text()) == report
    markdown = md_path.read_text()
    assert "| nelbo.ppl_bound | 12.5 | 20 |" in markdown and "| structured.json_validity |  | 0.25 |" in markdown
    assert "## Gap-head calibration: elastic: a" in markdown and "by_name" not in markdown


# ---------------------------------------------------------------------------------------------------------------
# The evaluate command (scripts/evaluate.py, commands.evaluate.main) end to end
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_script_end_to_end(tmp_path, trained_tiny) -> None:
    pytest.importorskip("jsonschema")
    checkpoint = trained_tiny  # the session's quick run of configs/tiny.yaml (conftest)
    model = ElasticMDMForDiffusionLM.from_pretrained(checkpoint)
    model.config.objective = "mdlm"  # an MDLM-objective checkpoint on the same backbone
    model.save_pretrained(tmp_path / "tiny-mdlm")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.save_pretrained(tmp_path / "tiny-mdlm")
    scorer = save_tiny_gpt2(tokenizer, tmp_path / "gpt2")
    output = tmp_path / "report"
    report = evaluate_main([
        "--model_name_or_path", str(checkpoint), "--mdlm_checkpoint", str(tmp_path / "tiny-mdlm"),
        "--dataset_name", "synthetic-json", "--num_synthetic_eval_records", "32", "--data_seed", "0",
        "--num_steps", "4", "--num_samples", "8", "--gen_ppl_model", str(scorer), "--num_per_template", "1",
        "--mdlm_gap_budget", "4", "--eval_batch_size", "16", "--output_dir", str(output), "--device", "cpu",
        "--sweep_steps", "1", "4",
    ])  # fmt: skip
    elastic, mdlm = report["models"]["elastic: tiny"], report["models"]["mdlm: tiny-mdlm"]
    assert set(elastic) >= {"nelbo", "gap_calibration", "calibration", "samples", "lengths", "structured"}
    sweep = elastic["length_sweep"]  # the data floor, then K = 1, 4 for linear and exponential
    assert [(row["schedule"], row["K"]) for row in sweep] == [
        ("data (fresh draw)", "-"), ("linear", 1), ("linear", 4), ("exponential", 1), ("exponential", 4)
    ]  # fmt: skip
    assert all(0.0 <= row["ks"] <= 1.0 and 0.0 <= row["capped"] <= 1.0 for row in sweep)
    assert all(row["tokens_per_forward"] >= 0 for row in sweep[1:]) and elastic["samples"]["tokens_per_forward"] > 0
    assert len(mdlm["length_sweep"]) == len(sweep)
    assert "gap_calibration" not in mdlm and set(mdlm) >= {"nelbo", "samples", "lengths", "structured"}
    assert elastic["samples"]["gen_ppl"] > 1 and elastic["samples"]["entropy_mean"] >= 0
    assert 0.0 <= elastic["lengths"]["total_variation"] <= 1.0
    assert elastic["structured"]["num_outputs"] == len(SCHEMAS) == mdlm["structured"]["num_outputs"]
    saved = json.loads((output / "evaluation.json").read_text())
    assert saved["models"]["elastic: tiny"]["nelbo"] == pytest.approx(elastic["nelbo"])
    markdown = (output / "evaluation.md").read_text()
    assert "nelbo.nelbo_bits_per_token" in markdown and "samples.gen_ppl" in markdown
    assert "samples.tokens_per_forward" in markdown
    assert (output / "tiny" / "length_histogram.png").exists() and (output / "tiny" / "samples.jsonl").exists()
    assert (output / "tiny" / "trajectory.png").exists() and (output / "tiny" / "length_sweep.png").exists()
    assert (output / "tiny-mdlm" / "trajectory.png").exists() and elastic["trajectory_png"].endswith("trajectory.png")


def test_evaluate_metric_modules() -> None:
    """`evaluate.load` on the repository's metric folders gives the library's numbers."""
    evaluate = pytest.importorskip("evaluate")
    pytest.importorskip("jsonschema")
    metrics = Path(__file__).resolve().parents[1] / "metrics"
    lengths = evaluate.load(str(metrics / "length_fidelity"))
    pooled = lengths.compute(predictions=[[2, 2, 3], [5]], references=[[2, 3, 3, 3], []])  # rows are pooled
    assert pooled["total_variation"] == pytest.approx(0.5) and pooled["wasserstein1"] == pytest.approx(0.75)
    assert lengths.compute(predictions=[2, 2, 3, 5], references=[2, 3, 3, 3])["ks"] == pytest.approx(0.25)
    validity = evaluate.load(str(metrics / "json_validity"))
    schema = json.dumps({"type": "object", "required": ["a"]})
    result = validity.compute(predictions=['{"a":1}', '{"b":1}', "{"], references=[schema] * 3)
    assert result == {"parse_rate": pytest.approx(2 / 3), "json_validity": pytest.approx(1 / 3)}
