"""lm-evaluation-harness integration (`elastic_mdm/integrations/lm_eval.py`), offline: a tiny random model, local
task YAML files over local JSONL data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("jsonschema")
from lm_eval.api.instance import Instance  # noqa: E402

from elastic_mdm.integrations.lm_eval import ElasticMDMLM, conditional_nelbo_terms  # noqa: E402
from elastic_mdm.objectives.nelbo import ElasticNELBOCollator, elastic_nelbo_terms  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def collator(synthetic_model, num_steps: int = 8) -> ElasticNELBOCollator:
    c = synthetic_model.config
    return ElasticNELBOCollator(c.mask_token_id, c.bos_token_id, c.eos_token_id, c.max_position_embeddings, seed=0,
                                num_steps=num_steps)  # fmt: skip


@torch.no_grad()
def test_conditional_terms_are_the_nelbo_without_context_and_drop_closed_gaps(
    synthetic_model, synthetic_tokenizer
) -> None:
    """BOS alone as context: the terms of `nelbo.elastic_nelbo_terms`. With a context, the gap terms between
    context tokens (closed gaps, never drawn by `generate`) are left out: each is >= 0, so the bound only drops."""
    bos, eos = synthetic_tokenizer.bos_token_id, synthetic_tokenizer.eos_token_id
    plain = [{"input_ids": [bos, 20, 21, 22, 23, eos]}, {"input_ids": [bos, 30, eos]}]
    batch = collator(synthetic_model)(plain)
    token, gap = elastic_nelbo_terms(synthetic_model, batch)
    ones = torch.ones(4, dtype=torch.long)
    assert torch.allclose(conditional_nelbo_terms(synthetic_model, batch, ones), token + gap)
    anchored = [{"input_ids": [bos, 20, 21, 22, 23, eos], "anchor_mask": [1, 1, 1, 1, 0, 1]}]
    batch = collator(synthetic_model)(anchored)
    token, gap = elastic_nelbo_terms(synthetic_model, batch)
    conditional = conditional_nelbo_terms(synthetic_model, batch, torch.tensor([4, 4]))
    assert (conditional <= token + gap + 1e-9).all()
    assert conditional[0] < (token + gap)[0]  # step 0: the closed gaps BOS-20, 20-21, 21-22 are left out


@torch.no_grad()
def test_loglikelihood_with_one_step_is_the_exact_log_probability(synthetic_model, synthetic_tokenizer) -> None:
    """K = 1: the bound is tight (step 0 draws the length, step 1 fills every mask): log p_φ(n | BOS ctx EOS) +
    Σ log p_θ(cont_i | BOS ctx [MASK]^n EOS), computed here by hand from the model's heads."""
    lm = ElasticMDMLM(
        pretrained=synthetic_model, tokenizer=synthetic_tokenizer, device="cpu", mc_samples=3, nelbo_num_steps=1
    )
    context, cont = lm.split_pair('{"name": ', '"Ann"')
    ((value, greedy),) = lm.loglikelihood([request("loglikelihood", '{"name": ', '"Ann"')])
    c = synthetic_model.config
    anchors = torch.tensor([c.bos_token_id, *context, c.eos_token_id])
    out = synthetic_model(anchors[None], attention_mask=torch.ones(1, anchors.numel()), output_hidden_states=True)
    hidden = out.hidden_states.reshape(-1, c.hidden_size)
    gap = (
        synthetic_model.gap_logits(hidden, torch.tensor([len(context)]), torch.tensor([0.0])).float().log_softmax(-1)
    )  # F(0)
    masked = torch.tensor([c.bos_token_id, *context, *[c.mask_token_id] * len(cont), c.eos_token_id])
    logits = (
        synthetic_model(masked[None], attention_mask=torch.ones(1, masked.numel())).logits[0].float().log_softmax(-1)
    )
    rows = torch.arange(len(context) + 1, len(context) + 1 + len(cont))
    exact = float(gap[0, len(cont)]) + float(logits[rows, torch.tensor(cont)].sum())
    assert value == pytest.approx(exact, abs=1e-4) and greedy is False


def test_loglikelihood_is_a_seeded_monte_carlo_mean(synthetic_model, synthetic_tokenizer) -> None:
    """Each request's value is the mean of its `mc_samples` draws, from noise seeded with its own tokens: the same
    value alone, beside other requests, in any order (what makes N processes give the results of one)."""
    requests = [request("loglikelihood", '{"a": ', "12"), request("loglikelihood", "", '{"b": 3}')]
    lm = ElasticMDMLM(
        pretrained=synthetic_model, tokenizer=synthetic_tokenizer, device="cpu", mc_samples=4, nelbo_num_steps=8,
        batch_size=2,
    )  # fmt: skip
    first = lm.loglikelihood(requests)
    assert first == lm.loglikelihood(requests)  # the same noise every call
    assert all(value < 0 and math.isfinite(value) for value, _ in first)
    assert lm.loglikelihood(requests[::-1]) == first[::-1] and lm.loglikelihood(requests[1:]) == first[1:]
    context, cont = lm.split_pair(*requests[0].args)
    ids = [lm.model.config.bos_token_id, *context, *cont, lm.model.config.eos_token_id]
    feature = {"input_ids": ids, "anchor_mask": [1] * (1 + len(context)) + [0] * len(cont) + [1]}
    lm.collator.generator = lm.request_generator(ids, len(context), device="cpu")
    draws = torch.cat([lm.batch_nelbo([feature] * 2) for _ in range(2)])  # the two passes of 2 draws each
    assert first[0][0] == pytest.approx(-float(draws.mean()))
    assert draws.unique().numel() == 4  # four different draws
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", '{"b": 3}')])
    ((alone, _),) = lm.loglikelihood([requests[1]])  # no context: the same bound, from the same noise
    assert rolling == pytest.approx(alone)


