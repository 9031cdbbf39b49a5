"""The packed state the samplers work on (`ActiveState`): how inputs become one, and its algebra.

Every sequence of a batch keeps its own length in one flat token stream; nothing is padded to a canvas. An input is
parsed into *anchors* (tokens that never change) and the *open* flag of every gap (whether masks may be inserted
after a token): a prompt `BOS p_1 .. p_m` is continued in one open gap before an appended EOS, a template
`BOS a [MASK] b EOS` opens one gap per mask, an unconditional sample starts from `BOS EOS` (docs/design.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device_reads_elastic_mdm import per_sequence_sum
from .packing_elastic_mdm import cu_seqlens_from_lengths

Anchors = tuple[list[int], list[bool]]
"""One parsed input: its anchor tokens and, for each, whether the gap after it is open."""


@dataclass
class ActiveState:
    """The packed active sequences: `tokens` `[T]`, `sequence_ids` `[T]` (sorted), `open_after` `[T]` (the gap
    between token i and i+1 may grow), `lengths` `[B]`."""

    tokens: torch.Tensor
    sequence_ids: torch.Tensor
    open_after: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_anchors(cls, sequences: list[Anchors], device: torch.device | str | None = None) -> ActiveState:
        """The packed state of parsed inputs, in order."""
        tokens = torch.tensor([t for seq, _ in sequences for t in seq], dtype=torch.long, device=device)
        lengths = torch.tensor([len(seq) for seq, _ in sequences], dtype=torch.long, device=device)
        return cls(
            tokens=tokens,
            sequence_ids=torch.arange(len(sequences), device=device).repeat_interleave(lengths),
            open_after=torch.tensor([f for _, flags in sequences for f in flags], dtype=torch.bool, device=device),
            lengths=lengths,
        )

    @classmethod
    def from_inputs(
        cls,
        input_ids: torch.Tensor | list[list[int]] | None,
        attention_mask: torch.Tensor | None,
        template_ids: torch.Tensor | list[list[int]] | None,
        num_return_sequences: int,
        special_ids: tuple[int, int, int],
        device: torch.device | str | None = None,
        vocab_size: int | None = None,
    ) -> ActiveState:
        """Start state of `generate()`: prompts (`input_ids`), templates (`template_ids`) or, with neither, the
        unconditional `BOS EOS`; each input repeated `num_return_sequences` times. `special_ids` is
        `(bos, eos, mask)`; with `vocab_size`, an id outside `0..vocab_size - 1` is refused (on the host lists)."""
        bos, eos, mask = special_ids
        if input_ids is not None and template_ids is not None:
            raise ValueError("Pass either input_ids (prompts) or template_ids (templates), not both.")
        if input_ids is not None:
            rows = rows_of(input_ids, attention_mask, "input_ids", vocab_size)
            sequences = [parse_prompt(row, bos, eos, mask, f"input_ids[{i}]") for i, row in enumerate(rows)]
        elif template_ids is not None:
            rows = rows_of(template_ids, attention_mask, "template_ids", vocab_size)
            sequences = [parse_template(row, bos, eos, mask, f"template_ids[{i}]") for i, row in enumerate(rows)]
        else:
            sequences = [([bos, eos], [True, False])]
        return cls.from_anchors([s for s in sequences for _ in range(num_return_sequences)], device)

    def split(self, on_device: bool = False) -> list[torch.Tensor]:
        """The active sequences as a list of 1-D tensors (on the host unless `on_device`)."""
        tokens = self.tokens if on_device else self.tokens.to("cpu", copy=True)  # a snapshot, never a view
        return list(tokens.split(self.lengths.tolist()))

    def select(self, keep: torch.Tensor, count: int, lengths: torch.Tensor | None = None) -> ActiveState:
        """The state restricted to the rows flagged in `keep` `[T]` (order kept); `count`, the number of flagged
        rows, known on the host (no read-back); `lengths` `[B]` the kept rows per sequence, when the caller has them."""
        if lengths is None:
            lengths = per_sequence_sum(keep.long(), self.sequence_ids, self.lengths.numel())
        rows = torch.nonzero_static(keep, size=count).squeeze(-1)  # [count]
        return ActiveState(self.tokens[rows], self.sequence_ids[rows], self.open_after[rows], lengths)

    def positions(self) -> torch.Tensor:
        """`[T]` index of every token inside its sequence."""
        starts = cu_seqlens_from_lengths(self.lengths)[:-1].long()  # [B]
        return torch.arange(self.tokens.numel(), device=self.tokens.device) - starts[self.sequence_ids]

    def last_rows(self) -> torch.Tensor:
        """`[B]` row of the last token of every sequence."""
        return cu_seqlens_from_lengths(self.lengths)[1:].long() - 1


def insert_masks(
    state: ActiveState,
    counts: torch.Tensor | None,
    mask_token_id: int,
    total: int | None = None,
    lengths: torch.Tensor | None = None,
    repeats: torch.Tensor | None = None,
) -> tuple[ActiveState, torch.Tensor]:
    """Insert `counts[i]` masks after token `i`; returns the new state and the old row `source` `[total]` of every
    new row (a mask: the token it follows), so that a per-token tensor `x` `[T]` follows as `x[source]`.

    New masks inherit the open flag of their gap (they sit inside an open gap). `total`, the new token count, is
    read from the device when not given; `lengths`, the new lengths `[B]`, computed when not given; `repeats`
    `[T + 1]` as `spread_tokens` takes it, when the caller has it (then `counts` may be `None` if `total` and
    `lengths` are given).
    """
    if repeats is None:
        repeats = F.pad(counts + 1, (1, 0), value=1)  # [T + 1]
    if total is None:
        total = state.tokens.numel() + int(counts.sum())
    tokens, source = spread_tokens(state.tokens, repeats, mask_token_id, total)
    if lengths is None:
        lengths = state.lengths + per_sequence_sum(counts, state.sequence_ids, state.lengths.numel())
    return ActiveState(tokens, state.sequence_ids[source], state.open_after[source], lengths), source


def spread_tokens(
    tokens: torch.Tensor, repeats: torch.Tensor, mask_token_id: int, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream `[total]` of `tokens` `[T]` with `repeats[i + 1] - 1` masks after token `i`, and the old row
    `source` `[total]` of every new row. `repeats` `[T + 1]` is a leading 1, then `1 + masks after token i`: its
    running sums `1 + Σ_{j<i} repeats[j + 1]` are one more than the new row of token `i`, so the tokens are
    scattered into a stream one row longer whose tail is the new one (no subtraction)."""
    landing = repeats.cumsum(0)[:-1]  # [T] 1 + where token i lands
    spread = torch.full((total + 1,), mask_token_id, dtype=tokens.dtype, device=tokens.device)
    spread[landing] = tokens
    return spread[1:], torch.repeat_interleave(repeats[1:], output_size=total)


