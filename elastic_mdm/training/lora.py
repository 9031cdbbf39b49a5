"""LoRA fine-tuning of a checkpoint (e.g. the LLaDA retrofit): adapters on the block linears, new modules in full.

`add_lora` wraps the model with peft adapters `W + (alpha / r) B A` on the attention and MLP linears of each block;
the modules a retrofitted checkpoint lacks (gap head, adaLN, time embedding) are trained in full
(`modules_to_save`). After training, `merge_lora` folds the adapters into the weights and `save_merged_zero3` saves
the merged model when DeepSpeed ZeRO-3 partitions it, so every run ends with a plain Elastic-MDM folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.integrations import is_deepspeed_zero3_enabled

from ..modeling_elastic_mdm import ElasticMDMForDiffusionLM

if TYPE_CHECKING:
    from .arguments import ModelArguments
    from .trainer import ElasticMDMTrainer

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


__all__ = ["LORA_TARGETS", "NEW_MODULES", "add_lora", "merge_lora", "save_merged_zero3"]
