"""What verifying a checkpoint costs: SHA-256 of a weights file, against hashing the same bytes in memory.

    python bench/checksum.py            # a 512 MB file (the size of GPT-2 124M in fp32)
    python bench/checksum.py --mb 128

gpt.checkpoint records the SHA-256 of model.safetensors and train_state.pt at save time and checks
it at load time. The baseline is hashlib over bytes already in memory (the hash's own speed), in the
same run, so the ratio holds on a busy machine; the file is read from the page cache (just written).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from gpt.checkpoint import sha256_of


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    data = os.urandom(args.mb << 20)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "weights.bin"
        f.write_bytes(data)
        file_s = best_of(lambda: sha256_of(f), args.repeats)
    mem_s = best_of(lambda: hashlib.sha256(data).hexdigest(), args.repeats)
    gb = len(data) / 1e9
    print(f"sha256 of a {args.mb} MiB file: {gb / file_s:.2f} GB/s ({file_s:.2f} s); in memory: {gb / mem_s:.2f} GB/s; "
          f"file/memory speed ratio {mem_s / file_s:.2f}")


if __name__ == "__main__":
    main()
