"""Benchmark Elastic-MDM against MDLM on the same backbone: sampling latency / throughput and training step time.

    # oracle trajectory mode: a random model of the requested size, exact forward-process lengths (no training)
    python -m benchmarks.benchmark --oracle --hidden_size 768 --num_hidden_layers 12 --num_attention_heads 12 \
        --vocab_size 50258 --length 1024 --num_steps 1024 --batch_size 32 --schedule linear exponential \
        --device cuda --dtype bf16
    # a trained checkpoint (its gap head sets the lengths); MDLM runs on the same backbone or --mdlm_checkpoint
    python -m benchmarks.benchmark --checkpoint outputs/tiny-elastic --num_steps 64 --batch_size 16
    # seconds on a CPU
    python -m benchmarks.benchmark --oracle --hidden_size 64 --num_hidden_layers 2 --num_attention_heads 2 \
        --vocab_size 256 --length 64 --num_steps 64 --batch_size 4

Prints Markdown tables (machine, batch, length, K, schedule; medians, FLOPs, MFU against --peak_tflops, and the
ratios Elastic / MDLM) and writes them with --output (Markdown, plus the same numbers as JSON next to it).
See `benchmarks/counting.py` for the FLOP formula, `benchmarks/sampling.py` and `benchmarks/training.py` for what
each mode measures.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.lengths import length_sampler
from benchmarks.oracle import compile_backbone, oracle_config, random_model
from benchmarks.report import machine_name, markdown_summary
from benchmarks.sampling import (
    VARIANTS,
    SamplingSetup,
    benchmark_sampling,
    checkpoint_setup,
    oracle_setup,
    sampling_ratios,
    static_shape_wrapper,
)
from benchmarks.timing import H100_BF16_DENSE_TFLOPS
from benchmarks.training import benchmark_training
from elastic_mdm.loading.checkpoints import load_checkpoint
from elastic_mdm.schedules_elastic_mdm import get_schedule

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-weights": torch.bfloat16}  # autocast
WEIGHT_DTYPES = {"bf16-weights": torch.bfloat16}  # cast once (no weight re-cast per pass, nor per graph replay)


VARIANT_NAMES = dict(zip(("elastic", "mdlm-cached", "mdlm-no-cache"), VARIANTS, strict=True))  # --variants


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--oracle", action="store_true", help="random model + exact forward-process lengths (default)")
    mode.add_argument("--checkpoint", help="a trained checkpoint (folder or Hub id)")
    parser.add_argument("--mdlm_checkpoint", help="checkpoint mode: run MDLM on this model instead")
    size = parser.add_argument_group("model size (oracle mode)")
    size.add_argument("--hidden_size", type=int, default=768)
    size.add_argument("--num_hidden_layers", type=int, default=12)
    size.add_argument("--num_attention_heads", type=int, default=12)
    size.add_argument("--vocab_size", type=int, default=50258)
    size.add_argument("--intermediate_size", type=int)
    size.add_argument("--block_type", default="dit", choices=["dit", "llama"])
    size.add_argument("--attn_implementation", default="sdpa", help="sdpa | eager | varlen_attn | flash_attention_2")
    run = parser.add_argument_group("what is run")
    run.add_argument("--length", type=int, default=1024, help="L: MDLM canvas and Elastic cap (BOS/EOS included)")
    run.add_argument("--num_steps", type=int, default=1024, help="K")
    run.add_argument("--batch_size", type=int, default=32)
    run.add_argument("--schedule", nargs="+", default=["linear"], help="one table per schedule")
    run.add_argument("--schedule_kwargs", type=json.loads, default={}, help="e.g. '{\"sigma\": 6.9}'")
    run.add_argument("--lengths", default="fixed", help="oracle/training data lengths: fixed | synthetic | "
                     "uniform:LO:HI | a file of lengths (see benchmarks/lengths.py)")  # fmt: skip
    run.add_argument("--skip", nargs="*", default=[], choices=["sampling", "training"])
    run.add_argument("--variants", nargs="+", choices=list(VARIANT_NAMES), default=list(VARIANT_NAMES),
                     help="samplers to time (mdlm-no-cache costs K full passes)")  # fmt: skip
    run.add_argument("--warmup", type=int, default=1, help="untimed sampling runs")
    run.add_argument("--repeats", type=int, default=3, help="timed sampling runs (median)")
    run.add_argument("--train_warmup", type=int, default=2)
    run.add_argument("--train_repeats", type=int, default=5)
    run.add_argument("--seed", type=int, default=0)
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    hw.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16/fp16: autocast over fp32 weights; "
                    "bf16-weights: the weights cast to bf16 once, under bf16 autocast")  # fmt: skip
    hw.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile the backbone (dynamic shapes); graphs come from --cuda_graphs")  # fmt: skip
    hw.add_argument("--bucket", type=int, help="pad each pass to its static shape bucket, on a geometric grid of "
                    "this granularity in tokens (cuda_graphs.bucket_size)")  # fmt: skip
    hw.add_argument("--cuda_graphs", action="store_true", help="replay every pass from a CUDA graph captured per "
                    "shape bucket (granularity --bucket, default 64), for every sampler")  # fmt: skip
    hw.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's choice)")
    hw.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="for MFU")
    parser.add_argument("--output", help="write the Markdown here (and the JSON next to it)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the checkpoints' own modeling code (auto_map); only for code you trust")  # fmt: skip
    return parser.parse_args(argv)


def load_models(args: argparse.Namespace):
    """`(model, mdlm_model or None)` on the device: a random model of the requested size (oracle) or checkpoints."""
    if not args.checkpoint:
        config = oracle_config(
            args.hidden_size, args.num_hidden_layers, args.num_attention_heads, args.vocab_size, args.length,
            args.block_type, args.intermediate_size,
        )  # fmt: skip
        config._attn_implementation = args.attn_implementation
        return random_model(config, args.device, args.seed), None
    load = functools.partial(
        load_checkpoint,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        attn_implementation=args.attn_implementation,
    )
    return load(args.checkpoint), load(args.mdlm_checkpoint) if args.mdlm_checkpoint else None


def sampling_setup(args: argparse.Namespace, model, mdlm_model, schedule: str) -> SamplingSetup:
    """The oracle or checkpoint setup of one schedule."""
    common = dict(
        num_steps=args.num_steps,
        schedule=get_schedule(schedule, **args.schedule_kwargs),
        seed=args.seed,
        autocast_dtype=DTYPES[args.dtype],
    )
    if args.checkpoint:
        length = min(args.length, model.config.max_position_embeddings)
        return checkpoint_setup(model, args.batch_size, length, mdlm_model=mdlm_model, **common)
    draw = length_sampler(args.lengths, args.length)
    lengths = draw(args.batch_size, torch.Generator().manual_seed(args.seed))
    return oracle_setup(model, lengths, **common)


def dtype_label(name: str) -> str:
    """How the settings table names `--dtype`."""
    if name in WEIGHT_DTYPES:
        return f"{WEIGHT_DTYPES[name]} weights, {DTYPES[name]} autocast".replace("torch.", "")
    return f"{name} (autocast)" if DTYPES[name] else name


def run_settings(args: argparse.Namespace, model, schedule: str) -> dict[str, Any]:
    """The settings table of one run."""
    config = model.config
    return {
        "machine": machine_name(args.device),
        "mode": f"checkpoint {args.checkpoint}" if args.checkpoint else f"oracle (data lengths: {args.lengths})",
        "model": f"{config.block_type} {config.num_hidden_layers}x{config.hidden_size}, {config.num_attention_heads} "
        f"heads, vocab {config.vocab_size}, {model.num_parameters() / 1e6:.1f}M params",
        "batch": args.batch_size,
        "length L": args.length,
        "K": args.num_steps,
        "schedule": schedule,
        "dtype": dtype_label(args.dtype),
        "compile": args.compile or "no",
        "static shapes": f"CUDA graphs, granularity {args.bucket or 64}"
        if args.cuda_graphs
        else f"granularity {args.bucket}"
        if args.bucket
        else "no",
        "attention": args.attn_implementation,
        "peak TFLOP/s (MFU)": args.peak_tflops,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, mdlm_model = load_models(args)
    for m in (model, mdlm_model):
        if m is not None and args.dtype in WEIGHT_DTYPES:
            m.to(WEIGHT_DTYPES[args.dtype])
        if m is not None and args.compile:
            compile_backbone(m, None if args.compile == "default" else args.compile)
    wrap = lambda d: d
    if args.bucket or args.cuda_graphs:
        wrap = static_shape_wrapper(model.config.eos_token_id, args.bucket or 64, args.cuda_graphs)
    results: dict[str, Any] = {"sampling": {}, "training": []}
    sections = []
    if "sampling" not in args.skip:
        for schedule in args.schedule:
            setup = sampling_setup(args, model, mdlm_model, schedule)
            rows = benchmark_sampling(
                setup, warmup=args.warmup, repeats=args.repeats, peak_tflops=args.peak_tflops, wrap=wrap,
                variants=[VARIANT_NAMES[name] for name in args.variants],
            )  # fmt: skip
            results["sampling"][schedule] = {"rows": rows, "ratios": sampling_ratios(rows)}
            sections.append(markdown_summary(run_settings(args, model, schedule), rows, []))
    if "training" not in args.skip:
        length = min(args.length, model.config.max_position_embeddings)
        results["training"] = benchmark_training(
            model, length_sampler(args.lengths, length), batch_size=args.batch_size, length=length,
            warmup=args.train_warmup, repeats=args.train_repeats, peak_tflops=args.peak_tflops,
            autocast_dtype=DTYPES[args.dtype], seed=args.seed,
        )  # fmt: skip
        settings = run_settings(args, model, "training noise: NoiseLevelSampler defaults / MDLM t ~ U(eps, 1)")
        sections.append(markdown_summary(settings, [], results["training"]))
    markdown = "\n".join(sections)
    print(markdown)
    if args.output:
        Path(args.output).write_text(markdown)
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
