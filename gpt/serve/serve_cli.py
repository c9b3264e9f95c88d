"""`python serve.py --ckpt DIR`: load a checkpoint once and serve it over OpenAI's API on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch
import uvicorn

from gpt.device import pick_device, pick_threads, resolve_dtype
from gpt.errors import UserError
from gpt.infer.engine import DEFAULT_MAX_MODEL_LEN
from gpt.infer.weights import add_model_args, load_for_decoding
from gpt.serve.app import ServerConfig, create_app


class ServeError(UserError):
    pass


def serving_threads(requested: int = 0) -> int:
    """torch's threads in the server: `requested`, or the idle cores less one. The event loop that parses
    requests and writes tokens shares the cores with the engine thread, and a parallel kernel waits at
    its barrier for any thread the scheduler parked (bench/serve_throughput.py, char model, 2 cores:
    8 concurrent requests 6,204 tok/s with 1 thread, 2,953 with 2; the 124M shape 116 vs 122)."""
    return requested if requested > 0 else max(1, pick_threads() - 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve a checkpoint with OpenAI's HTTP API.")
    p.add_argument("--ckpt", required=True, help="output directory (its best checkpoint, else latest) or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GPT_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint folder's name)")
    add_model_args(p, threads="0 = the cores other processes leave idle, less one for the web server",
                   context_cap=DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (the batch's rows) (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, help="sequences waiting for a row; beyond the batch and "
                   "the queue, requests get 429 with Retry-After (default: %(default)s)")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes; larger ones get 413 (default: %(default)s)")
    return p


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    for flag in ("max_batch", "port"):
        if getattr(args, flag) < 1 or (flag == "port" and args.port > 65535):
            raise ServeError(f"--{flag.replace('_', '-')} out of range: {getattr(args, flag)}")
    if args.max_queue < 0 or args.max_body < 1 or args.threads < 0:
        raise ServeError("--max-queue and --threads must be >= 0 and --max-body >= 1")
    torch.set_num_threads(serving_threads(args.threads))
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_for_decoding(args, device, dtype)
    model, tokenizer, folder = loaded.model, loaded.tokenizer, loaded.folder
    name = args.model_name or (folder.parent.name if folder.name in ("best", "latest") else folder.name)
    cfg = ServerConfig(name, args.api_key or os.environ.get("GPT_API_KEY") or None, args.max_batch, args.max_queue,
                       args.max_body, args.max_model_len)
    app = create_app(model, tokenizer, cfg)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=True,
                                   timeout_graceful_shutdown=30, server_header=False))
    server.ready_line = f"serving {name} ({folder}) at http://{args.host}:{args.port}/v1" + (
        " (API key required)" if cfg.api_key else "")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit 0 then, not "killed by a signal"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()


class Server(uvicorn.Server):
    """uvicorn's server, printing one line once the socket accepts requests."""

    ready_line = ""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, file=sys.stderr, flush=True)
