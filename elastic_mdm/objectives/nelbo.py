r"""The Elastic-MDM NELBO: an upper bound on `-log p_model(x0)`, comparable with MDLM's (docs/design.md, NELBO).

For a K-step process with reveal schedule `F`, position `i` is revealed (becomes a mask) at step `k_i` with
probability `F(k_i) - F(k_i - 1)`. From step k to k + 1 each of the `g` removed positions of a gap is revealed with
probability `q_k = (F(k+1) - F(k)) / (1 - F(k))`; the sampler inserts `m` masks into the gap with probability
`P_k(m) = Σ_{g' >= m} p_φ(g' | z_k) C(g', m) q_k^m (1 - q_k)^(g' - m)`. The insertion counts of every gap at every
step identify, with `x0`, the reveal step of every position, so

    NELBO(x0) = E_q [ Σ_{k=1..K} Σ_{masks i of z_k} -log p_θ(x0_i | z_k) + Σ_{k=0..K-1} Σ_{gaps of z_k} l_k(g, m) ]
    l_k(g, m) = -log Σ_{g' >= m} p_φ(g' | z_k) C(g', m) (1 - q_k)^(g' - g)            (q_k^m cancels)

The estimator takes the step-0 term exactly and draws one `k ~ U{1..K}` per sequence:
`[Σ_gaps l_0] + K · [token CE at step k + Σ_gaps l_k(g, m)]`, with `m` the forward process's own reveals at the
next step; bits per token divide by `n + 1` (interior tokens and EOS), the count MDLM's bound uses. The training
loss `-log p_φ(g)` overstates each gap term by `log C(g, m) >= 0` and is not a bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing_elastic_mdm import PackedSequences
from ..schedules_elastic_mdm import RevealSchedule, check_num_steps, get_schedule, reveal_probability
from .collators import IGNORE_INDEX, TARGET_TOKENS, PackingCollator, corrupt_packed, draw


def log_binomial(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`log C(n, k)` for `0 <= k <= n` (float64, broadcast)."""
    n, k = n.double(), k.double()
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def gap_nelbo_terms(
    log_probs: torch.Tensor,  # [rows, max_gap + 1] log p_φ(g' | z_k)
    gaps: torch.Tensor,  # [rows] g: removed positions of the gap at step k
    reveals: torch.Tensor,  # [rows] m: of those, revealed at step k + 1
    reveal_prob: torch.Tensor,  # [rows] q_k
) -> torch.Tensor:
    """`l_k(g, m) = -log Σ_{g' >= m} p_φ(g') C(g', m) (1 - q_k)^(g' - g)` per row `[rows]` (float64).

    `q_k = 0` (nothing revealed, m = 0) gives 0; `q_k = 1` (all revealed, m = g) gives `-log p_φ(g)`."""
    classes = torch.arange(log_probs.shape[-1], device=log_probs.device, dtype=torch.float64)[None]  # [1, G + 1]
    g, m, q = gaps.double()[:, None], reveals.double()[:, None], reveal_prob.double()[:, None]
    possible = classes >= m  # [rows, G + 1]
    choose = log_binomial(classes.clamp_min(m), m)
    keep = torch.where(classes == g, torch.zeros_like(choose), (classes - g) * torch.log1p(-q))  # log (1-q)^(g'-g)
    terms = (log_probs.double() + choose + keep).masked_fill(~possible, float("-inf"))
    return -torch.logsumexp(terms, dim=-1)


