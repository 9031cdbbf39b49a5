"""Loading checkpoints and tokenizers, with their checks: `checkpoints` (local or Hub, weights, configs, the pair of
model and tokenizer) and `tokenizers` (loading, special tokens, vocabulary checks against a config)."""
