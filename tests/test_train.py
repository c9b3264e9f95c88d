"""The training loop: accumulation, exact resume, safe checkpoints, clean stops and clear errors."""

import errno
import os
import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from gpt import checkpoint
from gpt.config import LoRAConfig, ModelConfig, PretrainConfig, load_config
from gpt.lora import apply_lora
from gpt.model import GPT, Block, KVCache
from gpt.train.loop import TrainingError
from gpt.train.pretrain import pretrain


def run(tmp_path, corpus, **extra):
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, corpus, **extra))
    return cfg, pretrain(cfg)


def weights(out_dir, kind="latest"):
    return load_file(str(out_dir / kind / "model.safetensors"))


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_equals_larger_batch(tmp_path, tiny_corpus):
    common = {"train.max_iters": 3, "train.eval_interval": 3, "model.dropout": 0.0, "train.dtype": "float32"}
    run(tmp_path / "a", tiny_corpus, **common, **{"train.batch_size": 8, "train.grad_accum": 1})
    run(tmp_path / "b", tiny_corpus, **common, **{"train.batch_size": 4, "train.grad_accum": 2})
    wa, wb = weights(tmp_path / "a" / "out"), weights(tmp_path / "b" / "out")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name
    la = [m["loss"] for m in metrics(tmp_path / "a" / "out") if "loss" in m]
    lb = [m["loss"] for m in metrics(tmp_path / "b" / "out") if "loss" in m]
    assert la == pytest.approx(lb, abs=1e-5)


def test_activation_checkpointing_recomputes_every_block_and_trains_the_same(tmp_path, tiny_corpus, monkeypatch):
    """train.activation_checkpointing=true runs each block again in the backward pass, and the run is the
    same run: fp32, dropout on (the recomputation replays the same masks), two micro-batches a step."""
    calls = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    common = {"train.max_iters": 3, "train.eval_interval": 3, "train.log_interval": 1, "train.grad_accum": 2,
              "model.dropout": 0.1}
    run(tmp_path / "a", tiny_corpus, **common)
    plain = len(calls)
    run(tmp_path / "b", tiny_corpus, **common, **{"train.activation_checkpointing": "true"})
    assert len(calls) - 2 * plain == 2 * 2 * 3  # 2 layers x 2 micro-batches x 3 steps; validation not again
    wa, wb = weights(tmp_path / "a" / "out"), weights(tmp_path / "b" / "out")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name
    la = [m["loss"] for m in metrics(tmp_path / "a" / "out") if "loss" in m]
    lb = [m["loss"] for m in metrics(tmp_path / "b" / "out") if "loss" in m]
    assert len(la) == 3 and lb == pytest.approx(la, rel=0, abs=1e-6)


