"""Convert MDLM and LLaDA checkpoints into Elastic-MDM folders (docs/design.md §7), streaming one tensor at a time.

The converters read the source `config.json` and weight files themselves (the original remote code predates
Transformers v5), rename every tensor, add the new modules (gap head; adaLN for a LLaDA model converted with
`adaln=True`) initialised by `ElasticMDMPreTrainedModel._init_weights`, and write a folder that
`AutoModel.from_pretrained(dst, trust_remote_code=True)` loads. With the gap head ignored and every position active,
the converted model's token logits equal the source model's (the mask column is -inf in ours).

MDLM (`kuleshov-group/mdlm-owt`, `block_type="dit"`; every tensor copied as is, layouts already agree):

| MDLM key                                           | Elastic-MDM key                                  |
|----------------------------------------------------|--------------------------------------------------|
| `backbone.vocab_embed.embedding` (raw parameter)   | `model.embed_tokens.weight`                      |
| `backbone.sigma_map.mlp.{0,2}.{p}`                 | `model.time_embed.mlp.{0,2}.{p}`                 |
| `backbone.blocks.{i}.norm1.weight`                 | `model.layers.{i}.input_norm.weight`             |
| `backbone.blocks.{i}.attn_qkv.weight` (3, H, D)    | `model.layers.{i}.attn.qkv_proj.weight` (3, H, D)|
| `backbone.blocks.{i}.attn_out.weight`              | `model.layers.{i}.attn.o_proj.weight`            |
| `backbone.blocks.{i}.norm2.weight`                 | `model.layers.{i}.post_attention_norm.weight`    |
| `backbone.blocks.{i}.mlp.0.{p}` / `mlp.2.{p}`      | `model.layers.{i}.mlp.up_proj.{p}` / `down_proj` |
| `backbone.blocks.{i}.adaLN_modulation.{p}`         | `model.layers.{i}.adaln.{p}` (same 6-chunk order)|
| `backbone.output_layer.norm_final.weight`          | `model.norm.weight`                              |
| `backbone.output_layer.adaLN_modulation.{p}`       | `model.final_adaln.{p}` (shift, scale)           |
| `backbone.output_layer.linear.{p}`                 | `lm_head.{p}`                                    |
| `backbone.rotary_emb.inv_freq`                     | checked against base 10000 over head_dim, dropped|

LLaDA (`GSAI-ML/LLaDA-8B-Base`, `block_type="llama"`; every tensor copied as is):

| LLaDA key                                          | Elastic-MDM key                                  |
|----------------------------------------------------|--------------------------------------------------|
| `model.transformer.wte.weight`                     | `model.embed_tokens.weight`                      |
| `model.transformer.blocks.{i}.attn_norm.weight`    | `model.layers.{i}.input_norm.weight`             |
| `model.transformer.blocks.{i}.{q,k,v}_proj.weight` | `model.layers.{i}.attn.{q,k,v}_proj.weight`      |
| `model.transformer.blocks.{i}.attn_out.weight`     | `model.layers.{i}.attn.o_proj.weight`            |
| `model.transformer.blocks.{i}.ff_norm.weight`      | `model.layers.{i}.post_attention_norm.weight`    |
| `model.transformer.blocks.{i}.ff_proj.weight`      | `model.layers.{i}.mlp.gate_proj.weight` (SiLU)   |
| `model.transformer.blocks.{i}.up_proj.weight`      | `model.layers.{i}.mlp.up_proj.weight`            |
| `model.transformer.blocks.{i}.ff_out.weight`       | `model.layers.{i}.mlp.down_proj.weight`          |
| `model.transformer.ln_f.weight`                    | `model.norm.weight`                              |
| `model.transformer.ff_out.weight`                  | `lm_head.weight` (absent when `weight_tying`)    |

Memory: the source is indexed from the file headers, then read one file at a time and one tensor at a time; output
shards (`max_shard_size`) are written as soon as they are complete. Peak memory is about one source file plus one
output shard, so LLaDA-8B (16 GB in bf16) converts on a 24 GB machine. Tensors keep their source dtype unless `dtype`
is given.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..configuration_elastic_mdm import ElasticMDMConfig
from ..modeling_elastic_mdm import ElasticMDMForDiffusionLM

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
DEFAULT_MAX_SHARD_SIZE = "2GB"
GPT2_END_OF_TEXT = 50256  # `<|endoftext|>`: BOS and EOS of MDLM's GPT-2 vocabulary
LLADA_SPECIAL_IDS = {"mask_token_id": 126336, "bos_token_id": 126080, "eos_token_id": 126081}
ADDED_MASK_TOKEN = "<|mask|>"  # the name `corpus.ensure_special_tokens` gives an added mask token

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
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


# ----------------------------------------------------------------------------------------------------------------
# Reading a source checkpoint: headers first, then one file and one tensor at a time
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A source tensor as its file header describes it (no data read)."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class _SafetensorsFile:
    """An open `.safetensors` file: names and shapes from the header, one tensor loaded on request."""

    def __init__(self, handle):
        self.handle = handle

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self.handle.get_slice(key)
        return tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()]

    def load(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)


class _TorchFile:
    """A `pytorch_model.bin` state dict, memory-mapped (data is read only when a tensor is used)."""

    def __init__(self, path: Path):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) format: cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(
                f"{path} is not a flat state dict of tensors (a training checkpoint?); export the weights."
            )
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self.state[key].shape), self.state[key].dtype

    def load(self, key: str) -> torch.Tensor:
        return self.state[key]


@contextmanager
def open_weight_file(path: Path) -> Iterator[_SafetensorsFile | _TorchFile]:
    """Open one weight file (`.safetensors` or a torch `.bin`) lazily; it is closed when the block ends."""
    if path.name.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as handle:
            yield _SafetensorsFile(handle)
    else:
        yield _TorchFile(path)


def read_json(path: Path) -> dict:
    """The JSON file `path`; a clear FileNotFoundError when the checkpoint folder lacks it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a checkpoint folder needs its {path.name}.")
    with open(path) as f:
        return json.load(f)


