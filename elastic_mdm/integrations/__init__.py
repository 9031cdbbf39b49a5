"""Integrations of Elastic-MDM with evaluation tools outside Transformers (optional dependencies, imported on use):

* `elastic_mdm.integrations.lm_eval`: an lm-evaluation-harness model, `--model elastic_mdm`.
"""
