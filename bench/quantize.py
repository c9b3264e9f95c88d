"""Quality and speed of weight-only int8 decoding (gpt/infer/quantize.py) on a trained checkpoint.

    python train.py configs/shakespeare.yaml && python bench/quantize.py --ckpt out/shakespeare

Perplexity on the whole validation split (consecutive block_size windows) in fp32 and with int8
weights; greedy agreement: the share of 300 greedy tokens that match fp32, and how many match
before the first difference, from several prompts taken from the validation text.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.checkpoint import load_checkpoint  # noqa: E402
from gpt.config import DataConfig  # noqa: E402
from gpt.data.corpus import prepared_dir, read_data_meta  # noqa: E402
from gpt.device import pick_threads, tune_allocator  # noqa: E402
from gpt.infer.engine import generate  # noqa: E402
from gpt.infer.quantize import quantize_int8  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)


@torch.no_grad()
def val_loss(model, val: np.ndarray, block: int, batch: int = 32) -> float:
    n = (len(val) - 1) // block
    x = torch.from_numpy(val[: n * block].astype(np.int64)).view(n, block)
    y = torch.from_numpy(val[1 : n * block + 1].astype(np.int64)).view(n, block)
    total = sum(model(x[i : i + batch], y[i : i + batch], reduction="sum")[1].item() for i in range(0, n, batch))
    return total / (n * block)


def speed(model, prompt: torch.Tensor, n: int = 100) -> float:
    generate(model, prompt, 2, GREEDY)
    t0 = time.perf_counter()
    generate(model, prompt, 1, GREEDY)
    t1 = time.perf_counter()
    generate(model, prompt, n, GREEDY)
    return (n - 1) / ((time.perf_counter() - t1) - (t1 - t0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/shakespeare")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--tokens", type=int, default=300)
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(pick_threads())
    loaded = load_checkpoint(args.ckpt)
    ref, config, folder = loaded.model, loaded.config, loaded.folder
    ref.eval()
    q = load_checkpoint(args.ckpt).model
    quantize_int8(q)
    data = DataConfig(**{**config["data"], "data_dir": args.data_dir})
    val = np.fromfile(prepared_dir(data) / "val.bin", dtype=np.dtype(read_data_meta(prepared_dir(data))["dtype"]))
    block = ref.config.block_size
    lf, lq = val_loss(ref, val, block), val_loss(q, val, block)
    print(f"{folder}: {ref.num_params() / 1e6:.2f}M params, {torch.get_num_threads()} threads")
    print(f"val loss fp32 {lf:.4f} (ppl {math.exp(lf):.3f}), int8 {lq:.4f} (ppl {math.exp(lq):.3f}): "
          f"perplexity {100 * (math.exp(lq) / math.exp(lf) - 1):+.2f}%")
    same, prefix = [], []
    for i in range(args.prompts):
        start = i * len(val) // args.prompts
        prompt = torch.from_numpy(val[start : start + 16].astype(np.int64))[None]
        a = generate(ref, prompt, args.tokens, GREEDY)[0, 16:]
        b = generate(q, prompt, args.tokens, GREEDY)[0, 16:]
        eq = (a == b).tolist()
        same.append(sum(eq) / len(eq))
        prefix.append(eq.index(False) if False in eq else len(eq))
    print(f"greedy agreement over {args.prompts} prompts x {args.tokens} tokens: {100 * sum(same) / len(same):.1f}% "
          f"of tokens; identical prefix {min(prefix)}..{max(prefix)} tokens")
    prompt = torch.from_numpy(val[:16].astype(np.int64))[None]
    fp32, int8 = speed(ref, prompt), speed(q, prompt)
    print(f"decode batch 1: fp32 {fp32:.0f} tok/s, int8 {int8:.0f} tok/s ({int8 / fp32:.2f}x)")


if __name__ == "__main__":
    main()
