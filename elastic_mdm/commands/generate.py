"""Sample from any Elastic-MDM (or MDLM-objective) checkpoint: a local folder or a Hub id.

    python scripts/generate.py outputs/tiny-elastic --num_return_sequences 8 --num_steps 64 --schedule exponential
    python scripts/generate.py outputs/tiny-elastic --prompt '{"name":"' --output samples.jsonl
    python scripts/generate.py outputs/tiny-elastic --template '{"name":"<mask>","age":<mask>}'
    python scripts/generate.py outputs/tiny-elastic --stream --num_steps 32    # one sample growing in place

Every field of `ElasticMDMGenerationConfig` is a flag. Prints the samples, or writes JSONL with `--output`.
The checkpoint is loaded with the installed classes; its own code runs only with `--trust_remote_code`
(docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..loading.checkpoints import load_model_and_tokenizer


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The flags of `scripts/generate.py` (this module's docstring is its `--help` text), checked together."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder or Hub id")
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument("--prompt", action="append", help="a text prefix (repeat for a batch)")
    inputs.add_argument("--template", action="append", help="text whose mask tokens mark open gaps (repeat)")
    parser.add_argument("--num_return_sequences", type=int, help="samples per input (default 4; 1 with --stream)")
    parser.add_argument("--num_steps", type=int)
    parser.add_argument("--schedule", help="linear | cosine | exponential | p-linear | clipped")
    parser.add_argument("--schedule_kwargs", type=json.loads, help="e.g. '{\"sigma\": 5.0}'")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--greedy_tokens", action="store_true", help="argmax tokens (do_sample=False)")
    parser.add_argument("--gap_temperature", type=float)
    parser.add_argument("--greedy_gaps", action="store_true", help="most likely gap counts (gap_do_sample=False)")
    parser.add_argument("--max_length", type=int)
    parser.add_argument("--mdlm_gap_budget", type=int, help="masks per open gap for an MDLM-objective model")
    parser.add_argument("--no_cache", action="store_true", help="re-encode every step (use_cache=False)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn_implementation", default=None)
    parser.add_argument("--progress_bar", action="store_true")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="show one sample growing in place in the terminal (Transformers' TextDiffusionStreamer: the draft of "
        "every step in yellow, then the final text)",
    )
    parser.add_argument("--stream_delay", type=float, default=0.05, help="seconds each --stream draft stays shown")
    parser.add_argument("--output", help="write JSONL here instead of printing")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run the checkpoint's own modeling / tokenizer code (its auto_map) instead of the installed classes; "
        "only for checkpoints whose code you trust",
    )
    args = parser.parse_args(argv)
    if args.num_return_sequences is None:
        args.num_return_sequences = 1 if args.stream else 4
    if args.stream and (args.num_return_sequences != 1 or len(args.prompt or args.template or [None]) != 1):
        parser.error("--stream shows one sample: give --num_return_sequences 1 and at most one --prompt / --template")
    if args.stream and args.output:
        parser.error("--stream prints to the terminal; drop --output (or --stream)")
    if args.stream_delay < 0:
        parser.error(f"--stream_delay must be >= 0 seconds, got {args.stream_delay}")
    if args.num_return_sequences < 1:
        parser.error(f"--num_return_sequences must be >= 1, got {args.num_return_sequences}")
    return args


def check_output_path(output: str | None, model: str) -> None:
    """Refuse an `--output` that would overwrite a file of the checkpoint folder."""
    if output is None:
        return
    out, folder = Path(output).expanduser().resolve(), Path(model).expanduser().resolve()
    if folder.is_dir() and folder in out.parents and out.exists():
        raise ValueError(
            f"--output {output!r} is a file of the checkpoint folder {model!r}; writing the samples there would "
            "overwrite it. Choose a path outside the checkpoint (or a new file name)."
        )


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The flags that were given, as `generate()` keywords."""
    names = ("num_steps", "schedule", "schedule_kwargs", "temperature", "top_k", "top_p", "gap_temperature")
    kwargs = {name: getattr(args, name) for name in names + ("max_length", "mdlm_gap_budget")}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if args.greedy_tokens:
        kwargs["do_sample"] = False
    if args.greedy_gaps:
        kwargs["gap_do_sample"] = False
    if args.no_cache:
        kwargs["use_cache"] = False
    return kwargs


def encode_inputs(args: argparse.Namespace, tokenizer) -> dict:
    """Prompts become `BOS + tokens`; templates `BOS .. EOS` with the mask token kept as the open-gap marker."""
    if args.prompt:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
        return {"input_ids": [[tokenizer.bos_token_id, *p] for p in ids]}
    if args.template:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in args.template]
        return {"template_ids": [[tokenizer.bos_token_id, *t, tokenizer.eos_token_id] for t in ids]}
    return {}


def main(argv: list[str] | None = None) -> list[dict]:
    """Load the checkpoint and its tokenizer, generate, and print the samples or write them as JSONL; return the rows
    `{"length", "hit_max_length", "text"}`."""
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_output_path(args.output, args.model)
    load = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, dtype, args.trust_remote_code, **load)
    inputs = encode_inputs(args, tokenizer)
    streamer = None
    if args.stream:
        from transformers import TextDiffusionStreamer

        streamer = TextDiffusionStreamer(tokenizer, sleep_time=args.stream_delay or None, skip_special_tokens=True)
    out = model.generate(
        **inputs,
        streamer=streamer,
        num_return_sequences=args.num_return_sequences,
        seed=args.seed,
        progress_bar=args.progress_bar,
        return_dict_in_generate=True,
        **generation_kwargs(args),
    )
    rows = [
        {"length": n, "hit_max_length": bool(capped), "text": tokenizer.decode(seq[:n], skip_special_tokens=True)}
        for seq, n, capped in zip(out.sequences, out.lengths.tolist(), out.hit_max_length.tolist(), strict=True)
    ]
    if args.output:
        with open(args.output, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"wrote {len(rows)} samples to {args.output} ({out.num_passes} passes, {out.tokens_processed} tokens)")
    elif not args.stream:  # the streamer printed the sample already
        for row in rows:
            print(f"[{row['length']:4d}] {row['text']}")
    return rows


__all__ = ["main", "parse_arguments", "check_output_path", "generation_kwargs", "encode_inputs"]
