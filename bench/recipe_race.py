"""The GPT-2 recipe against the modern one: configs/shakespeare.yaml vs configs/shakespeare_modern.yaml.

    python bench/recipe_race.py                       # both recipes, then the 124M step (~3 min on 2 cores)
    python bench/recipe_race.py --repeats 3           # median of 3 alternating runs per recipe
    python bench/recipe_race.py --skip-124m --overrides train.threads=2

Both recipes train Tiny Shakespeare (char) with train.py, alternately, each run a fresh process
(as bench/shakespeare_race.py). The table gives final val loss, training and process seconds of:
  gpt2, its config     configs/shakespeare.yaml as shipped (700 steps)
  modern, equal steps  the modern recipe for the GPT-2 run's steps (its lr schedule stretched to them)
  modern, equal time   the modern recipe with max_iters cut to the steps that fit the GPT-2 run's training
                       time at the modern recipe's measured ms/step: its whole lr schedule, warm-up and
                       cosine, fitted to that budget, so its final model is annealed as the GPT-2 one is (a
                       val curve read off mid-run would not be); its own measured time is printed beside it
  modern, its config   configs/shakespeare_modern.yaml as shipped (350 steps)
Training seconds are the sum of metrics.jsonl's ms_per_iter over the steps (validation, checkpoints and
start-up excluded); process seconds are start to exit. Then, at the GPT-2 124M shape (batch 4 x 256,
AdamW), the training step of our GPT-2 model against the same shape with the modern architecture
(RoPE, RMSNorm, SwiGLU at 2048, QK-norm, untied head): bench/train_throughput.py's "ours" worker on its
shapes "124m" and "124m-modern". Noisy on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

RECIPES = {"gpt2": "configs/shakespeare.yaml", "modern": "configs/shakespeare_modern.yaml"}


def train(config: str, out: Path, overrides: list[str]) -> dict:
    """One train.py run in a fresh process: steps, final val loss, training and process seconds."""
    cmd = [sys.executable, "train.py", config, f"out_dir={out}", "logging.progress=false", "logging.sample_tokens=0",
           "logging.plot=false", *overrides]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    process_s = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "ms_per_iter" in r]
    train_s = sum((r["iter"] - prev["iter"]) * r["ms_per_iter"] / 1000
                  for prev, r in zip([{"iter": 0}] + steps, steps))
    threads = next((line.split()[1] for line in done.stdout.splitlines() if line.startswith("threads:")), "?")
    return dict(steps=steps[-1]["iter"], val=[r["val_loss"] for r in rows if "val_loss" in r][-1],
                train_s=train_s, process_s=process_s, threads=threads)


def median_run(runs: list[dict]) -> dict:
    """The run with the median training time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["train_s"])[(len(runs) - 1) // 2]


def race(args, tmp: Path) -> None:
    runs = {"gpt2": [], "modern": []}
    for i in range(args.repeats):  # alternating, so a slow spell of the machine hits both recipes
        runs["gpt2"].append(train(RECIPES["gpt2"], tmp / f"gpt2_{i}", args.overrides))
        steps = f"train.max_iters={runs['gpt2'][-1]['steps']}"
        runs["modern"].append(train(RECIPES["modern"], tmp / f"modern_{i}", [*args.overrides, steps]))
    gpt2, modern = median_run(runs["gpt2"]), median_run(runs["modern"])
    own = train(RECIPES["modern"], tmp / "modern_own", args.overrides)
    budget_steps = max(1, round(gpt2["train_s"] / (modern["train_s"] / modern["steps"])))
    timed = train(RECIPES["modern"], tmp / "modern_equal_time", [*args.overrides, f"train.max_iters={budget_steps}"])
    print(f"\n{'recipe':<8} {'run':<16} {'steps':>6} {'val loss':>9} {'train s':>8} {'ms/step':>8} "
          f"{'process s':>9}  threads")
    for name, comparison, r in (("gpt2", "its config", gpt2), ("modern", "equal steps", modern),
                                ("modern", "equal time", timed), ("modern", "its config", own)):
        print(f"{name:<8} {comparison:<16} {r['steps']:>6} {r['val']:>9.4f} {r['train_s']:>8.1f} "
              f"{1000 * r['train_s'] / r['steps']:>8.1f} {r['process_s']:>9.1f}  {r['threads']}", flush=True)
    print(f"equal time: the modern recipe got {budget_steps} steps for the GPT-2 recipe's {gpt2['train_s']:.1f} s "
          f"of training; it took {timed['train_s']:.1f} s. Val loss, modern - gpt2: at equal steps "
          f"{modern['val'] - gpt2['val']:+.4f}, at equal time {timed['val'] - gpt2['val']:+.4f}")
    if args.repeats > 1:
        for name, rs in runs.items():
            vals = ", ".join(f"{r['val']:.4f}" for r in rs)
            seconds = ", ".join(f"{r['train_s']:.1f}" for r in rs)
            print(f"{name}: val {vals}; train s {seconds} (median {statistics.median(r['train_s'] for r in rs):.1f})")


def step_124m(args) -> None:
    """Training step at the GPT-2 124M shape, GPT-2 vs modern architecture (train_throughput's workers)."""
    from train_throughput import run_worker, shapes

    from gpt.model import GPT

    worker_args = argparse.Namespace(device="cpu", dtype=args.dtype, steps=args.steps_124m, threads=args.threads,
                                     batch_size=0, compile=False)
    results = {}
    for _ in range(args.repeats):
        for model in ("124m", "124m-modern"):
            results.setdefault(model, []).append(run_worker("ours", model, worker_args))
    medians = {model: sorted(rs, key=lambda r: r["tok_s"])[(len(rs) - 1) // 2] for model, rs in results.items()}
    print(f"\n{'shape':<12} {'params':>7} {'tok/s':>8} {'ms/step':>8} {'step MB':>8}  notes")
    for model, r in medians.items():
        cfg, batch = shapes()[model]
        n_params = GPT(cfg).num_params()
        ms = 1000 * batch * cfg.block_size / r["tok_s"]
        ratio = "" if model == "124m" else f", {medians['124m']['tok_s'] / r['tok_s']:.2f}x GPT-2's step time"
        print(f"{model:<12} {n_params / 1e6:>6.1f}M {r['tok_s']:>8,.0f} {ms:>8.0f} {r['step_mb']:>8,.0f}  "
              f"batch {batch} x {cfg.block_size}, {r['dtype']}, {r['threads']} threads, AdamW{ratio}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1, help="alternating fresh runs per recipe; the median is kept")
    p.add_argument("--overrides", nargs="*", default=[], help="train.py overrides for both recipes (key=value)")
    p.add_argument("--skip-race", action="store_true")
    p.add_argument("--skip-124m", action="store_true")
    p.add_argument("--steps-124m", type=int, default=3, help="timed steps at the 124M shape")
    p.add_argument("--dtype", default="auto", help="124M step: auto, float32, bfloat16")
    p.add_argument("--threads", type=int, default=0, help="124M step: torch threads (0: torch's default)")
    args = p.parse_args()
    import torch
    from gpt.device import cpu_model
    from train_throughput import cpu_flag

    flags = sorted(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if cpu_flag(f))
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores {flags}; torch {torch.__version__}; each run a fresh process")
    if not args.skip_race:
        with tempfile.TemporaryDirectory() as tmp:
            race(args, Path(tmp))
    if not args.skip_124m:
        step_124m(args)


if __name__ == "__main__":
    main()
