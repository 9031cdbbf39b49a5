"""The training command (`scripts/train.py`): arguments, model, data, `Trainer`, save, report.

    python scripts/train.py configs/tiny.yaml [--output_dir out --max_steps 100 ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py configs/owt-110m.yaml

A YAML file gives any field of ModelArguments, DataArguments, ElasticMDMTrainingArguments and ReportArguments
(`arguments.py`); command-line flags override it. An --output_dir that holds a model or checkpoint-* folders is
refused unless --overwrite_output_dir is given or the run resumes from a checkpoint inside it (`outputs.py`,
docs/security.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from ..configuration_elastic_mdm import ElasticMDMConfig
from ..data.arguments import DataArguments
from ..data.corpus import length_statistics, load_datasets
from ..data.schema_prompts import check_gap_budget
from ..data.synthetic import data_tokenizer
from ..loading.checkpoints import (
    check_finite_weights,
    check_model_type,
    checkpoint_config,
    local_or_hub,
    saved_tokenizer,
)
from ..loading.tokenizers import check_vocab, ensure_special_tokens, sync_config_with_tokenizer
from ..modeling_elastic_mdm import ElasticMDMForDiffusionLM
from ..objectives.table import get_objective
from ..training.arguments import NOT_SHAPE, ElasticMDMTrainingArguments, ModelArguments, ReportArguments
from ..training.lora import add_lora, merge_lora, save_merged_zero3
from ..training.outputs import check_output_dir, check_resume_checkpoint, check_resume_config
from ..training.trainer import ElasticMDMTrainer

RESUME_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "mask_token_id", "block_type", "hidden_size",
                 "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                 "time_conditioning", "cond_dim", "gap_head_type", "objective")  # fmt: skip


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, ElasticMDMTrainingArguments, ReportArguments]:
    """`[config.yaml] [--flag value ...]`: the YAML values first, the flags after them (the last one wins)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ElasticMDMTrainingArguments, ReportArguments))
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0]) as f:
            argv = yaml_to_flags(yaml.safe_load(f) or {}) + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def yaml_to_flags(values: dict) -> list[str]:
    """`{"lr": 3e-4, "families": ["linear", "cosine"]}` -> `["--lr", "0.0003", "--families", "linear", "cosine"]`."""
    flags = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        elif value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def build_model(model_args: ModelArguments, tokenizer) -> ElasticMDMForDiffusionLM:
    """Load the checkpoint with the installed class (its tokenizer must be the one given, its weights finite) or
    build a new model sized by `model_args`."""
    if model_args.model_name_or_path:
        path = local_or_hub(model_args.model_name_or_path)
        check_model_type(checkpoint_config(path), model_args.model_name_or_path)
        model = ElasticMDMForDiffusionLM.from_pretrained(
            path, attn_implementation=model_args.attn_implementation, use_safetensors=True
        )
        check_finite_weights(model, repr(model_args.model_name_or_path))
        if len(tokenizer) > model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
        check_vocab(model.config, tokenizer, saved_tokenizer(path, model_args.trust_remote_code))
        return model
    shape = {k: v for k, v in vars(model_args).items() if k not in NOT_SHAPE and not k.startswith("lora_")}
    config = sync_config_with_tokenizer(ElasticMDMConfig(**shape), tokenizer)
    return ElasticMDMForDiffusionLM._from_config(config, attn_implementation=model_args.attn_implementation)


