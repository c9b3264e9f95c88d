"""Wall time to a Tiny Shakespeare val loss: `python train.py configs/shakespeare.yaml` against nanoGPT's CPU recipe.

    python bench/shakespeare_race.py                                  # nanoGPT, then ours
    python bench/shakespeare_race.py --variants "optim.name=muon" "train.batch_size=24 train.max_iters=800"

nanoGPT's recipe (its README, "I only have a macbook"): char-level Shakespeare, 2000 iterations,
batch 12, block 64, 4 layers x 4 heads x 128, lr 1e-3 cosine to 1e-4 with 100 warm-up steps, beta2 0.99,
dropout 0, eval every 250 iterations on 20 batches of train and of val, fp32 on CPU. It runs here as a
faithful copy of its train loop (random batches from the 90/10 split, its init and AdamW groups) on the
model of bench/train_throughput.py. Every run is a fresh process and is timed from start to exit;
ours runs train.py with each variant's overrides. Noisy on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nanogpt(data: Path, max_iters: int = 2000) -> None:
    """nanoGPT's train.py with the CPU recipe's settings; prints the final val loss as JSON."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import NanoGPT

    from gpt.config import ModelConfig

    torch.manual_seed(1337)
    text = data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}
    block, batch, eval_iters, eval_interval = 64, 12, 20, 250
    cfg = ModelConfig(vocab_size=len(chars), block_size=block, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                      bias=False, gelu="exact")
    model = NanoGPT(cfg)
    for name, p in model.named_parameters():  # its _init_weights and the scaled residual projections
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - block, (batch,))
        x = torch.stack([torch.from_numpy(d[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {s: torch.stack([model(*get_batch(s))[1] for _ in range(eval_iters)]).mean().item() for s in splits}
        model.train()
        return out

    def get_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=max_iters):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    x, y = get_batch("train")
    val = math.nan
    for it in range(max_iters + 1):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if it % eval_interval == 0:
            val = estimate_loss()["val"]
        if it == max_iters:
            break
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # its log_interval=1
    print(json.dumps({"val_loss": val}))


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def ours(variant: str, out: Path, config: str) -> tuple[float, float]:
    cmd = [sys.executable, "train.py", config, f"out_dir={out}", "logging.progress=false",
           "logging.sample_tokens=0"] + variant.split()
    seconds, _ = run(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return seconds, [r["val_loss"] for r in rows if "val_loss" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shakespeare.yaml")
    p.add_argument("--variants", nargs="*", default=[""], help="override sets for train.py, one string each")
    p.add_argument("--skip-nanogpt", action="store_true")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare" / "input.txt"))
    p.add_argument("--nanogpt-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nanogpt_worker:
        return nanogpt(Path(args.data))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; each run a fresh "
          "process, wall time from start to exit")
    base = None
    if not args.skip_nanogpt:
        base, out = run([sys.executable, __file__, "--nanogpt-worker", "--data", args.data])
        print(f"{'nanoGPT CPU recipe (2000 iters)':<60} {base:7.1f} s  val {json.loads(out)['val_loss']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(args.variants):
            seconds, val = ours(variant, Path(tmp) / str(i), args.config)
            ratio = f"  {seconds / base:.2f}x nanoGPT's time" if base else ""
            print(f"{('ours ' + (variant or args.config)):<60} {seconds:7.1f} s  val {val:.4f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
