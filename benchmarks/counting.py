"""What a sampling run does, counted: its passes and their active lengths, the rows through each head, the tensor ops
outside the passes (private torch dispatch API: `TorchDispatchMode`), and the matmul FLOPs of it all.

FLOPs (matmul only; elementwise work, softmax and the embedding gather are left out). With `P_block` the weights
of the linear layers of the transformer blocks applied per token (adaLN modulation runs per sequence and is left
out), `d` the width, `N_layers` the depth, `V` the vocabulary and `P_gap` the gap-head weights:

    forward(pass) = Σ_sequences [ 2 · P_block · n  +  4 · d · N_layers · n² ]     (n = active length)
                  + 2 · d · V · (rows through the token head) + 2 · P_gap · (pairs through the gap head)

(the `4 · d · n` per token and layer is `q kᵀ` and `softmax · v`, `2 · n · d` each); a training step costs
`3 ×` its forward (backward = 2 × forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from elastic_mdm.modeling_elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.packing_elastic_mdm import PackedSequences


@dataclass
class PassLog:
    """What a sampling run encoded: the active length of every sequence of every pass, the rows through each head."""

    lengths: list[list[int]] = field(default_factory=list)
    token_rows: int = 0
    gap_rows: int = 0
    ops_outside_passes: int = 0


class OpCounter(TorchDispatchMode):
    """Counts the tensor ops dispatched while active, views left out. On a GPU each is a kernel launch (a few µs of
    host time), so the ops of a sampling step outside its denoiser pass are the launch overhead that a CUDA graph of
    the pass leaves (heads, draws, insertion, bookkeeping)."""

    NO_KERNEL = frozenset({"lift_fresh", "detach", "alias"})

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not (func.is_view or func.overloadpacket.__name__ in self.NO_KERNEL)
        return func(*args, **(kwargs or {}))


def uncounted():
    """A context in which no `OpCounter` counts: a benchmark's own work inside a sampling run (the oracle's answers,
    which a trained model does not compute) stays out of `ops_per_step`."""
    return _disable_current_modes()


class CountingDenoiser:
    """Wraps a denoiser and logs every pass and head call (reads lengths back to the host: not for timed runs)."""

    def __init__(self):
        self.inner, self.log = None, PassLog()

    def around(self, inner) -> CountingDenoiser:
        """Wrap `inner` (returns self: usable as `SamplingSetup.run`'s `wrap`)."""
        self.inner = inner
        return self

    def diffusion_features(self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor):
        self.log.lengths.append(packed.lengths.tolist())
        with uncounted():  # the pass itself is not counted by an `OpCounter`
            return self.inner.diffusion_features(input_ids, packed, noise_level)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.log.token_rows += hidden.shape[0]
        return self.inner.token_logits(hidden)

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor:
        self.log.gap_rows += left.numel()
        return self.inner.gap_logits(hidden, left, noise_level)


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOP coefficients of a model (see the module docstring)."""

    per_token: float  # 2 · P_block
    per_token_squared: float  # 4 · d · N_layers
    per_token_head_row: float  # 2 · d · V
    per_gap_row: float  # 2 · P_gap

    @classmethod
    def of(cls, model: ElasticMDMForDiffusionLM) -> FlopModel:
        block_weights = sum(
            module.weight.numel()
            for name, module in model.model.layers.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("adaln")
        )
        config = model.config
        gap_weights = sum(m.weight.numel() for m in model.gap_head.modules() if isinstance(m, torch.nn.Linear))
        return cls(
            per_token=2.0 * block_weights,
            per_token_squared=4.0 * config.hidden_size * config.num_hidden_layers,
            per_token_head_row=2.0 * model.lm_head.weight.numel(),
            per_gap_row=2.0 * gap_weights,
        )

    def backbone(self, lengths: Sequence[int]) -> float:
        """`Σ_s 2 · P_block · n_s + 4 · d · N_layers · n_s²` of one pass."""
        return sum(self.per_token * n + self.per_token_squared * n * n for n in lengths)

    def run(self, log: PassLog) -> float:
        """Forward FLOPs of a logged sampling run."""
        backbone = sum(self.backbone(lengths) for lengths in log.lengths)
        return backbone + self.per_token_head_row * log.token_rows + self.per_gap_row * log.gap_rows
