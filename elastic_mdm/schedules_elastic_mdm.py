"""Reveal schedules `F(k)` and the training-time schedule randomisation (docs/design.md §1-2, paper §4.4, App. D).

`F : {0..K} -> [0, 1]` is the share of interior positions active (clean or mask) at reverse step `k`;
`F(0) = 0`, `F(K) = 1`, nondecreasing. In the paper's notation `F(k) = α_{K-k}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SCHEDULES = ("linear", "cosine", "exponential", "p-linear", "clipped")
MASK_SHARES = ("schedule", "uniform")
MAX_NUM_STEPS = 65536
"""Largest horizon `K` of any schedule table (`[F(0..K)]`: at most 512 KiB). The samplers run K + 1 steps whatever
happens in them (a step that inserts nothing still draws every open gap's count); a sequence of at most `max_length`
tokens changes in at most `max_length - 2` of them, so K far above `max_length` only refines the schedule's time grid,
at a cost linear in K (100000 steps: about 40 s for one 64-token sequence on a CPU). 65536 is 64 x the longest paper
context. The NELBO paths take one uniform step per sequence, but a K of 10^9 would allocate an 8 GB table first."""


def check_num_steps(num_steps: object, name: str = "num_steps") -> int:
    """`num_steps` as a horizon `K`: an integer (not a bool) with `1 <= K <= MAX_NUM_STEPS`, else a ValueError naming
    `name`. Every path that builds a schedule table (sampling, the NELBO, the calibration, the training horizons)
    checks it here first, before anything of size `K` is allocated."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{name} must be an integer >= 1 (the number of reverse steps K), got {num_steps!r}.")
    if num_steps > MAX_NUM_STEPS:
        raise ValueError(
            f"{name}={num_steps} is above the limit of {MAX_NUM_STEPS} (MAX_NUM_STEPS): every step costs time "
            "whether or not it changes anything, and a sequence of L tokens changes in at most L - 2 steps, so more "
            f"steps only refine the schedule's time grid. Use {name} <= the sequence length (at most {MAX_NUM_STEPS})."
        )
    return num_steps


