"""Peak memory of converting a LLaDA checkpoint: the streaming converter against Transformers' own loading.

    python -m benchmarks.converter_memory --workdir /tmp/converter_memory
    python -m benchmarks.converter_memory --workdir /tmp/cm --n_layers 16 --shards 8 --max_shard_size 64MB

Builds a synthetic checkpoint in LLaDA's layout (config.json field names, `model.transformer.*` keys, fp32, sharded
safetensors with an index; random weights) and converts it twice, each time in a fresh process, one after the other:

* `streaming`: `convert_llada_checkpoint(src, dst, max_shard_size=...)` (`elastic_mdm/conversion/`);
* `library`: `ElasticMDMForDiffusionLM.from_pretrained(src, config=..., key_mapping=..., dtype=float32)` then
  `save_pretrained(dst, max_shard_size=..., save_original_format=False)` (by default `save_pretrained` reverses
  `key_mapping` and writes LLaDA's key names back), with `key_mapping` built from the same key rules (`LLADA.rules`)
  and the config from the same mapping (`build_config`): only the reading and writing of the weights differ.

Per method: the increase of the peak RSS over the RSS before the conversion (`VmHWM` after resetting it through
`/proc/self/clear_refs`; file-backed pages of memory-mapped shards included), the peak anonymous RSS (`RssAnon`
sampled every 5 ms), and the wall time; then both outputs are checked to hold the same keys and the same copied
tensors. Prints a Markdown table (and writes it with --output). Run it with `OMP_NUM_THREADS=1` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elastic_mdm.conversion.checkpoint_io import SAFE_INDEX, SourceCheckpoint
from elastic_mdm.conversion.convert import convert_llada_checkpoint
from elastic_mdm.conversion.formats import KeyRule, translate
from elastic_mdm.conversion.llada import LLADA
from elastic_mdm.conversion.plan import build_config, expected_shapes, meta_model
from elastic_mdm.modeling_elastic_mdm import ElasticMDMForDiffusionLM

METHODS = ("streaming", "library")


# ---------------------------------------------------------------------------------------------------------------
# The synthetic source checkpoint
# ---------------------------------------------------------------------------------------------------------------


def llada_config(d_model: int, n_layers: int, n_heads: int, mlp_hidden_size: int, vocab_size: int) -> dict[str, Any]:
    """A LLaDA `config.json` (the fields of GSAI-ML/LLaDA-8B-Base) of the given size; special ids at the end of the
    vocabulary."""
    return {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "block_type": "llama",
        "activation_type": "silu",
        "layer_norm_type": "rms",
        "rope": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "mlp_hidden_size": mlp_hidden_size,
        "embedding_size": vocab_size,
        "vocab_size": vocab_size,
        "max_sequence_length": 4096,
        "weight_tying": False,
        "mask_token_id": vocab_size - 4,
        "bos_token_id": vocab_size - 3,
        "eos_token_id": vocab_size - 2,
        "pad_token_id": vocab_size - 2,
    }


def source_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The LLaDA tensors of `config` and their shapes: the converted model's converted tensors, renamed back."""
    source = argparse.Namespace(config=config, tensors={})
    target = expected_shapes(meta_model(build_config(LLADA, source, {})))
    return {translate(key, LLADA.rules, reverse=True): shape for key, shape in target.items() if not LLADA.is_new(key)}


