"""The evaluate command: any Elastic-MDM (or MDLM-objective) checkpoint on any data, one JSON and one Markdown report.

    python scripts/evaluate.py --model_name_or_path outputs/tiny-elastic --dataset_name synthetic-json \
        --mdlm_checkpoint outputs/tiny-mdlm --gen_ppl_model gpt2 --num_samples 256 --output_dir eval/tiny

Checkpoints are local folders or Hub ids, loaded with the installed classes (their own code runs only with
`--trust_remote_code`, as scripts/generate.py; docs/security.md). The data flags are
those of `elastic_mdm.training.arguments.DataArguments` (as scripts/train.py); only the held-out split is used.
Per checkpoint (`--model_name_or_path`, and `--mdlm_checkpoint` side by side), the metrics `--metrics` selects:

* `nelbo`: held-out NELBO of the K-step process (`--num_steps`, `--schedule`) in bits/token and its perplexity
  bound (`evaluation.nelbo.nelbo_report`, seeded noise);
* `calibration` (objective `elastic`): gap-head calibration per bin of the noise level `s'`: bias
  `mean(E_pφ[g] - g)`, mean absolute error and gap CE, on corrupted held-out batches (`evaluation.calibration`);
* `samples`: `--num_samples` unconditional samples: length fidelity against the held-out lengths (TV, W1, KS, mean,
  median, a PNG), unigram entropy, and with `--gen_ppl_model` (any `AutoModelForCausalLM`, its own tokenizer) the
  generative perplexity of the decoded samples;
* `sweep`: length fidelity at every K of `--sweep_steps` and schedule of `--sweep_schedules`, with the data's floor;
* `structured`: templates whose structure tokens are anchors and whose values are open gaps (`--structured_tasks`:
  `builtin` for the synthetic task's schemas, or a JSONL of `{"schema", "instance"}` rows), filled by `generate`;
  the share that parses and validates with jsonschema. MDLM checkpoints get `--mdlm_gap_budget` masks per gap
  (paper §5.4).

Writes `<output_dir>/evaluation.json`, `<output_dir>/evaluation.md`, and per checkpoint a length histogram PNG,
`trajectory.png` (the active length of a few samples against the step), `length_sweep.png` (the K-sweep as a chart)
and the samples (JSONL).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from ..data.arguments import DataArguments
from ..data.corpus import length_statistics, load_datasets
from ..data.synthetic import data_tokenizer
from ..evaluation.calibration import calibration_collator, gap_calibration
from ..evaluation.lengths import SWEEP_SCHEDULES, SWEEP_STEPS, length_histogram_table, length_report, length_sweep
from ..evaluation.nelbo import heldout_batches, nelbo_report
from ..evaluation.perplexity import generative_perplexity, load_causal_lm
from ..evaluation.plots import save_length_histogram, save_sweep_chart, save_trajectory_plot
from ..evaluation.reports import markdown_table, write_reports
from ..evaluation.samples import draw_samples, sample_entropy, special_ids, write_samples
from ..evaluation.structured import (
    StructuredTask,
    builtin_structured_tasks,
    load_structured_tasks,
    structured_validity,
)
from ..generation_config_elastic_mdm import ElasticMDMGenerationConfig
from ..loading.checkpoints import load_checkpoint, local_or_hub, saved_tokenizer
from ..loading.tokenizers import check_vocab
from ..objectives.table import get_objective
from ..schedules_elastic_mdm import check_num_steps

METRICS = ("nelbo", "calibration", "samples", "sweep", "structured")
BUILTIN = "builtin"


@dataclass
class EvaluationArguments:
    """What to evaluate and how (the data flags are `DataArguments`)."""

    model_name_or_path: str = field(metadata={"help": "Checkpoint folder or Hub id."})
    mdlm_checkpoint: str | None = field(default=None, metadata={"help": "An MDLM-objective checkpoint to compare."})
    output_dir: str = field(default="evaluation", metadata={"help": "Where the reports go."})
    metrics: list[str] = field(default_factory=lambda: list(METRICS), metadata={"help": f"Some of {METRICS}."})
    num_steps: int = field(default=128, metadata={"help": "K of the NELBO, the calibration and the samplers."})
    schedule: str = field(default="linear", metadata={"help": "Reveal schedule of the NELBO and the samplers."})
    nelbo_draws: int = field(
        default=4, metadata={"help": "Independent noise draws of the held-out set averaged by the NELBO (with s.e.)."}
    )
    sweep_steps: list[int] = field(
        default_factory=lambda: list(SWEEP_STEPS), metadata={"help": "Horizons K of the length sweep."}
    )
    sweep_schedules: list[str] = field(
        default_factory=lambda: list(SWEEP_SCHEDULES), metadata={"help": "Schedules of the length sweep."}
    )
    generate_kwargs: str = field(default="{}", metadata={"help": "More generate() options, JSON: '{\"top_p\": 0.9}'"})
    eval_batch_size: int = 32
    max_eval_batches: int | None = field(default=None, metadata={"help": "Held-out batches for NELBO/calibration."})
    data_seed: int = field(default=42, metadata={"help": "The training --seed (draws the held-out split)."})
    calibration_bins: int = 10
    calibration_length_share: float = field(default=0.1, metadata={"help": "Share of step-0 (s' = 0) examples."})
    num_samples: int = field(default=64, metadata={"help": "Unconditional samples (0: none)."})
    sample_batch_size: int = 64
    gen_ppl_model: str | None = field(default=None, metadata={"help": "Causal LM scoring the samples (name/path)."})
    gen_ppl_batch_size: int = 8
    structured_tasks: str | None = field(
        default=None,
        metadata={"help": f"'{BUILTIN}' or a JSONL of {{schema, instance}} rows; unset: '{BUILTIN}' on synthetic-json"},
    )
    max_structured_tasks: int | None = field(default=None, metadata={"help": "Read at most this many JSONL rows."})
    num_per_template: int = field(default=4, metadata={"help": "Fills per structured-output template."})
    mdlm_gap_budget: int = field(default=16, metadata={"help": "Masks per open gap for MDLM templates (§5.4)."})
    seed: int = 0
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu")
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the checkpoints' own modeling / tokenizer code (auto_map); only for code you trust."},
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"Unknown metrics {unknown}; use some of {METRICS}.")
        check_num_steps(self.num_steps, "--num_steps")  # before any model loads or any table is built
        for steps in self.sweep_steps:
            check_num_steps(steps, "--sweep_steps")
        counts = ("eval_batch_size", "calibration_bins", "sample_batch_size", "gen_ppl_batch_size")
        for name in counts + ("num_per_template", "mdlm_gap_budget", "nelbo_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("num_samples", "max_eval_batches", "max_structured_tasks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value} (0 turns it off).")
        self.extra_generate_kwargs()  # a bad --generate_kwargs fails here, before any checkpoint loads

    def extra_generate_kwargs(self) -> dict[str, Any]:
        """`--generate_kwargs` as a dict of `generate()` options, checked: a JSON object whose keys are fields of
        `ElasticMDMGenerationConfig` with valid values, none of them set by a flag of their own (`--num_steps`,
        `--schedule`: the report states those, so a second value would be sampled with but not reported) nor by the
        evaluation itself (the generator, the number of samples)."""
        try:
            extra = json.loads(self.generate_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--generate_kwargs is not JSON ({err}): {self.generate_kwargs!r}.") from err
        if not isinstance(extra, dict):
            raise ValueError(f"--generate_kwargs must be a JSON object of generate() options, got {extra!r}.")
        own = {"num_steps": "--num_steps", "schedule": "--schedule", "num_return_sequences": "--num_samples",
               "mdlm_gap_budget": "--mdlm_gap_budget", "generator": "--seed", "seed": "--seed"}  # fmt: skip
        own.update({name: "set by the evaluation" for name in ("output_trajectory", "return_dict_in_generate")})
        taken = sorted(name for name in extra if name in own)
        if taken:
            flags = ", ".join(f"{name} ({own[name]})" for name in taken)
            raise ValueError(
                f"--generate_kwargs sets {flags}, which the evaluation sets from its own flags (and reports); pass "
                "those flags instead."
            )
        unknown = ElasticMDMGenerationConfig().update(**extra)  # validates the values too
        if unknown:
            raise ValueError(
                f"--generate_kwargs has unknown generate() options {sorted(unknown)}; see ElasticMDMGenerationConfig."
            )
        return extra

    def sampling_kwargs(self) -> dict[str, Any]:
        """`generate()` keywords of the samplers."""
        return {"num_steps": self.num_steps, "schedule": self.schedule, **self.extra_generate_kwargs()}


def parse_arguments(argv: list[str]) -> tuple[EvaluationArguments, DataArguments]:
    """The command line as `(EvaluationArguments, DataArguments)`."""
    return HfArgumentParser((EvaluationArguments, DataArguments)).parse_args_into_dataclasses(args=argv)


def heldout_dataset(data_args: DataArguments, tokenizer, max_length: int, seed: int):
    """The tokenized held-out split (`None` without data); the train split is cut to one document. With
    `--structured_eval_file`, its `{schema, instance}` rows as the training run saw them (prompt and structure
    anchored)."""
    if data_args.structured_eval_file:
        from ..data.schema_prompts import structured_dataset

        return structured_dataset(data_args.structured_eval_file, data_args, tokenizer, max_length)
    if data_args.dataset_name is None and not data_args.train_files:
        return None
    quick = dataclasses.replace(data_args, max_train_samples=1, num_synthetic_records=1)
    return load_datasets(quick, tokenizer, max_length, seed)[1]


def structured_tasks(args: EvaluationArguments, data_args: DataArguments, tokenizer) -> list[StructuredTask]:
    """The structured-output tasks `--structured_tasks` names (the built-in ones on the synthetic task)."""
    source = args.structured_tasks or (BUILTIN if data_args.is_synthetic else None)
    if source is None:
        return []
    if source == BUILTIN:
        return builtin_structured_tasks(tokenizer)
    tasks = load_structured_tasks(source, tokenizer, args.max_structured_tasks, data_args.structured_schema_prompt)
    if not tasks and args.max_structured_tasks != 0:  # 0 turns the section off
        raise ValueError(
            f"--structured_tasks {source!r} holds no row, so the report would have no structured section; give a "
            f"JSONL of {{schema, instance}} rows, '{BUILTIN}', or leave 'structured' out of --metrics."
        )
    return tasks


def sample_metrics(model, tokenizer, data_lengths, args: EvaluationArguments, scorer, output_dir: Path) -> dict:
    """Samples: lengths against the data (PNG, table), unigram entropy, generative perplexity."""
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    samples = draw_samples(
        model, tokenizer, args.num_samples, batch_size=args.sample_batch_size, generator=generator,
        **args.sampling_kwargs(),
    )  # fmt: skip
    write_samples(samples, output_dir / "samples.jsonl")
    entropy = sample_entropy(samples.ids, special_ids(tokenizer))
    out: dict[str, Any] = {"samples": {"num_samples": args.num_samples, **entropy}}
    out["samples"]["tokens_per_forward"] = samples.tokens_per_forward  # generated tokens per denoiser pass
    out["trajectory_png"] = str(trajectory_plot(model, args, output_dir / "trajectory.png"))
    if scorer is not None:
        out["samples"].update(generative_perplexity(samples.texts, *scorer, batch_size=args.gen_ppl_batch_size))
    if data_lengths is not None:
        out["lengths"] = length_report(samples.lengths, data_lengths)
        png = save_length_histogram(samples.lengths, data_lengths, output_dir / "length_histogram.png")
        out["lengths"]["histogram_png"] = str(png)
        out["length_table"] = length_histogram_table(samples.lengths, data_lengths)
    return out


def trajectory_plot(model, args: EvaluationArguments, path: Path, num_samples: int = 6) -> Path:
    """A few unconditional samples drawn again with their trajectory: active length against the step, as a PNG."""
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    out = model.generate(
        num_return_sequences=num_samples, generator=generator, output_trajectory=True, return_dict_in_generate=True,
        **args.sampling_kwargs(),
    )  # fmt: skip
    title = f"Active length per step ({model.config.objective}, K = {args.num_steps}, {args.schedule})"
    return save_trajectory_plot(out.trajectory, path, title=title)


def sweep_metrics(
    model, tokenizer, dataset, args: EvaluationArguments, data_args: DataArguments, output_dir: Path | None = None
) -> list[dict]:
    """Length fidelity at every K of `--sweep_steps` and schedule of `--sweep_schedules`, printed as a table, with
    the data-vs-data floor: a fresh draw of the synthetic task, else a bootstrap resample of the held-out lengths."""
    data_lengths = length_statistics(dataset)
    if data_args.is_synthetic:
        fresh = heldout_dataset(data_args, tokenizer, model.config.max_position_embeddings, args.data_seed + 1000)
        reference, label = length_statistics(fresh), "fresh draw"
    else:
        pick = torch.randint(len(data_lengths), (len(data_lengths),), generator=torch.Generator().manual_seed(0))
        reference, label = data_lengths[pick], "bootstrap"
    kwargs = {k: v for k, v in args.sampling_kwargs().items() if k not in ("num_steps", "schedule")}
    rows = length_sweep(
        model, tokenizer, data_lengths, num_samples=args.num_samples, steps=args.sweep_steps,
        schedules=args.sweep_schedules, reference_lengths=reference[: args.num_samples],
        batch_size=args.sample_batch_size, seed=args.seed, **kwargs,
    )  # fmt: skip
    rows[0]["schedule"] = f"data ({label})"
    print(markdown_table(rows, list(rows[-1])))  # the sampled rows add tokens_per_forward
    if output_dir is not None:
        print(f"length sweep chart: {save_sweep_chart(rows, output_dir / 'length_sweep.png')}")
    return rows


def evaluate_checkpoint(name: str, args: EvaluationArguments, data_args: DataArguments, scorer) -> dict[str, Any]:
    """Every selected metric of one checkpoint."""
    model = load_checkpoint(name, args.device, getattr(torch, args.dtype), args.trust_remote_code)
    path = local_or_hub(name)
    tokenizer = data_tokenizer(data_args, path, trust_remote_code=args.trust_remote_code)
    check_vocab(model.config, tokenizer, saved_tokenizer(path, args.trust_remote_code))
    config = model.config
    output_dir = Path(args.output_dir) / Path(name).name
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = heldout_dataset(data_args, tokenizer, config.max_position_embeddings, args.data_seed)
    results: dict[str, Any] = {
        "checkpoint": {"path": name, "objective": config.objective, "parameters": model.num_parameters()}
    }
    held_out = dict(max_batches=args.max_eval_batches)
    if "nelbo" in args.metrics and dataset is not None:
        results["nelbo"] = nelbo_report(
            model, dataset, num_steps=args.num_steps, schedule=args.schedule, batch_size=args.eval_batch_size,
            seed=args.seed, num_draws=args.nelbo_draws, **held_out,
        )  # fmt: skip
    if "calibration" in args.metrics and dataset is not None and get_objective(config.objective).learns_gaps:
        collator = calibration_collator(
            config, num_steps=args.num_steps, schedule=args.schedule, length_share=args.calibration_length_share,
            seed=args.seed,
        )  # fmt: skip
        batches = heldout_batches(dataset, collator, args.eval_batch_size, model.device, **held_out)
        table = gap_calibration(model, batches, args.calibration_bins)
        results["gap_calibration"] = table
        results["calibration"] = {k: v for k, v in table[-1].items() if k != "bin"}  # the "all" row
    if "samples" in args.metrics and args.num_samples:
        data_lengths = length_statistics(dataset) if dataset is not None else None
        results.update(sample_metrics(model, tokenizer, data_lengths, args, scorer, output_dir))
    if "sweep" in args.metrics and args.num_samples and dataset is not None:
        results["length_sweep"] = sweep_metrics(model, tokenizer, dataset, args, data_args, output_dir)
    tasks = structured_tasks(args, data_args, tokenizer) if "structured" in args.metrics else []
    if tasks:
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
        results["structured"] = structured_validity(
            model, tokenizer, tasks, num_per_template=args.num_per_template, batch_size=args.sample_batch_size,
            generator=generator, mdlm_gap_budget=args.mdlm_gap_budget, **args.sampling_kwargs(),
        )  # fmt: skip
    return results


def settings(args: EvaluationArguments, data_args: DataArguments) -> dict[str, Any]:
    """What the numbers were measured with."""
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "data": data_args.dataset_name or ", ".join(data_args.train_files or []) or "none",
        "num_steps (K)": args.num_steps,
        "schedule": args.schedule,
        "num_samples": args.num_samples,
        "gen_ppl_model": args.gen_ppl_model or "none",
        "mdlm_gap_budget": args.mdlm_gap_budget,
        "structured_schema_prompt": data_args.structured_schema_prompt,
        "seed": args.seed,
        "device": f"{args.device} ({machine})",
        "dtype": args.dtype,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluate command on `argv` (default: `sys.argv[1:]`): every checkpoint's metrics, the reports
    written and printed; returns the report."""
    args, data_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    scorer = None
    if args.gen_ppl_model and "samples" in args.metrics:
        scorer = load_causal_lm(args.gen_ppl_model, args.device, getattr(torch, args.dtype))
    checkpoints = [args.model_name_or_path] + ([args.mdlm_checkpoint] if args.mdlm_checkpoint else [])
    models = {}
    for name in checkpoints:
        result = evaluate_checkpoint(name, args, data_args, scorer)
        models[f"{result['checkpoint']['objective']}: {Path(name).name}"] = result
    report = {"settings": settings(args, data_args), "models": models}
    json_path, md_path = write_reports(report, args.output_dir)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return report


__all__ = ["EvaluationArguments", "evaluate_checkpoint", "main", "parse_arguments"]
