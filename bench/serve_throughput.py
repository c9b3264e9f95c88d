"""Tokens/s, latency and time to first token of serve.py at 1, 8 and 32 concurrent requests, against the engine.

    python bench/serve_throughput.py                                    # char and 124M shapes, 1, 8 and 32 at once
    python bench/serve_throughput.py --models char --tokens 16 --repeats 1     # a smoke run (seconds)
    python bench/serve_throughput.py --models 124m --max-batch 32 --prefill-chunk 0
    python bench/serve_throughput.py --models 124m --dtype bfloat16 --compile   # serve.py --compile (and the engine)

For each model shape (random weights: speed does not depend on them), in one run:
  engine      gpt.infer.engine.complete in this process: one request, greedy, `tokens` new tokens (best of
              --repeats), on the main thread and on a worker thread as the server runs it
  serve.py    the real server in its own process (a checkpoint of the same weights; its --threads rule,
              --max-batch, --prefill-chunk), driven over loopback by `httpx` clients from threads, so the clients'
              Python does not share the server's GIL. For each concurrency level (--concurrency, default
              1,8,32) and each mode (whole replies, then SSE streams) all the level's requests start together
              (a barrier): aggregate tokens/s (level x tokens / wall time from the first send to the last
              reply), its ratio to one request of the same mode, p50/p99 request latency and, for streams, p50/p99
              time to first token (to the first chunk with text). Each level's rate is the best of --repeats
              runs, the same statistic for every level (their latencies are pooled). p99 of N requests is
              their slowest but one rank: with 8 it is the slowest.
Every request generates exactly `tokens` tokens (ignore_eos) and the bench checks the count. The target
of issue 26: 8 concurrent >= 6x one request on the 124M shape. The first lines name the CPU, torch and the
command; timings on a shared machine are noisy: read the ratios printed in the same run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt.checkpoint import save_checkpoint  # noqa: E402
from gpt.config import ModelConfig  # noqa: E402
from gpt.data.tokenizer import CharTokenizer, TiktokenTokenizer  # noqa: E402
from gpt.infer.engine import complete  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.serve.serve_cli import serving_threads  # noqa: E402
from gpt.device import cpu_model  # noqa: E402

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65
SHAPES = {
    "char": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0),
    "124m": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def machine() -> str:
    """The CPU (gpt.device.cpu_model) and the cores this process may use."""
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores usable"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, args) -> tuple[subprocess.Popen, str]:
    """serve.py on the checkpoint, in its own process; returns once it accepts requests."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), "--ckpt", str(folder), "--port", str(port), "--model-name", "bench",
           "--dtype", args.dtype, "--threads", str(args.threads), "--max-queue", str(max(args.levels) * 2)]
    for flag in ("max_batch", "prefill_chunk"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--compile"] if args.compile else []
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    seen = []
    for line in proc.stderr:
        seen.append(line.rstrip())
        if line.startswith("serving "):
            break
    else:
        raise SystemExit("serve.py did not start:\n" + "\n".join(seen))
    proc.log_tail = collections.deque(maxlen=30)  # keep draining its log; its end is shown if it fails
    threading.Thread(target=lambda: proc.log_tail.extend(line.rstrip() for line in proc.stderr), daemon=True).start()
    print("  " + " ".join(shlex.quote(c) for c in cmd[1:]))
    print("  " + "; ".join(s for s in seen if s.startswith("KV cache")))
    return proc, f"http://127.0.0.1:{port}/v1/completions"


def one_request(client, url: str, body: dict, n: int, stream: bool) -> tuple[float, float, float | None]:
    """(start, seconds, time to first token or None) of one request; checks it generated n tokens."""
    t0 = time.perf_counter()
    first, tokens = None, None
    if stream:
        with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    else:
        r = client.post(url, json=body)
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
    assert tokens == n, f"expected {n} tokens, got {tokens}"
    return t0, time.perf_counter() - t0, first


def level_run(client, url: str, body: dict, n: int, level: int, stream: bool) -> dict:
    """`level` requests started together: aggregate tokens/s, their latencies and times to first token."""
    barrier = threading.Barrier(level)

    def go(_):
        barrier.wait()
        return one_request(client, url, body, n, stream)

    with ThreadPoolExecutor(level) as pool:
        results = list(pool.map(go, range(level)))
    wall = max(t0 + s for t0, s, _ in results) - min(t0 for t0, _, _ in results)
    return {"rate": level * n / wall, "lat": [s for _, s, _ in results],
            "ttft": [f for _, _, f in results if f is not None]}


def measure_server(url: str, prompt: str, n: int, args) -> dict:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    out = {}
    limits = httpx.Limits(max_connections=max(args.levels) + 4, max_keepalive_connections=max(args.levels) + 4)
    with httpx.Client(timeout=3600, limits=limits) as client:
        for level in args.levels * (2 if args.compile else 1):  # warm up the server and open every level's
            warm = 8 if args.compile else 1  # connections (compiled: each level's graphs, twice, untimed)
            level_run(client, url, {**body, "max_tokens": warm}, warm, level, False)
        for stream in (False, True):
            for level in args.levels:
                runs = [level_run(client, url, body, n, level, stream) for _ in range(args.repeats)]
                out[stream, level] = {"rate": max(r["rate"] for r in runs), "lat": sum((r["lat"] for r in runs), []),
                                      "ttft": sum((r["ttft"] for r in runs), [])}
    return out


def engine_rates(model, tok, prompt: str, params: SamplingParams, n: int, repeats: int) -> tuple[float, float]:
    """One request through the engine in this process: tokens/s on the main thread and on a worker thread."""
    complete(model, tok, prompt, SamplingParams(temperature=0, max_tokens=4))  # warm up

    def best() -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            complete(model, tok, prompt, params, stop_ids=())  # no end-of-text stop: exactly n tokens
            times.append(time.perf_counter() - t0)
        return n / min(times)

    main_rate, box = best(), []
    # the server decodes in its own thread; measure the engine there too (on a loaded 2-core CPU the
    # main thread's OpenMP team was several times slower than a worker thread's in our runs)
    worker = threading.Thread(target=lambda: box.append(best()))
    worker.start()
    worker.join()
    return main_rate, box[0]


def bench_shape(name: str, args) -> None:
    torch.manual_seed(0)
    cfg = SHAPES[name]
    model = prepare_for_decoding(GPT(cfg), DTYPES[args.dtype], compile=args.compile)  # as serve.py prepares it
    tok = CharTokenizer(list(SHAKESPEARE_CHARS)) if name == "char" else TiktokenTokenizer("gpt2")
    prompt = "ROMEO:" if name == "char" else "The meaning of life is"
    n = min(args.tokens, cfg.block_size - len(tok.encode(prompt)))  # the server refuses what does not fit
    params = SamplingParams(temperature=0, max_tokens=n)
    main_rate, engine_rate = engine_rates(model, tok, prompt, params, n, args.repeats)
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, {n} new tokens")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench" / "best"
        save_checkpoint(folder, _fp32_state(model), {"model": dataclasses.asdict(cfg)}, tok)
        proc, url = start_server(folder, args)
        try:
            results = measure_server(url, prompt, n, args)
        except Exception:
            time.sleep(1)
            print(f"serve.py (exit code {proc.poll()}), the end of its log:", *proc.log_tail, sep="\n  ", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{'system':>26} {'tok/s':>9} {'x one':>6} {'latency p50':>12} {'p99':>7} {'first token p50':>16} {'p99':>7}")
    print(f"{'engine, main thread':>26} {main_rate:>9.1f}")
    print(f"{'engine, worker thread':>26} {engine_rate:>9.1f}")
    for stream in (False, True):
        base = results[stream, 1]["rate"]
        for level in args.levels:
            r = results[stream, level]
            label = f"serve.py, {level} {'stream' if stream else 'repl'}{('s' if stream else 'ies') if level > 1 else ('' if stream else 'y')}"
            ttft = (f"{percentile(r['ttft'], 50):>14.3f} s {percentile(r['ttft'], 99):>5.3f} s" if r["ttft"]
                    else f"{'-':>16} {'-':>7}")
            print(f"{label:>26} {r['rate']:>9.1f} {r['rate'] / base:>5.2f}x {percentile(r['lat'], 50):>10.3f} s "
                  f"{percentile(r['lat'], 99):>5.3f} s {ttft}")
    if 8 in args.levels and 1 in args.levels:
        ratio = results[False, 8]["rate"] / results[False, 1]["rate"]
        print(f"8 concurrent / one request (whole replies): {ratio:.2f}x (issue 26's target on the 124M shape: >= 6x); "
              f"one request through serve.py: {100 * results[False, 1]['rate'] / engine_rate:.0f}% of the engine's rate")


def _fp32_state(model: GPT) -> dict:
    """The weights as a checkpoint holds them (float32, contiguous: the decoding layout is not saved)."""
    return {k: v.float().contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="char,124m")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (1 is always measured)")
    p.add_argument("--repeats", type=int, default=3, help="each level's rate is the best of this many runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the engine and of serve.py "
                   "(0 = serve.py's rule: the idle cores less one)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--max-batch", type=int, default=None, help="serve.py --max-batch (default: serve.py's)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="serve.py --prefill-chunk (default: serve.py's)")
    p.add_argument("--compile", action="store_true", help="serve.py --compile, and the engine's step compiled too "
                   "(each compiles on its first decode steps, untimed)")
    args = p.parse_args()
    args.levels = sorted({1, *(int(c) for c in args.concurrency.split(","))})
    torch.set_num_threads(serving_threads(args.threads))
    print(f"CPU: {machine()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the machine may be shared (noisy)")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    for name in args.models.split(","):
        bench_shape(name.strip(), args)


if __name__ == "__main__":
    main()
