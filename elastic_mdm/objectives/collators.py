"""The Elastic-MDM forward process and the collator that packs training batches (docs/design.md §1-2).

A clean sequence `x0 = (BOS, y_1..y_n, EOS)` plus any other anchors (prompt, template tokens) is corrupted at a
pair of reveal levels `(s, s') = (F(k-1), F(k))` with one uniform `u_i` per interior position:

| state   | condition        | in the model input       |
|---------|------------------|--------------------------|
| clean   | `u_i < s`        | its token                |
| mask    | `s <= u_i < s'`  | `[MASK]`, target `x0_i`  |
| removed | `u_i >= s'`      | no                       |

The compact input keeps the active tokens in order; the gap target of every adjacent active pair `(a, b)` is the
number of removed positions between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..device_reads_elastic_mdm import host_read, per_sequence_sum, rows_where
from ..modeling_elastic_mdm import IGNORE_INDEX
from ..packing_elastic_mdm import PackedSequences, TargetRows, cu_seqlens_from_lengths
from ..schedules_elastic_mdm import NoiseLevelSampler

TARGET_TOKENS = "num_target_tokens"  # batch key: n + 1 (interior tokens and EOS) per sequence, for bits per token


def corrupt_packed(
    tokens: torch.Tensor,  # [N] clean tokens of all sequences, concatenated
    sequence_ids: torch.Tensor,  # [N] sorted sequence index of each token
    anchor_mask: torch.Tensor,  # [N] True for tokens never noised (BOS, EOS, prompt, template)
    clean_share: torch.Tensor,  # [B] s = F(k-1)
    active_share: torch.Tensor,  # [B] s' = F(k)
    uniforms: torch.Tensor,  # [N] u_i ~ U(0, 1)
    mask_token_id: int,
    next_share: torch.Tensor | None = None,  # [B] F(k+1), for the NELBO's gap terms
) -> dict[str, torch.Tensor | int]:
    """Apply the forward process to a packed batch of clean sequences and build every training target.

    Returns the compact packed input `input_ids` `[T]`, `cu_seqlens` `[B + 1]`, `max_seqlen`, token targets
    `labels` `[T]` (clean token at masks, -100 elsewhere), gap targets `gap_labels` `[T]` (removed count between
    token i and the next active token of its sequence, -100 on the last token) and `noise_level` `[B]` (= s').
    With `next_share` `[B]` (`s'' = F(k+1)`), also `gap_reveals` `[T]`: how many of each gap's removed positions the
    forward process reveals at the next step (`s' <= u_i < s''`), the `m` of the NELBO's gap term.
    """
    u = uniforms.masked_fill(anchor_mask, -1.0)  # anchors are always clean
    clean = u < clean_share.to(u.dtype)[sequence_ids]
    active = u < active_share.to(u.dtype)[sequence_ids]
    mask = active & ~clean
    removed_before = (~active).long().cumsum(0)  # [N] removed positions up to and including i

    lengths = per_sequence_sum(active.long(), sequence_ids, active_share.numel())  # [B] active tokens
    # the one device read of the forward process (and of the training step: the model trusts these bounds)
    num_active, longest, num_masks = host_read(lengths.sum(), lengths.max(), mask.sum())
    keep = rows_where(active, num_active)  # [T] source row of each active token
    gaps = removed_before[keep].diff(append=removed_before[keep][-1:])  # removed between kept j and kept j+1
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    last = cu_seqlens[1:].long() - 1
    gaps[last] = IGNORE_INDEX  # last token of a sequence has no right neighbour

    out = {
        "input_ids": tokens.masked_fill(mask, mask_token_id)[keep],
        "labels": tokens.masked_fill(~mask, IGNORE_INDEX)[keep],
        "gap_labels": gaps,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": longest,
        "noise_level": active_share.float(),
        "target_rows": TargetRows(tokens=num_masks, gaps=num_active - lengths.numel()),  # all pairs but the last
    }
    if next_share is not None:
        revealed = (~active & (u < next_share.to(u.dtype)[sequence_ids])).long().cumsum(0)  # [N]
        reveals = revealed[keep].diff(append=revealed[keep][-1:])  # [T] revealed next step between j and j + 1
        out["gap_reveals"] = reveals.index_fill(0, last, IGNORE_INDEX)
    return out


def concat_sequences(
    features: Sequence[dict[str, Any]],
    bos_token_id: int,
    eos_token_id: int,
    mask_token_id: int,
    max_length: int,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the sequences (flat tokens `[N]`, anchor flags `[N]`, lengths `[B]`), refusing what the process
    cannot model: an empty batch, a missing BOS/EOS, a mask token in clean data, an id outside `0..vocab_size - 1`
    (`-100` padding included), a sequence over `max_length`. The features are host data: no device read."""
    if len(features) == 0:
        raise ValueError("The batch is empty: the collator got no features.")
    sequences = [torch.as_tensor(f["input_ids"], dtype=torch.long).flatten() for f in features]
    lengths = torch.tensor([len(s) for s in sequences])
    if int(lengths.min()) < 2:
        raise ValueError("Every sequence needs at least BOS and EOS (length >= 2).")
    if int(lengths.max()) > max_length:
        i = int(lengths.argmax())
        raise ValueError(
            f"Sequence {i} has {int(lengths[i])} tokens, more than max_length={max_length} "
            "(the model's max_position_embeddings); split long documents into chunks before collating."
        )
    tokens = torch.cat(sequences)
    ends = cu_seqlens_from_lengths(lengths).long()
    if bool((tokens[ends[:-1]] != bos_token_id).any()):
        raise ValueError(f"Every sequence must start with BOS ({bos_token_id}); tokenize with it added.")
    if bool((tokens[ends[1:] - 1] != eos_token_id).any()):
        raise ValueError(f"Every sequence must end with EOS ({eos_token_id}); tokenize with it added.")
    check_clean_ids(sequences, tokens, mask_token_id, vocab_size)
    if all("anchor_mask" in f for f in features):
        masks = [torch.as_tensor(f["anchor_mask"]).flatten().bool() for f in features]
        for i, (anchor, seq) in enumerate(zip(masks, sequences, strict=True)):
            if anchor.numel() != seq.numel():
                raise ValueError(
                    f"anchor_mask of feature {i} has {anchor.numel()} entries but its input_ids {seq.numel()} tokens; "
                    "give one entry per token of the same feature."
                )
        anchors = torch.cat(masks)
    elif any("anchor_mask" in f for f in features):
        raise ValueError("Give anchor_mask for every feature of the batch or for none.")
    else:
        anchors = torch.zeros_like(tokens, dtype=torch.bool)
    anchors[ends[:-1]] = True  # BOS
    anchors[ends[1:] - 1] = True  # EOS
    return tokens, anchors, lengths


def check_clean_ids(
    sequences: list[torch.Tensor], tokens: torch.Tensor, mask_token_id: int, vocab_size: int | None
) -> None:
    """Refuse clean ids outside `0..vocab_size - 1` (negative ids such as `-100` always) and the mask token, naming
    the first feature of the batch that holds one (`tokens` `[N]` is the concatenation of `sequences`, on the host)."""
    high = torch.iinfo(torch.long).max if vocab_size is None else vocab_size
    if not bool(((tokens < 0) | (tokens >= high) | (tokens == mask_token_id)).any()):
        return
    for i, seq in enumerate(sequences):
        outside = seq[(seq < 0) | (seq >= high)]
        if outside.numel():
            vocabulary = "" if vocab_size is None else f" (the vocabulary is 0..{vocab_size - 1})"
            raise ValueError(
                f"Feature {i} of the batch holds the id {int(outside[0])}{vocabulary}: input_ids must be token ids "
                "of the model's tokenizer (-100 pads labels, never input_ids)."
            )
        if bool((seq == mask_token_id).any()):
            raise ValueError(
                f"Feature {i} of the batch contains the mask token ({mask_token_id}); clean data must not (tokenize "
                "text with split_special_tokens=True, so that a literal mask token in it stays text)."
            )


@dataclass
class PackingCollator:
    """Packs clean sequences and applies a forward process to them.

    `collator(features)` returns a training batch. With `defer_noise=True` it returns the packed *clean* batch
    (`clean_ids`, `anchor_mask`, `clean_cu_seqlens`) and `collator.apply_noise(batch)` corrupts it later, on the
    batch's device with the global RNG: what `ElasticMDMTrainer` does, so that the noise runs on the GPU and a resumed
    run draws exactly the noise of the original one (the Trainer checkpoints the RNG states). Otherwise the noise
    comes from the collator's own generator, seeded with `seed`.
    """

    mask_token_id: int
    bos_token_id: int
    eos_token_id: int
    max_length: int
    seed: int | None = None
    defer_noise: bool = False
    vocab_size: int | None = None  # with it, ids outside 0..vocab_size - 1 are refused (always: negative ids)
    generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.reset_generator()

    def reset_generator(self) -> None:
        """Restart the noise stream from `seed` (evaluation sees the same noise every time)."""
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor | int]:
        tokens, anchors, lengths = concat_sequences(
            features, self.bos_token_id, self.eos_token_id, self.mask_token_id, self.max_length, self.vocab_size
        )
        clean = {
            "clean_ids": tokens,
            "anchor_mask": anchors,
            "clean_cu_seqlens": cu_seqlens_from_lengths(lengths),
            TARGET_TOKENS: lengths - 1,
        }
        return clean if self.defer_noise else self.apply_noise(clean, self.generator)

    def apply_noise(self, clean: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """The training batch of a packed clean batch (same device)."""
        raise NotImplementedError

    @staticmethod
    def is_clean(batch: dict) -> bool:
        return "clean_ids" in batch


def draw(shape: int, clean: dict, generator: torch.Generator | None) -> torch.Tensor:
    """`U(0, 1)` float64 draws on the batch's device (from `generator` on its own device, moved if needed)."""
    device = clean["clean_ids"].device
    on = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=on).to(device)


