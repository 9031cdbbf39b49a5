"""MDLM's ancestral sampler on a fixed canvas, the baseline of Elastic-MDM (`objective="mdlm"` checkpoints).

It runs through the same denoiser protocol, packing, step cache and token sampling as `sample_elastic`
(`sampler_loop_elastic_mdm.py`), so that the two are compared on identical code; only the canvas differs: every
sequence is `max_length` tokens long, and the positions a step reveals are drawn, not inserted.
"""

from __future__ import annotations

import torch

from .sampler_loop_elastic_mdm import (
    ElasticMDMGenerateOutput,
    PassWork,
    SamplerOptions,
    TokenDenoiser,
    host_read,
    rows_where,
    run_to_end,
)
from .sampling_state_elastic_mdm import ActiveState, insert_masks, per_sequence_sum
from .stepper_elastic_mdm import Cohort, Stepper


class MDLMStepper(Stepper):
    """MDLM's ancestral sampler (see `sample_mdlm`) over every running sequence, one step at a time: each cohort
    on its own clock `k = 0 .. K - 1` and its own canvas length, one packed pass per step over the canvases with a
    revealed position (or all of them without the step cache). A step reads the device once: the positions each
    cohort reveals and the size of the pass."""

    def add(
        self,
        state: ActiveState,
        options: SamplerOptions,
        *,
        eos_token_id: int,
        gap_budget: int | None = None,
        caps: torch.Tensor | None = None,
    ) -> Cohort:
        """A cohort of the anchors `state` joins at the next step, each on a canvas of its cap (`caps` `[size]`,
        `None`: `options.max_length`) tokens; one read."""
        length = options.max_length if caps is None else caps
        canvas, template_lengths = mdlm_canvas(state, length, options.mask_token_id, options.pad_token_id, gap_budget)
        generated = canvas.tokens == options.mask_token_id  # [size * L] positions the model writes
        (num_masks,) = host_read(generated.sum())
        cohort = self.new_cohort(
            canvas, options, options.num_steps, caps, eos_token_id=eos_token_id, template_lengths=template_lengths
        )
        cohort.num_masks = num_masks
        self.generated = generated if len(self.cohorts) == 1 else torch.cat([self.generated, generated])
        return cohort

    def step(self) -> None:
        """One step of every live cohort: draw the positions it reveals, encode the canvases that need it, fill."""
        live = self.live
        if not live:
            return
        state, single = self.state, len(self.cohorts) == 1
        for cohort in live:
            self.record(cohort)
        mask_rows = rows_where(state.tokens == live[0].options.mask_token_id, sum(c.num_masks for c in self.cohorts))
        parts = [reveal_draw(c.num_masks, c.share[c.k] if not c.finished else 0.0, c.options.generator,
                             state.tokens.device) for c in self.cohorts]  # fmt: skip
        revealed = parts[0] if single else torch.cat(parts)  # [M]
        first = [c for c in live if c.k == 0 or not c.options.use_cache]  # encoded whatever it reveals
        if single and first:
            stale = torch.ones_like(self.dirty)
        else:  # encode the changed canvases with a revealed position
            needed = per_sequence_sum(revealed.long(), state.sequence_ids[mask_rows], self.batch)  # [B]
            stale = self.dirty & (needed > 0)
            if first:
                stale = stale | self.flags(first)
        if single:
            work, num_revealed = PassWork.of(state.lengths, stale, revealed.sum())  # the step's one read
        else:
            work, totals = PassWork.of(state.lengths, stale, self.per_cohort(needed))  # the step's one read
            num_revealed = [b - a for a, b in zip([0, *totals[:-1]], totals, strict=True)]
        if work.tokens > 0:
            self.encode(stale, work, self.noise_levels(live), live)
            self.dirty = self.dirty & ~stale
        rows = mask_rows[rows_where(revealed, sum(num_revealed))]  # the revealed rows [R]
        self.fill(rows, list(zip(self.cohorts, num_revealed, strict=True)), self.dirty)
        for cohort, count in zip(self.cohorts, num_revealed, strict=True):
            cohort.num_masks -= count
        for cohort in live:
            cohort.k += 1
            if cohort.finished:
                self.record(cohort)

    def on_remove(self, rows: torch.Tensor, keep: torch.Tensor) -> None:
        self.generated = self.generated[rows]

    def output_of(
        self, cohort: Cohort, canvas: ActiveState, flags: torch.Tensor | None, hit: torch.Tensor | None = None
    ) -> ElasticMDMGenerateOutput:
        """The final canvas cut: at the first generated EOS (prompts), or the gaps squeezed (templates)."""
        generated = self.generated if flags is None else self.generated[flags]
        template_lengths, eos = cohort.extra["template_lengths"], cohort.extra["eos_token_id"]
        if template_lengths is None:
            final, hit = cut_at_first_eos(canvas, generated, eos)
        else:
            final, hit = squeeze_gaps(canvas, generated, template_lengths, (eos, cohort.options.pad_token_id))
        return super().output_of(cohort, final, flags, hit)


