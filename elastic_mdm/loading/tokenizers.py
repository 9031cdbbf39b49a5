"""Tokenizer set-up for Elastic-MDM: loading, the special tokens the model needs, and checks against a config.

Every example is `x0 = (BOS, y_1 .. y_n, EOS)` and the sampler writes `[MASK]` (docs/design.md §1), so a tokenizer
must have BOS, EOS and mask tokens; `ensure_special_tokens` adds the missing ones, `sync_config_with_tokenizer`
sizes a new model's config from the tokenizer, and `check_vocab` refuses a config and a tokenizer that disagree
(ids out of range, other special ids, or another vocabulary than the checkpoint's).
"""

from __future__ import annotations

import math
import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Tokens `ensure_special_tokens` adds when a tokenizer lacks them.
ADDED_BOS_TOKEN, ADDED_EOS_TOKEN, ADDED_MASK_TOKEN = "<|bos|>", "<|eos|>", "<|mask|>"


def load_tokenizer(
    name: str | os.PathLike, *, trust_remote_code: bool = False, cache_dir: str | None = None, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """The tokenizer `name` names: a local folder or a Hub id (`AutoTokenizer.from_pretrained`, `kwargs` passed on).

    `trust_remote_code=False` refuses a tokenizer that needs its own code. The tokenizer is returned as loaded: call
    `ensure_special_tokens` next and resize the model's embeddings if it added tokens. A tokenizer that cannot be
    loaded raises a ValueError saying where it was looked for (the loader's error is its cause).
    """
    try:
        return AutoTokenizer.from_pretrained(
            os.fspath(name), trust_remote_code=trust_remote_code, cache_dir=cache_dir, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the tokenizer {os.fspath(name)!r}: it is not a local folder with tokenizer files and "
            f"could not be found {where_hub()}. Check the name, or pass a local tokenizer folder (for training: "
            f"--tokenizer_name, or leave it unset to build the synthetic tokenizer). Cause: {err}"
        ) from err


def lacks_token(tokenizer: PreTrainedTokenizerBase, role: str) -> bool:
    """True when `tokenizer` has no `role` ('bos', 'eos', 'mask', 'pad') token with an id."""
    return getattr(tokenizer, f"{role}_token", None) is None or getattr(tokenizer, f"{role}_token_id", None) is None


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give `tokenizer` the BOS, EOS, mask and pad tokens Elastic-MDM needs; return the tokens new to its vocabulary.

    The automatic fix, in place:

    * EOS but no BOS: BOS := EOS (the GPT-2 convention, where `<|endoftext|>` opens and closes every document);
    * BOS but no EOS: add `<|eos|>`; neither: add `<|bos|>` and `<|eos|>`;
    * no mask token: add `<|mask|>`;
    * no pad token: pad := EOS (collators never need a distinct pad).

    Tokens already in the vocabulary are reused and not reported. When the returned list is non-empty,
    `len(tokenizer)` grew: call `model.resize_token_embeddings(len(tokenizer))` (or build a new config with
    `sync_config_with_tokenizer`).
    """
    old_size = len(tokenizer)
    new: dict[str, str] = {}
    if lacks_token(tokenizer, "eos"):
        new["eos_token"] = ADDED_EOS_TOKEN
    if lacks_token(tokenizer, "bos") and "eos_token" in new:
        new["bos_token"] = ADDED_BOS_TOKEN
    if lacks_token(tokenizer, "mask"):
        new["mask_token"] = ADDED_MASK_TOKEN
    if new:
        tokenizer.add_special_tokens(new)
    if lacks_token(tokenizer, "bos"):
        tokenizer.bos_token = tokenizer.eos_token
        logger.info(f"The tokenizer has no BOS token: using EOS {tokenizer.eos_token!r} as BOS.")
    if lacks_token(tokenizer, "pad"):
        tokenizer.pad_token = tokenizer.eos_token
    added = [token for token in new.values() if tokenizer.convert_tokens_to_ids(token) >= old_size]
    if added:
        logger.warning(
            f"Added special tokens {added} to the tokenizer ({old_size} -> {len(tokenizer)} tokens); resize the "
            "model's embeddings with model.resize_token_embeddings(len(tokenizer))."
        )
    return added


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """`{"bos_token_id", "eos_token_id", "mask_token_id"}` of `tokenizer`; a ValueError names any that is missing."""
    missing = [role for role in ("bos", "eos", "mask") if lacks_token(tokenizer, role)]
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(missing)} token; call ensure_special_tokens(tokenizer) to add them "
            "(then resize the model's embeddings)."
        )
    return {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "mask")}


def vocabulary_differences(
    tokenizer: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase, limit: int = 5
) -> tuple[int, list[str]]:
    """How many tokens of `reference` have another id (or none) in `tokenizer`, and the first `limit` of them.

    Tokens `tokenizer` adds beyond `reference` (e.g. a mask token `ensure_special_tokens` appended) are allowed."""
    vocab = tokenizer.get_vocab()
    differing = sorted(
        (token_id, token) for token, token_id in reference.get_vocab().items() if vocab.get(token) != token_id
    )
    examples = [f"{token!r}: id {token_id} in the checkpoint, {vocab.get(token)} here" for token_id, token in differing]
    return len(differing), examples[:limit]


def check_vocab(
    config: PreTrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise a ValueError listing every way `config` and `tokenizer` disagree, with the fix for each.

    Checked: `len(tokenizer) <= config.vocab_size` (a larger tokenizer emits ids without an embedding), that the
    config's BOS, EOS and mask ids equal the tokenizer's (the collator and the sampler use the config's), and, given
    the tokenizer saved with the checkpoint (`checkpoint_tokenizer`), that every one of its tokens keeps its id: the
    same vocabulary, not only the same size.
    """
    problems = []
    if checkpoint_tokenizer is not None:
        count, examples = vocabulary_differences(tokenizer, checkpoint_tokenizer)
        if count:
            problems.append(
                f"the tokenizer is not the checkpoint's: {count} of the checkpoint tokenizer's "
                f"{len(checkpoint_tokenizer)} tokens have another id ({'; '.join(examples)}), so the embeddings "
                "would be read with the wrong tokens: use the checkpoint's own tokenizer (leave --tokenizer_name "
                "unset, or point it at the checkpoint folder)"
            )
    if len(tokenizer) > config.vocab_size:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but config.vocab_size is {config.vocab_size}, so ids >= "
            f"{config.vocab_size} have no embedding: call model.resize_token_embeddings(len(tokenizer)) (e.g. after "
            "ensure_special_tokens added tokens), or build a new config with sync_config_with_tokenizer"
        )
    for role in ("bos", "eos", "mask"):
        tokenizer_id = None if lacks_token(tokenizer, role) else getattr(tokenizer, f"{role}_token_id")
        config_id = getattr(config, f"{role}_token_id", None)
        if tokenizer_id is None:
            problems.append(f"the tokenizer has no {role} token: call ensure_special_tokens(tokenizer) first")
        elif config_id != tokenizer_id:
            problems.append(
                f"config.{role}_token_id={config_id} but tokenizer.{role}_token_id={tokenizer_id}: set "
                f"config.{role}_token_id = tokenizer.{role}_token_id (sync_config_with_tokenizer(config, tokenizer) "
                "sets every special id) or load the tokenizer the model was trained with"
            )
    if problems:
        raise ValueError("The model config and the tokenizer disagree:\n- " + "\n- ".join(problems))


