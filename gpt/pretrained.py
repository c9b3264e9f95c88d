"""A model to start from or to score: one of our checkpoints, a local Hugging Face folder, hf://org/name, or a
PEFT LoRA adapter folder on one of these (its base).

`init_from` (training and fine-tuning), `python -m gpt.eval` and `python -m gpt.audit` accept them (adapter
folders: fine-tuning, gpt.eval, and sample.py/serve.py through gpt.infer.weights); this is the one place that
tells them apart. An adapter is merged into its base for scoring and decoding, and kept as LoRA layers
for fine-tuning, which trains it on. A hub name is downloaded only when the run allows it
(`allow_download: true`), once, into the output folder (out_dir/.hub_download), never ~/.cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt.checkpoint import CheckpointError, LoadedModel, load_checkpoint
from gpt.config import ConfigError, FinetuneConfig, PretrainConfig
from gpt.convert import HUB_DOWNLOAD, fetch_hub, is_hf_dir, load_hf_folder
from gpt.data.files import HUB_PREFIX
from gpt.lora import load_adapters, merge_adapters
from gpt.lora_peft import AdapterError, is_peft_dir, peft_base, read_peft_adapter


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", *, download_dir: Path | None = None,
                    verify: bool = True, adapter_base: str = "", merge: bool = True) -> LoadedModel:
    """Our output dir or checkpoint folder (checksums checked unless not `verify`), or a Hugging Face folder
    (GPT-2 or a family of gpt/hf_families.py; `config` is None for these), or a PEFT adapter folder
    (`load_adapter_folder`). hf://org/name is downloaded into download_dir (or found there, downloaded
    before); without a download_dir it is refused in one line."""
    if is_peft_dir(path):
        return load_adapter_folder(path, device, download_dir=download_dir, verify=verify, base=adapter_base,
                                   merge=merge)
    if str(path).startswith(HUB_PREFIX):
        if download_dir is None:
            raise CheckpointError(f"{path} is on the Hugging Face hub and downloads are off: set allow_download=true "
                                  f"to download it once into out_dir/{HUB_DOWNLOAD}, or pass a local folder "
                                  f"(python -m gpt.convert from-hf {path} DIR downloads it)")
        return load_hf_folder(fetch_hub(str(path)[len(HUB_PREFIX):], download_dir), device)
    if is_hf_dir(path):
        return load_hf_folder(path, device)
    return load_checkpoint(path, device, verify=verify)


def load_adapter_folder(folder: str | Path, device: str | torch.device = "cpu", *, download_dir: Path | None = None,
                        verify: bool = True, base: str = "", merge: bool = True) -> LoadedModel:
    """A PEFT LoRA adapter on its base: `base`, else its base_model_name_or_path, a local folder (ours or
    Hugging Face's) or a hub name (downloaded only with a download_dir). merge: folded into the weights
    (an ordinary GPT), else LoRA layers whose adapters train. `folder` is the adapter's, `config` the base's."""
    name = peft_base(folder, base)
    if is_peft_dir(name):
        raise AdapterError(f"{folder}: its base {name} is itself a PEFT adapter; name the model under both")
    if not Path(name).exists():
        hub = name if name.startswith(HUB_PREFIX) else HUB_PREFIX + name
        if download_dir is None:
            raise AdapterError(f"{folder}: its base model {name!r} (base_model_name_or_path) is not a local folder; "
                               f"fine-tuning: set adapter_base: DIR, or allow_download: true to download {hub}; "
                               "sample.py, serve.py, gpt.eval: point base_model_name_or_path at a local folder")
        name = hub
    loaded = load_pretrained(name, device, download_dir=download_dir, verify=verify)
    model = loaded.model
    load_adapters(model, read_peft_adapter(folder, model))
    if merge:
        merge_adapters(model)
    return LoadedModel(model, loaded.tokenizer, Path(folder), loaded.config)


def load_init_from(cfg: PretrainConfig | FinetuneConfig) -> LoadedModel:
    """The model a training or fine-tuning run starts from: its init_from, downloaded into its out_dir
    when it is a hub name and the run says allow_download. A PEFT adapter folder starts fine-tuning only,
    on its base (adapter_base, else its base_model_name_or_path), its adapters as LoRA layers."""
    download_dir = Path(cfg.out_dir) / HUB_DOWNLOAD if cfg.allow_download else None
    adapter = is_peft_dir(cfg.init_from)
    if adapter and isinstance(cfg, PretrainConfig):
        raise ConfigError(f"init_from {cfg.init_from} is a PEFT adapter folder: fine-tune from it (finetune.py); "
                          "pretraining starts from whole models")
    base = cfg.adapter_base if isinstance(cfg, FinetuneConfig) else ""
    if base and not adapter:
        raise ConfigError(f"adapter_base applies to an init_from that is a PEFT adapter folder, which "
                          f"{cfg.init_from} is not (no adapter_config.json)")
    return load_pretrained(cfg.init_from, download_dir=download_dir, adapter_base=base, merge=not adapter)
