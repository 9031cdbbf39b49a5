"""Wall-clock timing on CPU or CUDA, autocast, and achieved TFLOP/s and MFU against a peak.

Each timed call reads the clock after `torch.cuda.synchronize()` on CUDA. MFU = FLOPs / time / peak (`peak_tflops`,
default H100 SXM bf16 dense 989 TFLOP/s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

H100_BF16_DENSE_TFLOPS = 989.0


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`; no-op when `dtype` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the queued CUDA work of `device` (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """`(wall-clock seconds, result)` of one call of `fn`, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[0] for _ in range(repeats)]


def efficiency(flops: float, seconds: float, peak_tflops: float) -> dict[str, float]:
    """Achieved TFLOP/s and MFU (%) of `flops` done in `seconds` against `peak_tflops`."""
    achieved = flops / seconds / 1e12 if seconds > 0 else float("nan")
    return {"tflops_per_s": achieved, "mfu_percent": 100.0 * achieved / peak_tflops}
