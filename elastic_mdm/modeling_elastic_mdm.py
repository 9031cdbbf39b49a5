"""Elastic Masked Diffusion Model: packed bidirectional backbone, token head and gap-count head (docs/design.md §2, §4).

The model always computes on a *packed* batch: one flat token stream `[tokens]` cut into sequences by
`cu_seqlens` (`[batch + 1]`, int32, starting at 0). Positions (RoPE) restart at 0 in every sequence; attention
never crosses a boundary. A padded batch (`[batch, length]` + `attention_mask`) is packed on entry and the outputs
are unpacked back to `[batch, length, ...]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .configuration_elastic_mdm import ElasticMDMConfig
from .generation_config_elastic_mdm import ElasticMDMGenerationConfig
from .generation_elastic_mdm import ElasticMDMGenerationMixin
from .packing import PackedSequences, pack_padded, unpack_to_padded
from .pipeline_elastic_mdm import ElasticMDMTextGenerationPipeline  # noqa: F401  (saved with the checkpoint)

try:  # optional fast path: pip install flash-attn
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # torch >= 2.10 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on torch
    varlen_attn = None

IGNORE_INDEX = -100
TIME_SCALE = 1000.0  # noise levels in [0, 1] are fed to the sinusoidal time embedding as 1000 * level
VARLEN_ATTN = "varlen_attn"  # attn_implementation name of torch.nn.attention.varlen.varlen_attn


# ----------------------------------------------------------------------------------------------------------------
# Attention backends over a packed stream: q, k, v are [tokens, heads, head_dim]
# ----------------------------------------------------------------------------------------------------------------


def _padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences, eager: bool
) -> torch.Tensor:
    """Pad each sequence to `max_seqlen`, attend with a key-padding mask, unpad. Portable (CPU, any dtype)."""
    batch, length, (_, heads, dim) = packed.batch_size, packed.max_seqlen, q.shape
    index = packed.padded_index()  # [tokens]

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # [tokens, H, D] -> [B, H, L, D]
        out = x.new_zeros(batch * length, heads, dim).index_copy(0, index, x)
        return out.view(batch, length, heads, dim).transpose(1, 2)

    valid = torch.arange(length, device=q.device) < packed.lengths[:, None]  # [B, L]
    key_mask = valid[:, None, None, :]  # [B, 1, 1, L]
    qp, kp, vp = to_padded(q), to_padded(k), to_padded(v)
    if eager:
        scores = (qp.float() @ kp.float().transpose(-1, -2)) / math.sqrt(dim)  # [B, H, L, L]
        scores = scores.masked_fill(~key_mask, float("-inf"))
        out = (scores.softmax(-1) @ vp.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask)
    return out.transpose(1, 2).reshape(batch * length, heads, dim)[index]


def half_precision(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run a flash kernel (fp16/bf16 only) on bf16 copies of fp32 inputs and cast the output back."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return kernel(q, k, v, *args, **kwargs)
    return kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args, **kwargs).to(q.dtype)


def eager_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """Reference attention, softmax(q kᵀ / √d) v in fp32 per sequence."""
    return _padded_attention(q, k, v, packed, eager=True)


def sdpa_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on the padded layout with a key-padding mask."""
    return _padded_attention(q, k, v, packed, eager=False)


def torch_varlen_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.10): no padding, bidirectional window."""
    if varlen_attn is None or not q.is_cuda:
        raise RuntimeError(
            f"attn_implementation='{VARLEN_ATTN}' needs torch >= 2.10 and CUDA tensors (got device {q.device}); "
            "use attn_implementation='sdpa' on CPU."
        )
    cu = packed.cu_seqlens
    return half_precision(varlen_attn, q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen)


def flash_attention_2(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """`flash_attn.flash_attn_varlen_func` (pip install flash-attn), non-causal."""
    if flash_attn_varlen_func is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package: pip install flash-attn."
        )
    cu, length = packed.cu_seqlens, packed.max_seqlen
    return half_precision(flash_attn_varlen_func, q, k, v, cu, cu, length, length, causal=False)


ATTENTION_FUNCTIONS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    VARLEN_ATTN: torch_varlen_attention,
    "flash_attention_2": flash_attention_2,
}


def _register_varlen_attn_name() -> None:
    """Make `attn_implementation="varlen_attn"` a name Transformers accepts (it validates against its registry)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def hf_varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        # Transformers' convention: [1, heads, tokens, dim] with cu_seq_lens kwargs
        packed = PackedSequences.from_cu_seqlens(cu_seq_lens_q, max_length_q)
        out = torch_varlen_attention(*(x[0].transpose(0, 1) for x in (query, key, value)), packed)
        return out[None], None

    if VARLEN_ATTN not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(VARLEN_ATTN, hf_varlen_attention)


