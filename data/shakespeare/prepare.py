"""Prepare Tiny Shakespeare by hand: python data/shakespeare/prepare.py [char|gpt2|...]

train.py does this automatically when the token files are missing; this script is for doing it
ahead of time (e.g. once before a multi-node run). Downloads input.txt if it is not here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt.config import DataConfig  # noqa: E402
from gpt.data.corpus import ensure_prepared  # noqa: E402

if __name__ == "__main__":
    tokenizer = sys.argv[1] if len(sys.argv) > 1 else "char"
    data_dir = Path(__file__).resolve().parent.parent
    ensure_prepared(DataConfig(dataset="shakespeare", tokenizer=tokenizer, data_dir=str(data_dir)))
