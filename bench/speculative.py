"""Speculative decoding against plain decoding at batch 1: tokens/s, acceptance rate, identical greedy tokens.

    python bench/speculative.py                      # the 124M shape, random weights (a few minutes on 2 cores)
    python bench/speculative.py --ckpt out/run --draft-ckpt out/small   # your trained models
    python bench/speculative.py --ckpt out/run --task extraction        # the issue's target task only
    python bench/speculative.py --ckpt out/sft_extract --chat --prompt-file data/extract/val.jsonl  # a chat model
    python bench/speculative.py --smoke              # a seconds-long run of the script itself

Rows, all greedy, all generating exactly --new-tokens tokens (end tokens ignored), through the engine
(gpt.infer.engine.complete, batch 1), on three prompts: extraction (a record, then "copy these fields
exactly" with the answer begun: the answer copies spans of the prompt, the issue's target task), a
repetitive code-like one, and plain prose:
  plain          gpt.infer.engine.complete: one forward pass per token
  ngram          --speculate ngram: prompt lookup, K guesses verified per forward pass
  draft-tiny     --speculate DRAFT with a tiny draft (2 layers x 128, the target's vocabulary)
  draft-layers   --speculate DRAFT with the target's own first 2 layers as the draft (self-speculation)
  oracle         guesses that are always right (plain decoding's own tokens): the ceiling at this K,
                 what verifying K + 1 positions per pass can give at 100% acceptance
With random weights (the default) the models predict nothing, so acceptance says little about real
use: draft-tiny then almost never agrees (its row is the cost of drafting), draft-layers agrees often
(random layers barely move the residual stream), and ngram accepts only where the random model
repeats itself. The extraction task's figure (the issue asks >= 1.8x for ngram) therefore needs --ckpt: a
trained model that copies what it is asked to copy (any GPT-2-tokenizer checkpoint, e.g. a `python -m
gpt.convert` of GPT-2 or an SFT run of configs/sft_qa.yaml); with random weights only its oracle row (the
ceiling) means something. Pass --draft-ckpt for a trained draft; the oracle row is the ceiling either way.
With --chat the prompt is one user turn through the checkpoint's chat template (a fine-tuned chat model,
e.g. configs/sft_extract.yaml's), and the extraction request stops before the answer, which the model
writes itself. Decode rate = (n - 1) / (time(n tokens) - time(1 token)), which removes the prefill; each figure is the
median of --repeats runs. Compare ratios within one run, and name the CPU (printed) with any figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.checkpoint import load_checkpoint  # noqa: E402
from gpt.config import ModelConfig  # noqa: E402
from gpt.data.chat_template import ChatTemplate  # noqa: E402
from gpt.data.tokenizer import TiktokenTokenizer  # noqa: E402
from gpt.device import cpu_model, pick_device, resolve_dtype, tune_allocator  # noqa: E402
from gpt.infer.engine import complete  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.infer.speculative import DraftProposer, NgramProposer, Proposal, Speculation  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.model import GPT  # noqa: E402
from sample_throughput import decode_rate  # noqa: E402  (bench/: batch x (n - 1) / (t(n) - t(1)))

SHAPE_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
SHAPE_SMOKE = dict(n_layer=2, n_head=2, n_embd=64, block_size=256)
TINY_DRAFT = dict(n_layer=2, n_head=2, n_embd=128)

CODE_PROMPT = '''Rename the field `user_id` to `account_id` everywhere in this code and return the whole file.

def load_user(db, user_id):
    row = db.fetch("SELECT * FROM users WHERE user_id = ?", (user_id,))
    if row is None:
        raise KeyError(f"no user {user_id}")
    return {"user_id": row["user_id"], "name": row["name"], "email": row["email"]}


def save_user(db, user):
    db.execute("UPDATE users SET name = ?, email = ? WHERE user_id = ?",
               (user["name"], user["email"], user["user_id"]))


def delete_user(db, user_id):
    db.execute("DELETE FROM users WHERE user_id = ?", (user_id,))

Here is the file with `user_id` renamed to `account_id`:

def load_user(db, account_id):
'''
EXTRACTION_REQUEST = '''Customer record
Name: Margaret Okonkwo-Lindqvist
Account number: 4417-2290-8835-1063
Address: Flat 12, 48 Harbour View Road, Port Elsworth, PE7 3QL
Email: m.okonkwo.lindqvist@example-mail.org
Phone: +44 20 7946 0193
Plan: Business Broadband 500 (annual contract, renewed 14 March 2024)
Notes: prefers contact by email after 6pm; previous address 7 Quarry Lane, Dunmore, DN4 8RT

Copy the customer's name, account number, address, email and phone exactly as written above.'''
EXTRACTION_PROMPT = EXTRACTION_REQUEST + '''

Name: Margaret Okonkwo-Lindqvist
Account number: 4417-2290-8835-1063
Address:'''
PROSE_PROMPT = ('The harbour town woke slowly that morning. Fishermen argued about the weather while the '
                'baker opened his shutters, and a girl with a red scarf ran down to the quay to watch the '
                'ferry come in. Nobody noticed the stranger who stepped off it, a tall man carrying a '
                'violin case and a letter he had been told never to open. He asked the way to the old '
                'lighthouse, and the answer he got made him smile for the first time in weeks.')


class OracleProposer:
    """Guesses plain decoding's own next tokens: every guess is accepted (the ceiling of verification)."""

    name = "oracle"

    def __init__(self, reference: list[int]):
        self.reference = reference

    def prepare(self, tokenizer, vocab: int, context: int, rows: int, k: int) -> None:
        pass

    def move(self, req, row: int) -> None:
        pass

    def propose_rows(self, reqs, ks) -> list[Proposal]:
        return [Proposal(self.reference[len(r.tokens) : len(r.tokens) + k]) for r, k in zip(reqs, ks)]


