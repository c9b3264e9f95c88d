"""Time to first token with a shared prompt prefix: cold (computed) vs warm (from the prefix cache).

    python bench/prefix_cache.py                                  # 124M shape, 1,024-token prefix, 5 repeats
    python bench/prefix_cache.py --shape char --prefix 48 --suffix 8 --repeats 2    # a smoke run

The request: a shared prefix (a system prompt and tool definitions) followed by a question of
--suffix tokens, one new token, timed from Engine.add to its first token. For each repeat: an engine
without a prefix cache; cold: the prefix cache emptied, so the request misses (computed, then its
blocks stored); warm: the same prefix with another question, its cached blocks reused. Printed: the
median of each, the ratios (the goal: warm >= 3x faster than the miss at a 1,024-token prefix on the
124M shape), and whether warm decoding gave a cold run's greedy tokens (and log-probs within
tolerance) over --check-tokens tokens.

The 124M shape is GPT-2 small's widths and depth with a 2,048-position table: GPT-2's own 1,024
positions cannot hold a 1,024-token prefix and a question after it (the per-token cost is the same;
the weights are random, speed does not depend on them). Timings on a shared machine are noise: run it
on a quiet one and read the ratio printed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.config import ModelConfig  # noqa: E402
from gpt.device import pick_device, pick_threads, resolve_dtype  # noqa: E402
from gpt.infer.engine import Engine  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.model import GPT  # noqa: E402

SHAPES = {
    "char": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=65, dropout=0.0),
    "124m": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=2048, vocab_size=50304, dropout=0.0),
}


def first_token_seconds(engine: Engine, prompt: list[int]) -> float:
    """From add() to the request's first token (the engine's steps: row fill, the decode step, the draw)."""
    t0 = time.perf_counter()
    req = engine.add(prompt, SamplingParams(temperature=0, max_tokens=1))
    while not req.done:
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode(engine: Engine, prompt: list[int], n: int):
    req = engine.add(prompt, SamplingParams(temperature=0, max_tokens=n, logprobs=1))
    engine.run()
    return req


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="124m")
    p.add_argument("--prefix", type=int, default=1024, help="shared prefix tokens (default: %(default)s)")
    p.add_argument("--suffix", type=int, default=32, help="each request's own tokens after it (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="cold/warm pairs; the medians are printed")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared warm vs cold")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the idle cores)")
    p.add_argument("--prefix-cache-mb", type=float, default=1024)
    args = p.parse_args()
    torch.set_num_threads(pick_threads(args.threads))
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = SHAPES[args.shape]
    if args.prefix + args.suffix + args.check_tokens > cfg.block_size:
        p.error(f"--prefix + --suffix + --check-tokens must fit the {cfg.block_size}-token context")
    torch.manual_seed(0)
    model = prepare_for_decoding(GPT(cfg).to(device), dtype)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, cfg.vocab_size, (args.prefix,), generator=gen).tolist()
    questions = [torch.randint(0, cfg.vocab_size, (args.suffix,), generator=gen).tolist()
                 for _ in range(2 * args.repeats + 2)]
    engine = Engine(model, max_batch=1, max_model_len=cfg.block_size, prefix_cache_mb=args.prefix_cache_mb)
    plain = Engine(model, max_batch=1, max_model_len=cfg.block_size)  # no prefix cache at all
    with torch.no_grad():
        first_token_seconds(engine, prefix + questions[-1])  # warm up: allocations, kernels
        first_token_seconds(plain, prefix + questions[-1])
        off, cold, warm = [], [], []
        for i in range(args.repeats):
            off.append(first_token_seconds(plain, prefix + questions[2 * i]))
            engine.prefix_cache.clear()
            cold.append(first_token_seconds(engine, prefix + questions[2 * i]))  # a miss: computed, then stored
            warm.append(first_token_seconds(engine, prefix + questions[2 * i + 1]))
        reused = engine.prefix_cache.hit_tokens // args.repeats
        n = args.check_tokens
        warm_run = decode(engine, prefix + questions[-2], n)  # the prefix is cached: warm
        reference = decode(plain, prefix + questions[-2], n)
    same = warm_run.out_ids == reference.out_ids
    gap = max((abs(a - b) for a, b in zip(warm_run.out_logprobs, reference.out_logprobs)), default=0.0)
    o, c, w = statistics.median(off), statistics.median(cold), statistics.median(warm)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"## {args.shape}: {params:.1f}M params, {dtype}, {device}, prefix {args.prefix} + question {args.suffix} "
          f"tokens, {args.repeats} repeats")
    for label, times in (("no prefix cache", off), ("cold (a miss)", cold), ("warm (a hit)", warm)):
        print(f"time to first token, {label:>15}: {1000 * statistics.median(times):9.1f} ms "
              f"(median of {', '.join(f'{1000 * x:.1f}' for x in times)})")
    print(f"warm: {reused} prompt tokens from the cache; speed-up {c / w:.2f}x over the miss, {o / w:.2f}x over no "
          f"cache (goal >= 3x at a 1,024-token prefix on the 124M shape); a miss costs {100 * (c / o - 1):+.1f}%")
    print(f"warm vs cold, {n} greedy tokens: {'identical' if same else 'DIFFERENT'}; "
          f"largest log-prob difference {gap:.2e}")


if __name__ == "__main__":
    main()