def main(argv: list[str] | None = None) -> dict:
    # 1. arguments
    model_args, data_args, training_args, report_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    set_seed(training_args.seed)

    # 2. nothing is overwritten unasked; a resume is exact or refused; what the report needs is at hand
    check_training_paths(model_args, data_args, training_args)
    check_launch(training_args)
    check_report(report_args, model_args, data_args)

    # 3. tokenizer (the model's own when fine-tuning; BOS / EOS / mask added when missing) and model
    source = local_or_hub(model_args.model_name_or_path) if model_args.model_name_or_path else None
    tokenizer = data_tokenizer(data_args, source, trust_remote_code=model_args.trust_remote_code)
    ensure_special_tokens(tokenizer)
    model = build_model(model_args, tokenizer)
    if training_args.resume_from_checkpoint:
        expected = {name: getattr(model.config, name, None) for name in RESUME_FIELDS}
        check_resume_config(training_args.resume_from_checkpoint, {**expected, "objective": training_args.objective})
    if model_args.lora_r:
        model = add_lora(model, model_args, training_args.gradient_checkpointing)

    # 4. data: natural lengths, long documents split into chunks
    train_dataset, eval_dataset = load_datasets(
        data_args, tokenizer, model.config.max_position_embeddings, training_args.seed
    )

    # 5. train
    trainer = ElasticMDMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.dataset_name = data_args.dataset_name or ", ".join(data_args.train_files or [])
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 6. evaluate, save (weights, remote code, tokenizer, generation config, model card), push
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    merge = bool(model_args.lora_r and model_args.lora_merge)
    if merge:  # a plain Elastic-MDM folder, adapters folded in
        model = trainer.model = merge_lora(trainer)
    model.generation_config.num_steps = report_args.report_num_steps
    model.generation_config.schedule = report_args.report_schedule
    model.generation_config.lock_length = report_args.lock_length
    if merge and is_deepspeed_zero3_enabled():
        save_merged_zero3(trainer, model, tokenizer)
    else:
        trainer.save_model()
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub()

    # 7. report: generated vs data lengths (and JSON validity on the built-in task)
    if report_args.report_num_samples and trainer.is_world_process_zero():
        sampler = report_model(model, training_args)
        metrics["report"] = report(sampler, tokenizer, eval_dataset, data_args, training_args, report_args)

    # 8. every rank leaves together: a rank that exits while rank 0 still writes or reports tears down its
    # process group at interpreter exit, which aborts the run ("terminate called without an active exception");
    # the others wait for rank 0's report up to --ddp_timeout (30 minutes by default)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return metrics


def check_training_paths(
    model_args: ModelArguments, data_args: DataArguments, training_args: ElasticMDMTrainingArguments
) -> None:
    """Refuse an output folder that would overwrite a model or the run's source, an inexact resume, and a
    `--structured_gap_budget` the objective would misapply."""
    check_output_dir(
        training_args.output_dir,
        overwrite_output_dir=training_args.overwrite_output_dir,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        sources=(model_args.model_name_or_path, data_args.tokenizer_name),
    )
    if training_args.resume_from_checkpoint:
        check_resume_checkpoint(training_args.resume_from_checkpoint)
    check_gap_budget(data_args, training_args.objective)