def write_source(folder: Path, config: dict[str, Any], shards: int, seed: int = 0) -> int:
    """Write `config.json` and random fp32 weights in `shards` safetensors files plus their index; the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(source_shapes(config).items())
    generator, weight_map, total = torch.Generator().manual_seed(seed), {}, 0
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: torch.randn(shape, generator=generator) for key, shape in keys[index::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


# ---------------------------------------------------------------------------------------------------------------
# The two conversions (each run in its own process)
# ---------------------------------------------------------------------------------------------------------------


def key_mapping(rules: tuple[KeyRule, ...]) -> dict[str, str]:
    """`from_pretrained`'s `key_mapping` of `rules`. Transformers replaces the matched part of a key and fills in one
    captured group (`\\1`) only, so the block index `{i}` is the group and the `.{p}` suffix stays out of the pattern
    (kept as it is)."""
    mapping = {}
    for rule in rules:
        source, target = rule.source.removesuffix(".{p}"), rule.target.removesuffix(".{p}")
        mapping["^" + re.escape(source).replace(r"\{i\}", r"(\d+)")] = target.replace("{i}", r"\1")
    return mapping


def convert_with_library(src: Path, dst: Path, max_shard_size: str, dtype: str) -> None:
    """`from_pretrained(..., key_mapping=...)` + `save_pretrained(..., max_shard_size=...)` (missing new modules are
    initialised by `_init_weights`)."""
    config = build_config(LLADA, SourceCheckpoint(src), {})
    model = ElasticMDMForDiffusionLM.from_pretrained(
        src, config=config, key_mapping=key_mapping(LLADA.rules), dtype=getattr(torch, dtype)
    )
    model.save_pretrained(dst, max_shard_size=max_shard_size, save_original_format=False)  # else: the LLaDA keys


def status(field: str) -> int:
    """A `/proc/self/status` memory field in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(method: str, src: Path, dst: Path, max_shard_size: str, dtype: str) -> dict[str, float]:
    """Convert with `method` in this process: RSS before, peak RSS (`VmHWM`), peak `RssAnon`, seconds."""
    peak_anon, done = [status("RssAnon")], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))

    before, anon_before = status("VmRSS"), status("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current RSS
        f.write("5")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if method == "streaming":
        convert_llada_checkpoint(src, dst, max_shard_size=max_shard_size, dtype=dtype)
    else:
        convert_with_library(src, dst, max_shard_size, dtype)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], status("RssAnon"))
    return {"before": before, "peak": status("VmHWM"), "anon_increase": peak_anon[0] - anon_before, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of `folder`, by key."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors |= {key: f.get_tensor(key) for key in f.keys()}
    return tensors


def compare_outputs(streaming: Path, library: Path) -> str:
    """Whether both folders hold the same keys and equal converted (not new) tensors."""
    ours, theirs = saved_tensors(streaming), saved_tensors(library)
    if set(ours) != set(theirs):
        return f"different keys: {sorted(set(ours) ^ set(theirs))[:6]}"
    differ = [k for k in ours if not LLADA.is_new(k) and not torch.equal(ours[k], theirs[k])]
    return f"{len(differ)} converted tensors differ: {differ[:6]}" if differ else "same keys, converted tensors equal"


def run_method(method: str, src: Path, dst: Path, max_shard_size: str, dtype: str) -> dict[str, float]:
    """`measure` of `method` in a fresh interpreter (`--run`), into an emptied `dst`."""
    shutil.rmtree(dst, ignore_errors=True)
    command = [sys.executable, "-m", "benchmarks.converter_memory", "--run", method, str(src), str(dst)]
    result = subprocess.run([*command, max_shard_size, dtype], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-4000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT="))[7:])


def report(rows: dict[str, dict[str, float]], total: int, src: Path, dst: Path, comparison: str, dtype: str) -> str:
    """The Markdown table: machine, versions, checkpoint, and per method the peak RSS and wall time."""
    mib = 2**20
    largest_source = max(p.stat().st_size for p in src.glob("*.safetensors"))
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        f"checkpoint: {total / mib:.0f} MiB fp32 in {len(list(src.glob('*.safetensors')))} shards (largest "
        f"{largest_source / mib:.0f} MiB); output dtype {dtype}; outputs: {comparison}",
        "",
        "| method | peak RSS increase (MiB) | / checkpoint | peak anonymous RSS increase (MiB) | largest output shard "
        "(MiB) | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        increase = row["peak"] - row["before"]
        largest_output = max(p.stat().st_size for p in (dst / method).glob("*.safetensors"))
        lines.append(
            f"| {method} | {increase / mib:.0f} | {increase / total:.2f} | {row['anon_increase'] / mib:.0f} | "
            f"{largest_output / mib:.0f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str | None:
    """Build the source, convert it with each method, print (and write) the table; `--run`: one measurement."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=5, metavar=("METHOD", "SRC", "DST", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="converter_memory", help="source and outputs go here")
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--mlp_hidden_size", type=int, default=2048)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--shards", type=int, default=4, help="source shards")
    parser.add_argument("--max_shard_size", default="32MB", help="output shards")
    parser.add_argument("--dtype", default="float32", help="output dtype (the source is float32)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--output", help="write the Markdown table here")
    args = parser.parse_args(argv)
    if args.run:
        method, src, dst, size, dtype = args.run
        print("RESULT=" + json.dumps(measure(method, Path(src), Path(dst), size, dtype)))
        return None
    work = Path(args.workdir)
    config = llada_config(args.d_model, args.n_layers, args.n_heads, args.mlp_hidden_size, args.vocab_size)
    total = write_source(work / "src", config, args.shards)
    rows = {m: run_method(m, work / "src", work / m, args.max_shard_size, args.dtype) for m in args.methods}
    comparison = compare_outputs(work / "streaming", work / "library") if len(rows) == 2 else "not compared"
    markdown = report(rows, total, work / "src", work, comparison, args.dtype)
    print(markdown)
    if args.output:
        Path(args.output).write_text(markdown)
    return markdown


if __name__ == "__main__":
    main()
