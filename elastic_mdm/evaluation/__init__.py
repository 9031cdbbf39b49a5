"""Measuring a trained Elastic-MDM (or MDLM-objective) checkpoint (paper §5), one concept per module:

* `lengths`: length fidelity, the distances TV, W1, KS between generated and data lengths, and the K-sweep;
* `samples`: drawing, decoding and writing unconditional samples, their unigram entropy;
* `perplexity`: generative perplexity of sample texts under a causal LM;
* `nelbo`: the held-out NELBO bound, as the training run's evaluation computes it;
* `calibration`: gap-head calibration on corrupted held-out batches;
* `structured`: structured-output templates, their fills and their JSON validity;
* `reports`: the training run's sample report and the evaluation's JSON and Markdown reports;
* `plots`: the length histogram, trajectory and K-sweep charts (matplotlib).

The evaluate command composing them is `commands/evaluate.py` (`scripts/evaluate.py`).
"""