def test_activation_checkpointing_with_lora_packed_rows_and_decoding():
    """LoRA (frozen base: no block input needs a gradient), packed rows and per-token losses (SFT, DPO)
    give the same losses and adapter gradients recomputed; passes without a graph run each block once."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=11, dropout=0.1,
                            position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1))
    apply_lora(model, LoRAConfig(rank=2, dropout=0.1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at the start would leave A without a gradient
    calls = []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    x, y = torch.randint(0, 11, (2, 12)), torch.randint(0, 11, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])

    def step(recompute: bool):
        model.activation_checkpointing = recompute
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)
        _, losses = model(x, y, doc_ids=doc_ids, reduction="none")
        losses.sum().backward()
        return len(calls), losses.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (n_plain, loss_plain, grads_plain), (n_ckpt, loss_ckpt, grads_ckpt) = step(False), step(True)
    assert (n_plain, n_ckpt) == (2, 4)
    assert torch.allclose(loss_plain, loss_ckpt, rtol=0, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) == 16  # 4 Linear x A, B x 2 layers
    for name, g in grads_plain.items():
        assert g.abs().sum() > 0 and torch.allclose(g, grads_ckpt[name], rtol=0, atol=1e-6), name

    model.eval()  # decoding with the flag on: the cached and uncached paths run each block once, as before
    calls.clear()
    with torch.no_grad():
        full, _ = model(x)
    cache = KVCache.empty(model.config, 2, 12, x.device, torch.float32)
    cached = torch.cat([model(x[:, :6], kv_cache=cache)[0], model(x[:, 6:], kv_cache=cache, start_pos=6)[0]], 1)
    assert len(calls) == 3 * 2 and torch.allclose(full, cached, atol=1e-5)


def test_resume_is_bit_exact(tmp_path, tiny_corpus):
    # dropout on: the RNG state must be restored too. lr_decay_iters pins the schedule to 20 steps.
    common = {"model.dropout": 0.1, "optim.lr_decay_iters": 20, "train.eval_interval": 5}
    straight, _ = run(tmp_path / "s", tiny_corpus, **common, **{"train.max_iters": 20})
    run(tmp_path / "r", tiny_corpus, **common, **{"train.max_iters": 10})
    cfg, result = run(tmp_path / "r", tiny_corpus, **common, **{"train.max_iters": 20, "train.resume": "true"})
    assert result.step == 20
    ws, wr = weights(tmp_path / "s" / "out"), weights(tmp_path / "r" / "out")
    assert ws.keys() == wr.keys()
    for name in ws:
        assert torch.equal(ws[name], wr[name]), name
    state_s = checkpoint.load_train_state(tmp_path / "s" / "out" / "latest")
    state_r = checkpoint.load_train_state(tmp_path / "r" / "out" / "latest")
    assert state_s["iter"] == state_r["iter"] == 20


def test_bf16_autocast_trains_on_any_cpu(tmp_path, tiny_corpus, capsys):
    """bf16 autocast runs on every CPU (emulated, slowly, without native bf16): the loss falls and the
    weights, the optimizer state and the checkpoint stay fp32."""
    _, result = run(tmp_path, tiny_corpus, **{"train.dtype": "bfloat16", "optim.lr": "3e-3", "train.max_iters": 16,
                                              "train.eval_interval": 8, "train.eval_iters": 1})
    assert "torch.bfloat16 on cpu" in capsys.readouterr().out
    vals = [m["val_loss"] for m in metrics(tmp_path / "out") if "val_loss" in m]
    assert result.step == 16 and vals[-1] < vals[0]
    assert {t.dtype for t in weights(tmp_path / "out").values()} == {torch.float32}


def test_bf16_resume_is_bit_exact(tmp_path, tiny_corpus):
    common = {"train.dtype": "bfloat16", "optim.lr_decay_iters": 4, "train.eval_interval": 2, "train.eval_iters": 1,
              "train.batch_size": 2}
    run(tmp_path / "s", tiny_corpus, **common, **{"train.max_iters": 4})
    run(tmp_path / "r", tiny_corpus, **common, **{"train.max_iters": 2})
    run(tmp_path / "r", tiny_corpus, **common, **{"train.max_iters": 4, "train.resume": "true"})
    ws, wr = weights(tmp_path / "s" / "out"), weights(tmp_path / "r" / "out")
    assert all(torch.equal(ws[name], wr[name]) for name in ws)


def test_resume_without_checkpoint_is_clear_error(tmp_path, tiny_corpus):
    with pytest.raises(checkpoint.CheckpointError, match="no 'latest' checkpoint to resume from"):
        run(tmp_path, tiny_corpus, **{"train.resume": "true"})


def test_outputs_resolved_config_metrics_and_best(tmp_path, tiny_corpus):
    cfg, result = run(tmp_path, tiny_corpus, **{"optim.lr": "3e-3", "train.max_iters": 30})
    out = tmp_path / "out"
    before = load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_corpus, **{"optim.lr": "3e-3",
                                                                                       "train.max_iters": 30}))
    assert cfg == before  # fit() reads its own view of the config and changes nothing in it
    saved = load_config(PretrainConfig, out / "config.yaml")
    assert saved.model.n_embd == 16 and saved.model.vocab_size > 0 and cfg.model.vocab_size == 0
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert {"iter", "loss", "lr", "ms_per_iter", "tokens_per_s"} <= train_rows[0].keys()
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0]
    best = json.loads((out / "best" / "meta.json").read_text())
    assert best["val_loss"] == pytest.approx(min(vals))
    loaded = checkpoint.load_checkpoint(out)  # best by default
    model, tok = loaded.model, loaded.tokenizer
    assert model.config == saved.model
    assert tok.decode(tok.encode("To be")) == "To be"


def test_crash_between_renames_still_loads(tmp_path, tiny_corpus):
    run(tmp_path, tiny_corpus, **{"train.max_iters": 10})
    out = tmp_path / "out"
    (out / "latest").rename(out / ".latest.old")  # as if we died after the first rename
    assert checkpoint.resolve(out, prefer="latest") == out / ".latest.old"
    _, result = run(tmp_path, tiny_corpus, **{"train.max_iters": 12, "train.resume": "true"})
    assert result.step == 12 and (out / "latest" / "model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_corpus):
    run(tmp_path, tiny_corpus, **{"train.max_iters": 10})
    good = weights(tmp_path / "out")
    with pytest.raises(TrainingError, match="loss is (nan|inf).*last good checkpoint"):
        run(tmp_path, tiny_corpus, **{"train.max_iters": 20, "train.resume": "true", "optim.lr": "1e30",
                                      "optim.grad_clip": 0, "optim.warmup_iters": 0})
    now = weights(tmp_path / "out")
    assert all(torch.equal(good[k], now[k]) for k in good)


def test_ctrl_c_saves_and_resumes(tmp_path, tiny_corpus, monkeypatch):
    from gpt.data import corpus as data

    real = data.TokenBatches.train_batch

    def interrupt_at_7(self, step, micro):
        if step == 7:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(data.TokenBatches, "train_batch", interrupt_at_7)
    _, result = run(tmp_path, tiny_corpus, **{"train.max_iters": 20})
    assert result.interrupted and result.step == 7
    assert checkpoint.load_train_state(tmp_path / "out" / "latest")["iter"] == 7
    monkeypatch.setattr(data.TokenBatches, "train_batch", real)
    _, result = run(tmp_path, tiny_corpus, **{"train.max_iters": 20, "train.resume": "true"})
    assert result.step == 20 and not result.interrupted


def test_auto_threads_take_idle_cores_and_a_resume_reuses_the_recorded_count(tmp_path, monkeypatch):
    import json

    import gpt.train.loop as loop
    from gpt.config import TrainConfig

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loop, "pick_threads", lambda: 1)  # one of two cores busy
    assert loop.training_threads(TrainConfig(), tmp_path) == (1, f"auto: the idle cores of {len(os.sched_getaffinity(0))}")
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "meta.json").write_text(json.dumps({"iter": 10, "threads": 3}))
    n, why = loop.training_threads(TrainConfig(resume=True), tmp_path)
    assert n == 3 and "bit-exact" in why  # the count the run started with, whatever the load now
    n, why = loop.training_threads(TrainConfig(resume=True, threads=2), tmp_path)
    assert n == 2 and "the run used 3" in why  # an explicit other count is honoured, and said
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert loop.training_threads(TrainConfig(), tmp_path)[1] == "auto: OMP_NUM_THREADS"
