"""The lengths of the sequences a benchmark generates or trains on (`--lengths`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


def length_sampler(spec: str, length: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Draws `[batch]` interior counts `n` (sequence length `n + 2` <= `length`) from `spec`:

    * `fixed`: every sequence fills the canvas, `n = length - 2` (the equal-output comparison with MDLM);
    * `uniform:LO:HI`: sequence lengths uniform in `LO..HI` (BOS and EOS included);
    * `synthetic`: the record lengths of the built-in synthetic JSON task (its tokenizer, 4000 records);
    * a path: a JSON list or one integer per line of sequence lengths (BOS/EOS included), e.g. from
      `corpus.length_statistics`; lengths over `length` are clipped.
    """
    if spec == "fixed":
        pool = torch.tensor([length])
    elif spec.startswith("uniform:"):
        low, high = (int(v) for v in spec.split(":")[1:])
        pool = torch.arange(low, high + 1)
    elif spec == "synthetic":
        from elastic_mdm.data.synthetic import build_tokenizer, generate_records, record_length_distribution

        pool = record_length_distribution(build_tokenizer(), generate_records(4000, seed=1))
    else:
        text = Path(spec).read_text()
        pool = torch.tensor(json.loads(text) if text.lstrip().startswith("[") else [int(v) for v in text.split()])
    pool = pool.clamp(2, length) - 2

    def draw(batch: int, generator: torch.Generator) -> torch.Tensor:
        return pool[torch.randint(pool.numel(), (batch,), generator=generator)]

    return draw
