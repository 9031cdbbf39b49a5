import math

import pytest
import torch

from elastic_mdm.schedules_elastic_mdm import (
    SCHEDULES,
    NoiseLevelSampler,
    RevealSchedule,
    get_schedule,
    reveal_probability,
)

ALL = [RevealSchedule(n) for n in SCHEDULES] + [RevealSchedule("clipped", beta=0.2, omega=0.7)]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: f"{s.name}")
@pytest.mark.parametrize("K", [1, 2, 7, 64])
def test_schedule_endpoints_and_monotone(schedule: RevealSchedule, K: int) -> None:
    f = schedule.table(K)
    assert f.shape == (K + 1,)
    assert f[0] == 0.0 and f[-1] == 1.0
    assert bool((f.diff() >= 0).all())
    assert schedule(-1, K) == 0.0  # F(-1) := 0


def test_schedule_formulas() -> None:
    K, k = 10, torch.arange(1, 10)
    t = k / K
    torch.testing.assert_close(get_schedule("linear")(k, K), t.double())
    torch.testing.assert_close(get_schedule("cosine")(k, K), torch.sin(math.pi * t / 2).double())
    torch.testing.assert_close(get_schedule("exponential", sigma=3.0)(k, K), torch.exp(-3.0 * (1 - t)).double())
    torch.testing.assert_close(get_schedule("p-linear", p=3.0)(k, K), (t**3).double())
    clipped = get_schedule("clipped", beta=0.2, omega=0.6)(k, K)  # mask rate linear on [0.2, 0.6]
    torch.testing.assert_close(clipped, ((t - 0.4) / 0.4).clamp(0, 1).double())


def test_reveal_probability_reaches_one() -> None:
    for schedule in ALL:
        f = schedule.table(16)
        q = reveal_probability(f[:-1], f[1:])
        assert bool(((q >= 0) & (q <= 1)).all())
        assert q[(f[:-1] < 1).nonzero().max()] == 1.0  # the last step with something left reveals all of it
        assert bool((q[f[:-1] == 1] == 0).all())  # nothing left: nothing inserted
        # surviving the k reveals equals 1 - F(k): prod (1 - q_j) = 1 - F(k)
        torch.testing.assert_close(torch.cumprod(1 - q, 0), 1 - f[1:])


def test_bad_schedules() -> None:
    with pytest.raises(ValueError, match="unknown"):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule("linear").table(0)
    with pytest.raises(ValueError, match="sigma"):
        get_schedule("exponential", sigma=-1.0)
    with pytest.raises(ValueError, match="beta"):
        get_schedule("clipped", beta=0.8, omega=0.2)


def test_noise_level_sampler() -> None:
    sampler = NoiseLevelSampler(min_steps=4, max_steps=32, length_share=0.2, clipped_share=0.3, beta=0.1, omega=0.9)
    s, s_next = sampler(20000, generator=torch.Generator().manual_seed(0))
    assert bool(((0 <= s) & (s <= s_next) & (s_next <= 1)).all())
    zero = (s_next == 0).double().mean().item()
    # length share 0.2 (4 standard errors = 0.012), plus the step-1 draws of families flat at the start
    assert 0.2 - 0.012 <= zero <= 0.2 + 0.8 * 0.7 * 0.05 + 0.012
    # step-0 examples carry the whole length model: s = s' = 0
    assert bool((s[s_next == 0] == 0).all())


def test_noise_level_sampler_pairs_are_consecutive_steps() -> None:
    sampler = NoiseLevelSampler(families=("linear",), min_steps=8, max_steps=8, length_share=0.0)
    s, s_next = sampler(1000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s_next - s, torch.full_like(s, 1 / 8))
    assert set((s_next * 8).round().long().tolist()) == set(range(1, 9))
