"""MDLM's ancestral sampler on a fixed canvas, the baseline of Elastic-MDM (`objective="mdlm"` checkpoints).

It runs through the same denoiser protocol, packing, step cache and token sampling as `sample_elastic`
(`sampler_loop_elastic_mdm.py`), so that the two are compared on identical code; only the canvas differs: every
sequence is `max_length` tokens long, and the positions a step reveals are drawn, not inserted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .device_reads_elastic_mdm import host_read, per_sequence_sum, rows_where
from .sampler_loop_elastic_mdm import (
    ElasticMDMGenerateOutput,
    PassWork,
    SamplerOptions,
    TokenDenoiser,
    run_to_end,
)
from .sampling_state_elastic_mdm import ActiveState, insert_masks
from .stepper_elastic_mdm import Cohort, Stepper


class MDLMStepper(Stepper):
    """MDLM's ancestral sampler (see `sample_mdlm`) over every running sequence, one step at a time: each cohort
    on its own clock `k = 0 .. K - 1` and its own canvas length, one packed pass per step over the canvases with a
    revealed position (or all of them without the step cache). A step reads the device once: the positions each
    cohort reveals and the size of the pass. When one cohort runs, its last step (`q_{K-1} = 1`: it reveals every
    remaining mask) is planned by the read of the step before (`planned`) and reads nothing, so that the read of
    the output (the cut lengths, known only after that step's fill) keeps a run at `1 + K` reads."""

    planned: tuple[torch.Tensor, PassWork] | None = None  # the next step's encoded sequences `[B]` and pass

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
        `None`: `options.max_length`) tokens; one read (`mdlm_canvas`)."""
        length = options.max_length if caps is None else caps
        canvas = mdlm_canvas(state, length, options.mask_token_id, options.pad_token_id, gap_budget)
        generated = canvas.state.tokens == options.mask_token_id  # [size * L] positions the model writes
        cohort = self.new_cohort(
            canvas.state, options, options.num_steps, caps, eos_token_id=eos_token_id,
            template_lengths=canvas.template_lengths,
        )  # fmt: skip
        cohort.num_masks = canvas.num_masks
        self.generated = generated if len(self.cohorts) == 1 else torch.cat([self.generated, generated])
        self.planned = None  # a plan made without the new cohort
        if len(self.cohorts) == 1 and cohort.share[0] >= 1.0:  # K = 1: its one step encodes and reveals all
            work = PassWork(cohort.size, canvas.state.tokens.numel(), canvas.longest)
            self.planned = (torch.ones_like(self.dirty), work)
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
        if self.planned is not None:  # planned by the last step's read: this step reveals every mask
            (stale, work), self.planned = self.planned, None
            num_revealed = [cohort.num_masks for cohort in self.cohorts]
        else:
            stale, work, num_revealed = self.plan(live, revealed, mask_rows)
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

    def plan(
        self, live: list[Cohort], revealed: torch.Tensor, mask_rows: torch.Tensor
    ) -> tuple[torch.Tensor, PassWork, list[int]]:
        """The step's one read: the canvases it encodes `stale` `[B]` (changed since their last pass and with a
        revealed position, or all of a cohort at its first step or without the cache), the size of that pass and
        the positions each cohort reveals (`revealed` `[M]` over the masked rows `mask_rows` `[M]`). When one cohort
        runs and its next step is its last with `q_{K-1} = 1`, that step's pass is read too (`planned`)."""
        state, single, cohort = self.state, len(self.cohorts) == 1, live[0]
        first = [c for c in live if c.k == 0 or not c.options.use_cache]  # encoded whatever it reveals
        ahead = single and cohort.k + 2 == cohort.total_steps and cohort.share[cohort.k + 1] >= 1.0
        if not (single and first) or ahead:
            needed = per_sequence_sum(revealed.long(), state.sequence_ids[mask_rows], self.batch)  # [B]
        if single and first:
            stale = torch.ones_like(self.dirty)
        else:  # encode the changed canvases with a revealed position
            stale = self.dirty & (needed > 0)
            if first:
                stale = stale | self.flags(first)
        last = self.last_stale(cohort, stale, needed, revealed, mask_rows) if ahead else None
        more = PassWork.counts(state.lengths, last) if ahead else ()
        if single:
            work, (count, *planned) = PassWork.of(state.lengths, stale, revealed.sum(), *more)  # the one read
            num_revealed = [count]
        else:
            work, totals = PassWork.of(state.lengths, stale, self.per_cohort(needed))  # the step's one read
            num_revealed = [b - a for a, b in zip([0, *totals[:-1]], totals, strict=True)]
        if ahead:
            self.planned = (last, PassWork(*planned))
        return stale, work, num_revealed

    def last_stale(
        self, cohort: Cohort, stale: torch.Tensor, needed: torch.Tensor, revealed: torch.Tensor, mask_rows: torch.Tensor
    ) -> torch.Tensor:
        """`[B]` the canvases the cohort's last step encodes, known before this step's fill: without the cache all
        of them; with it, those changed since their last pass (not encoded now, `stale`, or filled now, `needed > 0`)
        with a mask left after this step (the last step reveals every one)."""
        if not cohort.options.use_cache:
            return torch.ones_like(self.dirty)
        kept = ~revealed  # [M] the masks this step leaves
        remaining = per_sequence_sum(kept.long(), self.state.sequence_ids[mask_rows], self.batch)  # [B]
        return ((self.dirty & ~stale) | (needed > 0)) & (remaining > 0)

    def on_remove(self, rows: torch.Tensor, keep: torch.Tensor) -> None:
        self.generated = self.generated[rows]
        self.planned = None

    def output_of(
        self, cohort: Cohort, canvas: ActiveState, flags: torch.Tensor | None, hit: torch.Tensor | None = None
    ) -> ElasticMDMGenerateOutput:
        """The final canvas cut: at the first generated EOS (prompts), or the gaps squeezed (templates); one read,
        the cut lengths (they size the cut and the output)."""
        generated = self.generated if flags is None else self.generated[flags]
        template_lengths, eos = cohort.extra["template_lengths"], cohort.extra["eos_token_id"]
        if template_lengths is None:
            keep, hit = cut_at_first_eos(canvas, generated, eos)
        else:
            keep, hit = squeeze_gaps(canvas, generated, template_lengths, (eos, cohort.options.pad_token_id))
        lengths = per_sequence_sum(keep.long(), canvas.sequence_ids, canvas.lengths.numel())  # [B]
        cohort.lengths = host_read(lengths)
        final = canvas.select(keep, sum(cohort.lengths), lengths)
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
    not depend on `use_cache`, so both give the same samples for a fixed `generator`. Like `sample_elastic`, a run
    reads the device only through `host_read`, `1 + K` times: the canvas checks and sizes, one read per step (the
    number of revealed positions and the size of the pass) but the last, which reveals every remaining mask and
    whose pass step `K - 2` reads ahead (`K = 1`: the start read), and the cut lengths of the output.

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


