"""`python serve.py --ckpt DIR`: load a checkpoint once and serve it over OpenAI's API on 127.0.0.1.

Binding another address without --api-key prints a warning line (anyone who reaches it may use the model).
SIGTERM or Ctrl-C drains: no new connection, 503 for a new request, those in flight may finish for
--shutdown-timeout seconds, then get 503 too (a stream ends with an error event), and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
import threading
from typing import Callable, TypeVar

import torch
import uvicorn

from gpt.device import pick_device, pick_threads, resolve_dtype
from gpt.errors import UserError
from gpt.infer.engine import DEFAULT_MAX_MODEL_LEN
from gpt.infer.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from gpt.infer.speculative import SPECULATE_TOKENS, load_speculation
from gpt.infer.weights import add_model_args, load_for_decoding
from gpt.serve.app import DEFAULT_BATCH_WAIT_MS, DEFAULT_PREFILL_CHUNK, ServerConfig, create_app

T = TypeVar("T")


class ServeError(UserError):
    pass


def serving_threads(requested: int = 0) -> int:
    """torch's threads in the server: `requested`, or the idle cores less one. The event loop that parses
    requests and writes tokens shares the cores with the engine thread, and a parallel kernel waits at
    its barrier for any thread the scheduler parked (bench/serve_throughput.py, char model, 2 cores:
    8 concurrent requests 6,204 tok/s with 1 thread, 2,953 with 2; the 124M shape 116 vs 122)."""
    return requested if requested > 0 else max(1, pick_threads() - 1)


def names(value: str) -> list[str]:
    """A comma-separated list of --allowed-hosts or --cors-origins (the flags may be repeated)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve a checkpoint with OpenAI's HTTP API.")
    p.add_argument("--ckpt", required=True, help="output directory (its best checkpoint, else latest), a checkpoint folder, or a PEFT adapter folder (merged into its base)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GPT_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint folder's name)")
    add_model_args(p, threads="0 = the cores other processes leave idle, less one for the web server",
                   context_cap=DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (the batch's rows); each row holds the keys and values of a whole "
                   "context, allocated at start (the start prints the MiB); more rows make every step, so every "
                   "stream's next token, take longer (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, help="sequences waiting for a row; beyond the batch and "
                   "the queue, requests get 429 with Retry-After (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="most prompt tokens computed per engine step: a longer prompt is prefilled over several "
                   "steps and the running streams get a token between its chunks (vLLM's chunked prefill); "
                   "0 = whole prompts at once (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, metavar="MS",
                   help="an idle server waits this long after each arriving request for another before it starts, "
                   "at most 8x this in all, so requests sent together are prefilled in one forward call; "
                   "0 = start at once (default: %(default)s)")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB, metavar="MIB",
                   help="MiB of prompt prefixes' keys and values kept for requests that begin alike (a shared system "
                   "prompt is computed once), least recently used evicted; 0 = off (default: %(default)s)")
    p.add_argument("--speculate", default=None, metavar="ngram|DRAFT_CKPT",
                   help="speculative decoding: every stream's next tokens guessed by prompt lookup (ngram) or a "
                   "smaller checkpoint with the same tokenizer (its folder), several verified per forward pass; "
                   "the same outputs, fewer passes when guesses are right, more work per step when they are "
                   "wrong (docs/serving.md#speculative-decoding) (default: off)")
    p.add_argument("--speculate-tokens", type=int, default=None, metavar="K",
                   help=f"tokens guessed per stream and step when speculating (default: {SPECULATE_TOKENS})")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes; larger ones get 413 (default: %(default)s)")
    p.add_argument("--allowed-hosts", type=names, action="extend", default=[], metavar="NAMES",
                   help="more Host names the server answers to, comma-separated (it always answers to its --host, "
                   "localhost, 127.0.0.1 and [::1]; a server bound to 0.0.0.0 answers to this machine's other names "
                   "only when listed); '*': any. Other Hosts get 403 (DNS rebinding)")
    p.add_argument("--cors-origins", type=names, action="extend", default=[], metavar="ORIGINS",
                   help="web pages that may call the API from a browser, e.g. https://app.example.com, "
                   "comma-separated; '*': any. Other pages' requests get 403 (default: none; the playground is "
                   "the server's own page)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long requests in flight may run before they get 503 "
                   "(default: %(default)s)")
    return p


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning line for a server others can reach with no key: any address but loopback (0.0.0.0, a LAN
    address, a name other than localhost), without --api-key."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if loopback:
        return None
    return (f"WARNING: serving on {host} without --api-key: anyone who can reach this address can use the model "
            "and read what it memorized. Set --api-key (or $GPT_API_KEY), or bind 127.0.0.1.")