def models(args, device, dtype):
    """(target, tokenizer, {draft name: (model, tokenizer or None)}): a checkpoint's, or random ones."""
    torch.manual_seed(0)
    if args.ckpt:
        loaded = load_checkpoint(args.ckpt, device)
        target, tokenizer = loaded.model, loaded.tokenizer
    else:
        tokenizer = TiktokenTokenizer("gpt2")
        shape = SHAPE_SMOKE if args.smoke else SHAPE_124M
        target = GPT(ModelConfig(**shape, vocab_size=tokenizer.vocab_size, dropout=0.0)).to(device)
    cfg = target.config
    drafts = {}
    if args.draft_ckpt:
        loaded = load_checkpoint(args.draft_ckpt, device)
        drafts["draft-ckpt"] = (loaded.model, loaded.tokenizer)
    tiny = dict(TINY_DRAFT, block_size=cfg.block_size, vocab_size=cfg.vocab_size, dropout=0.0)
    if cfg.position == "rope" or cfg.norm != "layernorm":  # a tiny draft of the target's own family
        tiny.update(position=cfg.position, norm=cfg.norm, mlp=cfg.mlp, bias=cfg.bias)
    drafts["draft-tiny"] = (GPT(ModelConfig(**tiny)).to(device), None)
    layers = copy.deepcopy(target)
    layers.transformer.h = layers.transformer.h[:2]
    layers.config = replace(cfg, n_layer=2)
    drafts["draft-layers"] = (layers, None)
    for m in [target] + [d for d, _ in drafts.values()]:
        prepare_for_decoding(m, dtype, args.quantize)
    return target, tokenizer, drafts


