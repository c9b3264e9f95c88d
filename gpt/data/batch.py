"""`Batch`: the (x, y) token tensors one training or evaluation step reads, whatever the data.

Pretraining windows (gpt/data/corpus.py), SFT rows (gpt/train/sft.py), scored documents
(gpt/eval.py) and the training loop (gpt/train/loop.py) all speak it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) target ids, IGNORE_INDEX where no loss
    doc_ids: torch.Tensor | None = None  # (B, T) packed-document numbers (SFT packing)
