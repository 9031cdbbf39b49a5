"""Before any writing: the source format checked, the target config built (source fields, checked overrides, special
ids), every source tensor mapped to a target tensor, every target tensor accounted for, every shape checked."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..configuration_elastic_mdm import ElasticMDMConfig
from ..modeling_elastic_mdm import ElasticMDMForDiffusionLM
from .checkpoint_io import SourceCheckpoint
from .formats import SourceFormat, translate


def check_source_format(expected: SourceFormat, source: SourceCheckpoint, formats: Sequence[SourceFormat]) -> None:
    """Raise a ValueError naming the right converter when `source` is not an `expected` checkpoint: its format is the
    one of `formats` whose `model_type` it has, else the one whose key prefix all its keys share."""
    model_type, keys = source.config.get("model_type"), list(source.tensors)
    if model_type == "elastic_mdm":
        raise ValueError(
            f"{source.folder} is already an Elastic-MDM checkpoint: load it with "
            "AutoModel.from_pretrained(path, trust_remote_code=True) instead of converting it."
        )
    found = next((fmt for fmt in formats if model_type == fmt.model_type), None)
    found = found or next((fmt for fmt in formats if keys and all(k.startswith(fmt.key_prefix) for k in keys)), None)
    if found is expected:
        return
    described = f"model_type={model_type!r}, keys such as {keys[:3]}"
    if found is None:
        raise ValueError(
            f"{source.folder} is not a checkpoint of {expected.name} ({described}); {expected.name} checkpoints have "
            f"model_type={expected.model_type!r} and keys '{expected.key_prefix}*'."
        )
    raise ValueError(
        f"{source.folder} is a checkpoint of {found.name} ({described}), not of {expected.name}: use {found.converter}."
    )


def merge_overrides(derived: dict[str, Any], overrides: dict[str, Any], fixed: Iterable[str]) -> dict[str, Any]:
    """`derived` updated with `overrides`, which must be ElasticMDMConfig fields that the weights do not fix."""
    allowed = set(inspect.signature(ElasticMDMConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"Unknown override(s) {unknown}; ElasticMDMConfig fields are {sorted(allowed)}.")
    clashes = [
        f"{name}={overrides[name]!r} (the checkpoint has {derived.get(name)!r})"
        for name in fixed
        if name in overrides and overrides[name] != derived.get(name)
    ]
    if clashes:
        raise ValueError(f"These fields are fixed by the source weights and cannot be overridden: {clashes}.")
    return {**derived, **overrides}


def check_special_ids(config: ElasticMDMConfig | SimpleNamespace) -> None:
    """The mask token needs its own row: inside the vocabulary and different from BOS, EOS and pad."""
    mask, rows = config.mask_token_id, config.vocab_size
    if mask is None or not 0 <= mask < rows:
        raise ValueError(
            f"mask_token_id={mask} has no row in the {rows}-token vocabulary: the checkpoint has no room for a mask "
            "token (masked-diffusion checkpoints keep [MASK] as an extra row). Pass mask_token_id=<a row id>."
        )
    shared = [role for role in ("bos", "eos", "pad") if getattr(config, f"{role}_token_id") == mask]
    if shared:
        raise ValueError(
            f"mask_token_id={mask} is also the {'/'.join(shared)} token: the {rows}-token vocabulary leaves no room "
            "for a separate mask token (MDLM puts [MASK] after the tokenizer's vocabulary: GPT-2's 50257 tokens + "
            "[MASK] = 50258 rows). Convert a checkpoint trained with a mask row, or pass mask_token_id=<its id>."
        )
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id")
        if token_id is not None and not 0 <= token_id < rows:
            raise ValueError(f"{role}_token_id={token_id} is outside the {rows}-token vocabulary.")


def build_config(fmt: SourceFormat, source: SourceCheckpoint, overrides: dict[str, Any]) -> ElasticMDMConfig:
    """The converted model's config: the source's fields, then the (checked) overrides; special ids validated."""
    kwargs = merge_overrides(fmt.config_kwargs(source), overrides, fmt.fixed_fields)
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(ElasticMDMConfig.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    check_special_ids(SimpleNamespace(**{**defaults, **kwargs}))  # the converter's own messages come first
    return ElasticMDMConfig(**kwargs)


def meta_model(config: ElasticMDMConfig) -> ElasticMDMForDiffusionLM:
    """The target model on the meta device: shapes and module tree, no memory."""
    with torch.device("meta"):
        return ElasticMDMForDiffusionLM(config)


def expected_shapes(model: ElasticMDMForDiffusionLM) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors the output folder holds (tied copies, e.g. a tied `lm_head.weight`, are not saved)."""
    tied = set(model.all_tied_weights_keys)
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if key not in tied}


@dataclass
class ConversionPlan:
    """`renames`: source key -> target key, in source order; `new_keys`: target keys `_init_weights` creates."""

    renames: dict[str, str]
    new_keys: list[str]


def plan_conversion(
    fmt: SourceFormat, source: SourceCheckpoint, expected: dict[str, tuple[int, ...]]
) -> ConversionPlan:
    """Map every source tensor; one ValueError names every unknown source key, every missing tensor and every shape
    mismatch (key and both shapes)."""
    renames, unknown = {}, []
    for key in source.tensors:
        if key in fmt.checked_keys:
            continue
        target = translate(key, fmt.rules)
        if target in expected:
            renames[key] = target
        else:
            unknown.append(key)
    produced = set(renames.values())
    new_keys = [key for key in expected if key not in produced]
    missing = [f"{translate(key, fmt.rules, reverse=True)} (-> {key})" for key in new_keys if not fmt.is_new(key)]
    mismatched = [
        f"{key}: source {source.tensors[key].shape}, expected {expected[target]} (for {target})"
        for key, target in renames.items()
        if source.tensors[key].shape != expected[target]
    ]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} tensor(s) have no place in the model ({expected_summary(expected)}): {unknown[:20]}"
        )
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model needs are missing: {missing[:20]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) with config.json: {mismatched[:20]}")
    if problems:
        raise ValueError(f"The {fmt.name} checkpoint {source.folder} does not fit:\n- " + "\n- ".join(problems))
    return ConversionPlan(renames, new_keys)


def expected_summary(expected: dict[str, tuple[int, ...]]) -> str:
    """`"2 blocks, embedding (64, 32)"`: what the config describes, for error messages."""
    layers = {key.split(".")[2] for key in expected if key.startswith("model.layers.")}
    return f"{len(layers)} blocks, embedding {expected['model.embed_tokens.weight']}"