def test_generate_until_cuts_at_stop_strings(synthetic_model, synthetic_tokenizer) -> None:
    lm = ElasticMDMLM(
        pretrained=synthetic_model, tokenizer=synthetic_tokenizer, device="cpu", num_steps=4, batch_size=2
    )
    gen = {"until": [","], "max_gen_toks": 12}
    requests = [request("generate_until", '{"a": ', gen) for _ in range(3)]
    texts = lm.generate_until(requests)
    assert len(texts) == 3 and all(isinstance(t, str) and "," not in t for t in texts)
    again = ElasticMDMLM(
        pretrained=synthetic_model, tokenizer=synthetic_tokenizer, device="cpu", num_steps=4, batch_size=2
    )
    assert again.generate_until(requests) == texts  # seeded
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([request("generate_until", "{", {"max_gen_toks": 0})])


TASKS = {
    "tiny_mc.yaml": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prefix}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
    "tiny_gen.yaml": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prefix}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["}}"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    rows = [
        {"prefix": '{"age": ', "choices": ["12", '"x"'], "label": 0},
        {"prefix": '{"name": ', "choices": ['"Ann"', "null"], "label": 0},
        {"prefix": '{"ok": ', "choices": ["1", "true"], "label": 1},
    ]
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, text in TASKS.items():
        (folder / name).write_text(text.format(data=data))
    return folder


def test_harness_command_line_on_local_tasks_one_and_two_processes(
    synthetic_model, synthetic_tokenizer, task_dir: Path, tmp_path: Path
) -> None:
    """`python -m elastic_mdm.integrations.lm_eval --model elastic_mdm ...` (the harness's own command line with the
    model registered) runs a multiple-choice task (loglikelihood) and a generation task offline; under
    `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m ...` two processes share the requests (a
    world of 2, in the results' config) and give the same answers and metrics as one."""
    checkpoint = tmp_path / "tiny"
    synthetic_model.save_pretrained(checkpoint)
    synthetic_tokenizer.save_pretrained(checkpoint)
    harness = [
        "-m", "elastic_mdm.integrations.lm_eval", "--model", "elastic_mdm",
        "--model_args", f"pretrained={checkpoint},mc_samples=2,nelbo_num_steps=4,num_steps=4",
        "--tasks", "tiny_mc,tiny_gen", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
        "--log_samples",
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two = [accelerate, "launch", "--config_file", "configs/accelerate/ddp_cpu.yaml", "--main_process_port", "0"]
    runs = {}
    for name, launcher in (("one", [sys.executable]), ("two", two)):
        output = tmp_path / name
        command = [*launcher, *harness, "--output_path", str(output)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (saved,) = output.rglob("results_*.json")
        samples = {}
        for path in output.rglob("samples_*.jsonl"):
            for row in map(json.loads, path.read_text().splitlines()):
                samples[(path.name.split("_2")[0], row["doc_id"])] = row["filtered_resps"]  # (resps: + padding)
        runs[name] = json.loads(saved.read_text()), samples, result.stderr
    (one, one_samples, _), (two_results, two_samples, two_log) = runs["one"], runs["two"]
    assert one["config"]["num_processes"] == 1 and two_results["config"]["num_processes"] == 2
    assert "process 0 of 2" in two_log and "process 1 of 2" in two_log
    results = one["results"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0 and 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert len(one_samples) == 6 and two_samples == one_samples  # every document, the same answers
    for task in ("tiny_mc", "tiny_gen"):
        assert two_results["results"][task] == results[task]


def test_entry_point_is_declared_and_loads_the_model(tmp_path: Path) -> None:
    """`[project.entry-points."lm_eval.models"]` names the class; a registry that registered it from the entry
    point (lm-eval's next release) resolves it, and importing the module then keeps that registration."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    assert declared == {"elastic_mdm": "elastic_mdm.integrations.lm_eval:ElasticMDMLM"}
    code = f"""
import importlib.metadata as md
from lm_eval.api.registry import get_model, model_registry
point = md.EntryPoint("elastic_mdm", {declared["elastic_mdm"]!r}, "lm_eval.models")
model_registry.register("elastic_mdm", target=point)
cls = get_model("elastic_mdm")
print(cls.__module__, cls.__name__)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["elastic_mdm.integrations.lm_eval", "ElasticMDMLM"]
