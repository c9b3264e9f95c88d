"""Training throughput: tokens/s, MFU and peak memory of our step against baselines, each in a fresh process.

    python bench/train_throughput.py                        # shakespeare, bpe-small, 124m; dtype auto
    python bench/train_throughput.py --models 124m --steps 3 --compile
    python bench/train_throughput.py --models bpe-small --systems ours,before
    python bench/train_throughput.py --models 124m,124m-modern --systems ours   # GPT-2 vs the modern architecture
    python bench/train_throughput.py --models 124m --batch-size 16 --compile     # on a GPU: MFU with bf16,
                                                                                # compile and flash SDPA

Systems (each one runs in its own fresh Python process, so allocator state and memory peaks are its own):
  ours         our training step (gpt.train.loop._train_step) with the glibc allocator tuned
               (gpt.device.tune_allocator) and model.fused_loss=auto
  fused        the same with model.fused_loss=on: head + loss in row chunks, whatever the batch
  untuned      ours with glibc's allocator left at its defaults (ours / untuned = the allocator's gain)
  before       the same step with default settings: glibc's default allocator, fused_loss=off
               (what this project did before the allocator and fused loss; the ratio shows their gain)
  nanogpt      a faithful nanoGPT step (its model.py: SDPA causal attention, exact GELU, tied head,
               AdamW in decay groups; its train.py: clip 1.0, set_to_none) with default settings, fp32
  nanogpt-amp  the same under bf16/fp16 autocast (what nanoGPT does on GPUs; its CPU default is fp32)
MFU is against a matmul peak this script measures on the device for the dtype in use. Peak MB is the
worker's peak RSS on CPU (the whole process: torch itself, model, optimizer, activations) or max allocated on
CUDA; step MB is the step's own peak: the most memory one step (after the first) holds at once beyond
what was allocated before it (activations, logits, gradients, temporaries; not weights or optimizer state).
The machine may be shared: compare the ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpt.config import ModelConfig, OptimConfig, PretrainConfig, load_config  # noqa: E402
from gpt.data.batch import Batch  # noqa: E402
from gpt.device import (  # noqa: E402
    autocast,
    pick_device,
        resolve_dtype,
    tune_allocator,
)
from gpt.model import GPT  # noqa: E402
from gpt.train.dist import Dist  # noqa: E402
from gpt.train.loop import Optimization, StepContext, TokenLoss, _train_step  # noqa: E402
from gpt.train.optim import make_optimizer  # noqa: E402

MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False)
SYSTEMS = ("ours", "fused", "untuned", "before", "nanogpt", "nanogpt-amp")


def shapes() -> dict[str, tuple[ModelConfig, int]]:
    """name -> (model config, batch size). nanoGPT's defaults (no bias, exact GELU) beyond the shipped config."""
    sh = load_config(PretrainConfig, ROOT / "configs" / "shakespeare.yaml")
    sh.model.vocab_size = 65

    def gpt(n_layer, n_head, n_embd, block_size=256, vocab_size=50304, **options):
        return ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, bias=False, gelu="exact", dropout=0.0, **options)

    return {
        "shakespeare": (sh.model, sh.train.batch_size),
        "bpe-small": (gpt(2, 4, 128, block_size=64), 16),  # GPT-2 BPE vocabulary dominates this step
        "10m": (gpt(6, 6, 192), 8),
        "50m": (gpt(8, 8, 512), 4),
        "124m": (gpt(12, 12, 768), 4),
        # the 124M shape with configs/shakespeare_modern.yaml's architecture: RoPE, RMSNorm, SwiGLU at
        # 8/3 x 768 = 2048 (GPT-2's MLP parameters), QK-norm and an untied head (+38.6M head parameters)
        "124m-modern": (gpt(12, 12, 768, **MODERN, intermediate_size=2048), 4),
        "350m": (gpt(24, 16, 1024), 2),
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
        data = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), generator=g).to(device)
        self.x, self.y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def train_batch(self, step: int, micro: int) -> Batch:
        return Batch(self.x, self.y)

    def val_batches(self):
        return iter(())


# ---------------------------------------------------------------------------- nanoGPT, as its model.py


class NanoBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias), nn.LayerNorm(c.n_embd, bias=c.bias)
        self.c_attn, self.c_proj = nn.Linear(c.n_embd, 3 * c.n_embd, c.bias), nn.Linear(c.n_embd, c.n_embd, c.bias)
        self.c_fc, self.mlp_proj = nn.Linear(c.n_embd, 4 * c.n_embd, c.bias), nn.Linear(4 * c.n_embd, c.n_embd, c.bias)

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(NanoBlock(c) for _ in range(c.n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(c.n_embd, bias=c.bias), nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_step(cfg: ModelConfig, batch_size: int, device, dtype):
    torch.manual_seed(0)
    model = NanoGPT(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    b = RandomBatches(cfg, batch_size, device).train_batch(0, 0)

    def step(i):
        with autocast(device, dtype):
            _, loss = model(b.x, b.y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return model, step


def ours_step(cfg: ModelConfig, batch_size: int, device, dtype, compile_model: bool):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, OptimConfig(), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_model = torch.compile(model) if compile_model else model
    batches = RandomBatches(cfg, batch_size, device)
    ctx = StepContext(train_model, TokenLoss(), device, dtype, Dist())
    optimization = Optimization(opt, scaler, grad_accum=1, grad_clip=1.0)

    def step(i):
        _train_step(ctx, optimization, batches, i)

    return model, step


# ---------------------------------------------------------------------------- one system, one process


def worker(args) -> None:
    """Time one system on one shape and print a JSON line; runs in its own process."""
    allocator = tune_allocator() if args.system in ("ours", "fused") else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg, batch_size = shapes()[args.model]
    batch_size = args.batch_size or batch_size
    if args.system == "nanogpt":
        dtype = torch.float32
    if args.system in ("nanogpt", "nanogpt-amp"):
        if cfg.position != "learned":
            raise SystemExit(f"{args.system} is GPT-2's architecture only; {args.model} is not")
        model, step = nanogpt_step(cfg, batch_size, device, dtype)
    else:
        cfg.fused_loss = {"ours": "auto", "fused": "on", "untuned": "auto", "before": "off"}[args.system]
        model, step = ours_step(cfg, batch_size, device, dtype, args.compile and args.system != "before")
    t0 = time.perf_counter()
    step(0)  # warm-up (and compilation); allocates the optimizer state
    sync(device)
    first_step_s = time.perf_counter() - t0
    step_mb = step_peak_mb(step, device)  # the second warm-up step

    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    fused = args.system in ("ours", "fused", "untuned", "before") and \
        getattr(model, "_orig_mod", model).fuses_loss(batch_size * cfg.block_size)
    print(json.dumps(dict(tok_s=batch_size * cfg.block_size * args.steps / seconds, peak_mb=peak_mb, step_mb=step_mb,
                          first_step_s=first_step_s, threads=torch.get_num_threads(), allocator=allocator,
                          fused_loss=fused, dtype=str(dtype).replace("torch.", ""))))


def step_peak_mb(step, device: torch.device) -> float:
    """Run one step; return the most memory it held at once beyond what was allocated before it (MB):
    activations, logits, gradients and temporaries, not the model or optimizer state. On CPU, from the
    profiler's count of bytes allocated through torch (independent of how malloc keeps freed memory)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(1)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(1)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    return max([0] + [e["args"]["Total Allocated"] for e in memory]) / 2**20


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["tok_s"])[(len(runs) - 1) // 2]


def run_worker(system: str, model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--models", model, "--device", args.device,
           "--dtype", args.dtype, "--steps", str(args.steps or default_steps(model, args.device)),
           "--threads", str(args.threads), "--batch-size", str(getattr(args, "batch_size", 0))]
    cmd += ["--compile"] if args.compile else []
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{system} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_steps(model: str, device: str) -> int:
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return 20
    return {"shakespeare": 40, "bpe-small": 10, "10m": 5}.get(model, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="shakespeare,bpe-small,124m", help=f"comma list of: {', '.join(shapes())}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of: {', '.join(SYSTEMS)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 40 shakespeare, 10 bpe-small, "
                                                        "3 for 124m on CPU; 20 on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: the shape's; "
                                                              "on a GPU try 16 for 124m)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per system (interleaved); the "
                                                           "median tok/s is reported")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--worker", choices=SYSTEMS, dest="system", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.system:
        args.model = args.models
        return worker(args)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peak = matmul_peak(device, dtype)
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if cpu_flag(f)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {os.cpu_count()} cores {flags}"
    print(f"{name}; torch {torch.__version__}; dtype {str(dtype).replace('torch.', '')}, "
          f"threads {args.threads or torch.get_num_threads()}, compile {args.compile}, "
          f"measured matmul peak {peak / 1e9:,.0f} GFLOP/s; every system in a fresh process"
          + (f", median of {args.repeats}" if args.repeats > 1 else ""))
    systems = args.systems.split(",")
    print(f"{'model':<12} {'params':>7} {'system':<12} {'tok/s':>9} {'MFU':>6} {'peak MB':>8} {'step MB':>8} "
          f"{'vs untuned':>10} {'vs before':>9} {'vs nanogpt':>10} {'vs amp':>7}  notes")
    rows = []
    for model in args.models.split(","):
        cfg, _ = shapes()[model]
        gpt = GPT(cfg)
        flops, n_params = gpt.flops_per_token(training=True), gpt.num_params()
        runs = {s: [] for s in systems}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every system
            for s in systems:
                runs[s].append(run_worker(s, model, args))
        results = {s: median_run(r) for s, r in runs.items()}
        for system, r in results.items():
            ratios = [f"{r['tok_s'] / results[b]['tok_s']:.2f}x" if b in results else "-"
                      for b in ("untuned", "before", "nanogpt", "nanogpt-amp")]
            notes = f"{r['dtype']}, {r['threads']} threads, allocator {r['allocator']}"
            notes += ", fused loss" if r["fused_loss"] else ""
            if args.compile and system in ("ours", "fused"):
                notes += f", first step (compiling) {r['first_step_s']:.0f} s"
            print(f"{model:<12} {n_params / 1e6:>6.1f}M {system:<12} {r['tok_s']:>9,.0f} "
                  f"{r['tok_s'] * flops / peak:>6.1%} {r['peak_mb']:>8,.0f} {r['step_mb']:>8,.0f} "
                  f"{ratios[0]:>10} {ratios[1]:>9} {ratios[2]:>10} {ratios[3]:>7}  {notes}", flush=True)
            rows.append(dict(model=model, params=n_params, system=system, mfu=r["tok_s"] * flops / peak, **r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


if __name__ == "__main__":
    main()
