"""The layers of the Elastic-MDM backbone and its gap-count head: norms, RoPE, the noise-level embedding, adaLN,
attention, MLP, the transformer block (`dit` = MDLM's DiT, `llama` = LLaDA's block) and `ElasticMDMGapHead`
(docs/design.md §2). Every layer works on a packed stream `[tokens, ...]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_elastic_mdm import attention_function
from .configuration_elastic_mdm import ElasticMDMConfig
from .packing_elastic_mdm import PackedSequences

TIME_SCALE = 1000.0  # noise levels in [0, 1] are fed to the sinusoidal time embedding as 1000 * level


class ElasticMDMNorm(nn.Module):
    """A weight-only normalisation computed in fp32: `normalize(x) * w`, `normalize` the subclass's `kernel`."""

    kernel: Callable[..., torch.Tensor]

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.kernel(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).to(x.dtype)


class ElasticMDMLayerNorm(ElasticMDMNorm):
    """Weight-only LayerNorm computed in fp32 (MDLM's DiT): `LN(x) * w`."""

    kernel = staticmethod(F.layer_norm)


class ElasticMDMRMSNorm(ElasticMDMNorm):
    """RMSNorm computed in fp32: `x / sqrt(mean(x²) + eps) * w`."""

    kernel = staticmethod(F.rms_norm)


def make_norm(config: ElasticMDMConfig) -> ElasticMDMNorm:
    """The norm of the block type: LayerNorm for `dit`, RMSNorm for `llama`."""
    norm = ElasticMDMLayerNorm if config.block_type == "dit" else ElasticMDMRMSNorm
    return norm(config.hidden_size, eps=config.norm_eps)


def rope_inv_freq(config: ElasticMDMConfig) -> torch.Tensor:
    """`[head_dim / 2]` RoPE frequencies `θ^(-2i/d)` in fp32."""
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class ElasticMDMRotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention): `cos`, `sin` of `position * θ^(-2i/d)` in fp32, `[tokens, head_dim]`."""

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Move the frequencies with the module but keep them fp32: `model.to(torch.bfloat16)` (what DeepSpeed's bf16
        engine does) would otherwise round `θ^(-2i/d)` to bf16, i.e. ~0.2 rad of angle at position 1024."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]  # [tokens, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [tokens, head_dim]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` in fp32 for `x` `[tokens, heads, head_dim]`."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class ElasticMDMTimestepEmbedder(nn.Module):
    """Noise level -> conditioning vector: sinusoidal features (256) -> Linear -> SiLU -> Linear (MDLM's
    `sigma_map`)."""

    frequency_dim = 256

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_dim, config.cond_dim), nn.SiLU(), nn.Linear(config.cond_dim, config.cond_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # [batch, half]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [batch, 256]
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ElasticMDMAdaLN(nn.Linear):
    """adaLN modulation `c -> (shift, scale, gate, ...)`: a linear layer initialised to zero (see `_init_weights`)."""


def per_token(modulation: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
    """Per-sequence adaLN outputs `[batch, k·d]` to per-token rows `[tokens, k·d]` (a `[1, k·d]` one broadcasts)."""
    return modulation if modulation.shape[0] == 1 else modulation[packed.sequence_ids]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift`."""
    return x * (1 + scale) + shift


class ElasticMDMAttention(nn.Module):
    """Bidirectional multi-head attention over a packed stream (fused QKV for `dit`, separate q/k/v for `llama`)."""

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        self.config = config
        attention_function(config._attn_implementation)  # an attention without a packed kernel is refused here
        d = config.hidden_size
        if config.block_type == "dit":
            self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], packed: PackedSequences
    ) -> torch.Tensor:
        shape = (x.shape[0], self.config.num_attention_heads, self.config.head_dim)
        if self.config.block_type == "dit":
            q, k, v = self.qkv_proj(x).view(x.shape[0], 3, *shape[1:]).unbind(1)  # each [tokens, H, D]
        else:
            q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attention = attention_function(self.config._attn_implementation)
        return self.o_proj(attention(q, k, v, packed).reshape(x.shape))


