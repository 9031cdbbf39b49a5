"""The data: where training and evaluation text comes from, how it becomes examples, and the built-in tasks.

* `arguments`: `DataArguments` (an `HfArgumentParser` dataclass) and the synthetic task's name;
* `corpus`: Hub datasets and local files, the eval split, tokenized datasets and their length statistics;
* `chunking`: documents -> `(BOS, y_1 .. y_n, EOS)` examples of at most `max_length` tokens;
* `synthetic`: the built-in synthetic JSON task, its tokenizer, and `data_tokenizer` (the tokenizer of a data source);
* `json_templates`: JSON Schema -> templates with open value gaps, their fills and validation;
* `schema_prompts`: structured rows with the schema as a prompt (anchored), and their gap budget.
"""
