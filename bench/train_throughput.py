"""Training throughput: tokens/s and MFU of our training step, against a naive baseline in the same run.

    python bench/train_throughput.py                      # shakespeare + GPT-2-124M shapes, auto dtype
    python bench/train_throughput.py --models 124m --dtype float32 --steps 5 --compile

MFU is measured against a matmul peak this script measures itself on the current device for the
dtype in use, so the figure means "share of what this machine's matmuls can do". The baseline is a
nanoGPT-style model written naively (manual attention, the same GELU, unfused AdamW) trained on the
same shape in the same process, so ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.config import ModelConfig, OptimConfig, PretrainConfig, load_config  # noqa: E402
from gpt.data.corpus import Batch  # noqa: E402
from gpt.device import autocast, pick_device, resolve_dtype  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.train.dist import Dist  # noqa: E402
from gpt.train.loop import _train_step  # noqa: E402
from gpt.train.optim import make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shapes() -> dict[str, tuple[ModelConfig, int]]:
    """name -> (model config, batch size): the shipped shakespeare config, and GPT-2 124M at batch 4."""
    sh = load_config(PretrainConfig, ROOT / "configs" / "shakespeare.yaml")
    sh.model.vocab_size = 65
    return {
        "shakespeare": (sh.model, sh.train.batch_size),
        "124m": (ModelConfig(vocab_size=50304, block_size=256, n_layer=12, n_head=12, n_embd=768), 4),
    }


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Achievable dense matmul FLOP/s for this device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class RandomBatches:
    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=g).to(device)

    def train_batch(self, step: int, micro: int) -> Batch:
        return Batch(self.x[:, :-1], self.x[:, 1:])

    def val_batches(self):
        return iter(())


# ---------------------------------------------------------------------------- naive baseline


class NaiveBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.gelu = nn.GELU(approximate="tanh" if c.gelu == "tanh" else "none")  # same curve as ours
        self.qkv, self.proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)
        self.fc, self.out = nn.Linear(c.n_embd, 4 * c.n_embd), nn.Linear(4 * c.n_embd, c.n_embd)
        self.register_buffer("mask", torch.tril(torch.ones(c.block_size, c.block_size)).bool())

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.out(self.gelu(self.fc(self.ln2(x))))


class NaiveGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.Sequential(*[NaiveBlock(c) for _ in range(c.n_layer)])
        self.ln_f, self.head = nn.LayerNorm(c.n_embd), nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        logits = self.head(self.ln_f(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# ---------------------------------------------------------------------------- timing


def time_ours(cfg, batch_size, device, dtype, steps, compile_model) -> float:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, OptimConfig(), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_model = torch.compile(model) if compile_model else model
    batches = RandomBatches(cfg, batch_size, device)

    def step(i):
        _train_step(train_model, batches, i, 1, opt, scaler, device, dtype, Dist(), 1.0)

    return tokens_per_s(step, batch_size * cfg.block_size, device, steps)


def time_naive(cfg, batch_size, device, dtype, steps) -> float:
    torch.manual_seed(0)
    model = NaiveGPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    x = RandomBatches(cfg, batch_size, device).train_batch(0, 0)

    def step(i):
        with autocast(device, dtype):
            loss = model(x.x, x.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return tokens_per_s(step, batch_size * cfg.block_size, device, steps)


def tokens_per_s(step, tokens_per_step: int, device, steps: int) -> float:
    for i in range(2):  # warm-up (and compilation)
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return tokens_per_step * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="shakespeare,124m", help="comma list of: shakespeare, 124m")
    p.add_argument("--gelu", choices=["tanh", "exact"], help="override the GELU form (124m uses GPT-2's tanh)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 40 small, 3 for 124m on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peak = matmul_peak(device, dtype)
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, threads {torch.get_num_threads()}, "
          f"measured matmul peak {peak / 1e9:,.0f} GFLOP/s")
    print(f"{'model':<12} {'params':>8} {'ours tok/s':>11} {'MFU':>6} {'naive tok/s':>12} {'ratio':>6}")
    for name in args.models.split(","):
        cfg, batch_size = shapes()[name]
        if args.gelu:
            cfg.gelu = args.gelu
        steps = args.steps or (3 if device.type == "cpu" and cfg.n_embd > 256 else 40)
        ours = time_ours(cfg, batch_size, device, dtype, steps, args.compile)
        naive = time_naive(cfg, batch_size, device, dtype, steps)
        flops = GPT(cfg).flops_per_token(training=True)
        print(f"{name:<12} {GPT(cfg).num_params() / 1e6:>7.1f}M {ours:>11,.0f} {ours * flops / peak:>6.1%} "
              f"{naive:>12,.0f} {ours / naive:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
