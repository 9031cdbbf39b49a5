"""Shared by the test modules: the special ids and the tiny config the model and sampler tests build on."""

from __future__ import annotations

from elastic_mdm import ElasticMDMConfig

PAD, BOS, EOS, MASK = 0, 1, 2, 3
VOCAB, MAX_POS = 64, 64


def tiny_config(**overrides) -> ElasticMDMConfig:
    """2 layers x 32 hidden x 4 heads, 64 positions, special ids PAD/BOS/EOS/MASK = 0/1/2/3; `overrides` win."""
    params = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        cond_dim=16,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        mask_token_id=MASK,
    )
    params.update(overrides)
    return ElasticMDMConfig(**params)
