"""Supervised fine-tuning: `finetune(cfg)` = base checkpoint + chat tokens + SFT batches -> the same fit().
Records that are preference pairs train with DPO instead (gpt/train/dpo.py), in the same run.

The base model comes from one of our checkpoint directories or a Hugging Face GPT-2 directory.
Its tokenizer gains the chat markers (<|system|> <|user|> <|assistant|> <|end|>) as special tokens,
the embedding/LM head grow to match (a model that ships its own chat template keeps it and gains
none: gpt/data/jinja_template.py), and the tokenizer (hence the template) is saved with every
checkpoint, so `sample.py --chat` formats conversations exactly as training did.

Batches. Training examples are visited epoch by epoch in a seeded shuffled order. With packing
(the default) consecutive examples fill each window and carry doc_ids, so positions restart and
attention stays inside each example (block-diagonal causal mask): packed examples never see each
other. Without packing each row holds one example, right-padded. Row j of this stream is a pure
function of (seed, j), and step s / micro-step m / rank r takes rows starting at
((s * grad_accum + m) * world_size + r) * batch_size, so a resumed run sees the batches an
uninterrupted one would, and N ranks of batch B see what one process of batch N * B sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from gpt.config import ConfigError, FinetuneConfig, ModelConfig, check_finetune
from gpt.pretrained import load_init_from
from gpt.data.batch import Batch
from gpt.data.chat_template import ChatTemplate
from gpt.data.examples import Example
from gpt.data.finetune_data import load_sft_data
from gpt.data.tokenizer import Tokenizer
from gpt.data.training_order import RowStream
from gpt.infer.engine import DEFAULT_MAX_MODEL_LEN, complete
from gpt.infer.sampling import SamplingParams
from gpt.lora import LoRALinear, apply_lora, count_trainable, merged_state_dict
from gpt.lora_peft import is_peft_dir, peft_base, write_peft_adapter
from gpt.model import GPT, IGNORE_INDEX
from gpt.plot import plot_run
from gpt.train import dpo
from gpt.train.loop import FitConfig, FitResult, Objective, fit, start_run


class SFTBatches:
    """The BatchSource fit() trains on: deterministic rows of examples, collated with their loss mask."""

    def __init__(self, train: list[Example], val: list[Example], *, block_size: int, batch_size: int,
                 device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 packing: bool = True, eval_batch_size: int = 0, eval_iters: int = 20):
        self.train, self.val = train, val
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.rank, self.world_size, self.grad_accum, self.packing = rank, world_size, grad_accum, packing
        self.stream = RowStream([len(e.ids) - 1 for e in train], block_size, packing, seed)
        self.eval_batch_size, self.eval_iters = eval_batch_size or batch_size, eval_iters
        self.val_rows = self._val_rows()

    def train_batch(self, step: int, micro: int) -> Batch:
        return self.collate(self.train_rows(step, micro), self.train)

    def train_rows(self, step: int, micro: int) -> list[list[int]]:
        """This rank's rows (example indices) of the global draw for (step, micro)."""
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        return [self.stream.row(first + b) for b in range(self.batch_size)]

    def val_batches(self) -> Iterator[Batch]:
        """The same validation rows at every evaluation: the whole set, or its first eval_iters batches."""
        B, W = self.eval_batch_size, self.world_size
        for i in range(0, len(self.val_rows), B * W):
            rows = self.val_rows[i + self.rank * B: i + (self.rank + 1) * B]
            yield self.collate(rows + [[]] * (B - len(rows)), self.val)  # [] = an empty row, no loss

    def steps_per_epoch(self) -> float:
        return self.stream.rows_per_epoch() / (self.batch_size * self.grad_accum * self.world_size)

    def _val_rows(self) -> list[list[int]]:
        stream = RowStream([len(e.ids) - 1 for e in self.val], self.block_size, self.packing, 0, shuffle=False)
        n = stream.rows_per_epoch()
        rows = [stream.row(j) for j in range(n)]
        return rows[: self.eval_iters * self.eval_batch_size * self.world_size]

    def collate(self, rows: list[list[int]], examples: list[Example]) -> Batch:
        """x, y (IGNORE_INDEX off the response and on padding) and, when packing, doc_ids.

        Packed rows are nearly full, so they keep one shape (block_size: friendly to torch.compile);
        padded rows are cut to the batch's longest example."""
        longest = max(sum(len(examples[i].ids) - 1 for i in row) for row in rows)
        T = self.block_size if self.packing else max(1, longest)
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        docs = np.zeros((len(rows), T), dtype=np.int64)
        for r, row in enumerate(rows):
            pos = 0
            for d, i in enumerate(row):
                e = examples[i]
                n = len(e.ids) - 1
                x[r, pos:pos + n] = e.ids[:-1]
                y[r, pos:pos + n] = np.where(e.mask[1:], e.ids[1:], IGNORE_INDEX)
                docs[r, pos:pos + n] = d
                pos += n
            docs[r, pos:] = len(row)  # the padding tail is a document of its own
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return Batch(to(x), to(y), to(docs) if self.packing else None)


