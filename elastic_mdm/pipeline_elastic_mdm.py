"""`pipeline("text-generation", model=path, trust_remote_code=True)` for Elastic-MDM checkpoints.

Shipped with every checkpoint as remote code (design §6): it imports only torch and transformers. The checkpoint's
config registers it under `custom_pipelines` (`configuration_elastic_mdm.CUSTOM_PIPELINES`), which is where
`transformers.pipeline` looks for a model's own pipeline class.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.pipelines.text_generation import TextGenerationPipeline


class ElasticMDMTextGenerationPipeline(TextGenerationPipeline):
    """Transformers' `TextGenerationPipeline` driving `ElasticMDMForDiffusionLM.generate` on prompts: a prompt is a
    prefix, continued in one open gap before EOS (design §5), and the result is returned as the stock pipeline
    returns it (`generated_text`, the prompt included unless `return_full_text=False`).

    What differs from the stock pipeline, each forced by the diffusion sampler:

    * prompts are tokenized without the tokenizer's special tokens (an appended EOS would close the prompt's open
      gap; `add_special_tokens=True` is passed on and then refused by `generate`), and BOS is put in front:
      `generate` needs the anchor;
    * the stock autoregressive defaults (`max_new_tokens=256`, `temperature=0.7`) are not added: the checkpoint's
      generation config (`num_steps`, `schedule`, `lock_length`, ...) applies and the gap head sets the length;
      keywords given at construction or call time (`num_steps=64`, `max_new_tokens=32`, `top_p=0.9`, `seed=0`,
      `streamer=...`) go to `generate` as in a direct call;
    * `generate` returns each sequence without the padding of a batched prompt; the rows are shifted right by their
      prompt's padding so that the stock post-processing, which cuts every row at the padded prompt length, cuts at
      the prompt (with `return_tensors=True` the token ids of a batched call start with that many pad ids).
    """

    _default_generation_config = None

    def check_model_type(self, supported_models: Any) -> None:
        """Accept Elastic-MDM models only (the stock check lists causal LMs, which this model is not)."""
        model_type = getattr(self.model.config, "model_type", None)
        if model_type != "elastic_mdm":
            raise ValueError(
                f"ElasticMDMTextGenerationPipeline drives Elastic-MDM models only, got model_type={model_type!r}; "
                "use pipeline('text-generation', ...) without pipeline_class for other models."
            )

    def preprocess(self, prompt_text, **kwargs: Any) -> dict[str, Any]:
        """The stock tokenization without special tokens unless asked, then BOS in front of the prompt when the
        tokenizer did not put it there."""
        if kwargs.get("add_special_tokens") is None:
            kwargs["add_special_tokens"] = False
        inputs = super().preprocess(prompt_text, **kwargs)
        bos = self.model.config.bos_token_id
        ids = inputs["input_ids"]
        if ids.shape[1] == 0 or bool((ids[:, 0] != bos).any()):
            inputs["input_ids"] = torch.cat([ids.new_full((ids.shape[0], 1), bos), ids], dim=1)
            if inputs.get("attention_mask") is not None:
                mask = inputs["attention_mask"]
                inputs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], 1)), mask], dim=1)
        return inputs

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs: Any) -> dict[str, Any]:
        """`generate` through the stock `_forward`; rows of a padded batch are shifted right by their padding."""
        mask = model_inputs.get("attention_mask")
        outputs = super()._forward(model_inputs, **generate_kwargs)
        if mask is None or outputs["input_ids"] is None or bool(mask.all()):
            return outputs
        shift = (mask.shape[1] - mask.sum(dim=1)).tolist()  # [in_b] padding of each prompt
        sequences = outputs["generated_sequence"]  # [in_b, per_prompt, longest]
        pad = self.model.config.pad_token_id
        pad = self.model.config.eos_token_id if pad is None else pad
        shifted = sequences.new_full((*sequences.shape[:2], sequences.shape[2] + max(shift)), pad)
        for row, offset in enumerate(shift):
            shifted[row, :, offset : offset + sequences.shape[2]] = sequences[row]
        outputs["generated_sequence"] = shifted
        return outputs


__all__ = ["ElasticMDMTextGenerationPipeline"]
