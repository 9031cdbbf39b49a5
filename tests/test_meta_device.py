"""The samplers and the captured region of a CUDA graph on the `meta` device (docs/design.md §8): tensors without
data, so a host read fails, and a `TorchDispatchMode` that sees every op flags any op that mixes devices (a
`TorchFunctionMode` adds the tensors built from host data on the device, which the dispatcher does not see). What this
finds on a CPU is what would sync, copy or fail on a GPU: a CPU tensor built inside a step and moved to the device
(a host-to-device copy per step), a device tensor read back, an op mixing a CPU and a device tensor.

Host-side work is allowed: an op whose tensors are all on the host (the schedule tables the samplers compute before
their loop) neither syncs nor copies. Inside the captured region nothing may touch the host at all.

`host_read` (the one read per step the samplers make) is stubbed: a CPU run with the same model and start state
records what it returned, and the meta run gets the same numbers back, so both take the same shapes and branches.
"""

from __future__ import annotations

import copy
import os
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import BOS, EOS, MASK, PAD, HostSyncRecorder, patch_host_read, random_model
from test_fake_cuda_graphs import FakeGraphCalls
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import elastic_mdm.sampler_loop_elastic_mdm as sampler_loop
from elastic_mdm import cuda_graphs_elastic_mdm as cuda_graphs
from elastic_mdm.cuda_graphs_elastic_mdm import CUDAGraphDenoiser
from elastic_mdm.device_reads_elastic_mdm import host_read
from elastic_mdm.packing_elastic_mdm import PackedSequences
from elastic_mdm.sampler_elastic_mdm import ElasticStepper, sample_elastic
from elastic_mdm.sampler_loop_elastic_mdm import SamplerOptions
from elastic_mdm.sampler_mdlm_elastic_mdm import mdlm_canvas, sample_mdlm
from elastic_mdm.sampling_state_elastic_mdm import ActiveState
from elastic_mdm.schedules_elastic_mdm import get_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

META = torch.device("meta")

# torch (2.13) has no meta kernel for binomial (the gap counts' draw); its output is shaped like its count input
if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::binomial", "Meta"):
    _BINOMIAL_META = torch.library.Library("aten", "IMPL")
    _BINOMIAL_META.impl("binomial", lambda count, prob, generator=None: torch.empty_like(count), "Meta")


class DeviceCheck(TorchDispatchMode):
    """Flags every op that mixes the host and `meta` (or, `strict`, touches the host at all) and every read back,
    while `recording`."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict, self.recording = strict, True
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.recording:
            return func(*args, **kwargs)
        if HostSyncRecorder.reads_back(func, args, kwargs):
            self.violations.append(f"{func} reads the device back at {caller()}")
        out = func(*args, **kwargs)
        devices = {t.device.type for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if devices - {"meta"} and ("meta" in devices or self.strict):
            self.violations.append(f"{func} on {sorted(devices)} at {caller()}")
        return out


class HostDataCheck(TorchFunctionMode):
    """Flags tensors built from host data on the device (`torch.tensor(list, device=...)`: a host-to-device copy,
    which on CUDA waits for the stream), while `check` records. The dispatcher never sees the host data."""

    BUILDERS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self, check: DeviceCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.check.recording and func in self.BUILDERS and not isinstance(args[0], torch.Tensor):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                self.check.violations.append(f"{func.__name__}(host data, device={device}) at {caller()}")
        return func(*args, **kwargs)


def caller() -> str:
    """`file:line function` of the innermost `elastic_mdm` frame of the current stack."""
    frames = [f for f in traceback.extract_stack() if f"{os.sep}elastic_mdm{os.sep}" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


def on_meta(state: ActiveState) -> ActiveState:
    return ActiveState(*(t.to(META) for t in (state.tokens, state.sequence_ids, state.open_after, state.lengths)))


def start_state() -> ActiveState:
    """Four unconditional `BOS EOS` starts, on the host."""
    return ActiveState.from_inputs(None, None, None, 4, (BOS, EOS, MASK), torch.device("cpu"))


SAMPLERS = {
    "elastic": lambda denoiser, state, options: sample_elastic(denoiser, state, options),
    "elastic-locked": lambda denoiser, state, options: sample_elastic(denoiser, state, options, lock_length=True),
    "mdlm": lambda denoiser, state, options: sample_mdlm(denoiser, state, options, eos_token_id=EOS),
    "mdlm-template": lambda denoiser, state, options: sample_mdlm(
        denoiser, state, options, eos_token_id=EOS, gap_budget=3
    ),
}


def templates() -> ActiveState:
    """Two templates with open gaps, twice each, on the host."""
    rows = [[BOS, 9, MASK, 10, MASK, EOS], [BOS, MASK, 11, EOS]]
    return ActiveState.from_inputs(None, None, rows, 2, (BOS, EOS, MASK), torch.device("cpu"))


STARTS = {"mdlm-template": templates}  # the start state of a sampler (`start_state` when not named)


def meta_options(num_steps: int, generator: torch.Generator | None, use_cache: bool = True) -> SamplerOptions:
    return SamplerOptions(
        mask_token_id=MASK, pad_token_id=PAD, max_length=24, num_steps=num_steps, schedule=get_schedule("linear"),
        generator=generator, use_cache=use_cache,
    )  # fmt: skip


class ReadTape:
    """`host_read` recorded on the host run (`record()`), then its answers given back in order on the meta run
    (`replay()`), where it checks that it reads device tensors."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch, self.values, self.replayed = monkeypatch, [], 0

    def record(self) -> None:
        def recorded(*tensors: torch.Tensor) -> list[int]:
            self.values.append(host_read(*tensors))
            return self.values[-1]

        patch_host_read(self.monkeypatch, recorded)

    def replay(self) -> None:
        answers = iter(self.values)

        def replayed(*tensors: torch.Tensor) -> list[int]:
            assert all(t.device == META for t in tensors), [t.device for t in tensors]
            self.replayed += 1
            return next(answers)

        patch_host_read(self.monkeypatch, replayed)