def read_prompt(path: Path) -> str:
    """A prompt file's text; of a .jsonl file of chat records, the first record's first user turn."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return text
    messages = json.loads(text.splitlines()[0])["messages"]
    return next(m["content"] for m in messages if m["role"] == "user")


def prompt_ids(prompt: str, tokenizer, chat: bool) -> list[int]:
    """The prompt's tokens: as text, or (chat) one user turn through the checkpoint's chat template."""
    if not chat:
        return tokenizer.encode(prompt)
    return ChatTemplate(tokenizer).encode([{"role": "user", "content": prompt}], add_generation_prompt=True)


def bench_prompt(label: str, prompt: str, target, tokenizer, drafts, args) -> None:
    ids = prompt_ids(prompt, tokenizer, args.chat)[-(target.config.block_size - args.new_tokens - 1):]
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n)  # noqa: E731
    reference = ids + complete(target, tokenizer, ids, greedy(args.new_tokens), stop_ids=())[0].token_ids
    rows = {"plain": (decode_rate(lambda n: complete(target, tokenizer, ids, greedy(n), stop_ids=()), 1,
                                  args.new_tokens, args.repeats), None, True)}
    proposers = [NgramProposer()] + [DraftProposer(m, tok, name) for name, (m, tok) in drafts.items()]
    for proposer in proposers + [OracleProposer(reference)]:
        spec = Speculation(proposer, args.k)
        name = spec.name
        run = lambda n: complete(target, tokenizer, ids, greedy(n), stop_ids=(), speculation=spec)  # noqa: E731
        rate = decode_rate(run, 1, args.new_tokens, args.repeats)
        spec.stats.__init__()  # the stats of one full-length run, for the table
        out = run(args.new_tokens)[0].token_ids
        rows[name] = (rate, spec.stats, ids + out == reference)
    plain = rows["plain"][0]
    print(f"\n## {label} prompt: {len(ids)} tokens, {args.new_tokens} new, K = {args.k}")
    print(f"{'system':>13} {'tok/s':>9} {'x plain':>8} {'accepted':>9} {'tok/pass':>9}  greedy = plain")
    for name, (rate, stats, same) in rows.items():
        acc = f"{100 * stats.acceptance_rate:.1f}%" if stats else "-"
        per = f"{stats.tokens / max(stats.rounds, 1):.2f}" if stats else "1.00"
        print(f"{name:>13} {rate:>9.1f} {rate / plain:>8.2f} {acc:>9} {per:>9}  {same}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="target checkpoint (default: a random GPT-2-124M-shaped model)")
    p.add_argument("--draft-ckpt", default=None, help="also a draft checkpoint with the target's tokenizer")
    p.add_argument("--prompt-file", default=None, help="time this prompt instead of the ones built in (a .jsonl "
                   "file of chat records: the first record's first user turn, e.g. data/extract/val.jsonl)")
    p.add_argument("--task", choices=["all", "extraction", "code", "prose"], default="all",
                   help="which built-in prompt(s) to time (default: all)")
    p.add_argument("--chat", action="store_true", help="prompts as a user turn through the checkpoint's chat template")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=5, help="--speculate-tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny target, few tokens, one repeat: checks the script")
    args = p.parse_args()
    if args.smoke:
        args.new_tokens, args.repeats = min(args.new_tokens, 12), 1
    allocator = tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target, tokenizer, drafts = models(args, device, dtype)
    cfg = target.config
    print(f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads, allocator {allocator}; "
          f"{str(dtype).replace('torch.', '')} on {device}")
    print(f"target: {args.ckpt or 'random'} {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}; "
          f"decode tokens/s at batch 1 (median of {args.repeats}); noisy on a shared machine")
    with torch.no_grad():
        builtin = {"extraction": EXTRACTION_REQUEST if args.chat else EXTRACTION_PROMPT, "code": CODE_PROMPT, "prose": PROSE_PROMPT}
        prompts = [(t, builtin[t]) for t in builtin if args.task in ("all", t)] if args.prompt_file is None else \
            [(args.prompt_file, read_prompt(Path(args.prompt_file)))]
        for label, prompt in prompts:
            bench_prompt(label, prompt, target, tokenizer, drafts, args)


if __name__ == "__main__":
    main()
