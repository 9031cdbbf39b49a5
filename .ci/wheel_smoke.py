"""Smoke test of the installed wheel (not an editable install), run by .ci/run from outside the repository: train a
few steps, save with a model card, reload through AutoModel with the checkpoint's remote code, generate."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel

import elastic_mdm
from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.data import synthetic
from elastic_mdm.training.arguments import ElasticMDMTrainingArguments
from elastic_mdm.training.trainer import ElasticMDMTrainer


def main() -> None:
    assert "site-packages" in elastic_mdm.__file__, f"not the installed wheel: {elastic_mdm.__file__}"
    tokenizer = synthetic.build_tokenizer(num_records=200)
    config = ElasticMDMConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=80, gap_noise_conditioning=True, mask_token_id=tokenizer.mask_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smoke"
        args = ElasticMDMTrainingArguments(
            output_dir=str(out), max_steps=5, per_device_train_batch_size=8, eval_num_steps=4, save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = ElasticMDMTrainer(
            model=ElasticMDMForDiffusionLM(config), args=args, processing_class=tokenizer,
            train_dataset=synthetic.synthetic_dataset(tokenizer, 64, seed=0),
            eval_dataset=synthetic.synthetic_dataset(tokenizer, 16, seed=1),
        )  # fmt: skip
        trainer.train()
        trainer.evaluate()
        trainer.save_model()
        trainer.create_model_card()
        card = (out / "README.md").read_text()
        assert "eval_nelbo_bits_per_token" in card, "the model card lacks the evaluation"
        model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        ids = model.generate(num_return_sequences=2, num_steps=4, seed=0)
        assert ids.dtype == torch.long and ids.shape[0] == 2 and int(ids[0, 0]) == tokenizer.bos_token_id
    print("wheel smoke test passed:", elastic_mdm.__file__, file=sys.stderr)


if __name__ == "__main__":
    main()
