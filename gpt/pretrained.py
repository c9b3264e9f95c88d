"""A model to start from or to score: one of our checkpoints or a local Hugging Face GPT-2 folder.

`init_from` (training and fine-tuning), `python -m gpt.eval` and `python -m gpt.audit` accept either;
this is the one place that tells them apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt.checkpoint import LoadedModel, load_checkpoint
from gpt.convert import is_hf_dir, load_hf_folder


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Our output dir or checkpoint folder, or a Hugging Face GPT-2 folder (config.json + model.safetensors
    or pytorch_model.bin); `config` is None for the latter."""
    if is_hf_dir(path):
        return load_hf_folder(path, device)
    return load_checkpoint(path, device)