_register_varlen_attn_name()


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class ElasticMDMLayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32 (MDLM's DiT): `LN(x) * w`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).to(x.dtype)


class ElasticMDMRMSNorm(nn.Module):
    """RMSNorm computed in fp32: `x / sqrt(mean(x²) + eps) * w`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).to(x.dtype)


def make_norm(config: ElasticMDMConfig) -> nn.Module:
    norm = ElasticMDMLayerNorm if config.block_type == "dit" else ElasticMDMRMSNorm
    return norm(config.hidden_size, eps=config.norm_eps)


class ElasticMDMRotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention): `cos`, `sin` of `position * θ^(-2i/d)` in fp32, `[tokens, head_dim]`."""

    def __init__(self, config: ElasticMDMConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

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
        attention = ATTENTION_FUNCTIONS[self.config._attn_implementation or "sdpa"]
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
        if self.pair == "concat":
            features = torch.cat([left, right], dim=-1)
        else:
            features = left + right if self.pair == "sum" else left * right
        if self.time_embed is not None:
            if noise_level is None:
                raise ValueError("This gap head is conditioned on the noise level (gap_noise_conditioning): pass it.")
            level = torch.as_tensor(noise_level, dtype=torch.float32, device=left.device).reshape(-1)
            cond = F.silu(self.time_embed(TIME_SCALE * level)).to(features.dtype)  # [rows or 1, cond]
            features = torch.cat([features, cond.expand(features.shape[0], -1)], dim=-1)
        return self.out_proj(F.gelu(self.dense(features), approximate="tanh"))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class ElasticMDMPreTrainedModel(PreTrainedModel):
    config_class = ElasticMDMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ElasticMDMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) linears and embeddings; unit norms; zero adaLN (DiT), so every block starts
        as the identity map (`dit`) or as the unmodulated block (`llama`)."""
        if isinstance(module, ElasticMDMAdaLN):  # checked per leaf: Transformers skips parameter-less parents
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, (ElasticMDMLayerNorm, ElasticMDMRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, ElasticMDMRotaryEmbedding):
            dim = self.config.head_dim
            exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
            init.copy_(module.inv_freq, 1.0 / (self.config.rope_theta**exponent))


class ElasticMDMModel(ElasticMDMPreTrainedModel):
    """The backbone: embeddings, blocks and the final (modulated) norm. Returns the features `h` both heads read."""

    def __init__(self, config: ElasticMDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.time_embed = ElasticMDMTimestepEmbedder(config) if config.adaln else None
        self.rotary_emb = ElasticMDMRotaryEmbedding(config)
        self.layers = nn.ModuleList(ElasticMDMBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.final_adaln = ElasticMDMAdaLN(config.cond_dim, 2 * config.hidden_size) if config.adaln else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def conditioning(self, noise_level: torch.Tensor | None, packed: PackedSequences) -> torch.Tensor | None:
        """`c = silu(time_embed(1000 · s'))` per sequence `[batch, cond]`; when `time_conditioning` is off, the
        constant `silu(time_embed(0))` `[1, cond]` (MDLM)."""
        if self.time_embed is None:
            return None
        if not self.config.time_conditioning:
            zero = torch.zeros(1, device=self.embed_tokens.weight.device)
            return F.silu(self.time_embed(zero))
        if noise_level is None:
            noise_level = torch.ones(packed.batch_size, device=packed.cu_seqlens.device)
        return F.silu(self.time_embed(TIME_SCALE * noise_level))

    def forward_packed(
        self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features `h` `[tokens, d]` of a packed stream `input_ids` `[tokens]`."""
        x = self.embed_tokens(input_ids)  # [tokens, d]
        cond = self.conditioning(noise_level, packed)
        rope = self.rotary_emb(packed.position_ids)
        for layer in self.layers:
            x = layer(x, cond, rope, packed)
        x = self.norm(x)
        if self.final_adaln is not None:
            shift, scale = per_token(self.final_adaln(cond), packed).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        noise_level: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        flat_ids, packed, flat_index = self.pack_inputs(input_ids, attention_mask, cu_seqlens, max_seqlen, noise_level)
        hidden = self.forward_packed(flat_ids, packed, noise_level)
        if flat_index is not None:
            hidden = unpack_to_padded(hidden, flat_index, input_ids.shape)
        return BaseModelOutput(last_hidden_state=hidden)

    def pack_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        noise_level: torch.Tensor | None,
    ) -> tuple[torch.Tensor, PackedSequences, torch.Tensor | None]:
        """Validate a packed (`[tokens]` + `cu_seqlens`) or padded (`[batch, length]` + `attention_mask`) batch and
        return the flat ids, their `PackedSequences`, and the padded row of each token (`None` if already packed)."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.device != self.embed_tokens.weight.device:
            raise ValueError(
                f"input_ids is on {input_ids.device} but the model is on {self.embed_tokens.weight.device}; "
                "move the inputs with .to(model.device)."
            )
        flat_index = None
        if input_ids.numel() == 0:
            raise ValueError("The batch is empty: input_ids holds no sequence.")
        if input_ids.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError(
                    "Pass either a padded input_ids [batch, length] or a packed input_ids [tokens] with cu_seqlens."
                )
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
                    "give one mask entry per token (1 = real token, 0 = padding)."
                )
            flat_index, cu_seqlens, max_seqlen = pack_padded(attention_mask.bool())
            input_ids = input_ids.flatten()[flat_index]
        elif input_ids.dim() != 1 or cu_seqlens is None or cu_seqlens.dim() != 1:
            raise ValueError("A packed batch needs input_ids of shape [tokens] and cu_seqlens of shape [batch + 1].")
        if cu_seqlens.numel() < 2 or input_ids.numel() == 0:
            raise ValueError("The batch is empty: input_ids holds no sequence.")
        self._check_packed(input_ids, cu_seqlens, max_seqlen)
        packed = PackedSequences.from_cu_seqlens(cu_seqlens, max_seqlen, num_tokens=input_ids.numel())
        if packed.max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"A sequence has {packed.max_seqlen} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; split it or use a model with a larger position table."
            )
        if noise_level is not None and noise_level.shape != (packed.batch_size,):
            raise ValueError(
                f"noise_level must have shape [batch]=({packed.batch_size},), got {tuple(noise_level.shape)}."
            )
        return input_ids, packed, flat_index

    def _check_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None) -> None:
        """`cu_seqlens` runs from 0 to the number of tokens without decreasing, `max_seqlen` is at least the longest
        sequence, and every id has an embedding row; one read-back for all of it."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        values = (cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max(), *input_ids.aminmax())
        first, last, shortest, longest, low, high = torch.stack([v.long() for v in values]).tolist()
        if [first, last] != [0, input_ids.numel()]:
            raise ValueError(
                f"cu_seqlens must run from 0 to the number of tokens ({input_ids.numel()}), got {first}..{last}."
            )
        if shortest < 0:
            raise ValueError("cu_seqlens must not decrease: it holds the cumulative sequence lengths [0, l_0, ...].")
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(
                f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest} tokens); pass the true "
                "longest length, or leave max_seqlen unset."
            )
        vocab = self.embed_tokens.num_embeddings
        if low < 0 or high >= vocab:
            raise ValueError(
                f"input_ids holds ids {low}..{high} outside the vocabulary 0..{vocab - 1}; tokenize with the "
                "model's tokenizer (or resize the embeddings to it)."
            )