def check_launch(training_args: ElasticMDMTrainingArguments) -> None:
    """Refuse processes that were launched together (`WORLD_SIZE`) but would each train alone: on a machine without
    a GPU, `accelerate launch` with a GPU launcher (configs/accelerate/ddp_cpu.yaml) and without `--use_cpu true`
    starts processes that each take themselves for the only one, and they all write the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != training_args.world_size:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but each would train alone (a world of "
            f"{training_args.world_size}): on a machine without a GPU pass --use_cpu true, so that they join (gloo)."
        )


def check_report(report_args: ReportArguments, model_args: ModelArguments, data_args: DataArguments) -> None:
    """Refuse, before training, a report (`--report_num_samples > 0`) the run could not write at its end: the PNG
    histogram needs matplotlib (`pip install elastic-mdm[eval]`), the JSON validity of the built-in task jsonschema,
    and under DeepSpeed ZeRO-3 the report samples with the saved folder, which unmerged LoRA adapters are not."""
    if not report_args.report_num_samples:
        return
    needs = {"matplotlib": "the PNG length histogram"}
    if data_args.is_synthetic:
        needs["jsonschema"] = "the JSON validity of the samples"
    missing = [f"{module} ({what})" for module, what in needs.items() if not importable(module)]
    if missing:
        raise ImportError(
            f"The end-of-training report (--report_num_samples {report_args.report_num_samples}) needs "
            f"{', '.join(missing)}: pip install elastic-mdm[eval], or pass --report_num_samples 0 to train without it."
        )
    if is_deepspeed_zero3_enabled() and model_args.lora_r and not model_args.lora_merge:
        raise ValueError(
            "Under DeepSpeed ZeRO-3 the report samples with the saved model folder, which --lora_merge false leaves "
            "as adapters only: pass --lora_merge true or --report_num_samples 0."
        )


def importable(module: str) -> bool:
    """Whether `import module` would find it (an import hook that refuses it counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a refusing hook; a module set to None in sys.modules
        return False


def report_model(model: ElasticMDMForDiffusionLM, training_args: ElasticMDMTrainingArguments):
    """The model process 0 samples the report with: `model`, or under DeepSpeed ZeRO-3, where every process holds a
    shard of each weight and each forward pass gathers them from all processes (process 0 alone would wait for the
    others forever), the folder just saved (whole 16-bit weights), loaded plain on process 0's device."""
    if not is_deepspeed_zero3_enabled():
        return model
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: load the saved folder whole, not partitioned across processes
    saved = ElasticMDMForDiffusionLM.from_pretrained(Path(training_args.output_dir).resolve(), use_safetensors=True)
    return saved.to(training_args.device).eval()


def report(model, tokenizer, eval_dataset, data_args, training_args, report_args) -> dict:
    """Sample, print the length table and validity, write the PNG and JSON next to the checkpoint."""
    from ..data.synthetic import SCHEMAS
    from ..evaluation.lengths import length_sweep
    from ..evaluation.reports import markdown_table, sample_report
    from ..evaluation.structured import builtin_structured_tasks

    model.eval()
    schemas = tasks = None
    if data_args.is_synthetic:
        schemas, tasks = list(SCHEMAS.values()), builtin_structured_tasks(tokenizer)
    streamed = not hasattr(eval_dataset, "__len__")  # a streamed eval split is finite (a split, or a `take`)
    data_lengths = length_statistics(eval_dataset, n=(data_args.max_eval_samples or sys.maxsize) if streamed else None)
    fixed_canvas = get_objective(model.config.objective).fixed_canvas  # MDLM: masks per open gap of a template
    budget = {"mdlm_gap_budget": report_args.mdlm_gap_budget} if fixed_canvas else {}
    result = sample_report(
        model,
        tokenizer,
        data_lengths,
        num_samples=report_args.report_num_samples,
        output_dir=Path(training_args.output_dir) / "report",
        schemas=schemas,
        structured_tasks=tasks,
        seed=training_args.seed,
        num_steps=report_args.report_num_steps,
        schedule=report_args.report_schedule,
        **budget,
    )
    print(
        f"\nLengths, generated vs data ({report_args.report_num_samples} samples, K={report_args.report_num_steps}, "
        f"{report_args.report_schedule} schedule):"
    )
    print(result["table"])
    result["length_sweep"] = length_sweep(
        model, tokenizer, data_lengths, num_samples=report_args.report_num_samples, steps=[1],
        schedules=[report_args.report_schedule], seed=training_args.seed,
    ) + [result["length_row"]]  # fmt: skip
    print("\nLength model alone (K = 1) next to the report's K:")
    print(markdown_table(result["length_sweep"]))
    skip = ("table", "length_sweep", "length_row")
    summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items() if k not in skip}
    print(json.dumps(summary, indent=1))
    print(f"histogram: {result['histogram_png']}; checkpoint: {training_args.output_dir}")
    return result


__all__ = [
    "main",
    "parse_arguments",
    "yaml_to_flags",
    "build_model",
    "check_training_paths",
    "check_launch",
    "check_report",
    "report_model",
    "report",
]
