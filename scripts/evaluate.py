"""Evaluate any Elastic-MDM (or MDLM-objective) checkpoint on any data: one command, a JSON and a Markdown report.

    python scripts/evaluate.py --model_name_or_path outputs/tiny-elastic --dataset_name synthetic-json \
        --mdlm_checkpoint outputs/tiny-mdlm --gen_ppl_model gpt2 --num_samples 256 --output_dir eval/tiny
    python scripts/evaluate.py --model_name_or_path user/elastic-owt --dataset_name openwebtext --num_steps 1024 \
        --structured_tasks schemas.jsonl --gen_ppl_model Qwen/Qwen3-0.6B-Base --device cuda --dtype bfloat16

The metrics, flags and outputs are described in `elastic_mdm/commands/evaluate.py` (`--help` lists the flags).
"""

from elastic_mdm.commands.evaluate import main

if __name__ == "__main__":
    main()