def find_weight_files(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of `folder` in load order and the index's `weight_map` (None for a single file).

    Looked for, in order: `model.safetensors.index.json` (shards), `model.safetensors`,
    `pytorch_model.bin.index.json`, `pytorch_model.bin`. A shard the index names but the folder lacks is an error.
    """
    for index_name, single_name in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name).get("weight_map") or {}
            files = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index_name} in {folder} lists shard(s) {missing} that are not in the folder (an interrupted "
                    "download?): fetch the missing shard(s) again."
                )
            return files, weight_map
        if (folder / single_name).is_file():
            return [single_name], None
    raise FileNotFoundError(
        f"No weights in {folder}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} with its shards, {BIN_WEIGHTS} or {BIN_INDEX}."
    )


class SourceCheckpoint:
    """An original checkpoint folder: its `config.json` and every tensor's file, shape and dtype (headers only)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = read_json(folder / CONFIG_NAME)
        files, weight_map = find_weight_files(folder)
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            with open_weight_file(folder / name) as weights:
                for key in weights.keys():
                    if key in self.tensors:
                        raise ValueError(f"{key} is stored twice, in {self.tensors[key].file} and in {name}.")
                    self.tensors[key] = TensorInfo(name, *weights.info(key))
        absent = [f"{key} (in {file})" for key, file in (weight_map or {}).items() if key not in self.tensors]
        if absent:
            raise ValueError(f"The weight index lists tensors that its shards do not hold: {absent[:10]}.")

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor once, in `self.tensors` order: one file open at a time, one tensor loaded at a time."""
        for name in dict.fromkeys(info.file for info in self.tensors.values()):
            with open_weight_file(self.folder / name) as weights:
                for key in (k for k, info in self.tensors.items() if info.file == name):
                    yield key, weights.load(key)

    def load(self, key: str) -> torch.Tensor:
        """One tensor, copied out of its file."""
        with open_weight_file(self.folder / self.tensors[key].file) as weights:
            return weights.load(key).clone()


def resolve_source(src: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (config, weights, index and tokenizer files only;
    safetensors preferred, `.bin` only when the repo has no safetensors)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{src} is a file; pass the checkpoint folder (config.json + weights) or a Hub repo id.")
    from huggingface_hub import snapshot_download

    common = [CONFIG_NAME, *TOKENIZER_FILES]
    try:
        for weights in (["*.safetensors", SAFE_INDEX], ["pytorch_model*.bin", BIN_INDEX]):
            folder = Path(
                snapshot_download(str(src), revision=revision, cache_dir=cache_dir, allow_patterns=common + weights)
            )
            if any(folder.glob(weights[0])):
                return folder
    except Exception as error:  # offline, unknown repo, gated, ...: one clear message
        raise FileNotFoundError(
            f"{src} is neither a local folder nor a Hub repo that could be downloaded "
            f"({type(error).__name__}: {error})."
        ) from error
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------------------


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
    checked_keys: tuple[str, ...] = ()  # source keys verified and then dropped (recomputed buffers)
    fixed_fields: tuple[str, ...] = ARCHITECTURE_FIELDS

    def is_new(self, target_key: str) -> bool:
        return any(re.search(pattern, target_key) for pattern in self.new_modules)


def _block_rules(source_prefix: str, pairs: dict[str, str]) -> tuple[KeyRule, ...]:
    """`{source_module: target_module}` inside block `{i}` -> rules for their `{p}` parameters."""
    return tuple(
        KeyRule(f"{source_prefix}.{{i}}.{src}.{{p}}", f"model.layers.{{i}}.{tgt}.{{p}}") for src, tgt in pairs.items()
    )


MDLM = SourceFormat(
    name="MDLM",
    model_type="mdlm",
    key_prefix="backbone.",
    converter="convert_mdlm_checkpoint (scripts/convert_mdlm.py)",
    rules=(
        KeyRule("backbone.vocab_embed.embedding", "model.embed_tokens.weight"),
        KeyRule("backbone.sigma_map.mlp.0.{p}", "model.time_embed.mlp.0.{p}"),
        KeyRule("backbone.sigma_map.mlp.2.{p}", "model.time_embed.mlp.2.{p}"),
        *_block_rules(
            "backbone.blocks",
            {
                "norm1": "input_norm",
                "attn_qkv": "attn.qkv_proj",
                "attn_out": "attn.o_proj",
                "norm2": "post_attention_norm",
                "mlp.0": "mlp.up_proj",
                "mlp.2": "mlp.down_proj",
                "adaLN_modulation": "adaln",
            },
        ),
        KeyRule("backbone.output_layer.norm_final.{p}", "model.norm.{p}"),
        KeyRule("backbone.output_layer.adaLN_modulation.{p}", "model.final_adaln.{p}"),
        KeyRule("backbone.output_layer.linear.{p}", "lm_head.{p}"),
    ),
    new_modules=(r"^gap_head\.",),
    checked_keys=("backbone.rotary_emb.inv_freq",),
    fixed_fields=(*ARCHITECTURE_FIELDS, "cond_dim", "adaln"),
)

LLADA = SourceFormat(
    name="LLaDA",
    model_type="llada",
    key_prefix="model.transformer.",
    converter="convert_llada_checkpoint (scripts/convert_llada.py)",
    rules=(
        KeyRule("model.transformer.wte.{p}", "model.embed_tokens.{p}"),
        *_block_rules(
            "model.transformer.blocks",
            {
                "attn_norm": "input_norm",
                "q_proj": "attn.q_proj",
                "k_proj": "attn.k_proj",
                "v_proj": "attn.v_proj",
                "attn_out": "attn.o_proj",
                "ff_norm": "post_attention_norm",
                "ff_proj": "mlp.gate_proj",
                "up_proj": "mlp.up_proj",
                "ff_out": "mlp.down_proj",
            },
        ),
        KeyRule("model.transformer.ln_f.{p}", "model.norm.{p}"),
        KeyRule("model.transformer.ff_out.{p}", "lm_head.{p}"),
    ),
    new_modules=(r"^gap_head\.", r"\.adaln\.", r"^model\.time_embed\.", r"^model\.final_adaln\."),
)

FORMATS = (MDLM, LLADA)


def check_source_format(expected: SourceFormat, source: SourceCheckpoint) -> None:
    """Raise a ValueError naming the right converter when `source` is not an `expected` checkpoint."""
    model_type, keys = source.config.get("model_type"), list(source.tensors)
    if model_type == "elastic_mdm":
        raise ValueError(
            f"{source.folder} is already an Elastic-MDM checkpoint: load it with "
            "AutoModel.from_pretrained(path, trust_remote_code=True) instead of converting it."
        )
    found = next((fmt for fmt in FORMATS if model_type == fmt.model_type), None)
    found = found or next((fmt for fmt in FORMATS if keys and all(k.startswith(fmt.key_prefix) for k in keys)), None)
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


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def _value(config: dict, key: str, default: Any = None) -> Any:
    """`config[key]`, or `default` when the key is absent or null."""
    value = config.get(key)
    return default if value is None else value


def _require(config: dict, names: Iterable[str], what: str) -> None:
    """A ValueError naming the `names` that `config` lacks (absent or null)."""
    missing = [name for name in names if config.get(name) is None]
    if missing:
        raise ValueError(f"The {what} config.json lacks {missing}: cannot build the converted model.")


def mdlm_config_kwargs(source: SourceCheckpoint) -> dict[str, Any]:
    """ElasticMDMConfig fields of an MDLM checkpoint.

    Reads the Hub export's flat fields (`hidden_dim`, `n_blocks`, `n_heads`, `cond_dim`, `vocab_size`,
    `model_length`, `time_conditioning`) or the training (hydra) layout (`model.hidden_size`, `model.n_blocks`,
    `model.n_heads`, `model.cond_dim`, `model.length`; vocabulary from the embedding). MDLM's DiT fixes the rest: MLP
    ×4, RoPE base 10000, LayerNorm eps 1e-5, biased MLP and head. Special ids: `[MASK]` is the last row (MDLM appends
    it after the tokenizer's vocabulary); BOS = EOS = GPT-2's `<|endoftext|>` (50256).
    """
    config = source.config
    nested = config.get("model") if isinstance(config.get("model"), dict) else {}
    if _value(config, "backbone", "dit") != "dit":
        raise ValueError(f"Only MDLM's DiT backbone converts; this checkpoint has backbone={config['backbone']!r}.")
    fields = {
        "hidden_dim": _value(config, "hidden_dim", nested.get("hidden_size")),
        "n_blocks": _value(config, "n_blocks", nested.get("n_blocks")),
        "n_heads": _value(config, "n_heads", nested.get("n_heads")),
        "cond_dim": _value(config, "cond_dim", nested.get("cond_dim")),
    }
    _require(fields, fields, "MDLM")
    embedding = source.tensors.get("backbone.vocab_embed.embedding")
    vocab_size = _value(config, "vocab_size", embedding.shape[0] if embedding else None)
    _require({"vocab_size": vocab_size}, ["vocab_size"], "MDLM")
    return dict(
        vocab_size=vocab_size,
        hidden_size=fields["hidden_dim"],
        num_hidden_layers=fields["n_blocks"],
        num_attention_heads=fields["n_heads"],
        intermediate_size=4 * fields["hidden_dim"],
        max_position_embeddings=_value(config, "model_length", nested.get("length", 1024)),
        block_type="dit",
        adaln=True,
        time_conditioning=bool(_value(config, "time_conditioning", False)),
        cond_dim=fields["cond_dim"],
        rope_theta=10000.0,
        norm_eps=1e-5,
        mlp_bias=True,
        head_bias=True,
        tie_word_embeddings=False,
        mask_token_id=_value(config, "mask_token_id", vocab_size - 1),
        bos_token_id=_value(config, "bos_token_id", GPT2_END_OF_TEXT),
        eos_token_id=_value(config, "eos_token_id", GPT2_END_OF_TEXT),
        pad_token_id=config.get("pad_token_id"),
        objective="mdlm",
    )


# LLaDA (OLMo) options our `llama` block does not implement: field -> accepted values (absent fields are accepted)
LLADA_SUPPORTED = {
    "block_type": ("llama",),
    "rope": (True,),
    "alibi": (False,),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "bias_for_layer_norm": (None, False),
    "attention_layer_norm": (False,),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "activation_type": ("silu",),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "multi_query_attention": (None, False),
    "block_group_size": (1,),
}


def llada_config_kwargs(source: SourceCheckpoint) -> dict[str, Any]:
    """ElasticMDMConfig fields of a LLaDA checkpoint.

    `d_model`, `n_layers`, `n_heads`, `mlp_hidden_size` (else `mlp_ratio * d_model`), `rope_theta`,
    `rms_norm_eps`, `max_sequence_length`, `weight_tying`; the vocabulary is the embedding's rows, `embedding_size`
    (padded, >= `vocab_size`) when set. Special ids from the config, else LLaDA's (mask 126336, BOS 126080,
    EOS 126081). Options the `llama` block lacks (biases, ALiBi, GQA, q/k norms, ...) are rejected.
    """
    config = source.config
    _require(config, ("d_model", "n_layers", "n_heads"), "LLaDA")
    unsupported = [
        f"{name}={config[name]!r} (supported: {accepted})"
        for name, accepted in LLADA_SUPPORTED.items()
        if name in config and config[name] not in accepted
    ]
    if _value(config, "n_kv_heads", config["n_heads"]) != config["n_heads"]:
        unsupported.append(f"n_kv_heads={config['n_kv_heads']} (grouped-query attention; need n_heads)")
    if unsupported:
        raise ValueError(f"This LLaDA checkpoint uses options the Elastic-MDM llama block lacks: {unsupported}.")
    vocab_size = _value(config, "vocab_size")
    rows = _value(config, "embedding_size", vocab_size)
    _require({"vocab_size": rows}, ["vocab_size"], "LLaDA")
    if vocab_size is not None and rows < vocab_size:
        raise ValueError(f"embedding_size={rows} is smaller than vocab_size={vocab_size}.")
    return dict(
        vocab_size=rows,
        hidden_size=config["d_model"],
        num_hidden_layers=config["n_layers"],
        num_attention_heads=config["n_heads"],
        intermediate_size=_value(config, "mlp_hidden_size", _value(config, "mlp_ratio", 4) * config["d_model"]),
        max_position_embeddings=_value(config, "max_sequence_length", 4096),
        block_type="llama",
        adaln=False,
        rope_theta=float(_value(config, "rope_theta", 10000.0)),
        norm_eps=float(_value(config, "rms_norm_eps", 1e-5)),
        mlp_bias=False,
        head_bias=False,
        tie_word_embeddings=bool(_value(config, "weight_tying", False)),
        **{name: _value(config, name, default) for name, default in LLADA_SPECIAL_IDS.items()},
        pad_token_id=config.get("pad_token_id"),
        objective="mdlm",
    )


CONFIG_BUILDERS: dict[str, Callable[[SourceCheckpoint], dict[str, Any]]] = {
    MDLM.name: mdlm_config_kwargs,
    LLADA.name: llada_config_kwargs,
}


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
    kwargs = merge_overrides(CONFIG_BUILDERS[fmt.name](source), overrides, fmt.fixed_fields)
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(ElasticMDMConfig.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    check_special_ids(SimpleNamespace(**{**defaults, **kwargs}))  # the converter's own messages come first
    return ElasticMDMConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Planning: every source tensor mapped, every target tensor accounted for, shapes checked, before any writing
# ----------------------------------------------------------------------------------------------------------------


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


def check_rotary(source: SourceCheckpoint, config: ElasticMDMConfig) -> None:
    """MDLM stores its RoPE `inv_freq`; ours is recomputed from `rope_theta` over `head_dim`: they must agree."""
    key = "backbone.rotary_emb.inv_freq"
    if key not in source.tensors:
        return
    dim = config.head_dim
    ours = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    theirs = source.load(key).float()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=0.0):
        raise ValueError(
            f"{key} {tuple(theirs.shape)} is not RoPE base {config.rope_theta} over head_dim={dim}: the converted "
            "model would rotate differently."
        )


# ----------------------------------------------------------------------------------------------------------------
# Writing: new tensors, output shards, config / generation config / remote code, tokenizer
# ----------------------------------------------------------------------------------------------------------------


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


def load_tokenizer(folder: Path, tokenizer: str | Path | None):
    """The tokenizer to save with the model: `tokenizer` (Hub id or folder) when given, else the source folder's.
    None when the folder has no tokenizer files, or when they do not load with `AutoTokenizer` (they are then copied
    as they are). The source's remote code is never run."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, ImportError) as error:
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