def sample_mdlm(
    denoiser: TokenDenoiser,
    state: ActiveState,
    options: SamplerOptions,
    *,
    eos_token_id: int,
    gap_budget: int | None = None,
    caps: torch.Tensor | None = None,
) -> ElasticMDMGenerateOutput:
    r"""MDLM's ancestral (DDPM) sampler on a fixed canvas, the baseline of Elastic-MDM, on a packed batch.

    `state` holds the same anchors `sample_elastic` starts from (`ActiveState.from_inputs`); each sequence becomes a
    canvas of `L = options.max_length` tokens, the layout `MDLMCollator` trains on (BOS + sequence + EOS + pads):

    * prompt / unconditional (`gap_budget=None`; the only open gap is the one before EOS):
      `[BOS, p_1 .. p_m, MASK × (L - 1 - m)]`: EOS is dropped, the model writes where the sequence ends;
    * template (`gap_budget=g`): every open gap becomes `g` masks, the template's EOS stays, and fixed pads fill the
      canvas up to `L` (the pads MDLM saw after EOS in training).

    With `F` the reveal schedule (`F(0) = 0`, `F(K) = 1`; for MDLM's `α_t`, `F(k) = α_{t_k}`, `t_k = 1 - k/K`), the
    input of step `k` has each maskable position revealed with probability `F(k)`:
    ```
    for k = 0 .. K-1:
        R = every [MASK] independently with prob. q_k = (F(k+1) - F(k)) / (1 - F(k))     (q_{K-1} = 1)
        h = f(x, F(k))                                   one pass; noise level F(k) = MDLMCollator's 1 - t
        x[i] ~ p_θ(· | h_i) for i in R                   same token processors as Elastic-MDM
    ```
    This is MDLM's `_ddpm_update` (`q(x_s | x_t, x_0 ~ p_θ)`, unmask with `(α_s - α_t) / (1 - α_t)`) written with
    the reveal draw first, which has the same law. After `k` steps the number of revealed positions of a
    sequence is `Binomial(#maskable, F(k))`; after `K` steps none is masked.

    `options.use_cache` (MDLM's `ddpm_cache`; exact unless the model is time-conditioned): a sequence is encoded only
    at a step that reveals one of its positions, and its last pass is reused when its canvas did not change since.
    With `use_cache=False` every step runs one full pass (`K · B · L` tokens), MDLM's plain sampler. The random draws do
    not depend on `use_cache`, so both give the same samples for a fixed `generator`. Like `sample_elastic`, the loop
    reads the device once per step (the number of revealed positions and the size of the pass).

    Output: prompt / unconditional sequences end at the first EOS generated after the prompt (length = its index + 1);
    with none, the length is `L` and `hit_max_length` is set. Templates keep every anchor and every generated token
    except the pad / EOS tokens inside a gap; `hit_max_length` flags a template with a gap that used its whole budget
    (its value may be cut). `trajectory[k]` (`k = 0..K`) is the canvas fed to step `k`, `trajectory[K]` the final one.
    `options.on_draft(canvas)`, when given, sees the canvas after the fill of every step (unrevealed positions still
    masks).
    """
    stepper = MDLMStepper(denoiser)
    cohort = stepper.add(state, options, eos_token_id=eos_token_id, gap_budget=gap_budget, caps=caps)
    return run_to_end(stepper, cohort, "mdlm")


