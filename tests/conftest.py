"""Shared test setup: offline tiktoken cache, the Tiny Shakespeare copy, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")


@pytest.fixture
def shakespeare_text() -> str:
    """Tiny Shakespeare from the repo's data folder or ../shared (never the network)."""
    for p in (ROOT / "data" / "shakespeare" / "input.txt", SHARED / "data" / "tinyshakespeare" / "input.txt"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    pytest.skip("Tiny Shakespeare is not available offline")


@pytest.fixture
def tiny_corpus(tmp_path: Path, shakespeare_text: str) -> Path:
    """The first 100k characters of Tiny Shakespeare as a standalone corpus file."""
    p = tmp_path / "corpus.txt"
    p.write_text(shakespeare_text[:100_000], encoding="utf-8")
    return p


def tiny_overrides(tmp_path: Path, corpus: Path, **extra) -> list[str]:
    """Overrides that make any config a few-thousand-parameter, few-second CPU run."""
    base = {
        "out_dir": str(tmp_path / "out"),
        "data.dataset": "tiny",
        "data.path": str(corpus),
        "data.data_dir": str(tmp_path / "data"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 16,
        "model.block_size": 32,
        "train.batch_size": 4,
        "train.max_iters": 20,
        "train.eval_interval": 10,
        "train.eval_iters": 2,
        "train.log_interval": 5,
        "train.device": "cpu",
        "optim.warmup_iters": 2,
        "logging.progress": "false",
        "logging.sample_tokens": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


__all__ = ["ROOT", "SHARED", "tiny_overrides"]
