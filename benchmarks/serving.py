"""Serving benchmark: a bounded load generator against `elastic-mdm serve` on localhost.

Three servers on the same backbone, each a subprocess (`python -m elastic_mdm.commands serve`):

* `Elastic-MDM`: this server, step-level continuous batching (`--max_running 64`);
* `one at a time`: the same server with `--max_running 1` (requests queue and run alone, what a server without
  continuous batching does);
* `MDLM`: an `objective="mdlm"` checkpoint of the same size served the same way (MDLM's sampler as a stepper, each
  request on a canvas of its prompt plus `max_tokens`).

At each concurrency (1, 4, 16, 64 clients) every client sends requests back to back (closed loop) until the level's
fixed request count is sent or its time bound passes; it reports requests/s, generated tokens/s (the
`completion_tokens` of the answers) and p50 / p95 latency, and the ratios of one run: `Elastic-MDM / one at a time`
and `Elastic-MDM / MDLM`. Without `--checkpoint`, random-weight checkpoints of the tiny config's size (DiT 4 x 128,
4 heads, 80 positions) on a 768-word tokenizer are built in a temporary folder: throughput only, no quality.

    python -m benchmarks.serving --threads 1                  # the CPU table of docs/benchmarks.md "Serving"
    python -m benchmarks.serving --checkpoint outputs/tiny-elastic --mdlm_checkpoint outputs/tiny-mdlm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LEVELS = (1, 4, 16, 64)


def tiny_checkpoints(folder: Path, vocab: int = 768) -> tuple[Path, Path]:
    """Random Elastic-MDM and MDLM checkpoints of the tiny config's backbone, with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM

    specials = ["<pad>", "<bos>", "<eos>", "<mask>"]
    words = [f"w{i}" for i in range(vocab - len(specials))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", mask_token="<mask>", unk_token=words[0])  # fmt: skip
    paths = []
    for objective in ("elastic", "mdlm"):
        torch.manual_seed(0)
        config = ElasticMDMConfig(
            vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=80, pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3,
            objective=objective,
        )  # fmt: skip
        path = folder / f"tiny-{objective}"
        ElasticMDMForDiffusionLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m elastic_mdm.commands serve PATH` as a subprocess on a free port (stopped on exit)."""

    def __init__(self, path: Path, threads: int, *flags: str) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "elastic_mdm.commands", "serve", str(path), "--port", str(self.port),
                   "--device", "cpu", "--threads", str(threads), "--max_queue", "1024", "--log_level", "warning",
                   *flags]  # fmt: skip
        self.process = subprocess.Popen(command, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("the server did not start")

    def __enter__(self) -> Server:
        self.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def load(url: str, clients: int, requests: int, duration: float, body: dict) -> dict:
    """`clients` closed-loop clients sending at most `requests` requests in total for at most `duration` s."""
    import httpx

    latencies: list[float] = []
    tokens = 0
    sent = 0
    stop_at = time.monotonic() + duration

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, sent
        while sent < requests and time.monotonic() < stop_at:
            seed, sent = sent, sent + 1
            prompt = " ".join(f"w{(seed * 7 + i) % 700}" for i in range(4))
            started = time.monotonic()
            response = await http.post(url + "/v1/completions", json={**body, "prompt": prompt, "seed": seed})
            response.raise_for_status()
            latencies.append(time.monotonic() - started)
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=max(duration, 60.0) * 2) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.monotonic() - started
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        elastic, mdlm = (
            (Path(args.checkpoint), Path(args.mdlm_checkpoint)) if args.checkpoint else tiny_checkpoints(Path(folder))
        )
        servers = {
            "Elastic-MDM": (elastic, ["--max_running", "64", "--max_batch_tokens", "100000"]),
            "one at a time": (elastic, ["--max_running", "1"]),
            "MDLM": (mdlm, ["--max_running", "64", "--max_batch_tokens", "100000"]),
        }
        body = {"max_tokens": args.max_tokens, "num_steps": args.num_steps, "model": None}
        rows = []
        for name, (path, flags) in servers.items():
            with Server(path, args.threads, "--served_model_name", "bench", *flags) as server:
                body["model"] = "bench"
                asyncio.run(load(server.url, 1, 2, 30, body))  # warm-up
                for clients in args.levels:
                    requests = max(args.requests, clients)
                    row = asyncio.run(load(server.url, clients, requests, args.duration, body))
                    rows.append({"server": name, **row})
                    print(json.dumps(rows[-1]), flush=True)
    by = {(row["server"], row["clients"]): row for row in rows}
    ratios = {}
    for clients in args.levels:
        mine = by[("Elastic-MDM", clients)]
        for other in ("one at a time", "MDLM"):
            ratios[f"tokens/s Elastic-MDM / {other} @ {clients}"] = (
                mine["tokens_per_s"] / by[(other, clients)]["tokens_per_s"]
            )
            ratios[f"requests/s Elastic-MDM / {other} @ {clients}"] = (
                mine["requests_per_s"] / by[(other, clients)]["requests_per_s"]
            )
    return {"rows": rows, "ratios": ratios}


def markdown(result: dict) -> str:
    lines = ["| server | clients | requests | requests/s | generated tokens/s | p50 s | p95 s |", "|---" * 7 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |")  # fmt: skip
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an Elastic-MDM checkpoint (default: random tiny ones)")
    parser.add_argument("--mdlm_checkpoint", help="an objective='mdlm' checkpoint of the same backbone")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least the clients)")
    parser.add_argument("--duration", type=float, default=120.0, help="time bound per level, seconds")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--num_steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--output", help="write the rows and ratios as JSON here")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) != bool(args.mdlm_checkpoint):
        parser.error("give both --checkpoint and --mdlm_checkpoint, or neither")
    result = run(args)
    print(markdown(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
