"""Train an Elastic-MDM (or the MDLM baseline, `--objective mdlm`) with the Transformers `Trainer`.

    python scripts/train.py configs/tiny.yaml [--output_dir out --max_steps 100 ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py configs/owt-110m.yaml

A YAML file gives any field of ModelArguments, DataArguments, ElasticMDMTrainingArguments and ReportArguments;
command-line flags override it. An --output_dir that holds a model or checkpoint-* folders is refused unless
--overwrite_output_dir is given or the run resumes from a checkpoint inside it (docs/security.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.evaluation.core import sample_report
from elastic_mdm.loading.checkpoints import (
    check_finite_weights,
    check_model_type,
    check_output_dir,
    check_resume_checkpoint,
    check_resume_config,
    checkpoint_config,
    local_or_hub,
    saved_tokenizer,
)
from elastic_mdm.training.arguments import DataArguments, ElasticMDMTrainingArguments
from elastic_mdm.training.corpus import load_datasets
from elastic_mdm.training.tokenizer import (
    check_vocab,
    data_tokenizer,
    ensure_special_tokens,
    sync_config_with_tokenizer,
)
from elastic_mdm.training.trainer import ElasticMDMTrainer


@dataclass
class ModelArguments:
    """A checkpoint to start from, or the shape of a new model."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint folder or Hub id."})
    block_type: str = field(default="dit", metadata={"help": "'dit' (MDLM) or 'llama' (LLaDA) blocks."})
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    time_conditioning: bool = field(default=False, metadata={"help": "Noise level s' conditions the backbone (adaLN)."})
    gap_noise_conditioning: bool = field(
        default=True, metadata={"help": "Noise level s' conditions the gap head only (step caching stays exact)."}
    )
    cond_dim: int = 128
    gap_head_type: str = "concat"
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa | eager | varlen_attn | flash_attention_2"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: train every weight)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator."})
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=list, metadata={"help": "Linears that get adapters (default: attention and MLP of the block)."}
    )
    lora_merge: bool = field(default=True, metadata={"help": "Merge the adapters and save a plain checkpoint."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let the tokenizer run its own code (auto_map); the model always loads the installed class."},
    )


NOT_SHAPE = ("model_name_or_path", "attn_implementation", "trust_remote_code")  # ModelArguments not in the config
RESUME_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "mask_token_id", "block_type", "hidden_size",
                 "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                 "time_conditioning", "cond_dim", "gap_head_type", "objective")  # fmt: skip


@dataclass
class ReportArguments:
    """Samples drawn after training to compare lengths with the data (and JSON validity on the built-in task)."""

    report_num_samples: int = field(default=0, metadata={"help": "Unconditional samples for the report (0: none)."})
    report_num_steps: int = 64
    report_schedule: str = "linear"
    lock_length: bool = field(
        default=True,
        metadata={"help": "Saved generation config: keep the step-0 length (True) or re-draw gaps every step (False)."},
    )
    mdlm_gap_budget: int = field(default=16, metadata={"help": "MDLM objective: masks per open gap of a template."})


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


LORA_TARGETS = {
    "dit": ["qkv_proj", "o_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
NEW_MODULES = ["gap_head", "adaln", "final_adaln", "time_embed"]  # trained in full next to the adapters


def add_lora(model: ElasticMDMForDiffusionLM, model_args: ModelArguments, gradient_checkpointing: bool):
    """Wrap the model with peft LoRA adapters on the block linears; the gap head and the adaLN modules (new in a
    retrofitted checkpoint) stay fully trainable (`modules_to_save`)."""
    from peft import LoraConfig, get_peft_model

    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or LORA_TARGETS[model.config.block_type],
        modules_to_save=[name for name in NEW_MODULES if name in present],
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    return model


def main(argv: list[str] | None = None) -> dict:
    # 1. arguments
    model_args, data_args, training_args, report_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    set_seed(training_args.seed)

    # 2. nothing is overwritten unasked; a resume is exact or refused
    check_training_paths(model_args, data_args, training_args)

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
        metrics["report"] = report(model, tokenizer, eval_dataset, data_args, training_args, report_args)
    return metrics


def merge_lora(trainer: ElasticMDMTrainer) -> ElasticMDMForDiffusionLM:
    """Fold the LoRA adapters into the block linears (peft `merge_and_unload`). Under DeepSpeed ZeRO-3 every rank
    holds a shard of each weight, so the merge runs on the gathered weights and rank 0's result is partitioned
    back."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_deepspeed_zero3_enabled():
        return peft_model.merge_and_unload()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(peft_model.parameters()), modifier_rank=0):
        return peft_model.merge_and_unload()


def save_merged_zero3(trainer: ElasticMDMTrainer, model: ElasticMDMForDiffusionLM, tokenizer) -> None:
    """Save a merged LoRA model trained under ZeRO-3: the engine gathers the 16-bit weights (every rank takes part)
    under the peft wrapper's names, which lose their `base_model.model.` prefix; rank 0 writes a plain folder."""
    state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    if not trainer.args.should_save:
        return
    prefix = "base_model.model."
    state_dict = {name.removeprefix(prefix): tensor for name, tensor in state_dict.items()}
    model.save_pretrained(trainer.args.output_dir, state_dict=state_dict)
    tokenizer.save_pretrained(trainer.args.output_dir)


def check_training_paths(
    model_args: ModelArguments, data_args: DataArguments, training_args: ElasticMDMTrainingArguments
) -> None:
    """Refuse an output folder that would overwrite a model or the run's source, and an inexact resume."""
    check_output_dir(
        training_args.output_dir,
        overwrite_output_dir=training_args.overwrite_output_dir,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        sources=(model_args.model_name_or_path, data_args.tokenizer_name),
    )
    if training_args.resume_from_checkpoint:
        check_resume_checkpoint(training_args.resume_from_checkpoint)


def report(model, tokenizer, eval_dataset, data_args, training_args, report_args) -> dict:
    """Sample, print the length table and validity, write the PNG and JSON next to the checkpoint."""
    from elastic_mdm.evaluation.core import builtin_structured_tasks, length_sweep, markdown_table
    from elastic_mdm.training.corpus import length_statistics
    from elastic_mdm.training.synthetic import SCHEMAS

    model.eval()
    schemas = tasks = None
    if data_args.dataset_name == "synthetic-json":
        schemas, tasks = list(SCHEMAS.values()), builtin_structured_tasks(tokenizer)
    data_lengths = length_statistics(eval_dataset)
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
        **({"mdlm_gap_budget": report_args.mdlm_gap_budget} if model.config.objective == "mdlm" else {}),
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


if __name__ == "__main__":
    main()