def sync_config_with_tokenizer(
    config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> PreTrainedConfig:
    """Set a NEW model's `vocab_size` and special ids from `tokenizer` (in place) and return the config.

    `vocab_size = len(tokenizer)`, rounded up to a multiple of `pad_to_multiple_of` when given (unused rows are never
    produced by the tokenizer); `bos/eos/mask_token_id` from the tokenizer (which must have them, see
    `ensure_special_tokens`) and `pad_token_id` from the tokenizer's pad (possibly None).
    """
    ids = special_token_ids(tokenizer)
    size = len(tokenizer)
    if pad_to_multiple_of:
        size = math.ceil(size / pad_to_multiple_of) * pad_to_multiple_of
    config.vocab_size = size
    for key, value in ids.items():
        setattr(config, key, value)
    config.pad_token_id = tokenizer.pad_token_id
    return config


def anchor_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """`(bos_token_id, eos_token_id)` of `tokenizer`, or a ValueError pointing to `ensure_special_tokens`."""
    missing = [role for role in ("bos", "eos") if lacks_token(tokenizer, role)]
    if missing:
        raise ValueError(
            f"The tokenizer has no {' or '.join(missing)} token, which every example needs; call "
            "ensure_special_tokens(tokenizer) first."
        )
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def where_hub() -> str:
    """'in the local cache (offline mode...)' or 'on the Hub', for error messages."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "in the local cache (offline mode is on: HF_HUB_OFFLINE=1, so the Hub is not contacted)"
    return "locally or on the Hugging Face Hub"


__all__ = [
    "ADDED_BOS_TOKEN",
    "ADDED_EOS_TOKEN",
    "ADDED_MASK_TOKEN",
    "load_tokenizer",
    "lacks_token",
    "ensure_special_tokens",
    "special_token_ids",
    "anchor_ids",
    "vocabulary_differences",
    "check_vocab",
    "sync_config_with_tokenizer",
    "where_hub",
]
