"""Safe checkpoint handling for the command-line tools (see docs/security.md).

* `local_or_hub`: a path that looks local must exist; it is never sent to the Hub.
* `load_checkpoint`: an Elastic-MDM folder loaded with the installed classes (no code from the checkpoint runs unless
  `trust_remote_code=True`), its `model_type` checked, its weights checked to be finite.

The training run's own checks (output folder, resume) are in `elastic_mdm/training/outputs.py`.

This module is not part of a checkpoint's remote code: only the tools use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ..weights_elastic_mdm import non_finite_message

logger = logging.getLogger(__name__)

MODEL_TYPE = "elastic_mdm"
MODEL_ARTEFACTS = (
    CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,  # full weights
    "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin",  # their shards
    ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME,  # a LoRA adapter (PEFT)
    "global_step*", "latest",  # DeepSpeed engine states and the tag of the last one
)  # fmt: skip
"""Names (globs) of what a saved model consists of: Transformers' and PEFT's weight and config files and DeepSpeed's
states. A folder holding any of them holds a model (`model_artefacts`)."""


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
    config, _ = PreTrainedConfig.get_config_dict(path, **kwargs)
    return config


def model_artefacts(folder: str | os.PathLike) -> list[str]:
    """The `MODEL_ARTEFACTS` in `folder` (sorted names; none if it is not a folder): what saving a model there would
    overwrite, or leave behind next to the new weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({path.name for pattern in MODEL_ARTEFACTS for path in folder.glob(pattern)})


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
    """Raise a ValueError naming the first parameter or buffer of `model` holding NaN or infinity (what the library's
    `from_pretrained` only warns about, `weights_elastic_mdm.non_finite_message`)."""
    message = non_finite_message(model, name)
    if message is not None:
        raise ValueError(message)


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
    from .tokenizers import load_tokenizer

    return load_tokenizer(local_or_hub(name), trust_remote_code=trust_remote_code)


def load_model_and_tokenizer(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
    **kwargs: Any,
):
    """`(model, tokenizer)`: `load_checkpoint`, the checkpoint's own tokenizer unless `tokenizer` is given, and a
    ValueError naming every way the two disagree (`check_vocab`)."""
    from .tokenizers import check_vocab

    model = load_checkpoint(name, device, dtype, trust_remote_code, **kwargs)
    tokenizer = tokenizer or load_checkpoint_tokenizer(name, trust_remote_code)
    check_vocab(model.config, tokenizer)
    return model, tokenizer


def saved_tokenizer(path: str | None, trust_remote_code: bool = False):
    """The tokenizer saved in the local checkpoint folder `path`, or None (a Hub id, or a folder without one)."""
    if path is None or not Path(path).is_dir():
        return None
    if not any((Path(path) / f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        return None
    return load_checkpoint_tokenizer(path, trust_remote_code)


__all__ = [
    "local_or_hub",
    "looks_local",
    "load_checkpoint",
    "load_checkpoint_tokenizer",
    "load_model_and_tokenizer",
    "saved_tokenizer",
    "MODEL_ARTEFACTS",
    "model_artefacts",
    "check_model_type",
    "check_finite_weights",
]
