"""Demo: build a tiny random Elastic-MDM, save it, reload it through remote code and sample from it.

    python scripts/demo.py [--output_dir outputs/demo-model] [--num_steps 16] [--schedule linear]

Until a trained checkpoint exists this shows the mechanics: variable lengths, prompts, templates, trajectories.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModel

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo-model")
    parser.add_argument("--num_steps", type=int, default=16)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = ElasticMDMConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        mask_token_id=127,
        pad_token_id=2,
    )
    ElasticMDMForDiffusionLM(config).save_pretrained(args.output_dir)
    model = AutoModel.from_pretrained(os.path.abspath(args.output_dir), trust_remote_code=True).eval()
    print(f"saved and reloaded {type(model).__name__} from {args.output_dir} via trust_remote_code")

    common = dict(num_steps=args.num_steps, schedule=args.schedule, max_length=args.max_length, seed=args.seed)
    start = time.perf_counter()
    out = model.generate(num_return_sequences=args.num_samples, return_dict_in_generate=True, **common)
    elapsed = time.perf_counter() - start
    print(
        f"\nunconditional, K={args.num_steps}, schedule={args.schedule}: {elapsed * 1000:.0f} ms, "
        f"{out.num_passes} passes, {out.tokens_processed} tokens encoded"
    )
    for seq, n in zip(out.sequences, out.lengths, strict=True):
        print(f"  length {int(n):3d}: {seq[: int(n)].tolist()}")

    prompt = model.generate(input_ids=[[0, 10, 11, 12]], return_dict_in_generate=True, output_trajectory=True, **common)
    print("\nprompt [0, 10, 11, 12], active length per step:", [len(step[0]) for step in prompt.trajectory])
    print("  ->", prompt.sequences[0, : int(prompt.lengths[0])].tolist())

    template = [0, 20, 127, 21, 127, 22, 1]  # BOS a [gap] b [gap] c EOS
    filled, lengths = model.generate(template_ids=[template], **common)
    print("\ntemplate", template, "->", filled[0, : int(lengths[0])].tolist())


if __name__ == "__main__":
    main()
