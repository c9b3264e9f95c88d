"""Peak memory of a training step with and without train.activation_checkpointing, each in a fresh process.

    python bench/memory.py                                   # 124m, smollm2-360m, llama-3.2-1b-lora; dtype auto
    python bench/memory.py --shapes 124m --steps 3
    python bench/memory.py --shapes tiny --steps 1           # a smoke run: seconds

Shapes (random weights, block 1024; the sizes the performance issue names):
  124m               GPT-2 124M, batch 8, full training
  smollm2-360m       SmolLM2-360M's shape (32 x 960, 15/5 heads, SwiGLU 2560, vocab 49152, tied), batch 4,
                     full fine-tuning
  llama-3.2-1b-lora  Llama-3.2-1B's shape (16 x 2048, 32/8 heads, SwiGLU 8192, vocab 128256, tied, llama3 RoPE
                     scaling), batch 4, LoRA rank 16 on c_attn, c_proj, c_fc (the base frozen)
  tiny               2 x 64, block 128, batch 2: checks the script runs

Each (shape, checkpointing) runs our training step (gpt.train.loop._train_step: autocast, backward, clipping,
AdamW) in its own Python process with the glibc allocator tuned as training tunes it, so every peak is that
process's own. One warm-up step (it allocates the optimizer state), then --steps timed steps.
  peak MB    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident set (VmHWM in
             /proc/self/status; ru_maxrss where there is no /proc): torch itself, the model, gradients,
             optimizer state, activations.
  step MB    peak MB minus what the process held right after the model was built (CUDA: memory_allocated;
             CPU: VmRSS): gradients, optimizer state, activations, logits, temporaries.
  s/step     the median timed step.
The machine may be shared: compare the rows of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpt.config import LoRAConfig, ModelConfig, OptimConfig  # noqa: E402
from gpt.device import pick_device, resolve_dtype, tune_allocator  # noqa: E402
from gpt.lora import apply_lora  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.train.dist import Dist  # noqa: E402
from gpt.train.loop import Optimization, StepContext, TokenLoss, _train_step  # noqa: E402
from gpt.train.optim import make_optimizer  # noqa: E402
from gpt.device import cpu_model  # noqa: E402
from train_throughput import RandomBatches, sync  # noqa: E402

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, norm_eps=1e-5)
GB24 = 24 * 1000**3 / 2**20  # 24 GB in MiB


def shapes() -> dict[str, tuple[ModelConfig, int, int]]:
    """name -> (model config, batch size, LoRA rank; 0 = every parameter trains)."""
    return {
        "124m": (ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8, 0),
        "smollm2-360m": (ModelConfig(vocab_size=49152, block_size=1024, n_layer=32, n_head=15, n_kv_head=5,
                                     n_embd=960, intermediate_size=2560, rope_theta=100000.0, **LLAMA), 4, 0),
        "llama-3.2-1b-lora": (ModelConfig(vocab_size=128256, block_size=1024, n_layer=16, n_head=32, n_kv_head=8,
                                          n_embd=2048, intermediate_size=8192, rope_theta=500000.0,
                                          rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                                          rope_high_freq_factor=4.0, rope_original_context=8192, **LLAMA), 4, 16),
        "tiny": (ModelConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64), 2, 0),
    }


def memory_mb(device: torch.device, peak: bool) -> float:
    """MiB held now, or at the peak so far: CUDA's allocated bytes; on CPU the resident set (VmRSS, VmHWM)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):  # no /proc: ru_maxrss, the peak so far (bytes on macOS, KiB on Linux)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def worker(args) -> None:
    """One shape, checkpointing on or off: build, measure, train, print a JSON line. Its own process."""
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg, batch_size, rank = shapes()[args.shapes]
    batch_size = args.batch_size or batch_size
    torch.manual_seed(0)
    model = GPT(cfg)
    if rank:
        apply_lora(model, LoRAConfig(rank=rank))
    model.to(device)
    model.activation_checkpointing = args.recompute == "on"
    sync(device)
    model_mb = memory_mb(device, peak=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_model = torch.compile(model) if args.compile else model
    batches = RandomBatches(cfg, batch_size, device)
    ctx = StepContext(train_model, TokenLoss(), device, dtype, Dist())
    opt = Optimization(make_optimizer(model, OptimConfig(), device.type),
                       torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), grad_accum=1, grad_clip=1.0)
    times = []
    for i in range(1 + args.steps):  # the first: warm-up (optimizer state, compilation)
        t0 = time.perf_counter()
        loss, _ = _train_step(ctx, opt, batches, i)
        loss.item()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak_mb = memory_mb(device, peak=True)
    print(json.dumps(dict(peak_mb=peak_mb, step_mb=peak_mb - model_mb, model_mb=model_mb,
                          step_s=statistics.median(times[1:] or times), tokens=batch_size * cfg.block_size,
                          params=sum(p.numel() for p in model.parameters()),
                          trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                          threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""))))


def run_worker(shape: str, recompute: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", recompute, "--shapes", shape, "--device", args.device,
           "--dtype", args.dtype, "--steps", str(args.steps), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size)] + (["--compile"] if args.compile else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{shape} with activation checkpointing {recompute} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {platform.machine()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="124m,smollm2-360m,llama-3.2-1b-lora",
                   help=f"comma list of: {', '.join(shapes())}")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up (default 2)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: the shape's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--worker", choices=["off", "on"], dest="recompute", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.recompute:
        return worker(args)
    device = pick_device(args.device)
    print(f"{machine(device)}; torch {torch.__version__}; dtype {args.dtype} "
          f"({str(resolve_dtype(args.dtype, device)).replace('torch.', '')}); compile {args.compile}; "
          f"each row a fresh process")
    print("command: python " + " ".join(["bench/memory.py", *sys.argv[1:]]))
    print(f"{'shape':<18} {'params':>8} {'trains':>8} {'tokens':>7} {'ckpt':>4} {'peak MB':>9} {'step MB':>9} "
          f"{'step MB ratio':>13} {'s/step':>8} {'time ratio':>10} {'<= 24 GB':>8}")
    rows = []
    for shape in args.shapes.split(","):
        if shape not in shapes():
            raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(shapes())}")
        off = run_worker(shape, "off", args)
        for recompute, r in (("off", off), ("on", run_worker(shape, "on", args))):
            print(f"{shape:<18} {r['params'] / 1e6:>7.1f}M {r['trainable'] / 1e6:>7.1f}M {r['tokens']:>7} "
                  f"{recompute:>4} {r['peak_mb']:>9,.0f} {r['step_mb']:>9,.0f} "
                  f"{r['step_mb'] / off['step_mb']:>12.2f}x {r['step_s']:>8.2f} {r['step_s'] / off['step_s']:>9.2f}x "
                  f"{'yes' if r['peak_mb'] <= GB24 else 'no':>8}", flush=True)
            rows.append(dict(shape=shape, activation_checkpointing=recompute == "on", **r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