# ---------------------------------------------------------------------------- the run


def add_chat_tokens(model: GPT, tok: Tokenizer, seed: int = 0) -> list[str]:
    """Add the chat markers to `tok` and grow the model to match; returns the tokens that were new.

    New rows start at the mean embedding plus a little noise (half the per-dimension spread of the
    existing rows): a neutral start, yet distinct, so a LoRA run with frozen embeddings can still
    tell <|user|> from <|assistant|>. An untied head (Llama, Qwen2, ...) gets the same treatment in
    both matrices, each from its own rows: the token reads as a distinct input and scores as a neutral output.
    """
    new = ChatTemplate.missing_tokens(tok)  # none for a model with its own template: it brings its own tokens
    n_before = tok.vocab_size
    ChatTemplate.add_tokens(tok)
    if tok.vocab_size > model.config.vocab_size:
        model.resize_vocab(tok.vocab_size)
    if new:
        head, embedding = model.lm_head.weight, model.transformer.wte.weight
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in [head] if head is embedding else [head, embedding]:
                old = w[:n_before].float()
                for name in new:
                    noise = torch.randn(w.shape[1], generator=gen).to(w.device)
                    w[tok.special_id(name)] = (old.mean(0) + 0.5 * old.std(0) * noise).to(w.dtype)
    return new


def training_window(cfg: FinetuneConfig, model: ModelConfig) -> int:
    """Tokens a fine-tuning row holds: sft.block_size, or the base model's block_size capped at the decoding
    default (DEFAULT_MAX_MODEL_LEN): a family whose block_size is its max_position_embeddings (131,072 for
    Llama 3.2) would otherwise pad every packed row to that length."""
    window = cfg.sft.block_size or min(model.block_size, DEFAULT_MAX_MODEL_LEN)
    if window > model.block_size:
        raise ConfigError(f"sft.block_size {window} exceeds the block size of {cfg.init_from} ({model.block_size})")
    return window