class MDLMCanvas(NamedTuple):
    """MDLM's start: the canvases `state`, for templates the length of each filled template `template_lengths`
    `[B]` (its rows after that are the fixed pad tail; `None` for prompts), and on the host the masks on the canvases
    `num_masks` and the longest canvas `longest`."""

    state: ActiveState
    template_lengths: torch.Tensor | None
    num_masks: int
    longest: int


def mdlm_canvas(
    anchors: ActiveState, length: int | torch.Tensor, mask_token_id: int, pad_token_id: int, gap_budget: int | None
) -> MDLMCanvas:
    """The MDLM canvases of `anchors` (see `sample_mdlm`), `length` tokens each (one int, or `[B]`). One read
    (`host_read`): the checks of the input and the sizes at once."""
    batch, device = anchors.lengths.numel(), anchors.tokens.device
    if gap_budget is None:
        is_last = torch.zeros_like(anchors.open_after).index_fill_(0, anchors.last_rows(), True)
        misplaced = (anchors.open_after != is_last.roll(-1)).any()  # an open gap elsewhere than before EOS
        body_lengths = anchors.lengths - 1  # [B] EOS dropped: the model writes the end
    else:
        counts = anchors.open_after.long() * gap_budget  # [T] masks after each open token
        misplaced = torch.zeros((), dtype=torch.bool, device=device)
        body_lengths = anchors.lengths + per_sequence_sum(counts, anchors.sequence_ids, batch)  # [B]
    canvas_lengths = torch.full_like(body_lengths, length) if isinstance(length, int) else length  # [B]
    excess, row = (body_lengths - canvas_lengths).max(0)
    worst = torch.stack([body_lengths, canvas_lengths]).index_select(1, row.reshape(1))  # [2, 1] its lengths
    bad, excess, body_length, canvas_length, body_total, canvas_total, longest = host_read(
        misplaced, excess, worst, body_lengths.sum(), canvas_lengths.sum(), canvas_lengths.max()
    )
    if bad:
        raise ValueError(
            "MDLM has no gaps that grow: only a prompt (one open gap before EOS) can be continued without a "
            "budget; give gap_budget (generate(): mdlm_gap_budget) to fill a template's open gaps."
        )
    if excess > 0:
        what = "A prompt" if gap_budget is None else f"A template with mdlm_gap_budget={gap_budget} masks per gap"
        raise ValueError(
            f"{what} has {body_length} tokens, more than its canvas length (max_length or the prompt plus "
            f"max_new_tokens) of {canvas_length}."
        )
    if gap_budget is None:
        body = anchors.select(~is_last, body_total, body_lengths)
        tail_token, template_lengths, num_masks = mask_token_id, None, canvas_total - body_total
    else:
        body, _ = insert_masks(anchors, counts, mask_token_id, total=body_total, lengths=body_lengths)
        tail_token, template_lengths = pad_token_id, body.lengths
        num_masks = body_total - anchors.tokens.numel()  # the gaps' masks; the tail is pads
    counts = torch.zeros_like(body.tokens).index_put_((body.last_rows(),), canvas_lengths - body.lengths)
    canvas, _ = insert_masks(body, counts, tail_token, total=canvas_total)  # the tail after each last token
    canvas.open_after.zero_()
    return MDLMCanvas(canvas, template_lengths, num_masks, longest)


