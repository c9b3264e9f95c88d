"""Prepared token files: train.bin and val.bin, flat arrays of token ids, written all or nothing.

uint16 halves disk and memory; a vocabulary of more than 65536 tokens needs uint32. The files are
written to per-process temp files (runs may race) and renamed into place only when every token is
written; on any failure (a refused corpus, Ctrl-C, a full disk) the temp files are deleted, so no
half-written tokens stay behind. Data preparation writes them into a temporary folder with their
meta.json and renames the folder into place (gpt/data/corpus.py prepare), so the three stay one unit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> type:
    """uint16 halves disk and memory; ids of 65536 and above need uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class TokenFiles:
    """`with TokenFiles(folder, dtype) as out: out.write(split, ids)`: folder/train.bin and val.bin,
    renamed into place when the block ends normally and deleted when it raises."""

    def __init__(self, folder: Path, dtype: type):
        self.folder, self.dtype = Path(folder), dtype
        self.counts = {split: 0 for split in SPLITS}  # tokens written per split
        self._tmp = {split: self.folder / f"{split}.bin.tmp-{os.getpid()}" for split in SPLITS}
        self._files: dict = {}

    def __enter__(self) -> TokenFiles:
        try:
            for split, path in self._tmp.items():
                self._files[split] = open(path, "wb")
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, split: str, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        arr.tofile(self._files[split])
        self.counts[split] += arr.size

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self._files.values():
            f.close()
        for split, path in self._tmp.items():
            if exc_type is None:
                os.replace(path, self.folder / f"{split}.bin")
            else:
                path.unlink(missing_ok=True)
