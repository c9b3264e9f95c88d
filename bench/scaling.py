"""How cost grows: training tokens/s and peak memory against model size, decode ms/token against context.

    python bench/scaling.py                                   # writes bench/scaling.png and bench/scaling.json
    python bench/scaling.py --models shakespeare,10m --contexts 16,64 --out /tmp/scaling.png

Training rows come from bench/train_throughput.py's worker (our step, each size in a fresh process,
a few steps: the figures are indicative). Decoding uses the 124M shape in the dtype `auto` picks:
a prompt fills the KV cache to the context, then the median of 10 decode steps (the engine's call) is taken, for
batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from train_throughput import cpu_flag, run_worker, shapes  # noqa: E402

from gpt.device import pick_device, pick_threads, resolve_dtype, tune_allocator  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.model import GPT, KVCache  # noqa: E402

@torch.no_grad()
def decode_ms_per_token(model: GPT, batch: int, context: int, device, steps: int = 10) -> float:
    """Median time of one decode step with `context` tokens in the KV cache: the call the engine makes
    (one token per row, per-row positions, a cache view as long as the context), after a real prefill."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(cfg, batch, cfg.block_size, device, dtype)
    model(torch.randint(0, cfg.vocab_size, (batch, context), device=device), kv_cache=cache, logits_to_keep=1)
    view = KVCache(cache.k[:, :, :, : context + 1], cache.v[:, :, :, : context + 1])
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    position = torch.full((batch,), context, device=device)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        model(token, kv_cache=view, start_pos=position, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="shakespeare,10m,50m,124m,350m")
    p.add_argument("--contexts", default="16,64,256,1024")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "scaling.png"))
    args = p.parse_args()
    args.threads, args.compile = pick_threads(), False  # the cores other jobs leave idle (docs/performance.md#threads)
    tune_allocator()
    train = []
    for name in args.models.split(","):
        cfg, batch = shapes()[name]
        r = run_worker("ours", name, args)
        train.append(dict(model=name, params=GPT(cfg).num_params(), batch=batch, block=cfg.block_size, **r))
        print(f"train {name:<12} {train[-1]['params'] / 1e6:7.1f}M {r['tok_s']:>9,.0f} tok/s  "
              f"{r['peak_mb']:>7,.0f} MB peak RSS, {r['step_mb']:>7,.0f} MB the step's own", flush=True)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(pick_threads())
    cfg, _ = shapes()["124m"]
    cfg.block_size = max(int(c) for c in args.contexts.split(",")) + 8
    torch.manual_seed(0)
    model = prepare_for_decoding(GPT(cfg).to(device), dtype)  # as sample.py and serve.py decode
    decode = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            ms = decode_ms_per_token(model, batch, context, device)
            decode.append(dict(batch=batch, context=context, ms_per_token=ms))
            print(f"decode 124m batch {batch} context {context:>5}: {ms:7.1f} ms/step", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(dict(train=train, decode=decode, dtype=str(dtype)), indent=1))
    flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if cpu_flag(f)) if device.type == "cpu" else ""
    where = f"{device} {flags}, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads"
    plot(train, decode, out, f"{where}, torch {torch.__version__}")
    print(f"wrote {out} and {out.with_suffix('.json')}")


def plot(train: list[dict], decode: list[dict], out: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    params = [r["params"] / 1e6 for r in train]
    a.loglog(params, [r["tok_s"] for r in train], "o-", label="tokens/s")
    a.set_xlabel("parameters (M)")
    a.set_ylabel("training tokens/s")
    a2 = a.twinx()
    a2.loglog(params, [r["peak_mb"] for r in train], "s--", color="tab:red", label="process peak")
    a2.loglog(params, [r["step_mb"] for r in train], "^:", color="tab:red", label="step's own peak")
    a2.set_ylabel("memory (MB)", color="tab:red")
    a2.legend(loc="upper center", fontsize=7)
    for r, x in zip(train, params):
        a.annotate(r["model"], (x, r["tok_s"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    a.set_title("training step vs model size")
    for batch in sorted({r["batch"] for r in decode}):
        rows = [r for r in decode if r["batch"] == batch]
        b.semilogx([r["context"] for r in rows], [r["ms_per_token"] for r in rows], "o-", label=f"batch {batch}")
    b.set_xlabel("context length (tokens in the KV cache)")
    b.set_ylabel("ms per decode step")
    b.set_ylim(bottom=0)
    b.legend()
    b.set_title("124M decode step vs context")
    fig.suptitle(where, fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