def cut_at_first_eos(
    canvas: ActiveState, generated: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `[T]` of each sequence up to its first generated EOS (included), or of the whole canvas, and
    `hit_max_length` `[B]`: no EOS was generated."""
    position = canvas.positions()  # [T]
    ends = generated & (canvas.tokens == eos_token_id)  # [T]
    stops = torch.where(ends, position + 1, canvas.lengths[canvas.sequence_ids])  # [T] a length each row allows
    lengths = canvas.lengths.scatter_reduce(0, canvas.sequence_ids, stops, reduce="amin")  # [B]
    ended = per_sequence_sum(ends.long(), canvas.sequence_ids, canvas.lengths.numel()) > 0  # [B]
    return position < lengths[canvas.sequence_ids], ~ended


def squeeze_gaps(
    canvas: ActiveState, generated: torch.Tensor, template_lengths: torch.Tensor, stop_ids: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `[T]` of each filled template without the pad / EOS tokens generated in its gaps, nor the pad tail,
    and the templates `[B]` with a gap holding no such token (it used its whole budget)."""
    stop = generated & ((canvas.tokens == stop_ids[0]) | (canvas.tokens == stop_ids[1]))  # [T]
    gap = (~generated).long().cumsum(0)  # [T] one id per run of generated rows (after its fixed left neighbour)
    gap_stops = torch.zeros(canvas.tokens.numel() + 1, dtype=torch.long, device=stop.device).index_add_(
        0, gap, stop.long()
    )  # [T + 1] stop tokens in each run
    full = generated & (gap_stops[gap] == 0)  # rows of the gaps that used their whole budget
    hit = per_sequence_sum(full.long(), canvas.sequence_ids, canvas.lengths.numel()) > 0  # [B]
    keep = (canvas.positions() < template_lengths[canvas.sequence_ids]) & ~stop
    return keep, hit
