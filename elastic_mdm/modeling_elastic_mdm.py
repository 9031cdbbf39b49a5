"""Elastic Masked Diffusion Model: packed bidirectional backbone, token head and gap-count head (docs/design.md §2, §4).

The model always computes on a *packed* batch: one flat token stream `[tokens]` cut into sequences by
`cu_seqlens` (`[batch + 1]`, int32, starting at 0). Positions (RoPE) restart at 0 in every sequence; attention
never crosses a boundary. A padded batch (`[batch, length]` + `attention_mask`) is packed on entry and the outputs
are unpacked back to `[batch, length, ...]`. The layers live in `layers_elastic_mdm.py`, the attention backends
in `attention_elastic_mdm.py`, `generate()` in `generation_elastic_mdm.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

from .configuration_elastic_mdm import ElasticMDMConfig
from .generation_config_elastic_mdm import ElasticMDMGenerationConfig
from .generation_elastic_mdm import ElasticMDMGenerationMixin
from .layers_elastic_mdm import (
    TIME_SCALE,
    ElasticMDMAdaLN,
    ElasticMDMBlock,
    ElasticMDMGapHead,
    ElasticMDMNorm,
    ElasticMDMRotaryEmbedding,
    ElasticMDMTimestepEmbedder,
    make_norm,
    modulate,
    per_token,
    rope_inv_freq,
)
from .packing_elastic_mdm import PackedSequences, TargetRows, pack_padded, supervised_rows, unpack_to_padded
from .pipeline_elastic_mdm import ElasticMDMTextGenerationPipeline  # noqa: F401  (saved with the checkpoint)
from .weights_elastic_mdm import non_finite_message

IGNORE_INDEX = -100
logger = logging.get_logger(__name__)


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

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Transformers' `from_pretrained`, then a warning naming the first tensor that holds NaN or infinity
        (such weights load without an error and sample garbage; the command-line tools refuse them)."""
        loaded = super().from_pretrained(*args, **kwargs)
        source = kwargs.get("pretrained_model_name_or_path", args[0] if args else "the checkpoint")
        message = non_finite_message(loaded[0] if isinstance(loaded, tuple) else loaded, repr(str(source)))
        if message is not None:
            logger.warning(message)
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) linears and embeddings; unit norms; zero adaLN (DiT), so every block starts
        as the identity map (`dit`) or as the unmodulated block (`llama`)."""
        if isinstance(module, ElasticMDMAdaLN):  # checked per leaf: Transformers skips parameter-less parents
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, ElasticMDMNorm):
            init.ones_(module.weight)
        elif isinstance(module, ElasticMDMRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(self.config))


@dataclass
class ElasticMDMModelOutput(BaseModelOutput):
    """`BaseModelOutput` of `ElasticMDMModel`; with `return_packed=True` also the packed layout of `last_hidden_state`
    `[tokens, d]` (`packed`) and the padded row of each token (`flat_index` `[tokens]`, `None` for packed inputs)."""

    packed: PackedSequences | None = None
    flat_index: torch.Tensor | None = None


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
        check_bounds: bool = True,
        return_packed: bool = False,
        **kwargs,
    ) -> ElasticMDMModelOutput:
        """Features `h = f(x, s')` of a packed (`[tokens]` + `cu_seqlens`) or padded (`[batch, length]` +
        `attention_mask`) batch: `last_hidden_state` in the layout of `input_ids` (`[tokens, d]` or
        `[batch, length, d]`), or, with `return_packed`, always the packed `[tokens, d]` with its `packed` layout and
        the padded row of each token `flat_index` (`None` for a packed input), as the heads read them.
        `check_bounds=False`: see `pack_inputs`."""
        flat_ids, packed, flat_index = self.pack_inputs(
            input_ids, attention_mask, cu_seqlens, max_seqlen, noise_level, check_bounds=check_bounds
        )
        hidden = self.forward_packed(flat_ids, packed, noise_level)  # [tokens, d]
        if return_packed:
            return ElasticMDMModelOutput(last_hidden_state=hidden, packed=packed, flat_index=flat_index)
        if flat_index is not None:
            hidden = unpack_to_padded(hidden, flat_index, input_ids.shape)  # [batch, length, d]
        return ElasticMDMModelOutput(last_hidden_state=hidden)

    def pack_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        noise_level: torch.Tensor | None,
        check_bounds: bool = True,
    ) -> tuple[torch.Tensor, PackedSequences, torch.Tensor | None]:
        """Validate a packed (`[tokens]` + `cu_seqlens`) or padded (`[batch, length]` + `attention_mask`) batch and
        return the flat ids, their `PackedSequences`, and the padded row of each token (`None` if already packed).
        `check_bounds=False` skips the one device read that checks `cu_seqlens`, `max_seqlen` and the id range: for
        bounds a collator built and read already."""
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
        if check_bounds:
            self._check_packed(input_ids, cu_seqlens, max_seqlen, noise_level)
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

    def _check_packed(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        noise_level: torch.Tensor | None = None,
    ) -> None:
        """`cu_seqlens` runs from 0 to the number of tokens without decreasing, `max_seqlen` is at least the longest
        sequence, every id has an embedding row and every noise level is a share in [0, 1] (NaN is not); one
        read-back for all of it."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        level_ok = cu_seqlens.new_ones(()) if noise_level is None else ((noise_level >= 0) & (noise_level <= 1)).all()
        values = (cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max(), *input_ids.aminmax())
        values = (*values, level_ok.to(cu_seqlens.device))
        first, last, shortest, longest, low, high, levels = torch.stack([v.long() for v in values]).tolist()
        if not levels:
            raise ValueError(
                "noise_level must hold the share s' of active interior positions of each sequence, a number in "
                f"[0, 1]; got values outside it or NaN: {noise_level.flatten()[:8].tolist()}."
            )
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
        the input's `s'` (`[rows]`, or one float for every row), read only by a noise-conditioned gap head.

        Without autograd (sampling) the pairs are one gather from the view `[T - 1, 2, d]` whose row `i` is
        `(h_i, h_{i+1})`; under it, two gathers (the gradient of `h` then sums its terms in the same order)."""
        if torch.is_grad_enabled() and hidden.requires_grad:
            return self.gap_head(hidden[left], hidden[left + 1], noise_level)
        pairs = hidden.unfold(0, 2, 1).transpose(1, 2)  # [T - 1, 2, d], a view of hidden
        return self.gap_head.pair_logits(pairs[left], noise_level)

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
        target_rows: TargetRows | None = None,
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
            target_rows: how many tokens carry a label and a gap label, known on the host: the training collators
                read them with the batch's bounds in their one device read, so that a training step reads the
                device once. With them the loss selects its rows without a read-back and the bounds the collator
                built are not checked again; leave unset for batches built by hand.
        """
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} is unknown; use one of {LOSS_REDUCTIONS}.")
        features = self.model(
            input_ids,
            attention_mask,
            cu_seqlens,
            max_seqlen,
            noise_level,
            check_bounds=target_rows is None,
            return_packed=True,
        )
        hidden, packed, flat_index = features.last_hidden_state, features.packed, features.flat_index  # [tokens, d]
        has_targets = labels is not None or gap_labels is not None
        if return_logits is None:
            return_logits = not has_targets

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or flat_index is None else x.flatten()[flat_index]

        token_loss = gap_loss = loss = None
        if has_targets:
            token_loss, gap_loss = self.diffusion_losses(
                hidden, packed, flat(labels), flat(gap_labels), flat(label_weights), loss_reduction, noise_level,
                target_rows,
            )  # fmt: skip
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
        target_rows: TargetRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token CE over masks and gap CE over supervised pairs; the heads run on those rows only (selected without a
        device read when `target_rows` gives their counts)."""
        batch = packed.batch_size
        zero = hidden.sum() * 0.0 if reduction == "mean" else hidden.new_zeros(batch, dtype=torch.float32)
        token_loss = gap_loss = zero
        if labels is not None:
            rows = supervised_rows(labels != IGNORE_INDEX, target_rows and target_rows.tokens)
            weights = None if label_weights is None else label_weights[rows].float()
            logits = self.token_logits(hidden[rows])
            sequences = packed.sequence_ids[rows]
            token_loss = reduce_cross_entropy(
                logits, labels[rows], sequences, batch, reduction, weights, num_tokens=hidden.shape[0]
            )
        if gap_labels is not None:
            flags = (gap_labels != IGNORE_INDEX) & ~packed.last_token_mask()
            rows = supervised_rows(flags, target_rows and target_rows.gaps)
            logits = self.gap_logits(hidden, rows, row_levels(noise_level, packed.sequence_ids[rows]))
            gap_loss = reduce_cross_entropy(logits, gap_labels[rows], packed.sequence_ids[rows], batch, reduction)
        return token_loss, gap_loss


ElasticMDMForDiffusionLM.register_for_auto_class("AutoModel")

__all__ = [
    "ElasticMDMPreTrainedModel",
    "ElasticMDMModel",
    "ElasticMDMModelOutput",
    "ElasticMDMForDiffusionLM",
    "ElasticMDMOutput",
]
