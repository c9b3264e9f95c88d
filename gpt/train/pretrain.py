"""Pretraining: prepare the corpus if needed, build or load the model, run the one training loop."""

from __future__ import annotations

import dataclasses

import torch

from gpt.config import ConfigError, PretrainConfig, check_pretrain, to_dict
from gpt.checkpoint import LoadedModel
from gpt.pretrained import load_init_from
from gpt.data import canary
from gpt.data.corpus import TokenBatches, ensure_prepared, read_data_meta
from gpt.data.tokenizer import Tokenizer, from_spec
from gpt.infer.engine import generate
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT
from gpt.plot import plot_run
from gpt.train.loop import FitConfig, FitResult, fit, start_run


def pretrain(cfg: PretrainConfig) -> FitResult:
    """Prepare the data if needed, build or load the model, and run fit()."""
    check_pretrain(cfg)
    dist, device = start_run(cfg)
    try:
        start = load_init_from(cfg) if cfg.init_from != "scratch" else None
        # a tokenizer built from a corpus (char, bpe) cannot be rebuilt from new text: the new corpus is
        # encoded with the starting checkpoint's own (continued pretraining)
        kept = start.tokenizer if start is not None and cfg.data.tokenizer in ("char", "bpe") else None
        if dist.is_main:
            folder = ensure_prepared(cfg.data, tokenizer=kept)
            canary.copy_record(folder, cfg.out_dir)
        dist.barrier()
        folder = ensure_prepared(cfg.data, log=lambda *_: None, tokenizer=kept) if not dist.is_main else folder
        meta = read_data_meta(folder)
        tokenizer = from_spec(meta["tokenizer"])
        model = init_model(cfg, tokenizer, start)
        t = cfg.train
        batches = TokenBatches(folder, block_size=min(cfg.model.block_size, model.config.block_size),
                               batch_size=t.batch_size, device=device, seed=t.seed, rank=dist.rank,
                               world_size=dist.world_size, grad_accum=t.grad_accum,
                               eval_batch_size=t.eval_batch_size, eval_iters=t.eval_iters)
        result = fit(model, batches, FitConfig.of(cfg, model.config), tokenizer, device, dist)
        if dist.is_main and cfg.logging.plot:
            plot_run(cfg.out_dir)
        if (dist.is_main or dist.sharded) and cfg.logging.sample_tokens and not result.interrupted:
            # fsdp: every rank runs the (sharded) model through the same seeded sampler, rank 0 prints
            print_sample(model, tokenizer, cfg.logging.sample_prompt, cfg.logging.sample_tokens, device,
                         show=dist.is_main)
        return result
    finally:
        dist.close()


def init_model(cfg: PretrainConfig, tokenizer: Tokenizer, start: LoadedModel | None = None) -> GPT:
    """A fresh model sized for the tokenizer, or the weights of init_from (`start`: load_pretrained's
    answer; cfg is left as it is: the model's own config is what checkpoints record)."""
    if start is None:
        m = cfg.model.vocab_multiple
        model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or
                                        -(-tokenizer.vocab_size // m) * m)
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                              f"({tokenizer.vocab_size}); set model.vocab_size=0 to size it automatically")
        return GPT(model_cfg)
    model, init_tok = start.model, start.tokenizer
    if init_tok.to_spec() != tokenizer.to_spec():
        raise ConfigError(f"init_from {cfg.init_from} uses a different tokenizer than data.tokenizer="
                          f"'{cfg.data.tokenizer}'; prepare the data with the checkpoint's tokenizer")
    if to_dict(model.config) != to_dict(cfg.model):
        print(f"model: the architecture comes from {cfg.init_from}; training windows are "
              f"min(model.block_size, {model.config.block_size}) tokens", flush=True)
    return model


def print_sample(model: GPT, tokenizer: Tokenizer, prompt: str, n_tokens: int, device, show: bool = True) -> None:
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id or 0]
    out = generate(model, torch.tensor([ids], device=device), n_tokens,
                   SamplingParams(temperature=0.8, top_k=200, seed=1337), vocab_limit=tokenizer.vocab_size)
    if show:
        print("--- sample ---\n" + tokenizer.decode(out[0].tolist()) + "\n--------------", flush=True)
