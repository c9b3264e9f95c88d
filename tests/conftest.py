"""Shared test setup: the network guard, offline tiktoken cache, the Tiny Shakespeare copy, tiny configs, the
suite's time budget."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NETGUARD = Path(__file__).resolve().parent / "netguard"
sys.path.insert(0, str(NETGUARD))

from netguard_rules import ATTEMPTS as NETWORK_ATTEMPTS  # noqa: E402
from netguard_rules import install  # noqa: E402

# The network guard, for the whole session (module fixtures included) and every Python process the
# tests start: connecting off this machine, or looking up a remote name, raises and fails the test.
install()  # once per process, even when conftest is imported a second time (`from conftest import ...`)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(NETGUARD)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(NETGUARD)])


@pytest.fixture(autouse=True)
def network_guard() -> list[str]:
    """Fails a test that tried to use the network, even if the code under test caught the error."""
    yield NETWORK_ATTEMPTS
    attempts = list(NETWORK_ATTEMPTS)
    NETWORK_ATTEMPTS.clear()
    assert not attempts, f"the test tried to use the network: {attempts}"


if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

# Tiny models gain nothing from a second thread, and on a shared CPU the spin-waits of two OpenMP
# threads make them 2-3x slower; set before torch is imported (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The whole suite must stay fast enough to run on every change: 5 minutes on 2 CPU cores.
# GPT_TEST_BUDGET_S changes the budget (0 = no limit).
SUITE_BUDGET_S = float(os.environ.get("GPT_TEST_BUDGET_S", 300))
_STARTED = pytest.StashKey[tuple[float, float]]()


def _cpu_seconds() -> float:
    """CPU time of this process and the subprocesses it waited for (entry scripts, torchrun ranks)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = (time.monotonic(), _cpu_seconds())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Report the suite's time and fail the session when it is over budget (--durations=10, set in
    pyproject.toml, lists the slowest tests). Tests run one at a time on one thread, so on a quiet
    machine wall time is about CPU time; on a machine shared with other jobs wall time grows and CPU
    time does not, so the smaller of the two is what is held to the budget."""
    wall0, cpu0 = session.config.stash.get(_STARTED, (time.monotonic(), _cpu_seconds()))
    wall, cpu = time.monotonic() - wall0, _cpu_seconds() - cpu0
    over = SUITE_BUDGET_S > 0 and min(wall, cpu) > SUITE_BUDGET_S
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        budget = f"{SUITE_BUDGET_S:.0f} s budget" if SUITE_BUDGET_S > 0 else "no budget"
        reporter.write_line(f"suite time: {wall:.0f} s wall, {cpu:.0f} s CPU ({budget})" +
                            (": TOO SLOW, make the slowest tests smaller" if over else ""), red=over)
    if over and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


def lively_model(vocab_size: int, block_size: int = 16, n_embd: int = 32, seed: int = 0):
    """A random GPT whose greedy output does not collapse into one repeated token (large weights)."""
    import torch

    from gpt.config import ModelConfig
    from gpt.model import GPT

    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 1.0 if "wpe" in name else 0.3)
    return model.eval()


def tiny_overrides(tmp_path: Path, corpus: Path, **extra) -> list[str]:
    """Overrides that make any config a few-thousand-parameter, few-second CPU run.

    Numbers are compared in fp32 (`auto` picks bf16 on CPUs with native bf16, fp32 elsewhere, so a
    test left on auto would compare different things on different machines); bf16 tests say so."""
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
        "train.dtype": "float32",
        "optim.warmup_iters": 2,
        "optim.name": "adamw",  # configs/shakespeare.yaml uses muon; these tests compare AdamW runs
        "logging.progress": "false",
        "logging.sample_tokens": 0,
        "logging.plot": "false",  # matplotlib costs seconds per run; test_plot.py covers it
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


__all__ = ["ROOT", "SHARED", "lively_model", "tiny_overrides"]
