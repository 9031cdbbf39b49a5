"""Generative perplexity of sample texts under a causal LM `q` (Sahoo et al., 2024):

    gen_ppl = exp(Σ_texts Σ_i -log q(t_i | t_<i) / Σ_texts #tokens)

the texts decoded from our samples and re-tokenized with the scorer's own tokenizer, in windows of its context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..loading.checkpoints import local_or_hub


def load_causal_lm(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of a causal LM (`AutoModelForCausalLM`) from a local folder or a Hub id, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_or_hub(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def scorer_windows(texts: Sequence[str], tokenizer, context: int) -> list[list[int]]:
    """Each text re-tokenized (no special tokens) and cut into windows of `context - 1` tokens, each window opened
    by the scorer's BOS (EOS when it has none, as GPT-2's `<|endoftext|>`). Empty texts give no window."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("The scorer's tokenizer has neither a BOS nor an EOS token to open a window with.")
    windows = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        windows += [[start, *ids[i : i + context - 1]] for i in range(0, len(ids), context - 1)]
    return windows


@torch.no_grad()
def sequence_nll(model, windows: Sequence[Sequence[int]], batch_size: int = 8) -> tuple[float, int]:
    """`(Σ -log q(t_i | t_<i), number of predicted tokens)` over the windows (the first token of each is context)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        rows = windows[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, width], right-padded
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # [B, width] 1 on real tokens
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, width - 1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        total += float((nll * mask[:, 1:]).sum())
        count += int(mask[:, 1:].sum())
    return total, count


def generative_perplexity(texts: Sequence[str], model, tokenizer, batch_size: int = 8) -> dict[str, float]:
    """Generative perplexity of `texts` under the causal LM `(model, tokenizer)`:
    `gen_ppl = exp(Σ NLL / Σ tokens)` with the texts decoded from our samples and re-tokenized by the scorer,
    in windows of the scorer's context (see `scorer_windows`); `nan` when no text has a token."""
    context = int(getattr(model.config, "max_position_embeddings", None) or 1024)
    windows = scorer_windows(texts, tokenizer, context)
    nll, count = sequence_nll(model, windows, batch_size) if windows else (0.0, 0)
    per_token = nll / count if count else float("nan")
    return {
        "gen_ppl": math.exp(min(per_token, 50.0)) if count else float("nan"),
        "gen_nll_per_token": per_token,
        "gen_ppl_tokens": count,
    }


__all__ = ["generative_perplexity", "load_causal_lm", "scorer_windows", "sequence_nll"]
