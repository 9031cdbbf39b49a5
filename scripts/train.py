"""Train an Elastic-MDM (or the MDLM baseline, `--objective mdlm`) with the Transformers `Trainer`.

    python scripts/train.py configs/tiny.yaml [--output_dir out --max_steps 100 ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py configs/owt-110m.yaml

A YAML file gives any field of ModelArguments, DataArguments, ElasticMDMTrainingArguments and ReportArguments;
command-line flags override it. An --output_dir that holds a model or checkpoint-* folders is refused unless
--overwrite_output_dir is given or the run resumes from a checkpoint inside it (docs/security.md).
The command is `elastic_mdm.commands.train.main`.
"""

from elastic_mdm.commands.train import main

if __name__ == "__main__":
    main()
