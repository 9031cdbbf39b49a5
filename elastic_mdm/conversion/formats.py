"""What a source format is: key rules that rename its tensors, the config fields its weights fix, and how its
`config.json` maps to ElasticMDMConfig fields (`mdlm.py`, `llada.py` define the two formats)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..configuration_elastic_mdm import ElasticMDMConfig
from .checkpoint_io import SourceCheckpoint

# config fields that the source weights fix: an override would not fit them (or would change the function)
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "block_type",
    "rope_theta",
    "norm_eps",
    "mlp_bias",
    "head_bias",
    "tie_word_embeddings",
)


@cache
def _template_regex(template: str) -> re.Pattern:
    """`a.{i}.b.{p}` -> a regex where `{i}` is a block index and `{p}` a parameter name (`weight` / `bias`)."""
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex)


@dataclass(frozen=True)
class KeyRule:
    """`source` key template -> `target` key template (`{i}`: block index, `{p}`: `weight` or `bias`)."""

    source: str
    target: str

    def translate(self, key: str, reverse: bool = False) -> str | None:
        pattern, template = (self.target, self.source) if reverse else (self.source, self.target)
        match = _template_regex(pattern).fullmatch(key)
        return template.format(**match.groupdict()) if match else None


def translate(key: str, rules: Iterable[KeyRule], reverse: bool = False) -> str | None:
    """The key `key` maps to (source -> target, or target -> source with `reverse`), None when no rule matches."""
    return next((out for rule in rules if (out := rule.translate(key, reverse)) is not None), None)


@dataclass(frozen=True)
class SourceFormat:
    """How to recognise, configure and rename one family of source checkpoints."""

    name: str
    model_type: str  # `model_type` of the source config.json
    key_prefix: str  # every source key starts with it
    converter: str  # what to call for this format (named in wrong-source errors)
    rules: tuple[KeyRule, ...]
    new_modules: tuple[str, ...]  # regexes of target keys that are new, initialised by `_init_weights`
    config_kwargs: Callable[[SourceCheckpoint], dict[str, Any]]  # ElasticMDMConfig fields of a source checkpoint
    checked_keys: tuple[str, ...] = ()  # source keys verified by `verify` and then dropped (recomputed buffers)
    fixed_fields: tuple[str, ...] = ARCHITECTURE_FIELDS
    verify: Callable[[SourceCheckpoint, ElasticMDMConfig], None] | None = None  # raises when the source disagrees

    def is_new(self, target_key: str) -> bool:
        """True when `target_key` belongs to a module the source lacks (initialised by `_init_weights`)."""
        return any(re.search(pattern, target_key) for pattern in self.new_modules)


def block_rules(source_prefix: str, pairs: dict[str, str]) -> tuple[KeyRule, ...]:
    """`{source_module: target_module}` inside block `{i}` -> rules for their `{p}` parameters."""
    return tuple(
        KeyRule(f"{source_prefix}.{{i}}.{src}.{{p}}", f"model.layers.{{i}}.{tgt}.{{p}}") for src, tgt in pairs.items()
    )


def config_value(config: dict, key: str, default: Any = None) -> Any:
    """`config[key]`, or `default` when the key is absent or null."""
    value = config.get(key)
    return default if value is None else value


def require_fields(config: dict, names: Iterable[str], what: str) -> None:
    """A ValueError naming the `names` that `config` lacks (absent or null)."""
    missing = [name for name in names if config.get(name) is None]
    if missing:
        raise ValueError(f"The {what} config.json lacks {missing}: cannot build the converted model.")