def reveal_draw(count: int, prob: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`[count]` independent `Bernoulli(prob)` flags: which masked positions a step reveals (all at `prob >= 1`, none
    at `prob <= 0`; only the strictly fractional case draws random numbers)."""
    if prob >= 1.0 or prob <= 0.0 or count == 0:
        return torch.full((count,), prob >= 1.0, dtype=torch.bool, device=device)
    return torch.rand(count, generator=generator, dtype=torch.float64, device=device) < prob


def mdlm_canvas(
    anchors: ActiveState, length: int | torch.Tensor, mask_token_id: int, pad_token_id: int, gap_budget: int | None
) -> tuple[ActiveState, torch.Tensor | None]:
    """The MDLM canvases of `anchors` (see `sample_mdlm`), `length` tokens each (one int, or `[B]`), and, for
    templates, the length of each filled template `[B]` (its rows after that are the fixed pad tail); `None` for
    prompts."""
    if gap_budget is None:
        is_last = torch.zeros_like(anchors.open_after).index_fill_(0, anchors.last_rows(), True)
        if not torch.equal(anchors.open_after, is_last.roll(-1)):
            raise ValueError(
                "MDLM has no gaps that grow: only a prompt (one open gap before EOS) can be continued without a "
                "budget; give gap_budget (generate(): mdlm_gap_budget) to fill a template's open gaps."
            )
        body, tail_token = anchors.select(~is_last), mask_token_id  # drop EOS: the model writes the end
        template_lengths = None
    else:
        counts = anchors.open_after.long() * gap_budget  # [T] masks after each open token
        body, _ = insert_masks(anchors, counts, mask_token_id)
        tail_token, template_lengths = pad_token_id, body.lengths
    excess, row = (body.lengths - length).max(0)
    if int(excess) > 0:
        what = "A prompt" if gap_budget is None else f"A template with mdlm_gap_budget={gap_budget} masks per gap"
        canvas = length if isinstance(length, int) else int(length[row])
        raise ValueError(
            f"{what} has {int(body.lengths[row])} tokens, more than its canvas length (max_length or the prompt "
            f"plus max_new_tokens) of {canvas}."
        )
    counts = torch.zeros_like(body.tokens).index_put_((body.last_rows(),), length - body.lengths)
    canvas, _ = insert_masks(body, counts, tail_token)  # the tail is inserted after each last token
    canvas.open_after.zero_()
    return canvas, template_lengths


def cut_at_first_eos(
    canvas: ActiveState, generated: torch.Tensor, eos_token_id: int
) -> tuple[ActiveState, torch.Tensor]:
    """Each sequence up to its first generated EOS (included), or the whole canvas with `hit_max_length` set."""
    position = canvas.positions()  # [T]
    ends = (generated & (canvas.tokens == eos_token_id)).nonzero().squeeze(-1)
    lengths = canvas.lengths.scatter_reduce(0, canvas.sequence_ids[ends], position[ends] + 1, reduce="amin")
    ended = torch.zeros_like(canvas.lengths, dtype=torch.bool).index_fill_(0, canvas.sequence_ids[ends], True)
    return canvas.select(position < lengths[canvas.sequence_ids]), ~ended


def squeeze_gaps(
    canvas: ActiveState, generated: torch.Tensor, template_lengths: torch.Tensor, stop_ids: tuple[int, int]
) -> tuple[ActiveState, torch.Tensor]:
    """Each filled template without the pad / EOS tokens generated in its gaps, nor the pad tail; flags the
    templates with a gap holding no such token (it used its whole budget)."""
    stop = generated & torch.isin(canvas.tokens, torch.tensor(stop_ids, device=canvas.tokens.device))  # [T]
    gap = (~generated).long().cumsum(0)  # [T] one id per run of generated rows (after its fixed left neighbour)
    gap_stopped = torch.zeros(canvas.tokens.numel() + 1, dtype=torch.bool, device=stop.device)
    gap_stopped.index_fill_(0, gap[stop], True)
    full = generated & ~gap_stopped[gap]  # rows of the gaps that used their whole budget
    hit = torch.zeros_like(canvas.lengths, dtype=torch.bool).index_fill_(0, canvas.sequence_ids[full], True)
    keep = (canvas.positions() < template_lengths[canvas.sequence_ids]) & ~stop
    return canvas.select(keep), hit
