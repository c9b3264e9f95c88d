"""FSDP on a Llama-shaped model (RMSNorm, rotary positions, SwiGLU, grouped-query attention, an untied LM
head): two ranks (torchrun, gloo on CPU) train like one process with the same global batch. One launch."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from conftest import run_script, tiny_overrides

from gpt.config import PretrainConfig
from gpt.entry import parse_run_args
from gpt.train.pretrain import pretrain

LLAMA = {"model.norm": "rmsnorm", "model.position": "rope", "model.mlp": "swiglu", "model.n_kv_head": 1,
         "model.bias": "false", "model.tie_embeddings": "false", "model.intermediate_size": 40}
COMMON = {"train.max_iters": 3, "train.grad_accum": 2, "train.eval_interval": 3, "train.log_interval": 1,
          "optim.lr_decay_iters": 6, "optim.lr": 1e-2, "optim.eps": 1e-3, "train.dtype": "float32", **LLAMA}


def metrics(out: Path, key: str) -> dict[int, float]:
    return {r["iter"]: r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r}


def test_fsdp_trains_an_untied_llama_shape_like_one_process(tmp_path, shakespeare_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text[:50_000], encoding="utf-8")
    common = {**COMMON, "data.data_dir": tmp_path / "data"}
    single = tiny_overrides(tmp_path, corpus, **common, **{"out_dir": tmp_path / "single", "train.batch_size": 4})
    with contextlib.redirect_stdout(io.StringIO()):
        pretrain(parse_run_args(PretrainConfig, ["configs/shakespeare.yaml", *single], "train.py"))
    sharded = tiny_overrides(tmp_path, corpus, **common, **{"out_dir": tmp_path / "fsdp", "train.batch_size": 2,
                                                            "train.threads": 1, "distributed.strategy": "fsdp"})
    proc = run_script("train.py", "configs/shakespeare.yaml", *sharded, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = metrics(tmp_path / "fsdp", "loss")
    assert sorted(losses) == [1, 2, 3]
    assert losses == pytest.approx(metrics(tmp_path / "single", "loss"), rel=1e-5, abs=1e-5)
    assert metrics(tmp_path / "fsdp", "val_loss") == pytest.approx(metrics(tmp_path / "single", "val_loss"),
                                                                   rel=1e-5, abs=1e-5)
