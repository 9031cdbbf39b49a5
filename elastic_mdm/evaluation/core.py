"""Measuring an Elastic-MDM: length fidelity, sample entropy, generative perplexity, gap-head calibration and
structured-output validity (paper §5).

Lengths are integer token counts (anchors included). Distances are between the two empirical distributions:

* total variation `TV = ½ Σ_n |p(n) - q(n)|`
* Wasserstein-1 `W1 = Σ_n |P(n) - Q(n)|` (P, Q the CDFs on the integers)
* Kolmogorov-Smirnov `KS = max_n |P(n) - Q(n)|`

Samples:

* unigram entropy of a token sequence `H = -Σ_v p(v) log p(v)` (nats), `p` the empirical token frequencies;
* generative perplexity under a causal LM `q`: `exp(Σ_texts Σ_i -log q(t_i | t_<i) / Σ_texts #tokens)`, the texts
  re-tokenized with the scorer's own tokenizer (Sahoo et al., 2024);
* gap calibration: for each adjacent active pair of a held-out corrupted batch, the expected removed count
  `E_pφ[g] = Σ_c c · pφ(c | h_a, h_b)` against the true `g`, and `-log pφ(g | h_a, h_b)`, binned by noise level `s'`;
* structured output (§5.4): the share of template fills that parse as JSON and validate against their schema.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..loading.checkpoints import load_checkpoint, local_or_hub
from ..packing import PackedSequences
from ..schedules import NoiseLevelSampler, get_schedule
from ..training.collators import IGNORE_INDEX, ElasticMDMCollator
from ..training.synthetic import GAP, SCHEMAS, json_template, merge_text, template_token_ids, to_text, validate_text


def empirical_cdfs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CDFs of two integer samples on their common support `0..max`: `[max + 1]` each."""
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("Length statistics need at least one generated and one data length.")
    size = int(max(a.max(), b.max())) + 1
    pa = torch.bincount(a.long(), minlength=size).double() / a.numel()
    pb = torch.bincount(b.long(), minlength=size).double() / b.numel()
    return pa.cumsum(0), pb.cumsum(0)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    """`½ Σ_n |p_a(n) - p_b(n)|` of two integer samples."""
    ca, cb = empirical_cdfs(a, b)
    return 0.5 * float((ca.diff(prepend=ca.new_zeros(1)) - cb.diff(prepend=cb.new_zeros(1))).abs().sum())


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """`Σ_n |P_a(n) - P_b(n)|`: the earth mover's distance of two integer samples."""
    ca, cb = empirical_cdfs(a, b)
    return float((ca - cb).abs().sum())


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """`max_n |P_a(n) - P_b(n)|`."""
    ca, cb = empirical_cdfs(a, b)
    return float((ca - cb).abs().max())


