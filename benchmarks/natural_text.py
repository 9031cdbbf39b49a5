"""Score checkpoints on natural text for docs/quality.md "Natural text" (corpus: `benchmarks/bible_corpus.py`,
scorer: `benchmarks/scorer.py`, every run: `benchmarks/natural_text.sh`).

    python -m benchmarks.natural_text steps  outputs/kjv/E-1.25X outputs/kjv/M-1.25X --output fig2.jsonl
    python -m benchmarks.natural_text curve  outputs/kjv/R-lr0.001/checkpoint-* --output curve.jsonl
    python -m benchmarks.natural_text schedules outputs/kjv/E-1024 --output fig4.jsonl
    python -m benchmarks.natural_text chart fig2.jsonl --output docs/natural_text/pareto.png
    python -m benchmarks.natural_text table fig2.jsonl          # a Markdown table of the rows

* `steps` (Fig. 2): per checkpoint, sampler (Elastic: the paper's and the length-locked one; MDLM's) and K of
  `--steps` (linear): `--num_samples` unconditional samples scored by the fixed scorer (gen-PPL), their unigram
  entropy (low-entropy samples game gen-PPL), length W1 / KS against the test split, and the median ms per sample
  of `generate` at batch 1 and 16; per checkpoint the test-split NELBO.
* `curve` (the retrofit): the same at one K, with the NELBO, for each checkpoint of a fine-tune.
* `schedules` (Fig. 4): at L = 1024 and one K, the median wall time per sequence (batch 1) of Elastic's samplers and
  MDLM's (cached) sampler on the same weights, under linear, p-linear (p = 2) and exponential schedules, next to the
  cost model `L^2 Σ_k α_k^2` (α_k = F(k), the share of the final length present at step k; MDLM: `L^2` per pass).

Every draw is seeded; timings are medians of `--repeats` calls after a warm-up, on the threads `torch` has.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from benchmarks.scorer import lines
from benchmarks.timing import time_calls
from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.evaluation.lengths import ks_statistic, wasserstein1
from elastic_mdm.evaluation.nelbo import nelbo_report
from elastic_mdm.evaluation.perplexity import generative_perplexity, load_causal_lm
from elastic_mdm.evaluation.reports import markdown_table
from elastic_mdm.evaluation.samples import draw_samples, sample_entropy, special_ids
from elastic_mdm.schedules_elastic_mdm import get_schedule

ELASTIC_SAMPLERS = {"elastic-paper": {"lock_length": False}, "elastic-locked": {"lock_length": True}}
MDLM_SAMPLERS = {"mdlm": {}}
FIG4_SCHEDULES = {"linear": {}, "p-linear": {"p": 2.0}, "exponential": {}}


def test_split(tokenizer, path: Path, max_length: int) -> Dataset:
    """The test lines tokenized (`BOS text EOS`); a line longer than `max_length` is an error, not truncated."""
    ids = tokenizer(lines(path))["input_ids"]
    longest = max(map(len, ids))
    if longest > max_length:
        raise ValueError(f"A line of {path} has {longest} tokens, more than the model's {max_length}.")
    return Dataset.from_dict({"input_ids": ids})


def samplers_of(model) -> dict[str, dict]:
    """The samplers a checkpoint has: Elastic's two, or MDLM's."""
    return MDLM_SAMPLERS if model.config.objective == "mdlm" else ELASTIC_SAMPLERS


def median_ms_per_sample(model, batch: int, repeats: int, **kwargs) -> float:
    """Median wall time of `generate(num_return_sequences=batch)` over `repeats` calls (one warm-up), per sample."""
    generator = torch.Generator(device=model.device).manual_seed(0)  # each call draws on from the last
    seconds = time_calls(
        lambda: model.generate(num_return_sequences=batch, generator=generator, **kwargs), model.device, 1, repeats
    )
    return 1e3 * statistics.median(seconds) / batch


def quality_row(model, tokenizer, scorer, data_lengths: torch.Tensor, num_samples: int, **kwargs) -> dict:
    """gen-PPL, entropy (nats) and length distances of `num_samples` seeded unconditional samples."""
    generator = torch.Generator(device=model.device).manual_seed(0)
    samples = draw_samples(model, tokenizer, num_samples, batch_size=64, generator=generator, **kwargs)
    ppl = generative_perplexity(samples.texts, *scorer, batch_size=64)
    return {
        "gen_ppl": round(ppl["gen_ppl"], 2),
        "entropy": round(sample_entropy(samples.ids, special_ids(tokenizer))["entropy_mean"], 3),
        "mean_length": round(float(samples.lengths.double().mean()), 2),
        "w1": round(wasserstein1(samples.lengths, data_lengths), 3),
        "ks": round(ks_statistic(samples.lengths, data_lengths), 4),
        "capped": round(float(samples.hit_max_length.double().mean()), 4),
    }


def nelbo_bits(model, dataset: Dataset, num_steps: int, draws: int) -> float:
    """Test-split NELBO in bits per token (MDLM: its continuous-time bound; Elastic: the K-step process)."""
    report = nelbo_report(model, dataset, num_steps=num_steps, batch_size=64, num_draws=draws)
    return round(report["nelbo_bits_per_token"], 4)


def data_row(tokenizer, scorer, dataset: Dataset) -> dict:
    """The test split scored as if it were samples: the floor every gen-PPL and entropy reads against."""
    ids = [list(i) for i in dataset["input_ids"]]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    lengths = torch.tensor([len(i) for i in ids])
    return {"checkpoint": "test split", "sampler": "data",
            "gen_ppl": round(generative_perplexity(texts, *scorer, batch_size=64)["gen_ppl"], 2),
            "entropy": round(sample_entropy(ids, special_ids(tokenizer))["entropy_mean"], 3),
            "mean_length": round(float(lengths.double().mean()), 2)}  # fmt: skip


class Context:
    """What every scoring command shares: the scorer, the test split of the checkpoint's tokenizer, the output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scorer = load_causal_lm(args.scorer)
        self.output = Path(args.output)

    def load(self, path: str) -> tuple[ElasticMDMForDiffusionLM, object, Dataset, torch.Tensor]:
        model = ElasticMDMForDiffusionLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        dataset = test_split(tokenizer, Path(self.args.test_file), model.config.max_position_embeddings)
        return model, tokenizer, dataset, torch.tensor([len(i) for i in dataset["input_ids"]])

    def write(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(self.output, "a") as f:
            f.write(json.dumps(row) + "\n")


def steps_command(ctx: Context) -> None:
    """Fig. 2 rows (see the module docstring)."""
    args = ctx.args
    for i, path in enumerate(args.checkpoints):
        model, tokenizer, dataset, lengths = ctx.load(path)
        if i == 0:
            ctx.write(data_row(tokenizer, ctx.scorer, dataset))
        nelbo = nelbo_bits(model, dataset, args.nelbo_steps, args.nelbo_draws)
        for name, extra in samplers_of(model).items():
            for k in args.steps:
                kwargs = {"num_steps": k, "schedule": "linear", **extra}
                row = {"checkpoint": path, "sampler": name, "K": k, "nelbo_bits": nelbo}
                row |= quality_row(model, tokenizer, ctx.scorer, lengths, args.num_samples, **kwargs)
                for batch, repeats in ((1, args.repeats), (16, max(1, args.repeats // 2))):
                    row[f"ms_b{batch}"] = round(median_ms_per_sample(model, batch, repeats, **kwargs), 2)
                ctx.write(row)


def curve_command(ctx: Context) -> None:
    """The retrofit curve: NELBO and one-K sample scores of every checkpoint, in the order given."""
    args = ctx.args
    for path in args.checkpoints:
        model, tokenizer, dataset, lengths = ctx.load(path)
        row = {"checkpoint": path, "objective": model.config.objective,
               "nelbo_bits": nelbo_bits(model, dataset, args.nelbo_steps, args.nelbo_draws)}  # fmt: skip
        for name, extra in samplers_of(model).items():
            kwargs = {"num_steps": args.steps[-1], "schedule": "linear", **extra}
            row[name] = quality_row(model, tokenizer, ctx.scorer, lengths, args.num_samples, **kwargs)
        ctx.write(row)


def cost_model(schedule: str, num_steps: int, **params: float) -> dict[str, float]:
    """Attention cost in units of `L^2`: Elastic-MDM's `Σ_{k=1..K} F(k)^2` (its pass at step k holds about
    `F(k) L` of the final `L` positions) and MDLM's `K` (a full canvas per pass)."""
    table = get_schedule(schedule, **params).table(num_steps)  # [K + 1]
    return {"elastic_cost": round(float((table[1:] ** 2).sum()), 3), "mdlm_cost": float(num_steps)}


def schedules_command(ctx: Context) -> None:
    """Fig. 4 rows: wall time per sequence at batch 1 for each schedule and sampler, and the cost model."""
    args = ctx.args
    model = ElasticMDMForDiffusionLM.from_pretrained(args.checkpoints[0]).eval()
    length, k = model.config.max_position_embeddings, args.steps[-1]
    for schedule, params in FIG4_SCHEDULES.items():
        for name, extra in {**ELASTIC_SAMPLERS, **MDLM_SAMPLERS}.items():
            model.config.objective = "mdlm" if name == "mdlm" else "elastic"  # MDLM's sampler, the same weights
            kwargs = {"num_steps": k, "schedule": schedule, "schedule_kwargs": params, **extra}
            out = model.generate(num_return_sequences=4, seed=0, return_dict_in_generate=True, **kwargs)
            row = {"checkpoint": args.checkpoints[0], "L": length, "K": k, "schedule": schedule, "sampler": name,
                   "ms_per_sequence": round(median_ms_per_sample(model, 1, args.repeats, **kwargs), 1),
                   "mean_length": round(float(out.lengths.double().mean()), 1),
                   "passes": round(float(out.sequence_passes.double().mean()), 1),
                   **cost_model(schedule, k, **params)}  # fmt: skip
            ctx.write(row)


def chart_command(args: argparse.Namespace) -> None:
    """The Pareto chart of Fig. 2: gen-PPL against ms per sample, one line per sampler, at batch 1 and 16."""
    from elastic_mdm.evaluation.plots import pyplot, save

    plt = pyplot()
    rows = [json.loads(line) for path in args.checkpoints for line in open(path)]
    floor = next((r["gen_ppl"] for r in rows if r.get("sampler") == "data"), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = sorted({(r["checkpoint"], r["sampler"]) for r in rows if "K" in r})
    named = len({checkpoint for checkpoint, _ in lines}) > 1  # name the model too when there are several
    for ax, batch in zip(axes, (1, 16), strict=True):
        for checkpoint, name in lines:
            line = sorted((r for r in rows if (r["checkpoint"], r.get("sampler")) == (checkpoint, name) and "K" in r),
                          key=lambda r: r["K"])  # fmt: skip
            label = f"{Path(checkpoint).name} {name}" if named else name
            ax.plot([r[f"ms_b{batch}"] for r in line], [r["gen_ppl"] for r in line], marker="o", label=label)
            for r in line:
                ax.annotate(f"K={r['K']}", (r[f"ms_b{batch}"], r["gen_ppl"]), fontsize=7)
        if floor is not None:
            ax.axhline(floor, color="grey", linestyle="--", label="test split")
        ax.set(xscale="log", yscale="log", xlabel=f"ms per sample (batch {batch})", ylabel="gen-PPL (scorer)")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(plt.NullFormatter())
            axis.set_major_formatter(plt.ScalarFormatter())
        ax.legend(fontsize=8)
    save(fig, plt, args.output)


def flat(row: dict) -> dict:
    """A curve row's per-sampler dicts spread into `sampler.field` columns, the checkpoint folder shortened."""
    out = {"checkpoint": "/".join(Path(row["checkpoint"]).parts[-2:])}
    for key, value in row.items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in value.items()}
        elif key != "checkpoint":
            out[key] = value
    return out


def table_command(args: argparse.Namespace) -> None:
    """The rows of JSONL files as one Markdown table (the tables of docs/quality.md "Natural text")."""
    rows = [flat(json.loads(line)) for path in args.checkpoints for line in open(path)]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    print(markdown_table(rows, columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["steps", "curve", "schedules", "chart", "table"])
    parser.add_argument("checkpoints", nargs="+", help="Checkpoint folders (chart, table: JSONL files).")
    parser.add_argument("--output", default="natural_text.jsonl", help="JSON lines (appended); chart: the PNG.")
    parser.add_argument("--scorer", default="outputs/kjv/scorer")
    parser.add_argument("--test_file", default="outputs/kjv/verses/test.txt")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--nelbo_steps", type=int, default=128)
    parser.add_argument("--nelbo_draws", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    if args.command in ("chart", "table"):
        return chart_command(args) if args.command == "chart" else table_command(args)
    commands = {"steps": steps_command, "curve": curve_command, "schedules": schedules_command}
    commands[args.command](Context(args))


if __name__ == "__main__":
    main()
