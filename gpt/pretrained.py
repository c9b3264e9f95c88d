"""A model to start from or to score: one of our checkpoints, a local Hugging Face folder, or hf://org/name.

`init_from` (training and fine-tuning), `python -m gpt.eval` and `python -m gpt.audit` accept either;
this is the one place that tells them apart. A hub name is downloaded only when the run allows it
(`allow_download: true`), once, into the output folder (out_dir/.hub_download), never ~/.cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt.checkpoint import CheckpointError, LoadedModel, load_checkpoint
from gpt.config import FinetuneConfig, PretrainConfig
from gpt.convert import HUB_DOWNLOAD, fetch_hub, is_hf_dir, load_hf_folder
from gpt.data.files import HUB_PREFIX


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", *,
                    download_dir: Path | None = None) -> LoadedModel:
    """Our output dir or checkpoint folder, or a Hugging Face folder (GPT-2 or a family of
    gpt/hf_families.py; `config` is None for these). hf://org/name is downloaded into download_dir
    (or found there, downloaded before); without a download_dir it is refused in one line."""
    if str(path).startswith(HUB_PREFIX):
        if download_dir is None:
            raise CheckpointError(f"{path} is on the Hugging Face hub and downloads are off: set allow_download=true "
                                  f"to download it once into out_dir/{HUB_DOWNLOAD}, or pass a local folder "
                                  f"(python -m gpt.convert from-hf {path} DIR downloads it)")
        return load_hf_folder(fetch_hub(str(path)[len(HUB_PREFIX):], download_dir), device)
    if is_hf_dir(path):
        return load_hf_folder(path, device)
    return load_checkpoint(path, device)


def load_init_from(cfg: PretrainConfig | FinetuneConfig) -> LoadedModel:
    """The model a training or fine-tuning run starts from: its init_from, downloaded into its out_dir
    when it is a hub name and the run says allow_download."""
    download_dir = Path(cfg.out_dir) / HUB_DOWNLOAD if cfg.allow_download else None
    return load_pretrained(cfg.init_from, download_dir=download_dir)
