"""The converters: `convert_mdlm_checkpoint`, `convert_llada_checkpoint` (their command: `commands/convert.py`).

A converter reads the source `config.json` and weight files itself (the original remote code predates Transformers
v5), renames every tensor (`mdlm.py`, `llada.py`), adds the new modules (gap head; adaLN for a LLaDA model converted
with `adaln=True`) initialised by `ElasticMDMPreTrainedModel._init_weights`, and writes a folder that
`AutoModel.from_pretrained(dst, trust_remote_code=True)` loads. With the gap head ignored and every position active,
the converted model's token logits equal the source model's (the mask column is -inf in ours).

Memory: the source is indexed from the file headers, then read one file at a time and one tensor at a time; output
shards (`max_shard_size`) are written as soon as they are complete (`writer.py`). Peak memory is about one source file
plus one output shard, so LLaDA-8B (16 GB in bf16) converts on a 24 GB machine. Tensors keep their source dtype
unless `dtype` is given.

Why not Transformers' own loading: `ElasticMDMForDiffusionLM.from_pretrained(src, config=..., key_mapping=...)` then
`save_pretrained(dst, max_shard_size=..., save_original_format=False)` gives the same folder (same keys, equal
converted tensors) but holds the whole model. Measured with `python -m benchmarks.converter_memory` (a 256 MiB fp32
LLaDA-layout checkpoint in 4 shards, largest 96 MiB; 2-core AMD EPYC, torch 2.13.0+cpu, transformers 5.24.0,
OMP_NUM_THREADS=1; peak RSS increase of a fresh process): fp32 -> fp32, streaming 114 MiB (0.44 x the checkpoint),
library 298 MiB (1.16 x); fp32 -> bf16, streaming 182 MiB (0.71 x), library 391 MiB (1.53 x, of which 153 MiB
anonymous: the whole model in bf16). The library path scales with the model, not with a shard, so it cannot hold the
bound above for LLaDA-8B; the streaming stays (docs/benchmarks.md, "Converter I/O").

`key_mapping` can express the renames of `mdlm.py` and `llada.py` only as Transformers applies it: the matched part of
a key is replaced and a single group `\\1` is substituted (the block index; `.weight` / `.bias` stay outside the
pattern), and `save_pretrained` reverses it unless `save_original_format=False`. It renames only: it can neither fuse
nor split tensors (not needed here: MDLM's fused `(3, H, D)` qkv and LLaDA's separate q / k / v match ours), nor check
a dropped tensor (MDLM's `rotary_emb.inv_freq`, `mdlm.check_rotary`), nor build the config (`plan.build_config`). The
new gap head is reported missing and initialised by `_init_weights`; Transformers' initialisation skips modules
without parameters of their own, the adaLN zeroing of `adaln=True` (see `writer.initialise_new_tensors`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..loading.checkpoints import model_artefacts
from .checkpoint_io import TOKENIZER_FILES, SourceCheckpoint, resolve_source
from .formats import SourceFormat, translate
from .llada import LLADA
from .mdlm import MDLM
from .plan import build_config, check_source_format, expected_shapes, meta_model, plan_conversion
from .tokenizer import prepare_tokenizer, save_tokenizer, source_tokenizer
from .writer import DEFAULT_MAX_SHARD_SIZE, initialise_new_tensors, parse_size, write_model_files, write_weights

logger = logging.getLogger(__name__)

FORMATS = (MDLM, LLADA)


def prepare_destination(dst: Path, source_folder: Path, overwrite: bool) -> None:
    """Create `dst`; a non-empty one only with `overwrite`, never the source. Overwriting removes the files of the
    model `dst` held (weights, shards, adapter, config: `loading.checkpoints.MODEL_ARTEFACTS`) and its tokenizer
    files, so that nothing of the old model is left next to the new one (a source without a tokenizer would otherwise
    leave the old tokenizer beside the new weights)."""
    dst = dst.expanduser().resolve()
    if dst == source_folder.resolve():
        raise ValueError(f"dst={dst} is the source folder; write the converted model elsewhere.")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"{dst} is not empty; choose an empty folder or pass overwrite=True.")
        stale = [dst / name for name in (*model_artefacts(dst), *TOKENIZER_FILES)]
        for path in [*stale, *dst.glob("*.safetensors")]:
            if path.is_file():
                path.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`"bfloat16"` / `torch.bfloat16` -> `torch.bfloat16`; None stays None (keep the source dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16).")
    return resolved


def convert_checkpoint(
    fmt: SourceFormat,
    src: str | Path,
    dst: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Convert the `fmt` checkpoint `src` (local folder or Hub id) into the Elastic-MDM folder `dst`; see
    `convert_mdlm_checkpoint` for the arguments. Everything is validated before the first byte is written."""
    target_dtype, max_bytes = resolve_dtype(dtype), parse_size(max_shard_size)
    folder = resolve_source(src, revision, cache_dir)
    source = SourceCheckpoint(folder)
    check_source_format(fmt, source, FORMATS)
    config = build_config(fmt, source, overrides)
    if fmt.verify is not None:
        fmt.verify(source, config)
    model = meta_model(config)
    plan = plan_conversion(fmt, source, expected_shapes(model))
    loaded_tokenizer = source_tokenizer(folder, tokenizer)
    if loaded_tokenizer is not None:
        prepare_tokenizer(loaded_tokenizer, config)
    dst = Path(dst)
    prepare_destination(dst, folder, overwrite)
    embedding = translate("model.embed_tokens.weight", fmt.rules, reverse=True)
    output_dtype = target_dtype or source.tensors[embedding].dtype
    new = {k: v.to(output_dtype) for k, v in initialise_new_tensors(model, plan.new_keys, seed).items()}
    write_weights(dst, source, plan, new, target_dtype, max_bytes)
    write_model_files(model, dst, output_dtype)
    save_tokenizer(loaded_tokenizer, folder, dst)
    logger.info(f"Converted {fmt.name} {src} -> {dst} ({len(plan.renames)} tensors copied, {len(new)} new).")
    return dst


