"""The command-line programs, each a thin composition of the library below it (nothing below imports this package).

`elastic-mdm COMMAND ...` (`main`) dispatches to `COMMAND.main(argv)`; `scripts/*.py` call the same functions (the
form `accelerate launch` needs for training):

* `train`: train an Elastic-MDM or the MDLM baseline with the Transformers `Trainer` (`scripts/train.py`);
* `generate`: sample from a checkpoint (`scripts/generate.py`);
* `evaluate`: the evaluation report of a checkpoint (`scripts/evaluate.py`);
* `convert`: an MDLM or LLaDA checkpoint as an Elastic-MDM folder (`scripts/convert_*.py`);
* `serve`: an OpenAI-compatible HTTP server (extra `serve`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "train an Elastic-MDM (or the MDLM baseline) with the Transformers Trainer",
    "generate": "sample from a checkpoint",
    "evaluate": "evaluate a checkpoint: NELBO, lengths, samples, structured outputs",
    "convert": "convert an MDLM or LLaDA checkpoint (elastic-mdm convert {mdlm,llada} SRC DST)",
    "serve": "serve a checkpoint over HTTP (OpenAI API; extra `serve`)",
}


def main(argv: list[str] | None = None) -> None:
    """The `elastic-mdm` console script: `elastic-mdm COMMAND [args ...]` runs `elastic_mdm.commands.COMMAND.main`
    with the remaining arguments (the command module is imported only when chosen)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="elastic-mdm", description=__doc__.split("\n")[0])
        parser.add_argument("command", choices=list(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
        parser.parse_args(argv[:1])
    importlib.import_module(f"{__name__}.{argv[0]}").main(argv[1:])


__all__ = ["COMMANDS", "main"]
