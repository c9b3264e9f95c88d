"""How long `--compile` takes before the first token, and the step it buys: fp32, CPU, inductor.

    python bench/compile_time.py                          # GPT-2 124M shape, one row (~4 min on 2 cores)
    python bench/compile_time.py --shape smollm2          # SmolLM2-135M shape (30 layers; ~15 min)

Each figure comes from a fresh process (what a user's `sample.py --compile` pays): the first compiled step
on a cold inductor cache (a new, empty TORCHINDUCTOR_CACHE_DIR), then again on the cache that run left (warm),
then the decode rate of one row ((N - 1) / (t(N) - t(1)), median of 3, random weights, greedy). Two settings:
  auto       what gpt/infer/compiled_decode.py picks: for fp32 weights at one row, plain inductor;
             otherwise freezing and max-autotune (CPU_TEMPLATES)
  templates  freezing and max-autotune for every step, as before the one-row fp32 exception
Run it alone: the compile is two threads of C++ compiles and kernel timing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One process: build the model, time the first compiled step, then the decode rate; print both."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from gpt.infer.engine import generate
    from gpt.infer.sampling import SamplingParams
    from gpt.infer.weights import prepare_for_decoding
    from gpt.model import GPT
    from sample_throughput import SHAPES, decode_rate

    torch.manual_seed(0)
    if args.shape == "smollm2":
        from family_speed import ours_from, theirs_fp32

        model = ours_from(theirs_fp32())
    else:
        model = GPT(SHAPES["124m"])
    model = prepare_for_decoding(model, torch.float32, compile=True)
    if args.templates == "templates":
        model.compiled_decode.fp32 = False  # as if the weights were not fp32: CPU_TEMPLATES at every row count
    greedy = SamplingParams(temperature=0)
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    generate(model, idx, 2, greedy)  # one compiled step
    first = time.perf_counter() - t0
    rate = decode_rate(lambda k: generate(model, idx, k, greedy), 1, 33, 3)
    print(f"RESULT {first:.1f} {rate:.1f}", flush=True)


def measure(args, templates: str, cache: str) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--templates", templates]
    out = subprocess.run(cmd, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, capture_output=True, text=True)
    line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"the {templates} run failed:\n{out.stderr[-2000:]}")
    first, rate = line.split()[1:]
    return float(first), float(rate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["124m", "smollm2"], default="124m")
    p.add_argument("--templates", choices=["auto", "templates"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    from gpt.device import cpu_model

    print(f"CPU {cpu_model()}, {os.cpu_count()} cores; shape {args.shape}, fp32, one row")
    print(f"{'setting':<10} {'cold compile s':>15} {'warm compile s':>15} {'tok/s':>8}")
    figures = {}
    for templates in ("templates", "auto"):
        with tempfile.TemporaryDirectory() as cache:
            cold, _ = measure(args, templates, cache)
            warm, rate = measure(args, templates, cache)
        figures[templates] = (cold, warm, rate)
        print(f"{templates:<10} {cold:>15.1f} {warm:>15.1f} {rate:>8.1f}", flush=True)
    (tc, tw, tr), (ac, aw, ar) = figures["templates"], figures["auto"]
    print(f"auto against templates: cold compile {ac / tc:.2f}x the time, warm {aw / tw:.2f}x, tok/s {ar / tr:.2f}x")


if __name__ == "__main__":
    main()
