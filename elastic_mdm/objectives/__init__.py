"""The forward process, its training targets and the NELBO, one home for each objective (docs/design.md §2).

* `collators`: packed batches, the forward (corruption) process and the training targets of both objectives;
* `nelbo`: the K-step elastic bound's terms and its collator (every sequence at step 0 and at `k ~ U{1..K}`);
* `table`: the objectives table (`get_objective`, `make_collator`): collators and per-sequence NELBO of each;
* `metrics`: the seeded evaluation collator and `nelbo_metrics` (bits per token, perplexity bound) over batches.
"""
