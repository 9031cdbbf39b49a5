"""The MDLM source format (`kuleshov-group/mdlm-owt`, `block_type="dit"`): key rules and config mapping.

Every tensor is copied as is (the layouts already agree, MDLM's fused `(3, H, D)` qkv included):

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
"""

from __future__ import annotations

from typing import Any

import torch

from ..configuration_elastic_mdm import ElasticMDMConfig
from .checkpoint_io import SourceCheckpoint
from .formats import ARCHITECTURE_FIELDS, KeyRule, SourceFormat, block_rules, config_value, require_fields

GPT2_END_OF_TEXT = 50256  # `<|endoftext|>`: BOS and EOS of MDLM's GPT-2 vocabulary


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
    if config_value(config, "backbone", "dit") != "dit":
        raise ValueError(f"Only MDLM's DiT backbone converts; this checkpoint has backbone={config['backbone']!r}.")
    fields = {
        "hidden_dim": config_value(config, "hidden_dim", nested.get("hidden_size")),
        "n_blocks": config_value(config, "n_blocks", nested.get("n_blocks")),
        "n_heads": config_value(config, "n_heads", nested.get("n_heads")),
        "cond_dim": config_value(config, "cond_dim", nested.get("cond_dim")),
    }
    require_fields(fields, fields, "MDLM")
    embedding = source.tensors.get("backbone.vocab_embed.embedding")
    vocab_size = config_value(config, "vocab_size", embedding.shape[0] if embedding else None)
    require_fields({"vocab_size": vocab_size}, ["vocab_size"], "MDLM")
    return dict(
        vocab_size=vocab_size,
        hidden_size=fields["hidden_dim"],
        num_hidden_layers=fields["n_blocks"],
        num_attention_heads=fields["n_heads"],
        intermediate_size=4 * fields["hidden_dim"],
        max_position_embeddings=config_value(config, "model_length", nested.get("length", 1024)),
        block_type="dit",
        adaln=True,
        time_conditioning=bool(config_value(config, "time_conditioning", False)),
        cond_dim=fields["cond_dim"],
        rope_theta=10000.0,
        norm_eps=1e-5,
        mlp_bias=True,
        head_bias=True,
        tie_word_embeddings=False,
        mask_token_id=config_value(config, "mask_token_id", vocab_size - 1),
        bos_token_id=config_value(config, "bos_token_id", GPT2_END_OF_TEXT),
        eos_token_id=config_value(config, "eos_token_id", GPT2_END_OF_TEXT),
        pad_token_id=config.get("pad_token_id"),
        objective="mdlm",
    )


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


MDLM = SourceFormat(
    name="MDLM",
    model_type="mdlm",
    key_prefix="backbone.",
    converter="convert_mdlm_checkpoint (scripts/convert_mdlm.py)",
    rules=(
        KeyRule("backbone.vocab_embed.embedding", "model.embed_tokens.weight"),
        KeyRule("backbone.sigma_map.mlp.0.{p}", "model.time_embed.mlp.0.{p}"),
        KeyRule("backbone.sigma_map.mlp.2.{p}", "model.time_embed.mlp.2.{p}"),
        *block_rules(
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
    config_kwargs=mdlm_config_kwargs,
    checked_keys=("backbone.rotary_emb.inv_freq",),
    fixed_fields=(*ARCHITECTURE_FIELDS, "cond_dim", "adaln"),
    verify=check_rotary,
)
