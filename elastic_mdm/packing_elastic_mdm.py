"""Packed batches: one flat token stream cut into sequences by `cu_seqlens` (no padding to a canvas)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackedSequences:
    """Where each token of a flat stream sits: everything attention and RoPE need, computed once per forward.

    `cu_seqlens` `[batch + 1]` int32 starting at 0, `max_seqlen` a Python int (kernels then need no host sync),
    `sequence_ids` `[tokens]` (which sequence), `position_ids` `[tokens]` (index inside its sequence).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    sequence_ids: torch.Tensor
    position_ids: torch.Tensor

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
        num_tokens: int | None = None,
        sequence_ids: torch.Tensor | None = None,
    ) -> PackedSequences:
        """Give `max_seqlen` and `num_tokens` when known, so that nothing is read back from the device, and the
        `sequence_ids` `[tokens]` (int64) when the caller has them."""
        cu_seqlens = cu_seqlens.to(torch.int32)
        num_tokens = int(cu_seqlens[-1]) if num_tokens is None else num_tokens
        tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.int32)
        if sequence_ids is None:
            sequence_ids = torch.searchsorted(cu_seqlens[1:], tokens, right=True)  # [tokens]
        position_ids = (tokens - cu_seqlens[sequence_ids]).long()  # [tokens]
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(cu_seqlens, max_seqlen, sequence_ids, position_ids)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor) -> PackedSequences:
        return cls.from_cu_seqlens(cu_seqlens_from_lengths(lengths))

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def last_token_mask(self) -> torch.Tensor:
        """`[tokens]` True at the last token of each sequence (it has no right neighbour)."""
        is_last = torch.zeros(self.sequence_ids.numel(), dtype=torch.bool, device=self.cu_seqlens.device)
        is_last[self.cu_seqlens[1:].long() - 1] = True
        return is_last

    def padded_index(self) -> torch.Tensor:
        """Row of each token in a `[batch * max_seqlen]` padded layout."""
        return self.sequence_ids * self.max_seqlen + self.position_ids


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """`[0, l_0, l_0 + l_1, ...]` as int32."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def pack_padded(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat rows of the real tokens of a `[batch, length]` mask, their `cu_seqlens` and the longest sequence."""
    lengths = attention_mask.sum(-1)  # [batch]
    return attention_mask.flatten().nonzero().squeeze(-1), cu_seqlens_from_lengths(lengths), int(lengths.max())


def unpack_to_padded(values: torch.Tensor | None, flat_index: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Scatter `[tokens, ...]` back to `[batch, length, ...]` (zeros at padding)."""
    if values is None:
        return None
    out = values.new_zeros(shape[0] * shape[1], *values.shape[1:])
    return out.index_copy(0, flat_index, values).view(*shape, *values.shape[1:])


@dataclass(frozen=True)
class TargetRows:
    """How many tokens of a training batch carry a token label and a gap label (host integers). Not a tuple, so
    that device-moving helpers (Trainer's `_prepare_input`, accelerate's `send_to_device`) pass it through as is."""

    tokens: int
    gaps: int


def supervised_rows(flags: torch.Tensor, count: int | None) -> torch.Tensor:
    """Indices `[rows]` of the `True` entries of `flags` `[tokens]`: with their `count` known on the host by
    `nonzero_static` (no read-back), else by `nonzero` (one read)."""
    if count is None:
        return flags.nonzero().squeeze(-1)
    return torch.nonzero_static(flags, size=count).squeeze(-1)


__all__ = [
    "PackedSequences",
    "TargetRows",
    "cu_seqlens_from_lengths",
    "pack_padded",
    "supervised_rows",
    "unpack_to_padded",
]
