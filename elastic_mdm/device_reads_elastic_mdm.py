"""The host-device boundary of the samplers and the collators: the one kind of read, and what needs none.

A sampling step (and the training forward process) reads the device back only through `host_read`: a few integer
scalars at once, one stream sync (docs/design.md §8). Every other index is taken at a size the host already knows
(`rows_where`, `torch.nonzero_static`), and per-sequence totals stay on the device (`per_sequence_sum`).
"""

from __future__ import annotations

import torch


def host_read(*values: torch.Tensor) -> list[int]:
    """The device-to-host read of a sampling step: a few integer scalars (or short vectors, flattened in order)
    copied back at once (each separate `int(tensor)` would stall the stream once; the step loops read once per
    step). One copy on the device at most: a single vector is read as it is, vectors are concatenated in one go
    (flags and counts alike: the concatenation promotes them to integers)."""
    if all(value.dim() == 0 for value in values):
        return torch.stack([value.long() for value in values]).tolist()
    if len(values) == 1:
        return values[0].reshape(-1).long().tolist()
    return torch.cat([value.reshape(-1) for value in values]).long().tolist()


def rows_where(flags: torch.Tensor, count: int) -> torch.Tensor:
    """`[count]` indices of the `True` entries of `flags` `[T]`, `count` known on the host (no read-back)."""
    return torch.nonzero_static(flags, size=count).squeeze(-1)


def per_sequence_sum(values: torch.Tensor, owners: torch.Tensor, batch: int) -> torch.Tensor:
    """`[B]` sums of `values` `[rows]` grouped by `owners` `[rows]`."""
    return torch.zeros(batch, dtype=values.dtype, device=values.device).index_add_(0, owners, values)


__all__ = ["host_read", "per_sequence_sum", "rows_where"]
