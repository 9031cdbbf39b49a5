"""Training with the Transformers `Trainer`: `arguments`, `trainer` (loss, logging, held-out NELBO), `outputs`
(output and resume folders), `lora` (peft adapters). The command composing them is `commands/train.py`."""