def convert_mdlm_checkpoint(src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """Convert an MDLM checkpoint (e.g. `kuleshov-group/mdlm-owt`) into an Elastic-MDM folder (`block_type="dit"`).

    Args:
        src: a Hub repo id or a local folder in MDLM's layout (`config.json` plus `model.safetensors`, sharded
            safetensors with `model.safetensors.index.json`, or `pytorch_model.bin`).
        dst: the output folder (must be empty unless `overwrite=True`).
        dtype: cast every tensor to this dtype (default: keep the source dtypes; bf16 stays bf16).
        max_shard_size: largest output shard (`"2GB"`, `"500MB"` or bytes).
        seed: seed of the initialisation of the new modules (the gap head).
        tokenizer: a tokenizer (Hub id or folder) saved with the model when `src` has none (MDLM-OWT: `"gpt2"`).
        revision, cache_dir: passed to `huggingface_hub.snapshot_download` for a Hub id.
        overwrite: allow a non-empty `dst` (its old weight files are removed).
        **overrides: ElasticMDMConfig fields the weights do not fix, e.g. `max_gap`, `gap_head_type`,
            `time_conditioning`, `objective` (default `"mdlm"`: the checkpoint was trained with the MDLM objective,
            so `generate()` uses MDLM's sampler until it is fine-tuned with the Elastic objective), special ids.

    Returns:
        `dst` as a Path.
    """
    return convert_checkpoint(MDLM, src, dst, **kwargs)


def convert_llada_checkpoint(src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """Convert a LLaDA checkpoint (e.g. `GSAI-ML/LLaDA-8B-Base`) into an Elastic-MDM folder (`block_type="llama"`).

    Same arguments as `convert_mdlm_checkpoint`. Useful overrides: `adaln=True` (zero-initialised adaLN, so the
    converted model still equals LLaDA) with `time_conditioning=True` and `cond_dim`; `max_gap`; `objective`.
    The tokenizer files of `src` are copied, with `<|mdm_mask|>` declared as the mask token.
    """
    return convert_checkpoint(LLADA, src, dst, **kwargs)
