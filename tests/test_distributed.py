"""torchrun on CPU (gloo, 2 ranks): ddp and fsdp train like one process with the same global batch,
write one set of files, and their checkpoints resume on any number of ranks with either strategy.

The one-process references run in this process; every 2-rank run of this module runs in ONE torchrun
launch (tests/dist_driver.py: a job per run, in order, each in a process group of its own), but the
failing rank, whose subject is torchrun ending the launch."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
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
RESUMED = {"train.resume": "true", "train.max_iters": 2 * K}
FT = {"train.max_iters": K, "train.eval_interval": K, "train.eval_iters": 2, "train.log_interval": 1,
      "train.device": "cpu", "train.dtype": "float32", "optim.lr": 1e-2, "optim.eps": 1e-3, "optim.warmup_iters": 1,
      "logging.progress": "false", "logging.sample_tokens": 0, "logging.plot": "false", "lora.rank": 4}
WORDS = ["cat", "sun", "red", "one", "up", "hot", "yes", "big"]


def launch(script: str, args: list[str], nproc: int = 1, timeout: float = 120):
    """`python SCRIPT` or `torchrun --standalone --nproc_per_node=N SCRIPT` (torchrun picks a free port)."""
    return run_script(script, *args, nproc=nproc, timeout=timeout)


def launch_jobs(jobs: list[dict], folder: Path, timeout: float = 400) -> dict[str, subprocess.CompletedProcess]:
    """Run the jobs ({"name", "entry", "args", "copy"}) in order on 2 ranks in one torchrun launch
    (tests/dist_driver.py); by name, what `torchrun ... ENTRY ARGS` would have given: the first non-zero exit
    status of the ranks, and their stdout and stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jobs.json").write_text(json.dumps([{**j, "args": [str(a) for a in j["args"]],
                                                   "copy": [[str(s), str(d)] for s, d in j.get("copy", [])]}
                                                  for j in jobs]))
    proc = launch("tests/dist_driver.py", [folder / "jobs.json"], nproc=2, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((folder / f"results.{r}.json").read_text()) for r in range(2)]
    out = {}
    for j in jobs:
        name = j["name"]
        code = next((c for c in (r[name] for r in ranks) if c != 0), 0)
        text = [[(folder / f"{name}.{r}.{s}").read_text() for r in range(2)] for s in ("out", "err")]
        out[name] = subprocess.CompletedProcess([j["entry"], *j["args"]], code, "".join(text[0]), "".join(text[1]))
    return out


def train_args(out: Path, corpus: Path, data_dir: Path, batch_size: int, **extra) -> list[str]:
    """train.py's arguments: K steps of configs/shakespeare.yaml, tiny, at `batch_size` per rank."""
    values = {**COMMON, "data.data_dir": data_dir, "train.batch_size": batch_size, **extra}
    return ["configs/shakespeare.yaml", *tiny_overrides(out.parent, corpus, out_dir=out, **values)]


def train_here(out: Path, corpus: Path, data_dir: Path, batch_size: int, **extra) -> str:
    """Train with train.py's config in one process (this one, to save a start-up); its stdout."""
    args = [a for a in train_args(out, corpus, data_dir, batch_size, **extra) if "threads" not in a]
    return in_process(lambda: pretrain(parse_run_args(PretrainConfig, args, "train.py")))


