"""Safe checkpoint handling for the command-line tools (see docs/security.md).

* `local_or_hub`: a path that looks local must exist; it is never sent to the Hub.
* `load_checkpoint`: an Elastic-MDM folder loaded with the installed classes (no code from the checkpoint runs unless
  `trust_remote_code=True`), its `model_type` checked, its weights checked to be finite.
* `check_output_dir` / `check_resume_checkpoint` / `check_resume_config`: a training run never overwrites a model or
  a checkpoint unasked, and a resumed run is exact or refused.

This module is not part of a checkpoint's remote code: only the tools use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

logger = logging.getLogger(__name__)

MODEL_TYPE = "elastic_mdm"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILES = ("scheduler.pt",)


# ---------------------------------------------------------------------------------------------------------------
# Where a checkpoint lives
# ---------------------------------------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """True for a name that can only mean a local path: it starts with `.`, `/` or `~`, or its parent folder exists
    (`outputs/tiny-elastic` next to an `outputs/` folder). A Hub id `user/model` has neither."""
    if name.startswith((".", "/", "~", os.sep)):
        return True
    parent = Path(name).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def local_or_hub(name: str) -> str:
    """The absolute path of an existing local folder or file, else `name` as a Hub id.

    A name that looks local (`looks_local`) but does not exist raises `FileNotFoundError`: a typo or a missing run
    must never turn into a Hub lookup (which would download, and possibly run, someone else's files).
    """
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_local(name):
        raise FileNotFoundError(
            f"no such checkpoint folder: {name!r} ({path.resolve()} does not exist). Check the path, or train the "
            "model first; a Hub id has the form 'user/model'."
        )
    return name


# ---------------------------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_config(path: str, **kwargs: Any) -> dict[str, Any]:
    """The `config.json` of a checkpoint as a dict, read as data (no class is resolved, no code runs)."""
    config, _ = PretrainedConfig.get_config_dict(path, **kwargs)
    return config


def check_model_type(config: dict[str, Any], name: str) -> None:
    """Refuse a checkpoint whose `model_type` is not `elastic_mdm` (our tools load nothing else)."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{name!r} is not an Elastic-MDM checkpoint: its config.json has model_type={model_type!r}, expected "
            f"{MODEL_TYPE!r}. Convert MDLM / LLaDA checkpoints first with scripts/convert_mdlm.py or "
            "scripts/convert_llada.py."
        )


def check_finite_weights(model: torch.nn.Module, name: str = "the model") -> None:
    """Raise a ValueError naming the first parameter or buffer of `model` holding NaN or infinity."""
    for tensor_name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{name} has non-finite weights: {tensor_name} holds {bad} NaN/inf values of {tensor.numel()}. "
                "The checkpoint is corrupt (or training diverged): use an earlier checkpoint."
            )


def load_checkpoint(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """An Elastic-MDM (or MDLM-objective) checkpoint from a folder or a Hub id, in eval mode on `device`.

    Without `trust_remote_code` the installed `ElasticMDMForDiffusionLM` loads it and no `.py` file of the checkpoint
    runs; with it, `AutoModel` runs the checkpoint's own modeling code (its `auto_map`). Either way the checkpoint
    must declare `model_type="elastic_mdm"` and its weights must be finite. `kwargs` go to `from_pretrained`.
    """
    path = local_or_hub(name)
    check_model_type(checkpoint_config(path), name)
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.setdefault("use_safetensors", True)  # never unpickle a .bin
    if trust_remote_code:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    else:
        from ..modeling_elastic_mdm import ElasticMDMForDiffusionLM

        model = ElasticMDMForDiffusionLM.from_pretrained(path, **kwargs)
    check_finite_weights(model, repr(name))
    return model.to(device).eval()


def load_checkpoint_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer saved with a checkpoint; `trust_remote_code=False` refuses a tokenizer that needs its own code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_or_hub(name), trust_remote_code=trust_remote_code)


