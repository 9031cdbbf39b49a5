"""The samplers as steppers (`stepper_elastic_mdm.py`): cohorts join a running batch between steps, each with its own
settings, and leave when done; one packed pass and one device read per step whatever the mix."""

from __future__ import annotations

import pytest
import torch
from helpers import BOS, MASK, MAX_POS, PAD, HostSyncRecorder, random_model, sequences_of
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper

from elastic_mdm.sampler_elastic_mdm import ElasticStepper, sample_elastic
from elastic_mdm.sampler_loop_elastic_mdm import SamplerOptions
from elastic_mdm.sampler_mdlm_elastic_mdm import MDLMStepper, sample_mdlm
from elastic_mdm.sampling_state_elastic_mdm import ActiveState
from elastic_mdm.schedules_elastic_mdm import get_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def mdlm_model():
    return random_model(objective="mdlm")


def options(seed: int, num_steps: int, schedule: str = "linear", temperature: float | None = None, **kw):
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature else [])
    return SamplerOptions(
        mask_token_id=MASK, pad_token_id=PAD, max_length=kw.pop("max_length", MAX_POS), num_steps=num_steps,
        schedule=get_schedule(schedule), token_processors=processors,
        generator=torch.Generator().manual_seed(seed), **kw,
    )  # fmt: skip


def prompts(model, rows, n=1):
    return model._initial_state(rows, None, None, n)


def run_together(stepper_class, model, requests, join_at):
    """Run `requests` ((state, options, add kwargs)) on one stepper, request i joining before step `join_at[i]`;
    every cohort's output, in order."""
    stepper, cohorts, step = stepper_class(model), [None] * len(requests), 0
    while step == 0 or len(stepper):
        for i, (state, opts, kwargs) in enumerate(requests):
            if join_at[i] == step:
                cohorts[i] = stepper.add(state, opts, **kwargs)
        stepper.step()
        stepper.collect()
        step += 1
    assert all(c.output is not None for c in cohorts)
    return [c.output for c in cohorts]


def test_a_cohort_samples_the_same_alone_or_joining_a_running_batch(model) -> None:
    """Each cohort draws from its own generator at its own step `k`: its sample does not depend on the cohorts it
    shares passes with (different horizons, schedules, temperatures, length lock, caps, joining mid-run)."""
    requests = [
        (prompts(model, [[BOS, 5, 6]], 3), lambda: options(0, 8), {}),
        (prompts(model, [[BOS, 7]], 2), lambda: options(1, 5, "cosine", temperature=0.7), {"lock_length": True}),
        (model._initial_state(None, None, None, 2), lambda: options(2, 12, max_length=10), {"gap_temperature": 0.5}),
        (prompts(model, [[BOS, 5], [BOS, 6, 7, 8]]), lambda: options(3, 6), {"caps": torch.tensor([6, 9])}),
    ]
    alone = [sample_elastic(model, state, make(), **kwargs) for state, make, kwargs in requests]
    together = run_together(ElasticStepper, model, [(s, make(), kw) for s, make, kw in requests], [0, 0, 3, 7])
    for a, b in zip(alone, together, strict=True):
        assert sequences_of(a) == sequences_of(b)
        assert torch.equal(a.hit_max_length, b.hit_max_length) and torch.equal(a.sequence_passes, b.sequence_passes)
    assert together[3].lengths.tolist()[0] <= 6 and together[3].lengths.tolist()[1] <= 9