@dataclass(frozen=True)
class RevealSchedule:
    """A reveal schedule `F(k)`.

    * linear:       `F(k) = k/K`
    * cosine:       `F(k) = sin(πk / 2K)`                      (α_t = cos(πt̄/2))
    * exponential:  `F(k) = exp(-σ(K-k)/K)` for k ≥ 1, `F(0) = 0` (α_t = e^{-σt̄}, σ = log(1/ε))
    * p-linear:     `F(k) = (k/K)^p`                           (α_t = (1-t̄)^p)
    * clipped:      `F(k) = clip((k/K - (1-ω)) / (ω-β), 0, 1)` (mask rate 1-α linear on [β, ω], flat outside)
    """

    name: str = "linear"
    sigma: float = math.log(1e3)
    p: float = 2.0
    beta: float = 0.0
    omega: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule={self.name!r} is unknown; use one of {SCHEDULES}.")
        if self.name == "exponential" and self.sigma <= 0:
            raise ValueError(f"exponential schedule needs sigma > 0, got sigma={self.sigma}.")
        if self.name == "p-linear" and self.p <= 0:
            raise ValueError(f"p-linear schedule needs p > 0, got p={self.p}.")
        if self.name == "clipped" and not 0.0 <= self.beta < self.omega <= 1.0:
            raise ValueError(
                f"clipped schedule needs 0 <= beta < omega <= 1, got beta={self.beta}, omega={self.omega}."
            )

    def __call__(self, k: torch.Tensor | int, num_steps: torch.Tensor | int) -> torch.Tensor:
        """`F(k)` in float64 for integer steps `k` (any shape) and horizon `K = num_steps`; `F(-1) := 0`."""
        k = torch.as_tensor(k, dtype=torch.float64)
        if not isinstance(num_steps, int | float):
            num_steps = torch.as_tensor(num_steps, dtype=torch.float64, device=k.device)
        t = (k / num_steps).clamp(0.0, 1.0)  # k/K (a host K divides as a number: nothing is copied to the device)
        if self.name == "linear":
            f = t
        elif self.name == "cosine":
            f = torch.sin(0.5 * math.pi * t)
        elif self.name == "exponential":
            f = torch.exp(-self.sigma * (1.0 - t))
        elif self.name == "p-linear":
            f = t**self.p
        else:  # clipped
            f = ((t - (1.0 - self.omega)) / (self.omega - self.beta)).clamp(0.0, 1.0)
        f = f.masked_fill(k <= 0, 0.0)  # F(0) = 0 exactly (and F(-1) = 0)
        return f.masked_fill(t >= 1.0, 1.0)  # F(K) = 1 exactly

    def table(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`[F(0), ..., F(K)]` as a float64 tensor of shape `[K + 1]`, `1 <= K <= MAX_NUM_STEPS`."""
        check_num_steps(num_steps)
        return self(torch.arange(num_steps + 1, device=device, dtype=torch.float64), num_steps)


def get_schedule(schedule: str | RevealSchedule = "linear", **params: float) -> RevealSchedule:
    """Build a schedule from its name (`linear`, `cosine`, `exponential`, `p-linear`, `clipped`) and parameters."""
    if isinstance(schedule, RevealSchedule):
        return schedule
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a name or a RevealSchedule, got {type(schedule).__name__}.")
    return RevealSchedule(schedule, **params)


def reveal_probability(f_now: torch.Tensor, f_next: torch.Tensor) -> torch.Tensor:
    """Share of the still-removed positions revealed next step: `q = (F(k+1) - F(k)) / (1 - F(k))`; 0 once F(k) = 1
    (nothing is left to reveal, so no insertion and no pass)."""
    remaining = 1.0 - f_now
    return ((f_next - f_now) / remaining.clamp_min(1e-300)).masked_fill(remaining <= 0, 0.0)


@dataclass
class NoiseLevelSampler:
    """Draws the pair `(s, s') = (F(k-1), F(k))` of every training example (paper §4.4 randomisation).

    Each example is, with probability `length_share`, a step-0 (length-model) example `s = s' = 0`; otherwise,
    with probability `clipped_share`, `s' = 1 - m` with the mask rate `m ~ U[beta, omega]` and `s` the previous
    step of a linear schedule of horizon `K`; otherwise a family from `families`, a horizon
    `K ~ U{min_steps..max_steps}`
    and a step `k ~ U{1..K}` give `(F(k-1), F(k))`.

    `mask_share` sets how many of the active interior positions are masks (carry token targets):
    `"schedule"`: `s = F(k-1)`, the previous step of the schedule (about `n / K` masks per example);
    `"uniform"`: `s = s' · (1 - r)`, `r ~ U(0, 1]`, so the mask share `(s' - s) / s' = r` is uniform (about
    `n s' / 2` masks). The gap targets depend on `s'` alone, so only the token supervision changes.
    """

    families: tuple[RevealSchedule, ...] = field(
        default_factory=lambda: tuple(RevealSchedule(n) for n in ("linear", "cosine", "exponential", "p-linear"))
    )
    min_steps: int = 16
    max_steps: int = 1024
    length_share: float = 0.05
    clipped_share: float = 0.0
    beta: float = 0.0
    omega: float = 1.0
    mask_share: str = "schedule"

    def __post_init__(self) -> None:
        if self.mask_share not in MASK_SHARES:
            raise ValueError(f"mask_share={self.mask_share!r} is unknown; use one of {MASK_SHARES}.")
        self.families = tuple(get_schedule(f) for f in self.families)
        if not self.families:
            raise ValueError("NoiseLevelSampler needs at least one schedule family.")
        check_num_steps(self.min_steps, "min_steps")
        check_num_steps(self.max_steps, "max_steps")
        if self.min_steps > self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}.")
        if not 0.0 <= self.beta < self.omega <= 1.0:
            raise ValueError(f"need 0 <= beta < omega <= 1, got beta={self.beta}, omega={self.omega}.")
        for name in ("length_share", "clipped_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(s, s')`, two float64 tensors of shape `[batch_size]` with `0 <= s <= s' <= 1`, drawn on the
        generator's device (else on `device`, from its global RNG): training draws them where the batch lives, with no
        host-to-device copy."""
        device = generator.device if generator is not None else device
        rand = lambda: torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)  # noqa: E731
        horizon = torch.randint(
            self.min_steps, self.max_steps + 1, (batch_size,), generator=generator, device=device
        )  # K
        step = (rand() * horizon).floor().long() + 1  # k ~ U{1..K}
        family = torch.randint(len(self.families), (batch_size,), generator=generator, device=device)
        s = s_next = torch.zeros(batch_size, dtype=torch.float64, device=device)
        for i, schedule in enumerate(self.families):  # loop over families, not examples
            pick = family == i
            s = torch.where(pick, schedule(step - 1, horizon), s)
            s_next = torch.where(pick, schedule(step, horizon), s_next)

        clipped = rand() < self.clipped_share
        clipped_next = 1.0 - (self.beta + (self.omega - self.beta) * rand())  # s' = 1 - m, m ~ U[β, ω]
        s = torch.where(clipped, (clipped_next - 1.0 / horizon).clamp_min(0.0), s)
        s_next = torch.where(clipped, clipped_next, s_next)

        if self.mask_share == "uniform":
            s = s_next * rand()  # 1 - r with r ~ U(0, 1]: the mask share r of the active positions is uniform
        length = rand() < self.length_share
        return s.masked_fill(length, 0.0), s_next.masked_fill(length, 0.0)


__all__ = [
    "SCHEDULES",
    "MASK_SHARES",
    "MAX_NUM_STEPS",
    "check_num_steps",
    "RevealSchedule",
    "get_schedule",
    "reveal_probability",
    "NoiseLevelSampler",
]