def length_report(generated: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """Means, medians and the three distances between generated and data lengths."""
    generated, data = generated.long().cpu(), data.long().cpu()
    return {
        "generated_mean": float(generated.double().mean()),
        "data_mean": float(data.double().mean()),
        "generated_median": float(generated.median()),
        "data_median": float(data.median()),
        "total_variation": total_variation(generated, data),
        "wasserstein1": wasserstein1(generated, data),
        "ks": ks_statistic(generated, data),
    }


def length_histogram_table(generated: torch.Tensor, data: torch.Tensor, num_bins: int = 12) -> str:
    """A text table of both length histograms over shared bins (shares in %, with bars)."""
    low, high = int(min(generated.min(), data.min())), int(max(generated.max(), data.max())) + 1
    edges = torch.linspace(low, high, num_bins + 1).floor().long().unique()
    rows = ["length bin   | data %  | generated %"]
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        shares = [float(((x >= lo) & (x < hi)).double().mean()) * 100 for x in (data, generated)]
        bars = "".join(f"{s:6.1f}  " for s in shares)
        rows.append(f"[{lo:4d}, {hi:4d}) | {bars}{'#' * round(shares[1] / 2)}")
    return "\n".join(rows)


def save_length_histogram(generated: torch.Tensor, data: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Both length histograms in one PNG (needs matplotlib: pip install elastic-mdm[eval])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError("Writing the histogram PNG needs matplotlib: pip install matplotlib") from error
    low, high = int(min(generated.min(), data.min())), int(max(generated.max(), data.max())) + 1
    bins = list(range(low, high + 1, max(1, (high - low) // 40)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(data.tolist(), bins=bins, alpha=0.5, density=True, label=f"data (n={data.numel()})")
    ax.hist(generated.tolist(), bins=bins, alpha=0.5, density=True, label=f"generated (n={generated.numel()})")
    ax.set_xlabel("sequence length (tokens, BOS/EOS included)")
    ax.set_ylabel("share")
    ax.set_title(title or "Length distribution: generated vs data")
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Samples: drawing, decoding, unigram entropy
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Generated sequences: `ids[i]` the tokens of sample i (anchors included), `lengths` `[N]`, `texts[i]` its
    decoded text (special tokens skipped); `tokens_per_forward` the generated tokens over the denoiser passes of
    every sequence (`generation_elastic_mdm.tokens_per_forward`, pooled over the batches)."""

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
        generated_tokens += int(out.lengths.sum()) - 2 * count  # each sample starts from BOS EOS
        passes += int(out.sequence_passes.sum())
    empty = torch.zeros(0, dtype=torch.long)
    return Samples(
        ids, torch.cat(lengths) if lengths else empty, texts, torch.cat(capped) if capped else empty.bool(),
        tokens_per_forward=generated_tokens / passes if passes else None,
    )  # fmt: skip


SWEEP_STEPS = (1, 4, 16, 64, 256)
SWEEP_SCHEDULES = ("linear", "exponential")


def length_sweep(
    model,
    tokenizer,
    data_lengths: torch.Tensor,
    *,
    num_samples: int,
    steps: Sequence[int] = SWEEP_STEPS,
    schedules: Sequence[str] = SWEEP_SCHEDULES,
    reference_lengths: torch.Tensor | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **generate_kwargs,
) -> list[dict[str, Any]]:
    """Length fidelity of unconditional samples at every horizon `K` in `steps` and schedule in `schedules`: mean,
    TV, W1, KS against `data_lengths`, the share stopped by the length cap, and the tokens per forward pass
    (`tokens_per_forward`). `K = 1` is the length model alone (the final length is the step-0 prediction); larger K
    show what the re-predictions of the gaps add. With `reference_lengths` (an independent draw of the data), a
    first row gives the data-vs-data floor of each distance at this sample size."""
    rows = []
    if reference_lengths is not None:
        rows.append(sweep_row("data (fresh draw)", "-", reference_lengths, data_lengths))
    for schedule in schedules:
        for num_steps in steps:
            generator = torch.Generator(device=model.device).manual_seed(seed)
            samples = draw_samples(
                model, tokenizer, num_samples, batch_size=batch_size, generator=generator, num_steps=num_steps,
                schedule=schedule, **generate_kwargs,
            )  # fmt: skip
            row = sweep_row(schedule, num_steps, samples.lengths, data_lengths, samples.hit_max_length)
            rows.append({**row, "tokens_per_forward": round(samples.tokens_per_forward or 0.0, 2)})
    return rows


def sweep_row(
    schedule: str, num_steps: int | str, lengths: torch.Tensor, data: torch.Tensor, capped: torch.Tensor | None = None
) -> dict[str, Any]:
    """One row of `length_sweep`."""
    report = length_report(lengths, data)
    return {
        "schedule": schedule,
        "K": num_steps,
        "mean": round(report["generated_mean"], 2),
        "data_mean": round(report["data_mean"], 2),
        "tv": round(report["total_variation"], 3),
        "w1": round(report["wasserstein1"], 2),
        "ks": round(report["ks"], 3),
        "capped": round(float(capped.double().mean()), 4) if capped is not None and capped.numel() else 0.0,
    }


def unigram_entropy(tokens: Sequence[int] | torch.Tensor) -> float:
    """`H = -Σ_v p(v) log p(v)` in nats, `p(v)` the share of `tokens` equal to `v` (0 for an empty sequence)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() == 0:
        return 0.0
    p = torch.unique(tokens, return_counts=True)[1].double() / tokens.numel()
    return float(-(p * p.log()).sum())


def sample_entropy(sequences: Sequence[Sequence[int]], exclude_ids: Iterable[int | None] = ()) -> dict[str, float]:
    """Unigram entropy of samples (nats), the ids in `exclude_ids` (BOS, EOS, pad, mask) left out:
    `entropy_mean` the mean over samples of each sample's entropy (the sample-diversity check of MDLM-style papers;
    a degenerate sampler repeating one token scores 0), `entropy_pooled` the entropy of all tokens together."""
    drop = {i for i in exclude_ids if i is not None}
    kept = [[t for t in seq if t not in drop] for seq in sequences]
    per_sample = [unigram_entropy(seq) for seq in kept]
    return {
        "entropy_mean": sum(per_sample) / max(len(per_sample), 1),
        "entropy_pooled": unigram_entropy([t for seq in kept for t in seq]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Generative perplexity under a causal LM
# ---------------------------------------------------------------------------------------------------------------


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
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
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


# ---------------------------------------------------------------------------------------------------------------
# Held-out data: NELBO bound and corrupted batches
# ---------------------------------------------------------------------------------------------------------------


class SingleProcess:
    """What `trainer.nelbo_metrics` needs of an `accelerate.Accelerator`, for one process: `autocast()` (to `dtype`
    when given) and `reduce()` (the identity)."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype | None = None):
        self.device, self.dtype = torch.device(device), dtype

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def heldout_batches(
    dataset: Iterable[dict], collator, batch_size: int, device: torch.device | str, max_batches: int | None = None
) -> Iterator[dict]:
    """Collated batches of `dataset` (at most `max_batches`), tensors moved to `device`."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def nelbo_report(
    model,
    dataset: Iterable[dict],
    *,
    num_steps: int = 128,
    schedule: str = "linear",
    batch_size: int = 32,
    seed: int = 0,
    num_draws: int = 1,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The held-out NELBO of the K-step process (K = `num_steps`, `schedule`) as bits per token and perplexity bound,
    with the objective's evaluation collator and seeded noise: `trainer.nelbo_metrics` (the bound of `nelbo.py`,
    step 0 exactly plus `K · [Σ_masks CE + Σ_gaps l_k(g, m)]` at one `k ~ U{1..K}` per sequence; MDLM's bound for
    `mdlm`). With `num_draws > 1` the metrics average that many independent noise draws of the data (seeds `seed`,
    `seed + 1`, ...) and `nelbo_bits_per_token_se` is the standard error of the bits per token between draws."""
    from ..training.arguments import ElasticMDMTrainingArguments
    from ..training.trainer import make_collators, nelbo_metrics

    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}.")
    draws = []
    for draw_seed in range(seed, seed + num_draws):
        args = ElasticMDMTrainingArguments(
            eval_num_steps=num_steps,
            eval_schedule=schedule,
            objective=model.config.objective,
            seed=draw_seed,
            use_cpu=model.device.type == "cpu",
            report_to="none",
        )
        collator = make_collators(args, model.config)[1]
        batches = heldout_batches(dataset, collator, batch_size, model.device, max_batches)
        with torch.no_grad():
            draws.append(nelbo_metrics(model, batches, args, SingleProcess(model.device, autocast_dtype)))
    report = {key: sum(d[key] for d in draws) / num_draws for key in draws[0]}
    if num_draws > 1:
        bits = torch.tensor([d["nelbo_bits_per_token"] for d in draws], dtype=torch.float64)
        report["nelbo_bits_per_token_se"] = float(bits.std() / math.sqrt(num_draws))
    return report


def calibration_collator(
    config, *, num_steps: int = 128, schedule: str = "linear", length_share: float = 0.1, seed: int = 0
) -> ElasticMDMCollator:
    """An `ElasticMDMCollator` of a fixed K-step `schedule` (step 0, the length model, with probability
    `length_share`, else `k ~ U{1..K}`), seeded: the corrupted held-out batches of the gap calibration."""
    sampler = NoiseLevelSampler(
        families=(get_schedule(schedule),), min_steps=num_steps, max_steps=num_steps, length_share=length_share
    )
    return ElasticMDMCollator(
        mask_token_id=config.mask_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        max_length=config.max_position_embeddings,
        noise_sampler=sampler,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Gap-head calibration
# ---------------------------------------------------------------------------------------------------------------


def noise_bins(noise_level: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin of each noise level `s'`: 0 for `s' = 0` (the length model, step 0), `i` for `s'` in
    `((i - 1)/num_bins, i/num_bins]` (to 1e-6, so that fp32 grid values such as 0.1 land in their own bin)."""
    return (noise_level.double() * num_bins - 1e-6).ceil().long().clamp(0, num_bins)


def calibration_table(
    expected: torch.Tensor, true: torch.Tensor, nll: torch.Tensor, noise_level: torch.Tensor, num_bins: int = 10
) -> list[dict[str, float]]:
    """Per bin of `s'` (`noise_bins`) and overall (`bin = "all"`): number of pairs, mean true count, mean expected
    count, bias `mean(E[g] - g)`, mean absolute error `mean |E[g] - g|` and gap CE `mean -log pφ(g)` (nats).
    All inputs are `[pairs]`; empty bins are left out."""
    bins = noise_bins(noise_level, num_bins)
    error = expected.double() - true.double()
    rows = []
    for b in [*range(num_bins + 1), None]:
        pick = torch.ones_like(bins, dtype=torch.bool) if b is None else bins == b
        if not bool(pick.any()):
            continue
        low, high = (0.0, 1.0) if b is None else (max(b - 1, 0) / num_bins, b / num_bins)
        rows.append(
            {
                "bin": "all" if b is None else "s'=0" if b == 0 else f"({low:.2f}, {high:.2f}]",
                "pairs": int(pick.sum()),
                "true_mean": float(true[pick].double().mean()),
                "expected_mean": float(expected[pick].double().mean()),
                "bias": float(error[pick].mean()),
                "mae": float(error[pick].abs().mean()),
                "gap_ce": float(nll[pick].double().mean()),
            }
        )
    return rows


@torch.no_grad()
def gap_predictions(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(E_pφ[g], g, -log pφ(g), s')` for every supervised adjacent pair of one `ElasticMDMCollator` batch."""
    packed = PackedSequences.from_cu_seqlens(batch["cu_seqlens"], batch["max_seqlen"], batch["input_ids"].numel())
    hidden = model.diffusion_features(batch["input_ids"], packed, batch["noise_level"])
    true = batch["gap_labels"]
    rows = ((true != IGNORE_INDEX) & ~packed.last_token_mask()).nonzero().squeeze(-1)
    levels = batch["noise_level"][packed.sequence_ids[rows]]  # [pairs] s'
    log_probs = model.gap_logits(hidden, rows, levels).float().log_softmax(-1)  # [pairs, max_gap + 1]
    classes = torch.arange(log_probs.shape[-1], device=log_probs.device, dtype=log_probs.dtype)
    expected = (log_probs.exp() * classes).sum(-1)
    nll = -log_probs.gather(-1, true[rows, None]).squeeze(-1)
    return expected, true[rows], nll, levels


def gap_calibration(model, batches: Iterable[dict], num_bins: int = 10) -> list[dict[str, float]]:
    """`calibration_table` over held-out batches of an `ElasticMDMCollator` (on the model's device)."""
    model.eval()
    parts = [tuple(t.cpu() for t in gap_predictions(model, batch)) for batch in batches]
    if not parts:
        raise ValueError("Gap calibration needs at least one batch.")
    return calibration_table(*(torch.cat(column) for column in zip(*parts, strict=True)), num_bins=num_bins)


# ---------------------------------------------------------------------------------------------------------------
# Structured output (paper §5.4)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StructuredTask:
    """One structured-output prompt: a template (`BOS .. EOS`, a mask at each open gap) and the schema its fill must
    validate against."""

    name: str
    template_ids: list[int]
    schema: dict


def instance_template(instance: Any) -> list[str | None]:
    """Pieces of the compact JSON of `instance` (`synthetic.to_text`) with every scalar value an open gap (`GAP`):
    keys, braces, brackets, colons, commas and the quotes of strings are text; a string's content, a number, a
    boolean or null is one gap. Arrays keep the instance's number of elements. Adjacent text pieces are merged."""
    if isinstance(instance, dict):
        parts: list[str | None] = ["{"]
        for i, (key, value) in enumerate(instance.items()):
            parts += [("," if i else "") + to_text(key) + ":", *instance_template(value)]
        return merge_text([*parts, "}"])
    if isinstance(instance, list):
        parts = ["["]
        for i, value in enumerate(instance):
            parts += [","] * bool(i) + instance_template(value)
        return merge_text([*parts, "]"])
    return ['"', GAP, '"'] if isinstance(instance, str) else [GAP]


def template_from_pieces(tokenizer, pieces: Sequence[str | None]) -> list[int]:
    """`BOS` + each text piece tokenized on its own (no special tokens) + `EOS`, with the mask token at each `GAP`:
    the layout `generate(template_ids=...)` takes (as `synthetic.template_token_ids`)."""
    ids = [tokenizer.bos_token_id]
    for piece in pieces:
        ids += [tokenizer.mask_token_id] if piece is GAP else tokenizer(piece, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def builtin_structured_tasks(tokenizer) -> list[StructuredTask]:
    """The six schemas of the built-in synthetic task, with their schema templates (`synthetic.template_token_ids`)."""
    return [StructuredTask(name, template_token_ids(tokenizer, name), schema) for name, schema in SCHEMAS.items()]


def load_structured_tasks(path: str | Path, tokenizer, limit: int | None = None) -> list[StructuredTask]:
    """Tasks of a JSONL file of `{"schema": ..., "instance": ...}` rows (optional `"name"`). The template comes from
    the instance (`instance_template`); rows without an instance use the schema's template (`synthetic.json_template`:
    objects, arrays as one gap, strings, scalars)."""
    tasks = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            pieces = instance_template(row["instance"]) if "instance" in row else json_template(row["schema"])
            tasks.append(
                StructuredTask(row.get("name", f"row{i}"), template_from_pieces(tokenizer, pieces), row["schema"])
            )
            if limit is not None and len(tasks) >= limit:
                break
    return tasks


def template_fits(template: Sequence[int], mask_token_id: int, max_length: int, gap_budget: int | None) -> bool:
    """Whether a template fits `max_length` tokens: its anchors, plus `gap_budget` masks per open gap for MDLM."""
    gaps = sum(t == mask_token_id for t in template)
    return len(template) - gaps + gaps * (gap_budget or 0) <= max_length


def fill_templates(
    model,
    tokenizer,
    templates: Sequence[Sequence[int]],
    *,
    num_per_template: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> list[str]:
    """Texts of `num_per_template` fills of every template (template 0's fills first), `generate(template_ids=...)`
    in batches of about `batch_size` sequences."""
    per_call = max(1, batch_size // num_per_template)
    texts = []
    for start in range(0, len(templates), per_call):
        out = model.generate(
            template_ids=[list(t) for t in templates[start : start + per_call]],
            num_return_sequences=num_per_template,
            generator=generator,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        texts += decode_samples(tokenizer, out.sequences, out.lengths)[1]
    return texts


def structured_validity(
    model,
    tokenizer,
    tasks: Sequence[StructuredTask],
    *,
    num_per_template: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    **generate_kwargs,
) -> dict[str, Any]:
    """Fill every task's template `num_per_template` times; return `parse_rate` (share of fills that are strict JSON),
    `json_validity` (share that also validate against the task's schema, formats checked), their count, and per
    task name the validity share. With `mdlm_gap_budget` (MDLM checkpoints), templates whose budgeted canvas exceeds
    the model's length are not run and count as failures (`too_long`)."""
    limit = generate_kwargs.get("max_length") or model.config.max_position_embeddings
    budget = generate_kwargs.get("mdlm_gap_budget") if model.config.objective == "mdlm" else None
    fits = [template_fits(t.template_ids, model.config.mask_token_id, limit, budget) for t in tasks]
    runnable = [t for t, ok in zip(tasks, fits, strict=True) if ok]
    texts = iter(
        fill_templates(
            model,
            tokenizer,
            [t.template_ids for t in runnable],
            num_per_template=num_per_template,
            batch_size=batch_size,
            generator=generator,
            **generate_kwargs,
        )
    )
    parsed, valid, by_name = [], [], defaultdict(list)
    for task, ok in zip(tasks, fits, strict=True):
        for _ in range(num_per_template):
            text = next(texts) if ok else None
            parsed.append(text is not None and validate_text(text, {}))  # the empty schema accepts any JSON value
            valid.append(text is not None and validate_text(text, task.schema))
            by_name[task.name].append(valid[-1])
    outputs = max(len(valid), 1)
    return {
        "num_outputs": len(valid),
        "parse_rate": sum(parsed) / outputs,
        "json_validity": sum(valid) / outputs,
        "too_long": fits.count(False),
        "by_name": {name: sum(v) / len(v) for name, v in by_name.items()},
    }


def json_validity(texts: Sequence[str], schemas: Sequence[dict]) -> float:
    """Share of texts that parse as JSON and validate against at least one of `schemas` (needs jsonschema)."""
    if not texts:
        return 0.0
    return sum(any(validate_text(text, schema) for schema in schemas) for text in texts) / len(texts)


def sample_report(
    model,
    tokenizer,
    data_lengths: torch.Tensor,
    *,
    num_samples: int,
    output_dir: str | Path,
    schemas: Sequence[dict] | None = None,
    structured_tasks: Sequence[StructuredTask] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **generate_kwargs,
) -> dict:
    """Sample `num_samples` unconditional sequences; report their lengths against the data (table, PNG), with
    `schemas` the share of valid JSON, and with `structured_tasks` the share of valid template fills (MDLM checkpoints:
    pass `mdlm_gap_budget`). Writes `length_histogram.png`, `samples.jsonl` and `sample_report.json`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples = draw_samples(model, tokenizer, num_samples, batch_size=batch_size, generator=generator, **generate_kwargs)
    generated = samples.lengths
    report = {"num_samples": num_samples, **length_report(generated, data_lengths)}
    steps = generate_kwargs.get("num_steps", model.generation_config.num_steps)
    schedule = generate_kwargs.get("schedule", model.generation_config.schedule)
    report["length_row"] = sweep_row(schedule, steps, generated, data_lengths, samples.hit_max_length)
    if schemas:
        report["json_validity"] = json_validity(samples.texts, schemas)
    if structured_tasks:
        per_template = max(1, num_samples // (4 * len(structured_tasks)))
        structured = structured_validity(
            model, tokenizer, structured_tasks, num_per_template=per_template, generator=generator, **generate_kwargs
        )
        report["template_json_validity"] = structured["json_validity"]
        report["template_json_validity_by_schema"] = structured["by_name"]
        report["templates_too_long"] = structured["too_long"]
    report["histogram_png"] = str(save_length_histogram(generated, data_lengths, output_dir / "length_histogram.png"))
    report["table"] = length_histogram_table(generated, data_lengths)
    write_samples(samples, output_dir / "samples.jsonl")
    with open(output_dir / "sample_report.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


def write_samples(samples: Samples, path: str | Path) -> Path:
    """One JSON line `{"length", "text"}` per sample."""
    path = Path(path)
    with open(path, "w") as f:
        for text, n in zip(samples.texts, samples.lengths.tolist(), strict=True):
            f.write(json.dumps({"length": n, "text": text}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A Markdown table cell: floats with 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (columns: those of the first row unless given)."""
    if not rows:
        return ""
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], title: str = "Elastic-MDM evaluation") -> str:
    """Markdown of an evaluation report `{"settings": {...}, "models": {label: {section: metrics}}}`: one table of
    the scalar metrics of every model side by side, then each model's calibration table and length histogram."""
    models = report["models"]
    lines = [f"# {title}", "", markdown_table([{"setting": k, "value": v} for k, v in report["settings"].items()])]
    keys = [key for m in models.values() for key in _scalar_keys(m)]
    rows = [{"metric": key, **{label: _lookup(m, key) for label, m in models.items()}} for key in dict.fromkeys(keys)]
    lines += ["", "## Metrics", "", markdown_table(rows, ["metric", *models])]
    for label, metrics in models.items():
        if "gap_calibration" in metrics:
            lines += ["", f"## Gap-head calibration: {label}", "", markdown_table(metrics["gap_calibration"])]
        if "length_table" in metrics:
            lines += ["", f"## Lengths, generated vs data: {label}", "", "```", metrics["length_table"], "```"]
    return "\n".join(lines) + "\n"


def _scalar_keys(metrics: dict[str, Any]) -> list[str]:
    """`"section.name"` of every number in the sections (dicts) of one model's metrics, in order."""
    return [
        f"{section}.{name}"
        for section, values in metrics.items()
        if isinstance(values, dict)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _lookup(metrics: dict, key: str) -> Any:
    """`metrics[section][name]` for `key = "section.name"`, '' when absent."""
    section, name = key.split(".", 1)
    value = metrics.get(section, {})
    return value.get(name, "") if isinstance(value, dict) else ""


def write_reports(report: dict[str, Any], output_dir: str | Path, stem: str = "evaluation") -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.md` in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(markdown_report(report))
    return json_path, md_path


__all__ = [
    "total_variation",
    "wasserstein1",
    "ks_statistic",
    "length_report",
    "length_histogram_table",
    "save_length_histogram",
    "Samples",
    "decode_samples",
    "draw_samples",
    "unigram_entropy",
    "sample_entropy",
    "local_or_hub",
    "load_checkpoint",
    "load_causal_lm",
    "scorer_windows",
    "sequence_nll",
    "generative_perplexity",
    "SingleProcess",
    "heldout_batches",
    "nelbo_report",
    "length_sweep",
    "calibration_collator",
    "noise_bins",
    "calibration_table",
    "gap_predictions",
    "gap_calibration",
    "StructuredTask",
    "instance_template",
    "template_from_pieces",
    "builtin_structured_tasks",
    "load_structured_tasks",
    "template_fits",
    "fill_templates",
    "structured_validity",
    "json_validity",
    "sample_report",
    "write_samples",
    "markdown_table",
    "markdown_report",
    "write_reports",
]
