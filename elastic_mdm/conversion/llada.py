"""The LLaDA source format (`GSAI-ML/LLaDA-8B-Base`, `block_type="llama"`): key rules and config mapping.

Every tensor is copied as is:

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
"""

from __future__ import annotations

from typing import Any

from .checkpoint_io import SourceCheckpoint
from .formats import KeyRule, SourceFormat, block_rules, config_value, require_fields

LLADA_SPECIAL_IDS = {"mask_token_id": 126336, "bos_token_id": 126080, "eos_token_id": 126081}

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
    require_fields(config, ("d_model", "n_layers", "n_heads"), "LLaDA")
    unsupported = [
        f"{name}={config[name]!r} (supported: {accepted})"
        for name, accepted in LLADA_SUPPORTED.items()
        if name in config and config[name] not in accepted
    ]
    if config_value(config, "n_kv_heads", config["n_heads"]) != config["n_heads"]:
        unsupported.append(f"n_kv_heads={config['n_kv_heads']} (grouped-query attention; need n_heads)")
    if unsupported:
        raise ValueError(f"This LLaDA checkpoint uses options the Elastic-MDM llama block lacks: {unsupported}.")
    vocab_size = config_value(config, "vocab_size")
    rows = config_value(config, "embedding_size", vocab_size)
    require_fields({"vocab_size": rows}, ["vocab_size"], "LLaDA")
    if vocab_size is not None and rows < vocab_size:
        raise ValueError(f"embedding_size={rows} is smaller than vocab_size={vocab_size}.")
    return dict(
        vocab_size=rows,
        hidden_size=config["d_model"],
        num_hidden_layers=config["n_layers"],
        num_attention_heads=config["n_heads"],
        intermediate_size=config_value(
            config, "mlp_hidden_size", config_value(config, "mlp_ratio", 4) * config["d_model"]
        ),
        max_position_embeddings=config_value(config, "max_sequence_length", 4096),
        block_type="llama",
        adaln=False,
        rope_theta=float(config_value(config, "rope_theta", 10000.0)),
        norm_eps=float(config_value(config, "rms_norm_eps", 1e-5)),
        mlp_bias=False,
        head_bias=False,
        tie_word_embeddings=bool(config_value(config, "weight_tying", False)),
        **{name: config_value(config, name, default) for name, default in LLADA_SPECIAL_IDS.items()},
        pad_token_id=config.get("pad_token_id"),
        objective="mdlm",
    )


LLADA = SourceFormat(
    name="LLaDA",
    model_type="llada",
    key_prefix="model.transformer.",
    converter="convert_llada_checkpoint (scripts/convert_llada.py)",
    rules=(
        KeyRule("model.transformer.wte.{p}", "model.embed_tokens.{p}"),
        *block_rules(
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
    config_kwargs=llada_config_kwargs,
)