@dataclass
class ElasticMDMCollator(PackingCollator):
    """Turns tokenized sequences into one packed Elastic-MDM training batch (one forward pass per batch).

    Each feature is a dict with `input_ids` (a full clean sequence `BOS .. EOS`) and optionally `anchor_mask`
    (1 for tokens never noised, e.g. a prompt; BOS and EOS are anchors regardless). Every sequence gets its own
    noise pair `(s, s')` from `noise_sampler` (paper §4.4 randomisation).

    Use it as the `data_collator` of a `Trainer` (with `remove_unused_columns=False`).
    """

    noise_sampler: NoiseLevelSampler = field(default_factory=NoiseLevelSampler)

    def apply_noise(self, clean: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        tokens, cu = clean["clean_ids"], clean["clean_cu_seqlens"]
        batch = cu.numel() - 1
        packed = PackedSequences.from_cu_seqlens(cu, max_seqlen=0, num_tokens=tokens.numel())  # max unused here
        clean_share, active_share = self.noise_sampler(batch, generator=generator, device=tokens.device)  # [B] each
        uniforms = draw(tokens.numel(), clean, generator)
        out = corrupt_packed(
            tokens,
            packed.sequence_ids,
            clean["anchor_mask"],
            clean_share.to(tokens.device),
            active_share.to(tokens.device),
            uniforms,
            self.mask_token_id,
        )
        return {**out, TARGET_TOKENS: clean[TARGET_TOKENS]}


@dataclass
class MDLMCollator(PackingCollator):
    r"""Fixed-length MDLM batch on the same backbone (the baseline objective).

    Each sequence `BOS .. EOS` is padded to a canvas of `max_length` tokens with `pad_token_id` (EOS when unset); a
    time `t_b ~ U(eps, 1)` per sequence (antithetic: `t_b = (u + b/B) mod 1`) masks every non-anchor position with
    probability `t_b` (linear schedule `α_t = 1 - t`). MDLM's continuous-time NELBO is
    `E_t[(1/t) Σ_{masked i} -log p_θ(x0_i | x_t)]`; with the token weights `1/t_b` the model's `token_loss` is MDLM's
    training loss (normalised by all canvas positions) and its per-sequence sums are NELBO estimates.
    """

    pad_token_id: int | None = None
    eps: float = 1e-3

    def apply_noise(self, clean: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        tokens, anchors, cu = clean["clean_ids"], clean["anchor_mask"].clone(), clean["clean_cu_seqlens"].long()
        device, batch, length = tokens.device, cu.numel() - 1, self.max_length
        pad = self.eos_token_id if self.pad_token_id is None else self.pad_token_id
        packed = PackedSequences.from_cu_seqlens(cu, max_seqlen=length, num_tokens=tokens.numel())
        canvas_rows = packed.padded_index()  # row of each token in the [B * L] canvas
        canvas = torch.full((batch * length,), pad, dtype=torch.long, device=device).index_copy(0, canvas_rows, tokens)
        anchors[cu[1:] - 1] = False  # EOS and pads are predicted: they carry the length
        fixed = torch.zeros(batch * length, dtype=torch.bool, device=device).index_copy(0, canvas_rows, anchors)

        offset = draw(1, clean, generator)
        t = self.eps + (1 - self.eps) * ((offset + torch.arange(batch, device=device) / batch) % 1.0)  # [B]
        per_position = t[:, None].expand(batch, length).reshape(-1)  # [B * L] t_b of every canvas position
        mask = (draw(batch * length, clean, generator) < per_position) & ~fixed
        weights = (1.0 / per_position).float()
        (num_masks,) = host_read(mask.sum())  # the one device read of the step
        return {
            "input_ids": canvas.masked_fill(mask, self.mask_token_id),
            "labels": canvas.masked_fill(~mask, IGNORE_INDEX),
            "label_weights": weights.masked_fill(~mask, 0.0),
            "cu_seqlens": torch.arange(batch + 1, dtype=torch.int32, device=device) * length,
            "max_seqlen": length,
            "noise_level": (1.0 - t).float(),
            "target_rows": TargetRows(tokens=num_masks, gaps=0),
            TARGET_TOKENS: clean[TARGET_TOKENS],
        }


__all__ = [
    "IGNORE_INDEX",
    "TARGET_TOKENS",
    "corrupt_packed",
    "concat_sequences",
    "check_clean_ids",
    "PackingCollator",
    "ElasticMDMCollator",
    "MDLMCollator",
]