@dataclass
class MetaRun:
    """A sampler run on `meta` after the same run on the host: the reads it replayed, what the check flagged, and
    the error that stopped it (`None` when it returned)."""

    reads: int
    replayed: int
    violations: list[str] = field(default_factory=list)
    error: Exception | None = None


def run_on_meta(
    monkeypatch, sampler: str, graphs: bool, seed: int = 3, loop_only: bool = False, num_steps: int = 8,
    use_cache: bool = True,
) -> MetaRun:  # fmt: skip
    """`SAMPLERS[sampler]` on a tiny random model, first on the host (recording `host_read`), then on `meta` with
    `host_read` returning the recorded values, through the model or (`graphs`) fake CUDA graphs around it.
    `loop_only`: check the step loop (`step_range`) only. The run starts from `STARTS[sampler]()` (or
    `start_state()`), with `num_steps` and `use_cache`."""
    start = STARTS.get(sampler, start_state)
    model, tape = random_model(tame=False, seed=seed), ReadTape(monkeypatch)

    def wrap(model):
        return CUDAGraphDenoiser(model, PAD, granularity=16) if graphs else model

    monkeypatch.setattr(cuda_graphs, "GRAPH_CALLS", FakeGraphCalls())
    tape.record()
    with torch.no_grad():
        SAMPLERS[sampler](wrap(model), start(), meta_options(num_steps, torch.Generator().manual_seed(seed), use_cache))
    tape.replay()
    check = DeviceCheck()
    meta_model, meta_state = copy.deepcopy(model).to(META), on_meta(start())
    if loop_only:
        check.recording = False
        plain_range = sampler_loop.step_range

        def checked_range(*args):
            check.recording = True
            yield from plain_range(*args)
            check.recording = False

        monkeypatch.setattr(sampler_loop, "step_range", checked_range)
    try:
        with torch.no_grad(), check, HostDataCheck(check):
            SAMPLERS[sampler](wrap(meta_model), meta_state, meta_options(num_steps, None, use_cache))
    except (NotImplementedError, RuntimeError) as error:  # meta tensors refuse a host read
        error_seen = error
    else:
        error_seen = None
    return MetaRun(len(tape.values), tape.replayed, check.violations, error_seen)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_step_loops_run_on_meta(monkeypatch, sampler: str, graphs: bool) -> None:
    """Every step of the run happens on `meta` (all the recorded reads replayed, so every pass ran) with no op of
    the step loop mixing the host and the device and no read outside `host_read` (the reads of the setup and the
    output are `test_whole_sampler_runs_on_meta`'s)."""
    run = run_on_meta(monkeypatch, sampler, graphs, loop_only=True)
    assert run.violations == []
    assert run.reads >= 5 and run.replayed == run.reads, (run.replayed, run.reads, run.error)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_whole_sampler_runs_on_meta(monkeypatch, sampler: str) -> None:
    """From its start state to its output, a sampler run reads the device only through `host_read` (MDLM: its
    canvas checks and sizes in the start read, its last step planned by the read before it, the cut lengths in the
    output read)."""
    run = run_on_meta(monkeypatch, sampler, graphs=False)
    assert run.error is None and run.violations == [] and run.replayed == run.reads


