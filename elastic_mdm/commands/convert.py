"""`elastic-mdm convert {mdlm,llada} SRC DST [options] [--<config field> <value> ...]`: an MDLM or LLaDA checkpoint
(Hub id or local folder) as an Elastic-MDM folder with a new gap head (`conversion/convert.py`, docs/design.md §7).

Options: --dtype, --max_shard_size, --seed, --tokenizer, --revision, --overwrite; any other `--field value` (after
SRC DST) is an `ElasticMDMConfig` override, parsed as JSON when it is JSON (`--adaln true` -> `True`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..conversion.convert import convert_llada_checkpoint, convert_mdlm_checkpoint
from ..conversion.writer import DEFAULT_MAX_SHARD_SIZE

CONVERTERS: dict[str, Callable[..., Path]] = {"mdlm": convert_mdlm_checkpoint, "llada": convert_llada_checkpoint}


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`["--max_gap", "2048", "--adaln=true"]` -> `{"max_gap": 2048, "adaln": True}` (values parsed as JSON when
    they are JSON, else kept as strings)."""
    overrides, index = {}, 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"Expected --field value, got {token!r}.")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ValueError(f"--{name} needs a value.")
            index += 1
            value = tokens[index]
        try:
            overrides[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name.replace("-", "_")] = value
        index += 1
    return overrides


def run_cli(converter: Callable[..., Path], argv: list[str] | None, description: str | None) -> Path:
    """`SRC DST [--dtype D] [--max_shard_size S] [--seed N] [--tokenizer T] [--revision R] [--overwrite]
    [--<config field> <value> ...]`: the converter's options, then ElasticMDMConfig overrides (after SRC DST)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("src", help="Hub repo id or local checkpoint folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: keep the source dtype)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the new modules' initialisation")
    parser.add_argument("--tokenizer", help="tokenizer to save with the model when the source has none")
    parser.add_argument("--revision")
    parser.add_argument("--overwrite", action="store_true")
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(extra)
    except ValueError as error:
        parser.error(str(error))
    options = {k: v for k, v in vars(args).items() if k not in ("src", "dst") and v is not None}
    path = converter(args.src, args.dst, **options, **overrides)
    print(f"Wrote the Elastic-MDM checkpoint {path}")
    return path


def main(argv: list[str] | None = None) -> Path:
    """`elastic-mdm convert FORMAT SRC DST ...`: FORMAT is `mdlm` or `llada`, the rest goes to `run_cli`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in CONVERTERS:
        parser = argparse.ArgumentParser(prog="elastic-mdm convert", description=__doc__)
        parser.add_argument("format", choices=list(CONVERTERS), help="the source checkpoint's format")
        parser.parse_args(argv[:1])
    return run_cli(CONVERTERS[argv[0]], argv[1:], __doc__)


__all__ = ["CONVERTERS", "main", "parse_overrides", "run_cli"]