class ElasticMDMMLP(nn.Module):
    """`dit`: `W2 gelu_tanh(W1 x)`; `llama`: `W_down (silu(W_gate x) * W_up x)`."""

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.block_type == "llama"
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class ElasticMDMBlock(GradientCheckpointingLayer):
    r"""Pre-norm transformer block with optional adaLN.

    `x <- x + g_a * Attn(mod(N(x), shift_a, scale_a))`, `x <- x + g_m * MLP(mod(N(x), shift_m, scale_m))`
    where `(shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = adaLN(c)`. The gate is `g = gate` for `dit`
    (MDLM) and `g = 1 + gate` for `llama`, so that a zero-initialised adaLN leaves a converted LLaDA unchanged.
    """

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        self.input_norm = make_norm(config)
        self.attn = ElasticMDMAttention(config)
        self.post_attention_norm = make_norm(config)
        self.mlp = ElasticMDMMLP(config)
        self.adaln = ElasticMDMAdaLN(config.cond_dim, 6 * config.hidden_size) if config.adaln else None
        self.gate_offset = 0.0 if config.block_type == "dit" else 1.0

    def forward(
        self,
        x: torch.Tensor,  # [tokens, d]
        cond: torch.Tensor | None,  # [batch or 1, cond_dim]
        rope: tuple[torch.Tensor, torch.Tensor],
        packed: PackedSequences,
    ) -> torch.Tensor:
        if self.adaln is None:
            x = x + self.attn(self.input_norm(x), rope, packed)
            return x + self.mlp(self.post_attention_norm(x))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = per_token(self.adaln(cond), packed).chunk(6, dim=-1)
        x = x + (self.gate_offset + gate_a) * self.attn(modulate(self.input_norm(x), shift_a, scale_a), rope, packed)
        return x + (self.gate_offset + gate_m) * self.mlp(modulate(self.post_attention_norm(x), shift_m, scale_m))


class ElasticMDMGapHead(nn.Module):
    """Gap-count head `p_φ(g | h_a, h_b[, s'])`: MLP on the pair features, `max_gap + 1` logits.

    With `gap_noise_conditioning`, the pair features are concatenated with `silu(emb(1000 · s'))`, the embedding of
    the input's noise level `s'`: the head knows the step without the backbone depending on it, so a step whose
    input did not change can reuse the backbone's last pass exactly.
    """

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        d = config.hidden_size
        self.pair = config.gap_head_type
        conditioned = config.gap_noise_conditioning
        self.time_embed = ElasticMDMTimestepEmbedder(config) if conditioned else None
        pair_dim = 2 * d if self.pair == "concat" else d
        self.dense = nn.Linear(pair_dim + (config.cond_dim if conditioned else 0), d)
        self.out_proj = nn.Linear(d, config.num_gap_classes)

    def forward(
        self,
        left: torch.Tensor,  # [rows, d]
        right: torch.Tensor,  # [rows, d]
        noise_level: torch.Tensor | float | None = None,  # [rows] or one level for every row
    ) -> torch.Tensor:
        """Logits `[rows, max_gap + 1]` of the pairs `(left_i, right_i)`."""
        features = torch.cat([left, right], dim=-1) if self.pair == "concat" else self.combine(left, right)
        return self.classify(features, noise_level)

    def pair_logits(
        self,
        pairs: torch.Tensor,  # [rows, 2, d] (h_a, h_b) stacked
        noise_level: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """`forward(pairs[:, 0], pairs[:, 1])` of stacked pairs: `[h_a; h_b]` is then a view, not a concatenation."""
        features = pairs.flatten(1) if self.pair == "concat" else self.combine(pairs[:, 0], pairs[:, 1])
        return self.classify(features, noise_level)

    def combine(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The `sum` (`h_a + h_b`) or `product` (`h_a * h_b`) pair features `[rows, d]`."""
        return left + right if self.pair == "sum" else left * right

    def classify(self, features: torch.Tensor, noise_level: torch.Tensor | float | None) -> torch.Tensor:
        """`out_proj(gelu(dense([features; silu(emb(1000 · s'))])))`, the noise embedding with
        `gap_noise_conditioning` only."""
        if self.time_embed is not None:
            if noise_level is None:
                raise ValueError("This gap head is conditioned on the noise level (gap_noise_conditioning): pass it.")
            if isinstance(noise_level, torch.Tensor):
                level = noise_level.to(device=features.device, dtype=torch.float32).reshape(-1)  # [rows] or [1]
            else:  # one level for every row, filled on the device (a host-to-device copy would stall the stream)
                level = torch.full((1,), float(noise_level), dtype=torch.float32, device=features.device)
            cond = F.silu(self.time_embed(TIME_SCALE * level)).to(features.dtype)  # [rows or 1, cond]
            features = torch.cat([features, cond.expand(features.shape[0], -1)], dim=-1)
        return self.out_proj(F.gelu(self.dense(features), approximate="tanh"))