def overrides(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def finetune_here(values: dict) -> str:
    """Fine-tune with finetune.py's config in this process; its stdout."""
    return in_process(lambda: finetune(parse_run_args(FinetuneConfig, overrides(values), "finetune.py")))


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


def resumed_name(name: str, nproc: int, strategy: str) -> str:
    return f"{name}-resumed-on-{nproc}-{strategy}"


@dataclass
class Runs:
    """The module's runs: pretraining in `tmp` (corpus, prepared data), fine-tuning in `sft` and `dpo`, and
    the stdout of each by name (the 2-rank ones with their exit status)."""

    tmp: Path
    corpus: Path
    data: Path
    sft: Path
    dpo: Path
    single_stdout: str
    procs: dict[str, subprocess.CompletedProcess]

    def stdout(self, name: str) -> str:
        """The stdout of the 2-rank run `name` (both ranks), asserting it succeeded."""
        proc = self.procs[name]
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text) -> Runs:
    """The one-process references in this process, then every 2-rank run in one launch, in this order:
    K steps of one process at batch 4 (the reference); ddp and fsdp on 2 ranks at batch 2 each (x 2
    accumulation steps), fsdp with the fused head and loss, fsdp with activation checkpointing; resumes on
    2 ranks (1 process -> fsdp, fsdp -> ddp); LoRA fine-tunes (ddp, fsdp) and DPO (ddp), each after its
    one-process reference."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus.txt"
    corpus.write_text(shakespeare_text[:100_000], encoding="utf-8")
    data = tmp / "data"
    single = train_here(tmp / "single", corpus, data, 4)
    assert "global batch: 4 x 2 accum x 1 ranks = 8 sequences" in single
    jobs = [{"name": s, "entry": "train.py", "args": train_args(tmp / s, corpus, data, 2, **{"distributed.strategy": s})}
            for s in ("ddp", "fsdp")]
    jobs.append({"name": "fsdp_fused", "entry": "train.py", "args": train_args(
        tmp / "fsdp_fused", corpus, data, 2, **{"distributed.strategy": "fsdp", "model.fused_loss": "on"})})
    jobs.append({"name": "fsdp_recompute", "entry": "train.py", "args": train_args(
        tmp / "fsdp_recompute", corpus, data, 2, **{"distributed.strategy": "fsdp",
                                                    "train.activation_checkpointing": "true"})})
    for name, strategy in (("single", "fsdp"), ("fsdp", "ddp")):  # 1 process -> 2 ranks, sharded; fsdp -> ddp
        out = tmp / resumed_name(name, 2, strategy)
        jobs.append({"name": out.name, "entry": "train.py", "copy": [(tmp / name, out)], "args": train_args(
            out, corpus, data, 2, **RESUMED, **{"distributed.strategy": strategy})})
    sft, dpo = tmp / "sft", tmp / "dpo"
    sft.mkdir()
    dpo.mkdir()
    jobs += sft_jobs(sft)
    jobs.append(dpo_job(dpo))
    jobs.append(llama_job(tmp, corpus, data))
    return Runs(tmp, corpus, data, sft, dpo, single, launch_jobs(jobs, tmp / "jobs"))


# A Llama shape: RMSNorm, rotary positions, SwiGLU, grouped-query attention, an untied LM head (FSDP wraps it)
LLAMA = {"model.norm": "rmsnorm", "model.position": "rope", "model.mlp": "swiglu", "model.n_kv_head": 1,
         "model.bias": "false", "model.tie_embeddings": "false", "model.intermediate_size": 40}


def llama_job(tmp: Path, corpus: Path, data: Path) -> dict:
    """FSDP on 2 ranks at batch 2 each of a Llama-shaped model, after its reference here at batch 4."""
    train_here(tmp / "llama-single", corpus, data, 4, **LLAMA)
    return {"name": "llama-fsdp", "entry": "train.py", "args": train_args(
        tmp / "llama-fsdp", corpus, data, 2, **LLAMA, **{"distributed.strategy": "fsdp"})}


def sft_jobs(tmp: Path) -> list[dict]:
    """LoRA fine-tunes of a tiny base on 2 ranks at batch 2 each (ddp, fsdp), after the reference here:
    one process at batch 4."""
    base = write_base(tmp / "base")
    data = write_jsonl(tmp / "qa.jsonl", [qa(f"{w}?", f"{w[::-1]}.") for w in WORDS * 4])
    values = {**FT, "init_from": base, "data.path": data, "data.val_path": data}
    finetune_here({**values, "out_dir": tmp / "single", "train.batch_size": 4})
    return [{"name": f"sft-{strategy}", "entry": "finetune.py", "args": overrides(
        {**values, "out_dir": tmp / strategy, "train.batch_size": 2, "train.threads": 1,
         "distributed.strategy": strategy})} for strategy in ("ddp", "fsdp")]


def dpo_job(tmp: Path) -> dict:
    """DPO with the reference precomputed by both ranks (each its share) on 2 ranks, after the same in one
    process (the reference run) with the same global batch; every validation pair evaluated (2 ranks x 3
    leaves a padding pair, and a rank idle)."""
    base = write_base(tmp / "base")
    data = write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"{w}?", "chosen": f"{w}.", "rejected": f"{w[::-1]}."}
                                             for w in WORDS])
    values = {**FT, "lora.rank": 0, "train.grad_accum": 2, "init_from": base,
              "data.path": data, "data.val_path": data, "dpo.reference": "precompute", "dpo.beta": 0.5}
    finetune_here({**values, "out_dir": tmp / "single", "train.batch_size": 4, "train.eval_batch_size": 6})
    args = {**values, "out_dir": tmp / "ddp", "train.batch_size": 2, "train.eval_batch_size": 3, "train.threads": 1}
    return {"name": "dpo-ddp", "entry": "finetune.py", "args": overrides(args)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs, strategy):
    stdout = runs.stdout(strategy)
    reference, out = runs.tmp / "single", runs.tmp / strategy
    losses = metrics(out, "loss")
    assert sorted(losses) == list(range(1, K + 1))
    assert losses == pytest.approx(metrics(reference, "loss"), **TOL)
    assert metrics(out, "val_loss") == pytest.approx(metrics(reference, "val_loss"), **TOL)
    assert losses[K] < losses[1] - 0.05  # it trained
    # the global batch is printed once and recorded
    assert stdout.count("global batch: 2 x 2 accum x 2 ranks = 8 sequences") == 1
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["global_batch"], first["world_size"]) == (8, 2)


def test_fsdp_with_the_fused_head_and_loss_trains_like_one_process_with_the_plain_loss(runs):
    runs.stdout("fsdp_fused")
    out = runs.tmp / "fsdp_fused"
    assert metrics(out, "loss") == pytest.approx(metrics(runs.tmp / "single", "loss"), **TOL)
    assert metrics(out, "val_loss") == pytest.approx(metrics(runs.tmp / "single", "val_loss"), **TOL)


def test_fsdp_with_activation_checkpointing_trains_like_one_process_without(runs):
    """Each block recomputed in the backward pass gathers its shards again: the same run."""
    runs.stdout("fsdp_recompute")
    out = runs.tmp / "fsdp_recompute"
    assert metrics(out, "loss") == pytest.approx(metrics(runs.tmp / "single", "loss"), **TOL)
    assert metrics(out, "val_loss") == pytest.approx(metrics(runs.tmp / "single", "val_loss"), **TOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_only_rank_zero_writes_files(runs, strategy):
    stdout = runs.stdout(strategy)
    assert files(runs.tmp / strategy) == files(runs.tmp / "single")  # no per-rank copies, no leftover temp folders
    assert stdout.count("val loss") == runs.single_stdout.count("val loss")


def resume(runs: Runs, name: str, nproc: int, batch_size: int, strategy: str = "ddp") -> Path:
    """Run `name` continued to 2K steps on `nproc` ranks (on 2: a copy continued in the launch; on 1: a copy
    continued here, now); its output dir."""
    out = runs.tmp / resumed_name(name, nproc, strategy)
    if nproc == 1:
        shutil.copytree(runs.tmp / name, out)
        stdout = train_here(out, runs.corpus, runs.data, batch_size, **RESUMED, **{"distributed.strategy": strategy})
    else:
        stdout = runs.stdout(out.name)
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_finetune_with_lora_on_two_ranks_matches_one_process(runs, strategy):
    runs.stdout(f"sft-{strategy}")
    out, reference = runs.sft / strategy, runs.sft / "single"
    assert metrics(out, "loss") == pytest.approx(metrics(reference, "loss"), **TOL)
    assert files(out) == files(reference)
    # the checkpoint holds the merged model, gathered whole even from shards
    merged, expected = load_file(out / "latest" / "model.safetensors"), load_file(reference / "latest" / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_dpo_on_two_ranks_matches_one_process(runs):
    """DPO with the reference precomputed by both ranks (each its share): the same losses and metrics."""
    stdout, tmp = runs.stdout("dpo-ddp"), runs.dpo
    assert stdout.count("global batch: 2 x 2 accum x 2 ranks = 8 pairs") == 1
    for key in ("loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_reward_chosen"):
        assert metrics(tmp / "ddp", key) == pytest.approx(metrics(tmp / "single", key), **TOL), key
    assert metrics(tmp / "ddp", "val_accuracy")[K] > 0.5  # it trained
    assert files(tmp / "ddp") == files(tmp / "single")  # one cache file, one writer


def test_fsdp_trains_an_untied_llama_shape_like_one_process(runs):
    runs.stdout("llama-fsdp")
    out, reference = runs.tmp / "llama-fsdp", runs.tmp / "llama-single"
    losses = metrics(out, "loss")
    assert sorted(losses) == list(range(1, K + 1))
    assert losses == pytest.approx(metrics(reference, "loss"), **TOL)
    assert metrics(out, "val_loss") == pytest.approx(metrics(reference, "val_loss"), **TOL)
