"""Custom BPE: training time, encoding speed against tiktoken's GPT-2, and compression, in one run.

    python bench/tokenizer_speed.py                 # Tiny Shakespeare + a code sample (Python's stdlib)
    python bench/tokenizer_speed.py --repeats 3     # fewer encode repeats: a quicker look

Targets (issue 13): an 8192-token BPE trains on the 1 MB Tiny Shakespeare in under 10 s on 2 cores,
and encodes within 1.5x of tiktoken's GPT-2 on the same text. Each corpus is cut 90/10 like
`data.val_fraction=0.1`: the tokenizers learn on the first part, compression is measured on the
held-out tail. Encoding speed is single-threaded `encode` over the whole text, best of --repeats.
The machine may be shared: compare the ratios printed in the same run, not absolute figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.data.bpe import cached_gpt2, train_bpe  # noqa: E402
from gpt.data.tokenizer import CharTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shakespeare() -> str:
    shared = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    for p in (ROOT / "data" / "shakespeare" / "input.txt", shared):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    sys.exit("Tiny Shakespeare not found: put it at data/shakespeare/input.txt")


def stdlib_code(limit: int = 1 << 20) -> str:
    """About 1 MB of Python source: the standard library's own modules, in name order."""
    parts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    gpt2 = cached_gpt2()
    if gpt2 is None:
        sys.exit("tiktoken's GPT-2 files are not cached: set TIKTOKEN_CACHE_DIR to a folder holding them")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()]
    print(f"cpu: {os.cpu_count()} cores, flags {' '.join(flags) or 'none'}; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, text in (("Tiny Shakespeare", shakespeare()), ("Python stdlib code", stdlib_code())):
        cut = int(len(text) * 0.9)
        train, val = text[:cut], text[cut:]
        t = time.perf_counter()
        bpe = train_bpe([train[i:i + (1 << 20)] for i in range(0, len(train), 1 << 20)], args.vocab_size,
                        log=lambda line: None)
        train_s = time.perf_counter() - t
        ours = best_time(lambda: bpe.encode(text), args.repeats)
        base = best_time(lambda: gpt2.encode(text), args.repeats)
        mb = len(text.encode()) / 1e6
        print(f"{name}: {mb:.2f} MB; train {args.vocab_size}-token BPE {train_s:.2f} s (target < 10 s); "
              f"encode ours {mb / ours:.1f} MB/s, tiktoken GPT-2 {mb / base:.1f} MB/s: "
              f"ours takes {ours / base:.2f}x GPT-2's time (target <= 1.5x)")
        val_bytes = len(val.encode())
        char = CharTokenizer.from_text(train)
        unseen = sum(c not in char.stoi for c in val)
        rows.append((name, val_bytes / len(val), unseen, val_bytes / len(gpt2.encode(val)),
                     val_bytes / len(bpe.encode(val))))
    print(f"\nbytes per token on the held-out 10% (higher = more text per token; {args.vocab_size // 1024}k custom)")
    print("| text | char | GPT-2 (50k) | custom BPE |")
    print("| --- | --- | --- | --- |")
    for name, char_bpt, unseen, gpt2_bpt, ours_bpt in rows:
        note = f" ({unseen} chars unseen in training)" if unseen else ""
        print(f"| {name} | {char_bpt:.2f}{note} | {gpt2_bpt:.2f} | {ours_bpt:.2f} |")


if __name__ == "__main__":
    main()