def finetune(cfg: FinetuneConfig) -> FitResult:
    """Load the base model, add the chat tokens, read and check the data, optionally add LoRA, fit()."""
    check_finetune(cfg)
    dist, device = start_run(cfg)
    try:
        log: Callable[[str], None] = (lambda line: print(line, flush=True)) if dist.is_main else (lambda line: None)

        loaded = load_init_from(cfg)
        model, tok, folder = loaded.model, loaded.tokenizer, loaded.folder
        new = add_chat_tokens(model, tok, cfg.train.seed)
        log(f"init: {folder}" + (f"; added chat tokens {' '.join(new)}" if new else ""))
        block_size = training_window(cfg, model.config)
        template = ChatTemplate(tok)
        data = load_sft_data(cfg.data, template, block_size + 1, cfg.sft.train_on_prompt, log,
                             report_dir=Path(cfg.out_dir) if dist.is_main else None)

        if data.preference and cfg.sft.train_on_prompt:
            raise ConfigError("sft.train_on_prompt does not apply to preference pairs: DPO compares replies only")
        export = None
        if is_peft_dir(cfg.init_from):
            log(continue_adapter(model, cfg))
            export = merged_state_dict
        elif cfg.lora.rank:
            names = apply_lora(model, cfg.lora, cfg.train.seed)
            trainable, total = count_trainable(model)
            log(f"lora: rank {cfg.lora.rank} adapters on {len(names)} layers; training {trainable:,} of "
                f"{total:,} parameters; checkpoints hold the merged model")
            export = merged_state_dict

        t = cfg.train
        objective: Objective | None = None
        if data.preference:
            batches, objective = dpo.prepare_dpo(cfg, model, data, device, dist, log)
            log(f"data: pairs of windows up to {block_size} tokens{', packed' if cfg.sft.packing else ''}; one epoch is about "
                f"{batches.steps_per_epoch():.1f} steps; max_iters {t.max_iters}")
        else:
            batches = SFTBatches(data.train, data.val, block_size=block_size, batch_size=t.batch_size,
                                 device=device, seed=t.seed, rank=dist.rank, world_size=dist.world_size,
                                 grad_accum=t.grad_accum, packing=cfg.sft.packing, eval_batch_size=t.eval_batch_size,
                                 eval_iters=t.eval_iters)
            log(f"data: {'packed' if cfg.sft.packing else 'padded'} windows of {block_size} tokens; "
                f"one epoch is about {batches.steps_per_epoch():.1f} steps; max_iters {t.max_iters}")
        result = fit(model, batches, FitConfig.of(cfg, model.config), tok, device, dist, export=export,
                     objective=objective)
        if export is not None and dist.is_main:
            log(write_adapter(model, cfg, new, dist.sharded))
        if dist.is_main and cfg.logging.plot:
            plot_run(cfg.out_dir)
        show = cfg.logging.show_examples and cfg.logging.sample_tokens  # record text: printed only if asked
        if (dist.is_main or dist.sharded) and show and not result.interrupted:
            for messages in data.samples:  # fsdp: every rank runs the (sharded) model, rank 0 prints
                print_reply(model, template, messages, cfg.logging.sample_tokens, device, show=dist.is_main)
        return result
    finally:
        dist.close()


def continue_adapter(model: GPT, cfg: FinetuneConfig) -> str:
    """init_from a PEFT adapter: its LoRA layers (loaded by load_init_from) train on, with lora.dropout;
    their rank, alpha and layers are the adapter's. Returns the log line."""
    if cfg.lora.rank:
        raise ConfigError(f"lora.rank: init_from {cfg.init_from} is a PEFT adapter, whose own rank the run "
                          "trains on; leave lora.rank at 0")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.dropout.p = cfg.lora.dropout
    trainable, total = count_trainable(model)
    return (f"lora: continuing the PEFT adapter {cfg.init_from} on {len(layers)} layers; training {trainable:,} of "
            f"{total:,} parameters; checkpoints hold the merged model")


def write_adapter(model: GPT, cfg: FinetuneConfig, added_tokens: list[str], sharded: bool) -> str:
    """out_dir/adapter/: the final step's LoRA adapters (those of out_dir/latest) in PEFT's format, for the
    to-hf export of init_from (of its base, when init_from is itself an adapter); returns the log line. Not written when the run added chat tokens (the base's
    vocabulary lacks them) or sharded the model (FSDP: no rank holds the whole adapters)."""
    if added_tokens:
        return (f"adapter: no PEFT adapter written: the run added {' '.join(added_tokens)}, which "
                f"{cfg.init_from} lacks; the checkpoints hold the merged model")
    if sharded:
        return "adapter: no PEFT adapter written under fsdp; the checkpoints hold the merged model"
    base = peft_base(cfg.init_from, cfg.adapter_base) if is_peft_dir(cfg.init_from) else cfg.init_from
    folder = write_peft_adapter(model, cfg.lora, Path(cfg.out_dir) / "adapter", base)
    return f"adapter: {folder} (PEFT, for the Hugging Face export of {base})"


def greedy_reply(model: GPT, template: ChatTemplate, messages: list[dict], max_new_tokens: int) -> str:
    """The model's greedy answer to `messages`, from the engine sample.py --chat uses."""
    ids = template.encode(messages, add_generation_prompt=True)
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
    return complete(model, template.tok, ids, params, stop_ids=template.stop_ids)[0].text


def print_reply(model: GPT, template: ChatTemplate, messages: list[dict], max_new_tokens: int, device,
                show: bool = True) -> None:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        return
    prompt, expected = messages[:last], messages[last]["content"]
    reply = greedy_reply(model, template, prompt, max_new_tokens)
    if show:
        print(f"--- sample ---\n{prompt[-1]['role']}: {prompt[-1]['content']}\nexpected: {expected}\n"
              f"model: {reply}\n--------------", flush=True)
