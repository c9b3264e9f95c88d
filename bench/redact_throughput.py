"""PII redaction speed (one core) and quality, in one run.

    python bench/redact_throughput.py                 # ~30 s
    python bench/redact_throughput.py --mb 4 --repeats 1

Speed: MB/s (UTF-8 bytes in, redacted text out) of gpt.data.pii.Redactor with every kind on
  prose    Tiny Shakespeare (data/shakespeare/input.txt), repeated to --mb
  sparse   the same prose with one PII value every ~2 KB (emails, phones, cards, IBANs, IPs, keys)
  dense    the labelled synthetic set of tests/pii_synth.py (a value every ~60 characters)
against a baseline measured in the same run: the same kinds' regular expressions each run over the
whole text (no prefilter, no anchors), which is what "one regex per kind" costs. The process is
single-threaded and timed by its own CPU time (time.process_time), so MB/s is per core and other
processes on a shared machine disturb it less than wall-clock time; still, compare ratios within a run.

Quality: precision and recall per kind on the labelled synthetic set (with near misses: invalid
card numbers and IBANs, version strings and OIDs that look like IPs, dates, times, MAC addresses).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pii_synth import POSITIVE, make_set, score  # noqa: E402

from gpt.data import pii  # noqa: E402

NAIVE = [pii._PHONE, pii._CARD, pii._IBAN, pii._IPV4, pii._SSN, pii._SECRET,
         re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
         re.compile(r"(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}"), re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s@/]+@"),
         re.compile(r"(?i)(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token)\s*[:=]\s*\S+")]


def prose(mb: float) -> str:
    src = ROOT / "data" / "shakespeare" / "input.txt"
    base = src.read_text(encoding="utf-8") if src.is_file() else " ".join(["the quick brown fox jumps"] * 40000)
    return (base * (int(mb * 1e6) // len(base) + 1))[: int(mb * 1e6)]


def sprinkle(text: str, every: int = 2000) -> str:
    import random

    r = random.Random(0)
    kinds = list(POSITIVE.values())
    parts = [text[i:i + every] + " " + r.choice(kinds)(r) + " " for i in range(0, len(text), every)]
    return "".join(parts)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8.0, help="size of the prose inputs")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dense, labels = make_set(4000, 0)
    inputs = {"prose": prose(args.mb), "sparse": sprinkle(prose(args.mb)), "dense": dense}
    print(f"{'input':8s} {'MB':>6s} {'ours MB/s':>10s} {'naive MB/s':>11s} {'ratio':>6s}")
    for name, text in inputs.items():
        mb = len(text.encode("utf-8")) / 1e6
        r = pii.Redactor()
        ours = timed(lambda: r.redact(text), args.repeats)
        naive = timed(lambda: [sum(1 for _ in rx.finditer(text)) for rx in NAIVE], args.repeats)
        print(f"{name:8s} {mb:6.2f} {mb / ours:10.1f} {mb / naive:11.1f} {naive / ours:5.1f}x")
    print("\nquality on the labelled synthetic set (seed 0, 4000 sentences)")
    print(f"{'kind':16s} {'labelled':>8s} {'precision':>9s} {'recall':>7s}")
    for kind, s in score(pii.Redactor(), dense, labels).items():
        print(f"{kind:16s} {s['labelled']:8d} {s['precision']:9.3f} {s['recall']:7.3f}")


if __name__ == "__main__":
    main()
