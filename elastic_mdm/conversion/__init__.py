"""Convert MDLM and LLaDA checkpoints into Elastic-MDM folders (docs/design.md §7).

* `convert.py`: `convert_mdlm_checkpoint`, `convert_llada_checkpoint` (their command line: `commands/convert.py`);
* `checkpoint_io.py`: reading the source (local folder or Hub id) from its headers, one tensor at a time;
* `formats.py`, `mdlm.py`, `llada.py`: what a source format is, and the two formats' key rules and config mappings;
* `plan.py`: the target config and the source -> target plan, validated before any writing;
* `writer.py`: new tensors, output shards, config and remote-code files; `tokenizer.py`: the saved tokenizer;
* `lora.py`: the LoRA parameter budget of a retrofit.
"""
