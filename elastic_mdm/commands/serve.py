"""`elastic-mdm serve PATH`: load a checkpoint and serve it over HTTP (OpenAI's API, the page at `/`).

One process owns the model; run one per device and put any HTTP load balancer in front for more (docs/security.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="elastic-mdm serve", description=__doc__)
    parser.add_argument("path", help="checkpoint folder or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", help="require 'Authorization: Bearer <key>' on /v1/*")
    parser.add_argument("--served_model_name", help="the model id of the API (default: the folder name)")
    parser.add_argument(
        "--max_batch_tokens",
        type=int,
        default=8192,
        help="token budget of one pass: the caps of the running sequences add up to at most this",
    )
    parser.add_argument("--max_running", type=int, default=64, help="most sequences in the running batch")
    parser.add_argument("--max_queue", type=int, default=256, help="most requests waiting; beyond: 429")
    parser.add_argument("--request_timeout", type=float, default=600.0, help="deadline of a request, seconds")
    parser.add_argument("--max_num_steps", type=int, default=4096, help="largest num_steps a request may ask")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--trust_remote_code", action="store_true", help="run a checkpoint's own code (opt-in)")
    parser.add_argument("--log_level", default="info")
    return parser  # fmt: skip


def build_app(args: argparse.Namespace):
    """The app of `args` (model loaded, engine not started: the app's lifespan starts it)."""
    import torch

    from ..loading.checkpoints import load_model_and_tokenizer
    from ..serving.app import create_app
    from ..serving.engine import Engine
    from ..serving.protocol import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(
        args.path, device, getattr(torch, DTYPES[args.dtype]), trust_remote_code=args.trust_remote_code
    )
    model.eval()
    limits = Limits(model.config.max_position_embeddings, args.max_running, args.max_num_steps, args.request_timeout)
    engine = Engine(model, args.max_batch_tokens, args.max_running, args.max_queue)
    name = args.served_model_name or Path(str(args.path).rstrip("/")).name
    return create_app(model, tokenizer, engine, model_name=name, limits=limits, api_key=args.api_key)


def main(argv: list[str] | None = None) -> None:
    """`elastic-mdm serve PATH ...` (also `python -m elastic_mdm.commands serve PATH ...`)."""
    args = serve_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        sys.exit("elastic-mdm serve needs the serve extra: pip install 'elastic-mdm[serve]'")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