def test_mdlm_cohorts_sample_the_same_alone_or_together(mdlm_model) -> None:
    requests = [
        (prompts(mdlm_model, [[BOS, 5, 6]], 2), lambda: options(0, 8, max_length=16), {"eos_token_id": 2}),
        (prompts(mdlm_model, [[BOS, 7]], 3), lambda: options(1, 4, "cosine", max_length=12), {"eos_token_id": 2}),
        (
            mdlm_model._initial_state(None, None, [[BOS, MASK, 5, MASK, 2]], 2),
            lambda: options(2, 6, max_length=20),
            {"eos_token_id": 2, "gap_budget": 3},
        ),
    ]
    alone = [sample_mdlm(mdlm_model, state, make(), **kwargs) for state, make, kwargs in requests]
    together = run_together(MDLMStepper, mdlm_model, [(s, make(), kw) for s, make, kw in requests], [0, 2, 3])
    for a, b in zip(alone, together, strict=True):
        assert sequences_of(a) == sequences_of(b) and torch.equal(a.hit_max_length, b.hit_max_length)


@pytest.mark.parametrize("objective", ["elastic", "mdlm"])
def test_prompts_of_different_caps_run_as_one_batch(monkeypatch, objective) -> None:
    """`max_new_tokens` with prompts of different lengths: one cohort with a cap per sequence, one pass per step
    (it ran once per cap before) and still one device read per step."""
    model = random_model(tame=False, seed=1, objective=objective)
    rows = [[BOS, 5], [BOS, 5, 6, 7, 8, 9]]
    with HostSyncRecorder(monkeypatch, loop_only=True) as recorder:
        out = model.generate(rows, num_steps=8, seed=0, max_new_tokens=3, return_dict_in_generate=True)
    assert recorder.syncs == []
    assert out.num_passes <= 8 + (objective == "elastic")  # one run: at most one pass per step
    assert out.lengths.tolist()[0] <= 3 + 3 and out.lengths.tolist()[1] <= 7 + 3
    if objective == "elastic":
        assert 8 < recorder.reads <= 1 + 2 * 8  # one per step, and one more on a capped step
        assert bool(out.hit_max_length.any())
    else:
        assert recorder.reads == 1 + 8  # the canvas, then one per step


def test_a_cancelled_cohort_leaves_at_the_next_step(model) -> None:
    stepper = ElasticStepper(model)
    kept = stepper.add(prompts(model, [[BOS, 5]], 2), options(0, 6))
    gone = stepper.add(prompts(model, [[BOS, 6, 7]], 3), options(1, 6))
    stepper.step()
    stepper.cancel(gone)  # its masks are still in the stream: no step before it has left
    with pytest.raises(RuntimeError, match="collect"):
        stepper.step()
    assert stepper.collect() == [gone] and stepper.batch == 2 and len(stepper) == 1
    while len(stepper):
        stepper.step()
    stepper.collect()
    alone = sample_elastic(model, prompts(model, [[BOS, 5]], 2), options(0, 6))
    assert sequences_of(kept.output) == sequences_of(alone) and stepper.state is None


def test_an_empty_stepper_steps_nothing(model) -> None:
    stepper = ElasticStepper(model)
    stepper.step()
    assert stepper.collect() == [] and stepper.num_passes == 0


@pytest.mark.parametrize("stepper_class", [ElasticStepper, MDLMStepper])
def test_cohorts_sharing_a_batch_read_the_device_once_per_step(monkeypatch, stepper_class) -> None:
    """Two cohorts at different steps: still one `host_read` per step (their counts ride in the same read) and no
    other read-back inside a step; joining and collecting read outside the steps."""
    model = random_model(objective="mdlm" if stepper_class is MDLMStepper else "elastic")
    kwargs = {"eos_token_id": 2} if stepper_class is MDLMStepper else {}
    stepper = stepper_class(model)
    stepper.add(prompts(model, [[BOS, 5]], 2), options(0, 8, max_length=24), **kwargs)
    stepper.step()
    stepper.add(prompts(model, [[BOS, 6, 7]], 3), options(1, 8, max_length=24), **kwargs)
    with HostSyncRecorder(monkeypatch) as recorder:
        for _ in range(6):
            stepper.step()
    assert recorder.syncs == [] and recorder.reads == 6
    state: ActiveState = stepper.state
    assert state.lengths.numel() == 5
