"""Unconditional samples of a model: drawing, decoding, writing, and their unigram entropy.

The unigram entropy of a token sequence is `H = -Σ_v p(v) log p(v)` (nats), `p` the empirical token frequencies:
the sample-diversity check of MDLM-style papers (a degenerate sampler repeating one token scores 0).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Samples:
    """Generated sequences: `ids[i]` the tokens of sample i (anchors included), `lengths` `[N]`, `texts[i]` its
    decoded text (special tokens skipped); `tokens_per_forward` the generated tokens over the denoiser passes of
    every sequence (`sampler_loop_elastic_mdm.tokens_per_forward`, pooled over the batches)."""

    ids: list[list[int]]
    lengths: torch.Tensor
    texts: list[str]
    hit_max_length: torch.Tensor | None = None  # [N] stopped by the sampler's max_length cap
    tokens_per_forward: float | None = None


def decode_samples(tokenizer, sequences: torch.Tensor, lengths: torch.Tensor) -> tuple[list[list[int]], list[str]]:
    """The first `lengths[i]` tokens of every row of `sequences` `[N, max_len]`, and their texts."""
    ids = [seq[:n].tolist() for seq, n in zip(sequences, lengths.tolist(), strict=True)]
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True)


def draw_samples(
    model,
    tokenizer,
    num_samples: int,
    *,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> Samples:
    """`num_samples` unconditional samples of `model.generate` in batches of `batch_size`."""
    ids, lengths, texts, capped = [], [], [], []
    generated_tokens, passes = 0, 0
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        out = model.generate(
            num_return_sequences=count, generator=generator, return_dict_in_generate=True, **generate_kwargs
        )
        batch_ids, batch_texts = decode_samples(tokenizer, out.sequences, out.lengths)
        ids += batch_ids
        texts += batch_texts
        lengths.append(out.lengths.cpu())
        capped.append(out.hit_max_length.cpu())
        batch_passes = int(out.sequence_passes.sum())
        generated_tokens += out.tokens_per_forward * batch_passes  # the sampler's own count, pooled over batches
        passes += batch_passes
    empty = torch.zeros(0, dtype=torch.long)
    return Samples(
        ids, torch.cat(lengths) if lengths else empty, texts, torch.cat(capped) if capped else empty.bool(),
        tokens_per_forward=generated_tokens / passes if passes else None,
    )  # fmt: skip


def write_samples(samples: Samples, path: str | Path) -> Path:
    """One JSON line `{"length", "text"}` per sample."""
    path = Path(path)
    with open(path, "w") as f:
        for text, n in zip(samples.texts, samples.lengths.tolist(), strict=True):
            f.write(json.dumps({"length": n, "text": text}) + "\n")
    return path


def unigram_entropy(tokens: Sequence[int] | torch.Tensor) -> float:
    """`H = -Σ_v p(v) log p(v)` in nats, `p(v)` the share of `tokens` equal to `v` (0 for an empty sequence)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() == 0:
        return 0.0
    p = torch.unique(tokens, return_counts=True)[1].double() / tokens.numel()
    return float(-(p * p.log()).sum())


def special_ids(tokenizer) -> tuple[int | None, ...]:
    """The ids `sample_entropy` leaves out: BOS, EOS, pad and mask (`None` where the tokenizer has none)."""
    return (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id)


def sample_entropy(sequences: Sequence[Sequence[int]], exclude_ids: Iterable[int | None] = ()) -> dict[str, float]:
    """Unigram entropy of samples (nats), the ids in `exclude_ids` (BOS, EOS, pad, mask) left out:
    `entropy_mean` the mean over samples of each sample's entropy, `entropy_pooled` the entropy of all tokens
    together."""
    drop = {i for i in exclude_ids if i is not None}
    kept = [[t for t in seq if t not in drop] for seq in sequences]
    per_sample = [unigram_entropy(seq) for seq in kept]
    return {
        "entropy_mean": sum(per_sample) / max(len(per_sample), 1),
        "entropy_pooled": unigram_entropy([t for seq in kept for t in seq]),
    }


__all__ = [
    "Samples",
    "decode_samples",
    "draw_samples",
    "sample_entropy",
    "special_ids",
    "unigram_entropy",
    "write_samples",
]