def prepare_destination(dst: Path, source_folder: Path, overwrite: bool) -> None:
    """Create `dst`; a non-empty one only with `overwrite` (its old weight files are removed), never the source."""
    dst = dst.expanduser().resolve()
    if dst == source_folder.resolve():
        raise ValueError(f"dst={dst} is the source folder; write the converted model elsewhere.")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"{dst} is not empty; choose an empty folder or pass overwrite=True.")
        for stale in [*dst.glob("*.safetensors"), *dst.glob("*.safetensors.index.json")]:
            stale.unlink()
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
    check_source_format(fmt, source)
    config = build_config(fmt, source, overrides)
    check_rotary(source, config)
    model = meta_model(config)
    plan = plan_conversion(fmt, source, expected_shapes(model))
    loaded_tokenizer = load_tokenizer(folder, tokenizer)
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


# ----------------------------------------------------------------------------------------------------------------
# LoRA budget and command line
# ----------------------------------------------------------------------------------------------------------------


def lora_parameter_count(
    config: ElasticMDMConfig, r: int, target_modules: Iterable[str], modules_to_save: Iterable[str] = ()
) -> dict[str, int]:
    """Trainable parameters of peft LoRA of rank `r` plus fully trained `modules_to_save`, counted on a meta-device
    model (no memory), with peft's matching rules.

    LoRA: every `nn.Linear` named `t` or ending with `.t` for a `t` in `target_modules` gets `A: r x in` and
    `B: out x r`, i.e. `r * (in + out)` parameters. `modules_to_save`: every module whose name ends with one of the
    strings (a plain suffix: `"adaln"` also matches `final_adaln`) is trained in full. Returns
    `{"lora", "modules_to_save", "trainable", "total"}` (`total`: the parameters of the model itself).
    """
    model = meta_model(config)
    targets, saved_names = tuple(target_modules), tuple(modules_to_save)
    lora = saved = 0
    saved_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in saved_prefixes):
            continue
        if name.endswith(saved_names):  # an empty tuple matches nothing
            saved += sum(p.numel() for p in module.parameters())
            saved_prefixes.append(name + ".")
        elif isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            lora += r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    return {"lora": lora, "modules_to_save": saved, "trainable": lora + saved, "total": total}


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`["--max_gap", "2048", "--adaln=true"]` -> `{"max_gap": 2048, "adaln": True}` (values parsed as JSON when
    they are JSON, else kept as strings)."""
    overrides, index = {}, 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"Expected --field value, got {token!r}.")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ValueError(f"--{name} needs a value.")
            index += 1
            value = tokens[index]
        try:
            overrides[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name.replace("-", "_")] = value
        index += 1
    return overrides


def run_cli(converter: Callable[..., Path], argv: list[str] | None, description: str | None) -> Path:
    """`SRC DST [--dtype D] [--max_shard_size S] [--seed N] [--tokenizer T] [--revision R] [--overwrite]
    [--<config field> <value> ...]`: the converter's options, then ElasticMDMConfig overrides (after SRC DST)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("src", help="Hub repo id or local checkpoint folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: keep the source dtype)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the new modules' initialisation")
    parser.add_argument("--tokenizer", help="tokenizer to save with the model when the source has none")
    parser.add_argument("--revision")
    parser.add_argument("--overwrite", action="store_true")
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(extra)
    except ValueError as error:
        parser.error(str(error))
    options = {k: v for k, v in vars(args).items() if k not in ("src", "dst") and v is not None}
    path = converter(args.src, args.dst, **options, **overrides)
    print(f"Wrote the Elastic-MDM checkpoint {path}")
    return path


__all__ = [
    "convert_mdlm_checkpoint",
    "convert_llada_checkpoint",
    "lora_parameter_count",
    "SourceCheckpoint",
    "run_cli",
]
