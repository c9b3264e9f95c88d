"""Pretraining: prepare the corpus if needed, build or load the model, run the one training loop."""

from __future__ import annotations

import torch

from gpt.config import PretrainConfig, check_pretrain, to_dict
from gpt.convert import load_pretrained
from gpt.data.corpus import TokenBatches, ensure_prepared, read_meta
from gpt.data.tokenizer import Tokenizer, from_spec
from gpt.infer.engine import generate
from gpt.model import GPT
from gpt.train.loop import FitResult, fit, start_run


def pretrain(cfg: PretrainConfig) -> FitResult:
    """Prepare the data if needed, build or load the model, and run fit()."""
    check_pretrain(cfg)
    dist, device = start_run(cfg)
    try:
        if dist.is_main:
            folder = ensure_prepared(cfg.data)
        dist.barrier()
        folder = ensure_prepared(cfg.data, log=lambda *_: None) if not dist.is_main else folder
        meta = read_meta(folder)
        tokenizer = from_spec(meta["tokenizer"])
        window = cfg.model.block_size
        model = init_model(cfg, tokenizer)
        window = min(window, model.config.block_size)
        batches = TokenBatches(folder, window, cfg.train.batch_size, device, cfg.train.seed,
                               dist.rank, cfg.train.eval_batch_size, cfg.train.eval_iters, dist.world_size,
                               cfg.train.grad_accum)
        result = fit(model, batches, cfg, tokenizer, device, dist)
        if (dist.is_main or dist.sharded) and cfg.logging.sample_tokens and not result.interrupted:
            # fsdp: every rank runs the (sharded) model through the same seeded sampler, rank 0 prints
            print_sample(model, tokenizer, cfg.logging.sample_prompt, cfg.logging.sample_tokens, device,
                         show=dist.is_main)
        return result
    finally:
        dist.close()


def init_model(cfg: PretrainConfig, tokenizer: Tokenizer) -> GPT:
    """A fresh model sized for the tokenizer, or the weights named by init_from."""
    if cfg.init_from == "scratch":
        if not cfg.model.vocab_size:
            m = cfg.model.vocab_multiple
            cfg.model.vocab_size = -(-tokenizer.vocab_size // m) * m
        elif cfg.model.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                             f"({tokenizer.vocab_size}); set model.vocab_size=0 to size it automatically")
        return GPT(cfg.model)
    model, init_tok, _ = load_pretrained(cfg.init_from)
    if init_tok.to_spec() != tokenizer.to_spec():
        raise ValueError(f"init_from {cfg.init_from} uses a different tokenizer than data.tokenizer="
                         f"'{cfg.data.tokenizer}'; prepare the data with the checkpoint's tokenizer")
    if to_dict(model.config) != to_dict(cfg.model):
        print(f"model: the architecture comes from {cfg.init_from}; training windows are "
              f"min(model.block_size, {model.config.block_size}) tokens", flush=True)
    cfg.model = model.config
    return model


def print_sample(model: GPT, tokenizer: Tokenizer, prompt: str, n_tokens: int, device, show: bool = True) -> None:
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id or 0]
    out = generate(model, torch.tensor([ids], device=device), n_tokens, temperature=0.8, top_k=200, seed=1337,
                   vocab_limit=tokenizer.vocab_size)
    if show:
        print("--- sample ---\n" + tokenizer.decode(out[0].tolist()) + "\n--------------", flush=True)
