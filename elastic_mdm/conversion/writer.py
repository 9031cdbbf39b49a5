"""Writing the converted folder: the new tensors initialised, output shards written as soon as they are complete, and
what `save_pretrained` writes besides the weights (config, generation config, remote code)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..modeling_elastic_mdm import ElasticMDMForDiffusionLM
from .checkpoint_io import SAFE_INDEX, SAFE_WEIGHTS, SourceCheckpoint
from .plan import ConversionPlan

DEFAULT_MAX_SHARD_SIZE = "2GB"


def initialise_new_tensors(model: ElasticMDMForDiffusionLM, keys: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Materialise the modules owning `keys` on the CPU and run the model's `_init_weights` over the module tree,
    children first (gap head: normal; adaLN: zeros, so a converted block is unchanged); every other tensor stays on
    the meta device, where initialisation is a no-op.

    `_init_weights` is applied directly (`model.apply`): Transformers' `initialize_weights` skips, for custom-code
    models, every module without parameters of its own, i.e. the `_init_weights` branches that zero a block's `adaln`
    and the model's `final_adaln`.
    """
    for owner in dict.fromkeys(key.rpartition(".")[0] for key in keys):
        module = model.get_submodule(owner)
        if any(f"{owner}.{name}" not in keys for name, _ in module.named_parameters(recurse=False)):
            raise ValueError(f"{owner} mixes converted and new parameters.")
        module.to_empty(device="cpu", recurse=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.apply(model._init_weights)
    state = model.state_dict()
    return {key: state[key].detach() for key in keys}


def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or a string such as `"2GB"`, `"500MB"`, `"1GiB"`."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size such as 2GB, 500MB or 1073741824.")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def shard_names(count: int) -> list[str]:
    """Transformers' names: `model.safetensors`, or `model-00001-of-0000N.safetensors`."""
    if count == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def split_into_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive keys grouped into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards, current, filled = [], [], 0
    for key, size in sizes.items():
        if current and filled + size > max_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(key)
        filled += size
    return [*shards, current] if current else shards


def write_shards(dst: Path, shards: list[list[str]], tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Write each shard as soon as its last tensor arrives (the stream follows the shard order); return the
    weight map."""
    names = shard_names(len(shards))
    shard_of = {key: index for index, keys in enumerate(shards) for key in keys}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors:
        index = shard_of[key]
        pending.setdefault(index, {})[key] = tensor
        if len(pending[index]) == len(shards[index]):
            save_file(pending.pop(index), dst / names[index], metadata={"format": "pt"})
    if pending:
        raise RuntimeError(f"Output shards {sorted(pending)} never received all their tensors.")
    return {key: names[index] for key, index in shard_of.items()}


def converted_tensors(
    source: SourceCheckpoint, plan: ConversionPlan, new: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The output stream: renamed source tensors (cast to `dtype` when given), then the new ones."""
    for key, tensor in source.stream():
        if key in plan.renames:
            yield plan.renames[key], (tensor if dtype is None else tensor.to(dtype)).contiguous()
    yield from new.items()


def write_weights(
    dst: Path,
    source: SourceCheckpoint,
    plan: ConversionPlan,
    new: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    max_shard_size: int,
) -> None:
    """Stream the converted tensors into safetensors shards, plus `model.safetensors.index.json` when sharded."""
    sizes = {}
    for key, target in plan.renames.items():
        info = source.tensors[key]
        sizes[target] = math.prod(info.shape) * (dtype or info.dtype).itemsize
    sizes.update({key: tensor.numel() * tensor.element_size() for key, tensor in new.items()})
    shards = split_into_shards(sizes, max_shard_size)
    weight_map = write_shards(dst, shards, converted_tensors(source, plan, new, dtype))
    if len(shards) > 1:
        total_parameters = sum(math.prod(source.tensors[k].shape) for k in plan.renames)
        total_parameters += sum(t.numel() for t in new.values())
        index = {"metadata": {"total_parameters": total_parameters, "total_size": sum(sizes.values())}}
        (dst / SAFE_INDEX).write_text(json.dumps({**index, "weight_map": weight_map}, indent=2) + "\n")


def write_model_files(model: ElasticMDMForDiffusionLM, dst: Path, dtype: torch.dtype) -> None:
    """What `save_pretrained` writes besides the weights: config (with dtype and architectures), generation config,
    and the remote-code files (`custom_object_save`)."""
    from transformers.dynamic_module_utils import custom_object_save

    model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    custom_object_save(model, dst, config=model.config)
    model.config.save_pretrained(dst)
    model.generation_config.save_pretrained(dst)
