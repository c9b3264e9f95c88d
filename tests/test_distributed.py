"""torchrun on CPU (gloo, 2 ranks): ddp and fsdp train like one process with the same global batch,
write one set of files, and their checkpoints resume on any number of ranks with either strategy."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import qa, run_script, tiny_overrides, write_base, write_jsonl
from safetensors.torch import load_file

from gpt.entry import parse_run_args
from gpt.config import FinetuneConfig, PretrainConfig
from gpt.train.pretrain import pretrain
from gpt.train.sft import finetune

K = 4  # optimizer steps per run; resumed runs go on to 2 * K
# eps comparable to the gradients keeps AdamW sensitive to their scale (a wrong 1/world_size would show)
COMMON = {"train.max_iters": K, "train.grad_accum": 2, "train.eval_interval": 2, "train.log_interval": 1, "train.threads": 1,
          "optim.lr_decay_iters": 2 * K, "optim.lr": 1e-2, "optim.eps": 1e-3, "train.dtype": "float32"}
TOL = dict(rel=1e-5, abs=1e-5)


def launch(script: str, args: list[str], nproc: int = 1, timeout: float = 120):
    """`python SCRIPT` or `torchrun --standalone --nproc_per_node=N SCRIPT` (torchrun picks a free port)."""
    return run_script(script, *args, nproc=nproc, timeout=timeout)


def train(out: Path, corpus: Path, data_dir: Path, nproc: int, batch_size: int, **extra) -> str:
    """Train with train.py's config on `nproc` ranks (one process: in this one, to save a start-up); its stdout."""
    values = {**COMMON, "data.data_dir": data_dir, "train.batch_size": batch_size, **extra}
    args = ["configs/shakespeare.yaml", *tiny_overrides(out.parent, corpus, out_dir=out, **values)]
    if nproc == 1:
        return in_process(lambda: pretrain(parse_run_args(PretrainConfig, [a for a in args if "threads" not in a],
                                                          "train.py")))
    proc = launch("train.py", args, nproc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def in_process(fn) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn()
    return buffer.getvalue()


def metrics(out: Path, key: str) -> dict[int, float]:
    """iter -> value of `key`, asserting each iteration was recorded once (one writer)."""
    seen: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            assert record["iter"] not in seen, f"iter {record['iter']} recorded twice in {out}/metrics.jsonl"
            seen[record["iter"]] = record[key]
    return seen


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text):
    """K steps of: one process at batch 4; ddp and fsdp on 2 ranks at batch 2 each (x 2 accumulation steps)."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus.txt"
    corpus.write_text(shakespeare_text[:100_000], encoding="utf-8")
    data = tmp / "data"
    single = tmp / "single"
    stdout = train(single, corpus, data, 1, 4)
    assert "global batch: 4 x 2 accum x 1 ranks = 8 sequences" in stdout
    procs = {"single": stdout}
    for strategy in ("ddp", "fsdp"):
        procs[strategy] = train(tmp / strategy, corpus, data, 2, 2, **{"distributed.strategy": strategy})
    return tmp, corpus, data, procs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs, strategy):
    tmp, _, _, procs = runs
    reference, out = tmp / "single", tmp / strategy
    losses = metrics(out, "loss")
    assert sorted(losses) == list(range(1, K + 1))
    assert losses == pytest.approx(metrics(reference, "loss"), **TOL)
    assert metrics(out, "val_loss") == pytest.approx(metrics(reference, "val_loss"), **TOL)
    assert losses[K] < losses[1] - 0.05  # it trained
    # the global batch is printed once and recorded
    assert procs[strategy].count("global batch: 2 x 2 accum x 2 ranks = 8 sequences") == 1
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["global_batch"], first["world_size"]) == (8, 2)


def test_fsdp_with_the_fused_head_and_loss_trains_like_one_process_with_the_plain_loss(runs):
    tmp, corpus, data, _ = runs
    out = tmp / "fsdp_fused"
    train(out, corpus, data, 2, 2, **{"distributed.strategy": "fsdp", "model.fused_loss": "on"})
    assert metrics(out, "loss") == pytest.approx(metrics(tmp / "single", "loss"), **TOL)
    assert metrics(out, "val_loss") == pytest.approx(metrics(tmp / "single", "val_loss"), **TOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_only_rank_zero_writes_files(runs, strategy):
    tmp, _, _, procs = runs
    assert files(tmp / strategy) == files(tmp / "single")  # no per-rank copies, no leftover temp folders
    assert procs[strategy].count("val loss") == procs["single"].count("val loss")


def resume(runs, name: str, nproc: int, batch_size: int, strategy: str = "ddp") -> Path:
    """Continue a copy of run `name` to 2K steps on `nproc` ranks; returns its output dir."""
    tmp, corpus, data, _ = runs
    out = tmp / f"{name}-resumed-on-{nproc}-{strategy}"
    shutil.copytree(tmp / name, out)
    stdout = train(out, corpus, data, nproc, batch_size, **{"train.resume": "true", "train.max_iters": 2 * K,
                                                           "distributed.strategy": strategy})
    assert f"resuming from {out / 'latest'} at iter {K}" in stdout
    return out


def test_checkpoints_resume_across_rank_counts_and_strategies(runs):
    resumed = [
        resume(runs, "ddp", 1, 4),  # 2 ranks -> 1 process
        resume(runs, "fsdp", 1, 4),  # sharded -> 1 process
        resume(runs, "single", 2, 2, "fsdp"),  # 1 process -> 2 ranks, sharded
        resume(runs, "fsdp", 2, 2, "ddp"),  # fsdp -> ddp (every checkpoint has the single-process format)
    ]
    expected = {k: v for k, v in metrics(resumed[0], "loss").items() if k > K}
    assert sorted(expected) == list(range(K + 1, 2 * K + 1))
    for out in resumed[1:]:
        assert {k: v for k, v in metrics(out, "loss").items() if k > K} == pytest.approx(expected, **TOL), out.name
        assert metrics(out, "val_loss")[2 * K] == pytest.approx(metrics(resumed[0], "val_loss")[2 * K], **TOL)


def test_a_failing_rank_ends_the_run_instead_of_hanging(tmp_path):
    """Rank 0 fails while rank 1 waits for it in a barrier: torchrun must stop both, with the error shown."""
    args = ["configs/shakespeare.yaml", *tiny_overrides(tmp_path, tmp_path / "missing.txt",
                                                       **{"distributed.timeout_s": 60})]
    proc = launch("train.py", args, nproc=2, timeout=90)  # a hang fails the test via TimeoutExpired
    assert proc.returncode != 0
    assert "missing.txt" in proc.stderr
    assert not (tmp_path / "out" / "latest").exists()


FT = {"train.max_iters": K, "train.eval_interval": K, "train.eval_iters": 2, "train.log_interval": 1,
      "train.device": "cpu", "train.dtype": "float32", "optim.lr": 1e-2, "optim.eps": 1e-3, "optim.warmup_iters": 1,
      "logging.progress": "false", "logging.sample_tokens": 0, "logging.plot": "false", "lora.rank": 4}


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory):
    """A LoRA fine-tune of a tiny base in one process at batch 4: the reference for the 2-rank runs."""
    tmp = tmp_path_factory.mktemp("sft")
    base = write_base(tmp / "base")
    words = ["cat", "sun", "red", "one", "up", "hot", "yes", "big"]
    data = write_jsonl(tmp / "qa.jsonl", [qa(f"{w}?", f"{w[::-1]}.") for w in words * 4])
    values = {**FT, "init_from": base, "data.path": data, "data.val_path": data}
    args = [f"{k}={v}" for k, v in {**values, "out_dir": tmp / "single", "train.batch_size": 4}.items()]
    in_process(lambda: finetune(parse_run_args(FinetuneConfig, args, "finetune.py")))
    return tmp, values


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_finetune_with_lora_on_two_ranks_matches_one_process(sft_single, strategy):
    tmp, values = sft_single
    out, reference = tmp / strategy, tmp / "single"
    args = {**values, "out_dir": out, "train.batch_size": 2, "train.threads": 1, "distributed.strategy": strategy}
    proc = launch("finetune.py", [f"{k}={v}" for k, v in args.items()], nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert metrics(out, "loss") == pytest.approx(metrics(reference, "loss"), **TOL)
    assert files(out) == files(reference)
    # the checkpoint holds the merged model, gathered whole even from shards
    merged, expected = load_file(out / "latest" / "model.safetensors"), load_file(reference / "latest" / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_dpo_on_two_ranks_matches_one_process(tmp_path):
    """DPO with the reference precomputed by both ranks (each its share): the same losses and metrics."""
    base = write_base(tmp_path / "base")
    words = ["cat", "sun", "red", "one", "up", "hot", "yes", "big"]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{w}?", "chosen": f"{w}.", "rejected": f"{w[::-1]}."}
                                                  for w in words])
    values = {**FT, "lora.rank": 0, "train.grad_accum": 2, "init_from": base,
              "data.path": data, "data.val_path": data, "dpo.reference": "precompute", "dpo.beta": 0.5}
    # the same global batch; every validation pair evaluated (2 ranks x 3 leaves a padding pair, and a rank idle)
    single = {**values, "out_dir": tmp_path / "single", "train.batch_size": 4, "train.eval_batch_size": 6}
    single = [f"{k}={v}" for k, v in single.items()]
    in_process(lambda: finetune(parse_run_args(FinetuneConfig, single, "finetune.py")))
    args = {**values, "out_dir": tmp_path / "ddp", "train.batch_size": 2, "train.eval_batch_size": 3, "train.threads": 1}
    proc = launch("finetune.py", [f"{k}={v}" for k, v in args.items()], nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("global batch: 2 x 2 accum x 2 ranks = 8 pairs") == 1
    for key in ("loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_reward_chosen"):
        assert metrics(tmp_path / "ddp", key) == pytest.approx(metrics(tmp_path / "single", key), **TOL), key
    assert metrics(tmp_path / "ddp", "val_accuracy")[K] > 0.5  # it trained
    assert files(tmp_path / "ddp") == files(tmp_path / "single")  # one cache file, one writer
