"""Tokens/s through the HTTP server against the in-process engine, alone and with concurrent clients.

    python bench/serve_throughput.py                         # char and 124M shapes
    python bench/serve_throughput.py --models char --tokens 64 --concurrency 8

For each model shape (random weights: speed does not depend on them), in one run:
  engine   gpt.infer.engine.complete in this process: one request, greedy, `tokens` new tokens
  http x1  the same request through serve's app (uvicorn on loopback) with the real `openai` client
  http xN  N clients at once from threads (continuous batching): aggregate tokens/s, p50 and max latency
Single-request figures are the best of --repeats runs. Every request generates exactly `tokens` tokens (no end-of-text stop: a logit_bias bans it).
`transformers serve` is compared only where its serving extra is installed; otherwise the line says
it was skipped. Timings on a shared machine are noisy: read the ratios printed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.config import ModelConfig  # noqa: E402
from gpt.data.tokenizer import CharTokenizer, TiktokenTokenizer  # noqa: E402
from gpt.infer.engine import complete  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.serve.app import ServerConfig, create_app  # noqa: E402
from gpt.serve.serve_cli import serving_threads  # noqa: E402

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65
SHAPES = {
    "char": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0),
    "124m": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0),
}


def start_server(model, tok, max_batch: int):
    import uvicorn

    app = create_app(model, tok, ServerConfig("bench", max_batch=max_batch, max_queue=64))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def bench_shape(name: str, args) -> None:
    import openai

    torch.manual_seed(0)
    model = prepare_for_decoding(GPT(SHAPES[name]), torch.float32)  # as serve.py prepares a checkpoint
    tok = CharTokenizer(list(SHAKESPEARE_CHARS)) if name == "char" else TiktokenTokenizer("gpt2")
    prompt = "ROMEO:" if name == "char" else "The meaning of life is"
    bias = {tok.eot_id: -100.0} if tok.eot_id is not None else {}
    n = min(args.tokens, model.config.block_size - len(tok.encode(prompt)))  # the server refuses what does not fit
    params = SamplingParams(temperature=0, max_tokens=n, logit_bias=bias)
    complete(model, tok, prompt, SamplingParams(temperature=0, max_tokens=4))  # warm up

    def alone() -> float:
        t0 = time.perf_counter()
        complete(model, tok, prompt, params)
        return time.perf_counter() - t0

    main_rate = n / min(alone() for _ in range(args.repeats))
    # the server decodes in its own thread; measure the engine there too (on a loaded 2-core CPU the
    # main thread's OpenMP team was several times slower than a worker thread's in our runs)
    box = []
    worker = threading.Thread(target=lambda: box.append(n / min(alone() for _ in range(args.repeats))))
    worker.start()
    worker.join()
    engine_rate = box[0]

    server, thread, url = start_server(model, tok, args.concurrency)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)

    def one(_=None) -> float:
        t0 = time.perf_counter()
        r = client.completions.create(model="bench", prompt=prompt, max_tokens=n, temperature=0,
                                      logit_bias={str(k): v for k, v in bias.items()})
        assert r.usage.completion_tokens == n
        return time.perf_counter() - t0

    one()  # warm up the connection
    single = min(one() for _ in range(args.repeats))
    with ThreadPoolExecutor(args.concurrency) as pool:
        t0 = time.perf_counter()
        lat = list(pool.map(one, range(args.concurrency)))
        wall = time.perf_counter() - t0
    server.should_exit = True
    thread.join(timeout=30)

    http1 = n / single
    agg = args.concurrency * n / wall
    print(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, fp32, {n} new tokens")
    print(f"{'system':>22} {'tok/s':>9}  note")
    print(f"{'engine, main thread':>22} {main_rate:>9.1f}")
    print(f"{'engine, worker thread':>22} {engine_rate:>9.1f}  the baseline below")
    print(f"{'http, 1 request':>22} {http1:>9.1f}  {100 * http1 / engine_rate:.0f}% of the engine")
    print(f"{f'http, {args.concurrency} concurrent':>22} {agg:>9.1f}  {agg / http1:.2f}x one request; latency p50 "
          f"{statistics.median(lat):.2f} s, max {max(lat):.2f} s")
    try:
        import transformers.commands.serving  # noqa: F401  (the serving extra)
        print("transformers serve: installed, but this bench does not drive it yet (compare by hand)")
    except Exception:
        print("transformers serve: skipped (transformers' serving extra is not installed)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="char,124m")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="single-request figures are the best of this many")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = serve.py's rule: the idle cores less one)")
    args = p.parse_args()
    torch.set_num_threads(serving_threads(args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the machine may be shared (noisy)")
    for name in args.models.split(","):
        bench_shape(name.strip(), args)


if __name__ == "__main__":
    main()