@dataclass
class ElasticNELBOCollator(PackingCollator):
    """Held-out batches for the NELBO estimator of a fixed K-step process (`num_steps`, `schedule`).

    The step-0 term (the length model) is a large share of the bound and costs one short pass, so it is taken
    exactly rather than sampled: every sequence appears twice, at `k = 0` with weight 1 and at `k ~ U{1..K}` with
    weight K (`nelbo_weight` `[2B]`; the estimate of a sequence is the weighted sum of its two terms, unbiased for the
    NELBO with a far smaller variance than one `k ~ U{0..K}` scaled by `K + 1`). Each copy is corrupted at
    `(s, s') = (F(k-1), F(k))` (`F(-1) = 0`); the batch also holds `gap_reveals` (`m` of every gap, from the same
    uniforms at `s'' = F(k+1)`, `F(K+1) = 1`) and `reveal_prob` `q_k` `[2B]`. `num_target_tokens` counts each
    sequence once (0 on the second copy).
    """

    schedule: str | RevealSchedule = "linear"
    num_steps: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_steps(self.num_steps)  # before the [K + 1] table of apply_noise is ever built
        self.schedule = get_schedule(self.schedule)

    def apply_noise(self, clean: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        tokens, cu, anchors = clean["clean_ids"], clean["clean_cu_seqlens"], clean["anchor_mask"]
        batch, device = cu.numel() - 1, tokens.device
        later = (draw(batch, clean, generator) * self.num_steps).floor().long() + 1  # [B] k ~ U{1..K}
        steps = torch.cat([torch.zeros_like(later), later])  # [2B]: every sequence at k = 0, then at k
        table = self.schedule.table(self.num_steps, device=device)  # [K + 1] F(0..K)
        extended = torch.cat([table.new_zeros(1), table, table.new_ones(1)])  # F(-1), F(0..K), F(K+1)
        clean_share, active_share, next_share = extended[steps], extended[steps + 1], extended[steps + 2]
        twice = torch.cat([cu[:-1], cu[:-1] + cu[-1], 2 * cu[-1:]])  # [2B + 1]: starts of both copies, end
        packed = PackedSequences.from_cu_seqlens(twice, max_seqlen=0, num_tokens=2 * tokens.numel())
        out = corrupt_packed(
            tokens.repeat(2),
            packed.sequence_ids,
            anchors.repeat(2),
            clean_share,
            active_share,
            draw(2 * tokens.numel(), clean, generator),
            self.mask_token_id,
            next_share=next_share,
        )
        weights = torch.cat(
            [torch.ones(batch, device=device), torch.full((batch,), float(self.num_steps), device=device)]
        )
        targets = clean[TARGET_TOKENS]
        return {
            **out,
            "reveal_prob": reveal_probability(active_share, next_share),
            "nelbo_weight": weights.double(),
            TARGET_TOKENS: torch.cat([targets, torch.zeros_like(targets)]),
        }


NELBO_KEYS = ("gap_reveals", "reveal_prob", "nelbo_weight", TARGET_TOKENS)


def elastic_nelbo_terms(
    model, batch: dict, context_lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence step terms `[B]` (nats) of one `ElasticNELBOCollator` batch: the token CE of the masks and
    `Σ_gaps l_k(g, m)`. The NELBO estimate is `Σ nelbo_weight · (token + gap)` over the copies of a sequence.

    With `context_lengths` `[B]` (sequences that start with that many anchors: BOS and a context), the gaps between
    two context tokens are closed, as in `generate(input_ids=...)`, which never draws them: they are left out of the
    bound (docs/design.md §2b, §5); all 1 (BOS alone) changes nothing."""
    inputs = {k: v for k, v in batch.items() if k not in NELBO_KEYS and k != "gap_labels"}
    out = model(**inputs, loss_reduction="sequence", output_hidden_states=True, return_logits=False)
    hidden = out.hidden_states  # [T, d]
    cu = batch["cu_seqlens"]
    packed = PackedSequences.from_cu_seqlens(cu, batch["max_seqlen"], batch["input_ids"].numel())
    gaps = batch["gap_labels"]
    supervised = (gaps != IGNORE_INDEX) & ~packed.last_token_mask()  # [T]
    if context_lengths is not None:  # open gaps only: from the context's last token onwards
        supervised &= packed.position_ids >= context_lengths.to(cu.device)[packed.sequence_ids] - 1
    rows = supervised.nonzero().squeeze(-1)  # [pairs]
    sequences = packed.sequence_ids[rows]
    levels = batch["noise_level"][sequences]
    log_probs = model.gap_logits(hidden, rows, levels).float().log_softmax(-1)  # [pairs, G + 1]
    terms = gap_nelbo_terms(log_probs, gaps[rows], batch["gap_reveals"][rows], batch["reveal_prob"][sequences])
    gap = terms.new_zeros(cu.numel() - 1).index_add(0, sequences, terms)
    return out.token_loss.double(), gap


__all__ = ["log_binomial", "gap_nelbo_terms", "ElasticNELBOCollator", "elastic_nelbo_terms", "NELBO_KEYS"]