@pytest.mark.parametrize("num_steps", [1, 2, 3, 8])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("sampler", ["mdlm", "mdlm-template"])
def test_mdlm_reads_once_per_step_with_its_output(monkeypatch, num_steps: int, use_cache: bool, sampler: str) -> None:
    """MDLM from its start to its output on `meta`: `1 + K` reads in all, for every horizon (`K = 1`: the start
    read plans the one step; `K >= 2`: step `K - 2`'s read plans the last step, whose read the output's takes)."""
    run = run_on_meta(monkeypatch, sampler, graphs=False, num_steps=num_steps, use_cache=use_cache)
    assert run.error is None and run.violations == []
    assert run.reads == run.replayed == 1 + num_steps


CANVAS_ERRORS = {  # input, gap budget, canvas length (int or per sequence), the error
    "gap inside a prompt": ([[BOS, 9, MASK, 10, EOS]], None, 24, "MDLM has no gaps that grow"),
    "prompt too long": ([[BOS, *range(9, 18)]], None, 6, "A prompt has 10 tokens, more than .* of 6"),
    "prompt past its cap": ([[BOS, 9], [BOS, 9, 10, 11, 12]], None, torch.tensor([8, 3]), "has 5 tokens, .* of 3"),
    "template too long": ([[BOS, MASK, 9, MASK, EOS]], 4, 10, "mdlm_gap_budget=4 .* has 11 tokens, .* of 10"),
}


@pytest.mark.parametrize("case", list(CANVAS_ERRORS))
def test_mdlm_canvas_checks_ride_in_its_one_read(monkeypatch, case: str) -> None:
    """The checks of MDLM's input (its one open gap before EOS, each canvas holding its prompt or filled template)
    come back in the canvas's one read, with the row that fails them: no other read-back."""
    rows, budget, length, error = CANVAS_ERRORS[case]
    template = MASK in rows[0]
    anchors = ActiveState.from_inputs(None if template else rows, None, rows if template else None, 1, (BOS, EOS, MASK))
    with HostSyncRecorder(monkeypatch) as recorder, pytest.raises(ValueError, match=error):
        mdlm_canvas(anchors, length, MASK, PAD, budget)
    assert recorder.reads == 1 and recorder.syncs == []


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_captured_region_stays_on_the_device(monkeypatch, time_conditioning: bool) -> None:
    """The padded pass a graph captures (`pad_to_bucket`, `PackedSequences`, the backbone), its capture, the input
    copies and a replay: every tensor on `meta`, no host tensor at all, no read back."""
    monkeypatch.setattr(cuda_graphs, "GRAPH_CALLS", FakeGraphCalls())
    model = copy.deepcopy(random_model(tame=False, time_conditioning=time_conditioning)).to(META)
    lengths = torch.tensor([5, 0, 9, 2], device=META)
    packed = PackedSequences.from_cu_seqlens(
        torch.tensor([0, 5, 5, 14, 16], dtype=torch.int32, device=META), max_seqlen=9, num_tokens=16
    )
    ids = torch.empty(16, dtype=torch.long, device=META)
    level = torch.empty(lengths.shape, device=META)
    denoiser = CUDAGraphDenoiser(model, PAD, granularity=16)
    check = DeviceCheck(strict=True)
    with torch.no_grad(), check, HostDataCheck(check):
        first = denoiser.diffusion_features(ids, packed, level)  # capture
        second = denoiser.diffusion_features(ids, packed, level)  # replay
    assert check.violations == []
    assert first.device == second.device == META and first.shape == (16, model.config.hidden_size)
    assert denoiser.calls.captures == 1 and denoiser.calls.replays == 2


def run_cohorts(model, states: tuple[ActiveState, ActiveState], generator, check: DeviceCheck | None = None) -> int:
    """Two cohorts on one `ElasticStepper` (continuous batching, as the server runs them): the first joins and steps
    three times, the second joins with another horizon, then both step to their ends (no `collect`: it reads the
    finished sequences). The steps and the second join run under `check`; returns the steps run."""
    stepper = ElasticStepper(model)
    stepper.add(states[0], meta_options(8, generator))
    steps = 0
    with check or nullcontext(), HostDataCheck(check) if check else nullcontext():
        for _ in range(3):
            stepper.step()
            steps += 1
        stepper.add(states[1], meta_options(6, generator))
        while stepper.live:
            stepper.step()
            steps += 1
    return steps


def test_two_cohorts_step_on_meta(monkeypatch) -> None:
    """Continuous batching: two cohorts of different horizons sharing one stepper step on `meta` with nothing
    built on, or read from, the host."""
    model, tape = random_model(tame=False, seed=3), ReadTape(monkeypatch)
    tape.record()
    with torch.no_grad():
        steps = run_cohorts(model, (start_state(), start_state()), torch.Generator().manual_seed(3))
    tape.replay()
    check = DeviceCheck()
    with torch.no_grad():
        meta_steps = run_cohorts(
            copy.deepcopy(model).to(META), (on_meta(start_state()), on_meta(start_state())), None, check
        )
    assert meta_steps == steps >= 9 and tape.replayed == len(tape.values)
    assert check.violations == []
