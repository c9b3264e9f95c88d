"""Held-out before/after for the DPO QA example: each checkpoint's own ranking of the pairs and its answers.

    python bench/dpo_qa.py out/sft_qa out/dpo_qa

preference accuracy: share of data/qa/pairs_val.jsonl where the model gives the correct answer a higher
log-probability than the wrong one (its own ranking, no reference model). exact match: share of
data/qa/val.jsonl questions whose greedy answer is exactly the reference answer.
"""

from __future__ import annotations

import argparse

import torch

from gpt import checkpoint
from gpt.data.chat_template import ChatTemplate
from gpt.data.finetune_data import load_file
from gpt.train.dpo import PairBatches, sequence_logps
from gpt.train.sft import greedy_reply


@torch.no_grad()
def score(ckpt: str, pairs: str, questions: str, n_questions: int, device: torch.device) -> tuple[float, float]:
    loaded = checkpoint.load_checkpoint(ckpt, device)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    template = ChatTemplate(tok)
    budget = model.config.block_size + 1
    records = load_file(pairs, "preference", template, budget, False).records
    batches = PairBatches(records, [], batch_size=64, device=device)
    wins = 0.0
    for b in batches.split_batches("train", 64):
        chosen, rejected = sequence_logps(model, b).view(2, -1)
        wins += ((chosen > rejected) & (b.index >= 0)).sum().item()
    convs = [c for c in load_file(questions, "chat", template, budget, False).conversations if c][:n_questions]
    hits = sum(greedy_reply(model, template, c[:-1], 40) == c[-1]["content"] for c in convs)
    return wins / len(records), hits / max(1, len(convs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--pairs", default="data/qa/pairs_val.jsonl")
    ap.add_argument("--questions", default="data/qa/val.jsonl")
    ap.add_argument("--n-questions", type=int, default=200, help="questions answered greedily (slow on a busy CPU)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    for ckpt in args.checkpoints:
        accuracy, exact = score(ckpt, args.pairs, args.questions, args.n_questions, torch.device(args.device))
        print(f"{ckpt}: held-out preference accuracy {accuracy:.3f}, greedy exact match {exact:.3f} "
              f"(first {args.n_questions} questions)")


if __name__ == "__main__":
    main()
