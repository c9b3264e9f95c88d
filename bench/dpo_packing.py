"""DPO batches packed or padded: positions per batch and the time of a policy forward + backward.

    python data/qa/prepare.py && python bench/dpo_packing.py

The QA preference pairs get a context of 0-190 characters of Tiny Shakespeare before the question (a
seeded choice per pair), so sequence lengths vary as in real data; a random 4 x 128 character model
scores batches of 16 pairs in bf16 autocast (fp32 on CPUs without native bf16), padded and packed,
alternating, in one process. Uniform lengths gain nothing from packing: there is nothing to share.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpt.config import ModelConfig  # noqa: E402
from gpt.data.chat_template import ChatTemplate  # noqa: E402
from gpt.data.finetune_data import load_file  # noqa: E402
from gpt.data.tokenizer import CharTokenizer  # noqa: E402
from gpt.device import autocast, resolve_dtype, tune_allocator  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.train.dpo import PairBatches, sequence_logps  # noqa: E402


def mixed_pairs(pairs: Path, context: str, out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(pairs, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            n = rng.choice([0, 0, 0, 20, 60, 190])
            start = rng.randrange(len(context) - 200)
            row["prompt"] = (context[start:start + n] + "\n" if n else "") + row["prompt"]
            dst.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=str(ROOT / "data" / "qa" / "pairs_train.jsonl"))
    p.add_argument("--context", default=str(ROOT / "data" / "shakespeare" / "input.txt"))
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    tune_allocator()
    device = torch.device("cpu")
    dtype = resolve_dtype("auto", device)
    context = Path(args.context).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        mixed_pairs(Path(args.pairs), context, path)
        tok = CharTokenizer(sorted(set(context + path.read_text(encoding="utf-8"))))
        ChatTemplate.add_tokens(tok)
        pairs = load_file(str(path), "preference", ChatTemplate(tok), 257, False).records
    examples = [e for pair in pairs for e in pair]
    lengths = [len(e.ids) - 1 for e in examples]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=tok.vocab_size, dropout=0.0))
    print(f"{len(examples) // 2} pairs, sequences of {sum(lengths) / len(lengths):.0f} tokens on average, "
          f"up to {max(lengths)}; {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads")
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for packing in (False, True, False, True):
        batches = PairBatches(pairs, [], batch_size=16, device=device, packing=packing)

        def step(i: int) -> int:
            b = batches.train_batch(i, 0)
            with autocast(device, dtype):
                logps = sequence_logps(model, b)
            logps.sum().backward()
            return b.x.numel()

        step(0)
        t0, positions = time.perf_counter(), 0
        for i in range(1, args.steps + 1):
            positions += step(i)
        results[packing].append((positions / args.steps, (time.perf_counter() - t0) / args.steps * 1e3))
    for packing, runs in results.items():
        best = min(runs, key=lambda r: r[1])
        print(f"{'packed' if packing else 'padded':>7}: {best[0]:,.0f} positions a batch, {best[1]:.1f} ms a step")
    print(f"packed / padded time: {min(r[1] for r in results[True]) / min(r[1] for r in results[False]):.2f}")


if __name__ == "__main__":
    main()
