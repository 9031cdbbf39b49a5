"""The tokenizer saved with a converted model: loaded from the source (or a given one), given the config's BOS / EOS /
mask tokens, saved; copied unchanged when it does not load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..configuration_elastic_mdm import ElasticMDMConfig
from ..loading.tokenizers import ADDED_MASK_TOKEN, load_tokenizer
from .checkpoint_io import TOKENIZER_FILES

logger = logging.getLogger(__name__)


def source_tokenizer(folder: Path, tokenizer: str | Path | None):
    """The tokenizer to save with the model: `tokenizer` (Hub id or folder) when given, else the source folder's.

    Both load with `loading.tokenizers.load_tokenizer` (the source's remote code is never run). A given tokenizer
    that does not load is an error; the source folder's gives None when the folder has no tokenizer files or when
    they do not load (they are then copied as they are, `save_tokenizer`)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return load_tokenizer(folder)
    except (ValueError, ImportError) as error:
        logger.warning(f"The tokenizer of {folder} does not load ({error}); its files are copied unchanged.")
        return None


def prepare_tokenizer(tokenizer, config: ElasticMDMConfig) -> None:
    """Give `tokenizer` the config's BOS / EOS / mask tokens where it lacks them, in place (LLaDA's tokenizer does
    not declare `<|mdm_mask|>` as its mask token; GPT-2's gets `<|mask|>` as the row after its vocabulary, MDLM's
    mask). A tokenizer larger than the vocabulary, or whose own mask token is another id, is an error; a BOS / EOS
    that differs from the config's is reported."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, more than the model's {config.vocab_size} rows.")
    for role in ("bos", "eos", "mask"):
        wanted, current = getattr(config, f"{role}_token_id"), getattr(tokenizer, f"{role}_token_id", None)
        if getattr(tokenizer, f"{role}_token", None) is not None and current is not None:
            if current != wanted and role == "mask":
                raise ValueError(
                    f"The tokenizer's mask token has id {current}, the model's {wanted}: pass "
                    f"mask_token_id={current} if the checkpoint was trained with it."
                )
            if current != wanted:
                logger.warning(f"The tokenizer's {role} token has id {current}, the model config's {wanted}.")
            continue
        if wanted < len(tokenizer):
            tokenizer.add_special_tokens({f"{role}_token": tokenizer.convert_ids_to_tokens(wanted)})
        elif role == "mask" and wanted == len(tokenizer):
            tokenizer.add_special_tokens({"mask_token": ADDED_MASK_TOKEN})
        else:
            raise ValueError(f"{role}_token_id={wanted} is not a token of the {len(tokenizer)}-token tokenizer.")


def save_tokenizer(tokenizer, folder: Path, dst: Path) -> None:
    """Save the prepared tokenizer, or copy the source's tokenizer files unchanged when it did not load."""
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
        return
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, dst / name)
