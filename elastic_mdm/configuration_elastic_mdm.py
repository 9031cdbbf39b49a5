"""Configuration of the Elastic Masked Diffusion Model (docs/design.md §4)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

BLOCK_TYPES = ("dit", "llama")
OBJECTIVES = ("elastic", "mdlm")
SPECIAL_IDS = ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
AUTO_MAP = {
    "AutoConfig": "configuration_elastic_mdm.ElasticMDMConfig",
    "AutoModel": "modeling_elastic_mdm.ElasticMDMForDiffusionLM",
    "AutoModelForMaskedLM": "modeling_elastic_mdm.ElasticMDMForDiffusionLM",
}
CUSTOM_PIPELINES = {  # where transformers.pipeline(task, model=path, trust_remote_code=True) finds the model's own
    "text-generation": {  # pipeline class (pipeline_elastic_mdm.py, saved with the checkpoint)
        "impl": "pipeline_elastic_mdm.ElasticMDMTextGenerationPipeline",
        "pt": ["AutoModel"],
        "type": "text",
    }
}


class ElasticMDMConfig(PreTrainedConfig):
    r"""Configuration of an Elastic-MDM: one bidirectional transformer backbone, a token head and a gap-count head.

    Args:
        vocab_size: Number of token ids, the mask token included.
        hidden_size: Width `d` of the residual stream.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Number of attention heads (`hidden_size` must divide by it).
        intermediate_size: Hidden width of the MLP (GELU-tanh for `dit`, SwiGLU for `llama`). Default `4 * hidden_size`.
        max_position_embeddings: Longest active sequence, anchors included (`N_max + 2`).
        block_type: `"dit"` (MDLM-compatible: weight-only LayerNorm, adaLN, fused QKV, GELU MLP) or
            `"llama"` (LLaDA-compatible: RMSNorm, separate q/k/v/o, SwiGLU, untied head).
        time_conditioning: Condition the adaLN modulation of the backbone on the noise level `s'` of the input.
            When off, the conditioning vector is the constant `silu(time_embed(0))`, as in MDLM.
        gap_noise_conditioning: Condition the gap head alone on the noise level `s'` (its input is
            `[h_a; h_b; emb(s')]`). The backbone stays independent of the step, so step caching stays exact.
        adaln: Use adaLN modulation. Always on for `dit`; optional (zero-initialised, so that a retrofitted model
            starts as the original) for `llama`.
        cond_dim: Width of the conditioning vector fed to adaLN.
        rope_theta: RoPE base.
        norm_eps: Epsilon of LayerNorm / RMSNorm.
        max_gap: Largest gap class `N_max`: the gap head predicts a removed count in `0..max_gap`.
            Default `max_position_embeddings`, also its bound (no gap of a sequence that fits can be longer).
        gap_head_type: Features of an adjacent pair `(h_a, h_b)` fed to the gap MLP: `"concat"` (`[h_a; h_b]`),
            `"sum"` (`h_a + h_b`) or `"product"` (`h_a * h_b`).
        gap_loss_weight: `λ_gap` in `loss = token_loss + λ_gap * gap_loss`.
        mlp_bias: Bias in the MLP linears (`True` in MDLM's DiT, `False` in LLaDA).
        head_bias: Bias in the token head (`True` in MDLM's DiT, `False` in LLaDA).
        tie_word_embeddings: Tie the token head to the input embedding.
        initializer_range: Std of the normal initialisation.
        mask_token_id, bos_token_id, eos_token_id, pad_token_id: Special ids. BOS may equal EOS (GPT-2 style).
        objective: The objective the checkpoint was trained with; `generate()` dispatches on it.
            `"elastic"`: the Elastic-MDM process (`ElasticMDMCollator`: active tokens only, gap head trained),
            sampled by `sample_elastic` with variable lengths. `"mdlm"`: the MDLM baseline on a fixed canvas of
            `max_position_embeddings` tokens (`MDLMCollator`: `BOS` + sequence + `EOS` + pads, the gap head unused),
            sampled by `sample_mdlm`, MDLM's ancestral sampler on that canvas.

    Example (unset sizes follow the given ones; an unknown choice raises, naming the argument):

    >>> from elastic_mdm import ElasticMDMConfig
    >>> config = ElasticMDMConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...     max_position_embeddings=24, mask_token_id=15, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    >>> config.intermediate_size, config.max_gap  # 4 * hidden_size; the gap classes 0..max_position_embeddings
    (128, 24)
    >>> ElasticMDMConfig(objective="autoregressive")
    Traceback (most recent call last):
    ValueError: objective='autoregressive' is unknown; use one of ('elastic', 'mdlm') ...
    """

    model_type = "elastic_mdm"

    def __init__(
        self,
        vocab_size: int = 50258,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1024,
        block_type: str = "dit",
        time_conditioning: bool = False,
        gap_noise_conditioning: bool = False,
        adaln: bool | None = None,
        cond_dim: int = 128,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        max_gap: int | None = None,
        gap_head_type: str = "concat",
        gap_loss_weight: float = 1.0,
        mlp_bias: bool | None = None,
        head_bias: bool | None = None,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        mask_token_id: int | None = 50257,
        bos_token_id: int | None = 50256,
        eos_token_id: int | None = 50256,
        pad_token_id: int | None = None,
        objective: str = "elastic",
        **kwargs,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(
                f"objective={objective!r} is unknown; use one of {OBJECTIVES} (the objective the checkpoint was "
                "trained with)."
            )
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type={block_type!r} is unknown; use one of {BLOCK_TYPES}.")
        if gap_head_type not in ("concat", "sum", "product"):
            raise ValueError(f"gap_head_type={gap_head_type!r} is unknown; use 'concat', 'sum' or 'product'.")
        is_dit = block_type == "dit"
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.block_type = block_type
        self.time_conditioning = time_conditioning
        self.gap_noise_conditioning = gap_noise_conditioning
        self.adaln = True if is_dit else bool(adaln)
        self.cond_dim = cond_dim
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.max_gap = max_position_embeddings if max_gap is None else max_gap
        self.gap_head_type = gap_head_type
        self.gap_loss_weight = gap_loss_weight
        self.mlp_bias = is_dit if mlp_bias is None else mlp_bias
        self.head_bias = is_dit if head_bias is None else head_bias
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.objective = objective
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.setdefault("custom_pipelines", {task: dict(info) for task, info in CUSTOM_PIPELINES.items()})
        self._check_sizes()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.check_special_ids()

    def validate(self) -> None:
        """Transformers' checks (where its config has them, e.g. at `save_pretrained`), then this config's own:
        sizes and special ids, which an attribute set after construction may have broken."""
        parent = getattr(super(), "validate", None)
        if parent is not None:
            parent()
        self._check_sizes()
        self.check_special_ids()

    def _check_sizes(self) -> None:
        """Refuse sizes that would fail later, deep inside the model or the sampler: counts below their minimum,
        `max_gap > max_position_embeddings` (the gap head's `max_gap + 1` classes are computed for every pair of
        every pass: 100000 classes cost 1.6 GB per pass, for counts no sequence can have), `norm_eps <= 0` (a zero
        variance divides by zero), a negative or non-finite `gap_loss_weight` (`loss = token_loss + λ · gap_loss`)."""
        minimum = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "max_gap": 0}
        minimum["max_position_embeddings"] = 3  # BOS, one token, EOS
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}."
            )
        if self.max_gap > self.max_position_embeddings:
            raise ValueError(
                f"max_gap={self.max_gap} exceeds max_position_embeddings={self.max_position_embeddings}: no gap of a "
                "sequence the model can hold is that long. Leave max_gap unset (it defaults to "
                "max_position_embeddings) or lower it."
            )
        for name, positive in (("norm_eps", True), ("rope_theta", True), ("gap_loss_weight", False)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}.")

    def check_special_ids(self) -> None:
        """Special ids lie in `0..vocab_size - 1`, and the mask differs from BOS and EOS (else sampling would
        overwrite the anchors). Run at construction, by `validate()`, and by `generate()` before it samples (ids can
        be set on a built config)."""
        for name in SPECIAL_IDS:
            value = getattr(self, name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name}={value!r} is not a token id of the vocabulary (0..{self.vocab_size - 1}); set it from "
                    "the tokenizer (loading.tokenizers.sync_config_with_tokenizer) or raise vocab_size."
                )
        for anchor in ("bos_token_id", "eos_token_id"):
            if self.mask_token_id is not None and self.mask_token_id == getattr(self, anchor):
                raise ValueError(
                    f"mask_token_id={self.mask_token_id} equals {anchor}: the mask token must be its own token (the "
                    "sampler replaces every mask, so it would overwrite the anchor). Give the tokenizer a mask token "
                    "(loading.tokenizers.ensure_special_tokens) and set mask_token_id to it."
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_gap_classes(self) -> int:
        """Gap classes `0..max_gap`."""
        return self.max_gap + 1


ElasticMDMConfig.register_for_auto_class()

__all__ = ["ElasticMDMConfig"]