@dataclass
class ElasticMDMOutput(ModelOutput):
    """Output of `ElasticMDMForDiffusionLM`.

    `logits` `[tokens, vocab]` (or `[batch, length, vocab]` for a padded input): token distribution at every
    position; `gap_logits` `[tokens, max_gap + 1]`: distribution of the removed count between a token and the next
    one of its sequence (undefined on the last token of each sequence). With targets, `loss = token_loss +
    gap_loss_weight * gap_loss` and the logits are only returned when `return_logits=True`.
    """

    loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    gap_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    gap_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


LOSS_REDUCTIONS = ("mean", "sequence")


def row_levels(noise_level: torch.Tensor | None, sequence_ids: torch.Tensor) -> torch.Tensor:
    """The noise level `s'` of each row `[rows]` from the per-sequence levels `[batch]` (1 when not given)."""
    if noise_level is None:
        return torch.ones(sequence_ids.shape, device=sequence_ids.device)
    return noise_level.to(sequence_ids.device)[sequence_ids]


def reduce_cross_entropy(
    logits: torch.Tensor,  # [rows, classes]
    targets: torch.Tensor,  # [rows]
    sequence_ids: torch.Tensor,  # [rows]
    batch_size: int,
    reduction: str,
    weights: torch.Tensor | None = None,  # [rows]
    num_tokens: int = 1,
) -> torch.Tensor:
    """CE of the given rows reduced to a scalar or to per-sequence sums `[batch]`.

    `mean`: the mean over rows (0 when there are none, so empty-interior batches stay finite), or with weights
    `Σ_i w_i CE_i / num_tokens` (MDLM: `1/t` weights, normalised by every position of the canvas);
    `sequence`: `Σ_{i in b} w_i CE_i` per sequence `b` (the NELBO terms).
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # [rows]
    if weights is not None:
        ce = ce * weights
    if reduction == "sequence":
        return ce.new_zeros(batch_size).index_add(0, sequence_ids, ce)
    return ce.sum() / (num_tokens if weights is not None else max(ce.numel(), 1))


class ElasticMDMForDiffusionLM(ElasticMDMGenerationMixin, ElasticMDMPreTrainedModel):
    """Elastic-MDM: backbone + token head `p_θ(x | x_k)` + gap-count head `p_φ(g | h_a, h_b)` + the sampler.

    Training loss of one forward pass (docs/design.md §2):
    `L = mean_{masks} -log p_θ(x0_i | x_k) + λ_gap · mean_{adjacent pairs} -log p_φ(g_ab | h_a, h_b)`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    generation_config_class = ElasticMDMGenerationConfig
    accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer scales it for gradient accumulation

    def __init__(self, config: ElasticMDMConfig):
        super().__init__(config)
        self.model = ElasticMDMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.head_bias)
        self.gap_head = ElasticMDMGapHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits `[rows, vocab]`; the mask token is never predicted (its logit is -inf)."""
        logits = self.lm_head(hidden)
        if self.config.mask_token_id is not None:
            logits[..., self.config.mask_token_id] = float("-inf")
        return logits

    def gap_logits(
        self, hidden: torch.Tensor, left: torch.Tensor, noise_level: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Gap logits `[rows, max_gap + 1]` for the pairs `(left, left + 1)` of the packed stream; `noise_level` is
        the input's `s'` (`[rows]`, or one float for every row), read only by a noise-conditioned gap head."""
        return self.gap_head(hidden[left], hidden[left + 1], noise_level)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        noise_level: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        gap_labels: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        return_logits: bool | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> ElasticMDMOutput:
        r"""
        Args:
            input_ids: `[tokens]` packed (with `cu_seqlens`) or `[batch, length]` padded (with `attention_mask`).
            cu_seqlens: `[batch + 1]` sequence boundaries of a packed stream; `max_seqlen` its longest sequence.
            noise_level: `[batch]` share `s'` of interior positions active; conditions adaLN when
                `time_conditioning` is on (default 1).
            labels: same layout as `input_ids`; the clean token at every mask, -100 elsewhere.
            gap_labels: same layout; at token `i`, the removed count between `i` and the next token, -100 where
                there is no pair (last token) or no supervision.
            label_weights: same layout; per-token weights of the token CE, e.g. MDLM's `1/t`; then
                `token_loss = Σ_i w_i CE_i / tokens` (MDLM's loss).
            loss_reduction: `"mean"` (training) or `"sequence"`: losses are per-sequence sums `[batch]` (NELBO).
            return_logits: return full logits alongside the loss (default: only without targets).
        """
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} is unknown; use one of {LOSS_REDUCTIONS}.")
        model = self.model
        flat_ids, packed, flat_index = model.pack_inputs(input_ids, attention_mask, cu_seqlens, max_seqlen, noise_level)
        hidden = model.forward_packed(flat_ids, packed, noise_level)  # [tokens, d]
        has_targets = labels is not None or gap_labels is not None
        if return_logits is None:
            return_logits = not has_targets

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or flat_index is None else x.flatten()[flat_index]

        token_loss = gap_loss = loss = None
        if has_targets:
            token_loss, gap_loss = self.diffusion_losses(
                hidden, packed, flat(labels), flat(gap_labels), flat(label_weights), loss_reduction, noise_level
            )
            loss = token_loss + self.config.gap_loss_weight * gap_loss

        logits = gap = None
        if return_logits:
            logits = self.token_logits(hidden)
            # pair (i, i + 1) for every token; the wrap-around row of each sequence's last token is meaningless
            gap = self.gap_head(hidden, hidden.roll(-1, dims=0), row_levels(noise_level, packed.sequence_ids))
        if flat_index is not None:
            shape = input_ids.shape
            logits, gap = unpack_to_padded(logits, flat_index, shape), unpack_to_padded(gap, flat_index, shape)
            hidden = unpack_to_padded(hidden, flat_index, shape)
        return ElasticMDMOutput(
            loss=loss,
            token_loss=token_loss,
            gap_loss=gap_loss,
            logits=logits,
            gap_logits=gap,
            hidden_states=hidden if output_hidden_states else None,
        )

    def diffusion_losses(
        self,
        hidden: torch.Tensor,  # [tokens, d]
        packed: PackedSequences,
        labels: torch.Tensor | None,  # [tokens]
        gap_labels: torch.Tensor | None,  # [tokens]
        label_weights: torch.Tensor | None = None,  # [tokens]
        reduction: str = "mean",
        noise_level: torch.Tensor | None = None,  # [batch] s'
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token CE over masks and gap CE over supervised pairs; the heads run on those rows only."""
        batch = packed.batch_size
        zero = hidden.sum() * 0.0 if reduction == "mean" else hidden.new_zeros(batch, dtype=torch.float32)
        token_loss = gap_loss = zero
        if labels is not None:
            rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
            weights = None if label_weights is None else label_weights[rows].float()
            logits = self.token_logits(hidden[rows])
            sequences = packed.sequence_ids[rows]
            token_loss = reduce_cross_entropy(
                logits, labels[rows], sequences, batch, reduction, weights, num_tokens=hidden.shape[0]
            )
        if gap_labels is not None:
            rows = ((gap_labels != IGNORE_INDEX) & ~packed.last_token_mask()).nonzero().squeeze(-1)
            logits = self.gap_logits(hidden, rows, row_levels(noise_level, packed.sequence_ids[rows]))
            gap_loss = reduce_cross_entropy(logits, gap_labels[rows], packed.sequence_ids[rows], batch, reduction)
        return token_loss, gap_loss


ElasticMDMForDiffusionLM.register_for_auto_class("AutoModel")

__all__ = [
    "ElasticMDMPreTrainedModel",
    "ElasticMDMModel",
    "ElasticMDMForDiffusionLM",
    "ElasticMDMOutput",
    "ATTENTION_FUNCTIONS",
]