def saved_tokenizer(path: str | None, trust_remote_code: bool = False):
    """The tokenizer saved in the local checkpoint folder `path`, or None (a Hub id, or a folder without one)."""
    if path is None or not Path(path).is_dir():
        return None
    if not any((Path(path) / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        return None
    return load_checkpoint_tokenizer(path, trust_remote_code)


# ---------------------------------------------------------------------------------------------------------------
# Training outputs and resuming
# ---------------------------------------------------------------------------------------------------------------


def holds_model(folder: Path) -> list[str]:
    """What in `folder` a training run would overwrite or delete: model files and `checkpoint-*` folders."""
    if not folder.is_dir():
        return []
    found = [name for name in MODEL_FILES if (folder / name).exists()]
    found += sorted(p.name for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: str,
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: str | None = None,
    sources: Iterable[str | None] = (),
) -> None:
    """Refuse a training `output_dir` that would overwrite or delete a model.

    * `output_dir` equal to a source (`--model_name_or_path`, `--tokenizer_name`) is always refused: the run would
      overwrite the weights it starts from;
    * an `output_dir` holding model files or `checkpoint-*` folders is refused unless `overwrite_output_dir` is set or
      the run resumes from a checkpoint inside it.
    """
    out = Path(output_dir).expanduser().resolve()
    for source in sources:
        if source and Path(source).expanduser().exists() and Path(source).expanduser().resolve() == out:
            raise ValueError(
                f"--output_dir {output_dir!r} is the folder the run starts from ({source!r}); saving there would "
                "overwrite the source checkpoint. Choose another --output_dir."
            )
    found = holds_model(out)
    if not found or overwrite_output_dir:
        return
    if resume_from_checkpoint and _inside(Path(resume_from_checkpoint).expanduser().resolve(), out):
        return
    last = get_last_checkpoint(str(out))
    resume = f" To continue that run, pass --resume_from_checkpoint {last}." if last else ""
    raise ValueError(
        f"--output_dir {output_dir!r} already holds a model ({', '.join(found[:5])}); training there would overwrite "
        f"it (and --save_total_limit could delete its checkpoints). Choose another --output_dir, or pass "
        f"--overwrite_output_dir to replace it.{resume}"
    )


def missing_resume_state(checkpoint: Path) -> list[str]:
    """The parts of a Trainer checkpoint an exact resume needs but `checkpoint` lacks: optimizer, scheduler, RNG and
    trainer state. A DeepSpeed checkpoint keeps its optimizer in `global_step*/`."""
    missing = []
    if not any((checkpoint / f).exists() for f in OPTIMIZER_FILES) and not list(checkpoint.glob("global_step*")):
        missing.append("optimizer state (optimizer.pt)")
    if not any((checkpoint / f).exists() for f in SCHEDULER_FILES):
        missing.append("learning-rate scheduler state (scheduler.pt)")
    if not list(checkpoint.glob("rng_state*.pth")):
        missing.append("RNG state (rng_state*.pth)")
    if not (checkpoint / "trainer_state.json").exists():
        missing.append("trainer state (trainer_state.json)")
    return missing


def check_resume_checkpoint(checkpoint: str) -> None:
    """Refuse to resume from a folder that is not a complete Trainer checkpoint (the resume would not be exact)."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: no such checkpoint folder: {checkpoint!r}.")
    missing = missing_resume_state(path)
    if missing:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} lacks its {', '.join(missing)}, so the run would not continue "
            "exactly (the optimizer, learning rate and noise would restart). Resume from a complete checkpoint-* "
            "folder, or start a new run from these weights with --model_name_or_path."
        )


def check_resume_config(checkpoint: str, expected: dict[str, Any]) -> None:
    """Refuse to resume when the model the flags build differs from the checkpoint's `config.json` in one of the
    `expected` fields (the run would train another model and save its config over the checkpoint's). A checkpoint
    without `config.json` (LoRA adapters only) is not compared."""
    path = Path(checkpoint).expanduser().resolve()
    if not (path / "config.json").exists():
        return
    saved = checkpoint_config(str(path))
    changed = [
        f"{name}: {saved[name]!r} in the checkpoint, {value!r} from the flags"
        for name, value in expected.items()
        if name in saved and saved[name] != value
    ]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} was trained with another model ({'; '.join(changed)}). Resume "
            "with the flags the run was started with, or start a new run from these weights with "
            "--model_name_or_path."
        )


__all__ = [
    "local_or_hub",
    "looks_local",
    "load_checkpoint",
    "load_checkpoint_tokenizer",
    "saved_tokenizer",
    "check_model_type",
    "check_finite_weights",
    "check_output_dir",
    "check_resume_checkpoint",
    "check_resume_config",
    "missing_resume_state",
]
