"""Score checkpoints on the built-in synthetic JSON task for docs/quality.md: honest NELBO, length fidelity at
K = 1 and K = 64 with the paper's sampler and the length-locked one, unconditional and template JSON validity.

    python benchmarks/quality.py outputs/abl-*/ --output quality.jsonl

Every number uses the held-out split the main job evaluates on (512 records, data seed 0) and seeded samplers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoTokenizer

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.data.arguments import DataArguments
from elastic_mdm.data.corpus import length_statistics, load_datasets
from elastic_mdm.data.synthetic import SCHEMAS
from elastic_mdm.evaluation.lengths import length_sweep
from elastic_mdm.evaluation.nelbo import nelbo_report
from elastic_mdm.evaluation.samples import draw_samples
from elastic_mdm.evaluation.structured import builtin_structured_tasks, json_validity, structured_validity
from elastic_mdm.objectives.table import get_objective

SAMPLERS = {"paper": {"lock_length": False}, "locked": {"lock_length": True}}


def nelbo_bits(model, dataset, num_steps: int, draws: int) -> tuple[float, float]:
    """Mean and standard error of the NELBO (bits/token) over `draws` independent noise draws of the held-out set."""
    report = nelbo_report(model, dataset, num_steps=num_steps, batch_size=64, num_draws=draws)
    return round(report["nelbo_bits_per_token"], 3), round(report.get("nelbo_bits_per_token_se", float("nan")), 3)


def sampler_scores(model, tokenizer, data_lengths, extra: dict, num_samples: int, steps: list[int]) -> dict:
    """Length rows per K, unconditional JSON validity at the last K, template validity (MDLM: 16 masks per gap)."""
    rows = length_sweep(model, tokenizer, data_lengths, num_samples=num_samples, steps=steps, schedules=["linear"],
                        **extra)  # fmt: skip
    out = {f"K{r['K']}": {k: r[k] for k in ("mean", "tv", "w1", "ks", "capped")} for r in rows}
    samples = draw_samples(model, tokenizer, num_samples, generator=torch.Generator(device=model.device).manual_seed(0),
                           num_steps=steps[-1], **extra)  # fmt: skip
    out["uncond_json"] = round(json_validity(samples.texts, list(SCHEMAS.values())), 4)
    budget = {"mdlm_gap_budget": 16} if get_objective(model.config.objective).fixed_canvas else {}
    fills = structured_validity(
        model,
        tokenizer,
        builtin_structured_tasks(tokenizer),
        num_per_template=32,
        generator=torch.Generator(device=model.device).manual_seed(0),
        num_steps=steps[-1],
        **extra,
        **budget,
    )
    out["template"] = round(fills["json_validity"], 3)
    out["template_by_schema"] = {k: round(v, 2) for k, v in fills["by_name"].items()}
    return out


def score(path: str, num_samples: int, nelbo_steps: list[int], nelbo_seeds: int) -> dict:
    start = time.time()
    model = ElasticMDMForDiffusionLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = DataArguments(dataset_name="synthetic-json", num_synthetic_records=1, num_synthetic_eval_records=512)
    dataset = load_datasets(data, tokenizer, model.config.max_position_embeddings, 0)[1]
    lengths = length_statistics(dataset)
    objective = get_objective(model.config.objective)
    result = {"checkpoint": path, "objective": objective.name}
    steps = nelbo_steps if objective.learns_gaps else nelbo_steps[:1]  # MDLM's bound is continuous in time, no K
    result["nelbo_bits"] = {f"K{k}": nelbo_bits(model, dataset, k, nelbo_seeds) for k in steps}
    if objective.learns_gaps:
        for name, extra in SAMPLERS.items():
            result[name] = sampler_scores(model, tokenizer, lengths, extra, num_samples, [1, 64])
    else:
        result[objective.name] = sampler_scores(model, tokenizer, lengths, {}, num_samples, [64])
    result["eval_seconds"] = round(time.time() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--output", default="quality.jsonl", help="JSON lines, one per checkpoint (appended).")
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--nelbo_steps", type=int, nargs="+", default=[64, 1024], help="K of the Elastic bound.")
    parser.add_argument("--nelbo_seeds", type=int, default=16, help="Noise draws of the held-out set per bound.")
    args = parser.parse_args()
    for path in args.checkpoints:
        result = score(path, args.num_samples, args.nelbo_steps, args.nelbo_seeds)
        print(json.dumps(result), flush=True)
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
