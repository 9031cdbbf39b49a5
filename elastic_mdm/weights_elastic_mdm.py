"""Finite weights: the first parameter or buffer of a model that holds NaN or infinity.

A checkpoint with non-finite weights loads without an error and then samples garbage (often `[BOS, EOS]`: every
logit is NaN, so the argmax is the first class). `ElasticMDMForDiffusionLM.from_pretrained` warns with
`non_finite_message`; the command-line tools refuse such a checkpoint (`loading.checkpoints.check_finite_weights`).
"""

from __future__ import annotations

import torch
from torch import nn


def non_finite_tensor(module: nn.Module) -> tuple[str, int, int] | None:
    """`(name, non-finite count, numel)` of the first floating-point parameter or buffer of `module` holding NaN or
    infinity, in `named_parameters()` then `named_buffers()` order, or None when all are finite. The per-tensor
    counts are read back from the device once (tensors on the meta device are skipped)."""
    named = [
        (name, tensor)
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
        if tensor.is_floating_point() and tensor.device.type != "meta"
    ]
    if not named:
        return None
    device = named[0][1].device
    counts = torch.stack([(~torch.isfinite(t.detach())).sum().to(device) for _, t in named]).tolist()  # [tensors]
    for (name, tensor), count in zip(named, counts, strict=True):
        if count:
            return name, count, tensor.numel()
    return None


def non_finite_message(module: nn.Module, name: str) -> str | None:
    """What is wrong with the weights of `module` (loaded from `name`), or None when every tensor is finite."""
    bad = non_finite_tensor(module)
    if bad is None:
        return None
    tensor, count, total = bad
    return (
        f"{name} has non-finite weights: {tensor} holds {count} NaN/inf values of {total}. The checkpoint is corrupt "
        "(or training diverged): use an earlier checkpoint."
    )


__all__ = ["non_finite_tensor", "non_finite_message"]