LIMITS = {  # flag: (lowest, highest) accepted; None = no bound (numbers must be finite)
    "port": (1, 65535), "max_batch": (1, None), "max_queue": (0, None), "max_body": (1, None), "threads": (0, None),
    "shutdown_timeout": (0, None), "prefix_cache_mb": (0, None), "prefill_chunk": (0, None), "batch_wait_ms": (0, 1000),
    "speculate_tokens": (1, None),
}


def check_limits(args: argparse.Namespace) -> None:
    """Every numeric limit in its range, or one line naming the flag, its range and the value given; a flag
    that needs another, given without it, is refused the same way."""
    for flag, (low, high) in LIMITS.items():
        value = getattr(args, flag)
        if value is None:  # not given, and its default is decided later (--speculate-tokens)
            continue
        if not (low <= value < float("inf") and (high is None or value <= high)):
            allowed = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ServeError(f"--{flag.replace('_', '-')} must be {allowed}, got {value}")
    if args.speculate_tokens is not None and args.speculate is None:
        raise ServeError("--speculate-tokens needs --speculate")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() in a thread that ends before serving starts. OpenMP (torch's CPU threads) keeps a team of threads for
    every thread that ran parallel work; while the main thread's team lives, libgomp counts more threads than
    cores and throttles the engine thread's team, and a decode step is about 30% slower
    (docs/performance.md#xeon-2-quiet-prefix-caching-and-serving-2026-12-06). Loading in a passing thread leaves
    the engine thread's team the only one."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread: one-line errors stay one line
            box["error"] = e

    thread = threading.Thread(target=target, name="gpt-setup")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def build_app(args: argparse.Namespace):
    """The model loaded for decoding and the app serving it: (app, checkpoint folder, model name, config)."""
    torch.set_num_threads(serving_threads(args.threads))
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_for_decoding(args, device, dtype)
    model, tokenizer, folder = loaded.model, loaded.tokenizer, loaded.folder
    name = args.model_name or (folder.parent.name if folder.name in ("best", "latest") else folder.name)
    cfg = ServerConfig(name, api_key=args.api_key or os.environ.get("GPT_API_KEY") or None, max_batch=args.max_batch,
                       max_queue=args.max_queue, max_body_bytes=args.max_body, max_model_len=args.max_model_len,
                       prefix_cache_mb=args.prefix_cache_mb, prefill_chunk=args.prefill_chunk,
                       batch_wait_ms=args.batch_wait_ms, host=args.host,
                       allowed_hosts=tuple(args.allowed_hosts),
                       cors_origins=tuple(args.cors_origins), speculate=args.speculate,
                       speculate_tokens=args.speculate_tokens or SPECULATE_TOKENS)
    speculation = None
    if args.speculate is not None:
        speculation = load_speculation(args.speculate, cfg.speculate_tokens, device, dtype, args.quantize,
                                       verify=not args.no_verify)
        print(f"speculative decoding: {speculation.name}, {speculation.k} tokens guessed per stream and step "
              "(acceptance in the log at shutdown)", file=sys.stderr, flush=True)
    app = create_app(model, tokenizer, cfg, speculation)
    return app, folder, name, cfg


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    check_limits(args)
    app, folder, name, cfg = in_passing_thread(lambda: build_app(args))
    cache = app.state.server.worker.engine.cache
    print(f"KV cache: {args.max_batch} rows x {app.state.server.block_size} tokens, "
          f"{2 * cache.k.nbytes / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # uvicorn's own limit comes after ours: by then every handler has answered, none is killed mid-request
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=True,
                                   timeout_graceful_shutdown=args.shutdown_timeout + 10, server_header=False))
    server.worker, server.shutdown_timeout = app.state.server.worker, args.shutdown_timeout
    server.ready_line = f"serving {name} ({folder}) at http://{args.host}:{args.port}/v1" + (
        " (API key required)" if cfg.api_key else "")
    warning = exposure_warning(args.host, cfg.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit 0 then, not "killed by a signal"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()


class Server(uvicorn.Server):
    """uvicorn's server, printing one line once the socket accepts requests, and draining on shutdown."""

    ready_line = ""
    worker = None  # the app's engine thread (gpt.serve.worker.Worker)
    shutdown_timeout = 30.0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, file=sys.stderr, flush=True)

    async def shutdown(self, sockets=None) -> None:
        """uvicorn refuses new connections and a new request gets 503; those in flight run for shutdown_timeout
        seconds, then the engine cancels them and each answers 503 (a stream: an error event), so uvicorn,
        which waits for every connection to close, never cancels a handler (its plain-text 500 and a traceback)."""
        self.worker.stop_accepting()
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.worker.cancel_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
