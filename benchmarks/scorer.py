"""The generative-perplexity scorer of docs/quality.md "Natural text": a plain Transformers causal LM
(`GPT2LMHeadModel`) trained on the train split of a line-per-document corpus, fixed for every comparison, with its
own held-out perplexity. No diffusion model is tuned on it.

    python -m benchmarks.scorer outputs/kjv/verses outputs/kjv/scorer --tokenizer outputs/kjv/tokenizer

Each line is one example `BOS text EOS` (the corpus tokenizer's own special tokens). The held-out perplexity is the
one `elastic_mdm.evaluation.perplexity.generative_perplexity` computes on the test lines, so it reads on the same
scale as the samples' gen-PPL: `exp(Σ -log q(t_i | t_<i) / Σ tokens)` over the text tokens after BOS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datasets import Dataset
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from elastic_mdm.evaluation.perplexity import generative_perplexity


def lines(path: Path) -> list[str]:
    """The non-blank lines of a text file."""
    return [line for line in path.read_text().splitlines() if line.strip()]


def scorer_config(tokenizer, context: int, layers: int, width: int) -> GPT2Config:
    """A GPT-2 of `layers` x `width` (heads of 64) over the corpus tokenizer's vocabulary."""
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=context, n_embd=width, n_layer=layers, n_head=width // 64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="Folder with train.txt, validation.txt and test.txt.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    train = Dataset.from_dict({"input_ids": tokenizer(lines(args.corpus / "train.txt"), truncation=True,
                                                      max_length=args.context)["input_ids"]})  # fmt: skip
    model = GPT2LMHeadModel(scorer_config(tokenizer, args.context, args.layers, args.width))
    training = TrainingArguments(
        output_dir=str(args.output_dir / "run"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=100, weight_decay=0.01,
        logging_steps=200, save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    start = time.time()
    Trainer(model=model, args=training, train_dataset=train, data_collator=collator).train()
    seconds = time.time() - start
    model.eval().save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    held_out = {split: generative_perplexity(lines(args.corpus / f"{split}.txt"), model, tokenizer, batch_size=64)
                for split in ("validation", "test")}  # fmt: skip
    summary = {
        "train_seconds": round(seconds),
        "parameters": model.num_parameters(),
        **vars(args),
        "held_out": held_out,
    }
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in summary.items()}
    (args.output_dir / "scorer.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