def cap_insertions(
    counts: torch.Tensor, sequence_ids: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip insertion counts (rows in stream order) so no sequence exceeds `max_length`; flags clipped sequences.

    With `b = max_length - n` the room of a sequence of `n` tokens and `c_<i` the insertions before gap `i` in
    that sequence, gap `i` keeps `min(c_i, max(b - c_<i, 0))`."""
    budget = (max_length - lengths).clamp_min(0)  # [B]
    inclusive = counts.cumsum(0)
    first = torch.full_like(lengths, torch.iinfo(torch.long).max).scatter_reduce(
        0, sequence_ids, inclusive - counts, reduce="amin"
    )
    before = inclusive - counts - first[sequence_ids]  # insertions earlier in the same sequence
    capped = torch.minimum(counts, (budget[sequence_ids] - before).clamp_min(0))
    clipped = per_sequence_sum((capped < counts).long(), sequence_ids, lengths.numel()) > 0
    return capped, clipped


def rows_of(
    ids: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None, name: str, vocab_size: int | None = None
) -> list[list[int]]:
    """Token lists of a padded tensor (`attention_mask` picks the real tokens) or of a list of lists; with
    `vocab_size`, every id must lie in `0..vocab_size - 1` (else the embedding lookup fails deep in the sampler)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        rows = [row[m.bool()].tolist() for row, m in zip(ids, attention_mask, strict=True)]
    else:
        rows = [list(map(int, r)) for r in ids]
    if not rows:
        raise ValueError(f"{name} is an empty batch; pass at least one sequence.")
    bad = [(i, t) for i, row in enumerate(rows) for t in row if vocab_size is not None and not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"{name}[{bad[0][0]}] holds the id {bad[0][1]}, outside the vocabulary 0..{vocab_size - 1}; tokenize with "
            "the model's tokenizer (pad with attention_mask, not with -100)."
        )
    return rows


def parse_prompt(prompt: list[int], bos: int, eos: int, mask: int, name: str) -> Anchors:
    """`BOS p_1 .. p_m` -> tokens `BOS p_1 .. p_m EOS`, open flags `F .. F T F`: one open gap before the EOS."""
    if not prompt or prompt[0] != bos:
        raise ValueError(f"{name} must start with BOS ({bos}); tokenize with add_special_tokens=True or prepend it.")
    if mask in prompt:
        raise ValueError(
            f"{name} contains the mask token ({mask}); prompts must be clean text. Use template_ids to mark open gaps."
        )
    if bos != eos and len(prompt) > 1 and prompt[-1] == eos:
        raise ValueError(f"{name} ends with EOS ({eos}); a prompt is a prefix: drop the EOS, or use template_ids.")
    return prompt + [eos], [False] * (len(prompt) - 1) + [True, False]


def parse_template(template: list[int], bos: int, eos: int, mask: int, name: str) -> Anchors:
    """`BOS a [MASK] b EOS` -> tokens `BOS a b EOS`, open flags `F T F F`: each mask marks one open gap."""
    ids = torch.tensor(template, dtype=torch.long)
    if ids.numel() < 2 or ids[0] != bos or ids[-1] != eos:
        raise ValueError(f"{name} must start with BOS ({bos}) and end with EOS ({eos}).")
    marker = ids == mask
    if bool((marker[1:] & marker[:-1]).any()):
        raise ValueError(f"{name} has two adjacent open-gap markers; one mask token marks one gap.")
    open_after = torch.cat([marker[1:], marker.new_zeros(1)])[~marker]  # a kept token is open if a marker follows it
    return ids[~marker].tolist(), open_after.tolist()


def sample_binomial(
    count: torch.Tensor, prob: float, generator: torch.Generator | None, on_device: torch.Tensor | None = None
) -> torch.Tensor:
    """`m ~ Binomial(count, prob)` elementwise (exact at prob 0 and 1); `on_device`, `prob` in a 0-dim float32
    device tensor when the caller has one (read through a broadcast view: the same draws, no fill)."""
    if prob >= 1.0:
        return count
    if prob <= 0.0:
        return torch.zeros_like(count)
    if on_device is None:
        p = torch.full(count.shape, prob, dtype=torch.float32, device=count.device)
    else:
        p = on_device.expand(count.shape)
    return torch.binomial(count.float(), p, generator=generator).long()
