"""Checkpoint directories: written atomically, loaded safely, with readable errors.

A run's output directory holds `config.yaml`, `metrics.jsonl` and checkpoint folders:
  latest/  the newest state, for train.resume
  best/    the lowest validation loss so far, what sample.py loads by default
Each checkpoint folder holds model.safetensors (the tied lm_head is stored once, as wte),
config.yaml (the resolved run config), tokenizer.json, meta.json (iteration, val loss) and,
for resuming, train_state.pt (optimizer, scaler, RNG states; read with weights_only=True).

A folder is written under a temporary name and renamed into place, so a crash mid-save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.config import ConfigError, ModelConfig, from_dict
from gpt.data import tokenizer as tokenizers
from gpt.errors import UserError
from gpt.model import GPT

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
TIED_KEY = "lm_head.weight"  # same tensor as transformer.wte.weight


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip torch.compile and DDP wrappers so state-dict keys are the plain GPT names."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return unwrap(model).state_dict()


def save_checkpoint(
    ckpt_dir: str | Path,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: tokenizers.Tokenizer,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically (temp folder, then rename)."""
    target = Path(ckpt_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k != TIED_KEY}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "gpt"})
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        tokenizers.save(tokenizer, tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta or {}), encoding="utf-8")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def resolve(path: str | Path, prefer: str = "best") -> Path:
    """An output dir or a checkpoint folder -> the checkpoint folder to read."""
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return p
    order = [prefer] + [n for n in ("best", "latest") if n != prefer]
    for name in order:
        for candidate in (p / name, p / f".{name}.old"):  # .old: a crash between the two renames
            if (candidate / MODEL_FILE).is_file():
                return candidate
    if p.name in ("best", "latest") and (p.parent / f".{p.name}.old" / MODEL_FILE).is_file():
        return p.parent / f".{p.name}.old"
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or output directory")
    raise CheckpointError(f"{p}: no checkpoint here (expected {MODEL_FILE} in it or in {p}/best or {p}/latest)")


def read_config(ckpt_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((ckpt_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{ckpt_dir}/config.yaml: unreadable ({e})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{ckpt_dir}/config.yaml: no 'model' section")
    return cfg


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def model_config_from(config: dict[str, Any], where: str = "checkpoint") -> ModelConfig:
    try:
        return from_dict(ModelConfig, config["model"], where=where, prefix="model.")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_model(path: str | Path, device: str | torch.device = "cpu", prefer: str = "best"):
    """Load (model, tokenizer, config dict, folder) from an output dir or checkpoint folder."""
    ckpt = resolve(path, prefer)
    config = read_config(ckpt)
    model = GPT(model_config_from(config, where=f"{ckpt}/config.yaml"))
    load_weights(model, ckpt / MODEL_FILE)
    try:
        tok = tokenizers.load(ckpt / "tokenizer.json")
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(str(e)) from None
    return model.to(device), tok, config, ckpt


def load_weights(model: torch.nn.Module, file: str | Path) -> None:
    """Load safetensors weights into `model`, naming every missing, unexpected or misshapen tensor."""
    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: unreadable weights ({e})") from None
    load_state_checked(model, state, str(file))


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    state = {k: v for k, v in state.items() if k != TIED_KEY}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    if shapes:
        problems.append("wrong shapes: " + ", ".join(shapes[:5]))
    if problems:
        raise CheckpointError(f"{where}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def load_train_state(ckpt_dir: str | Path) -> dict[str, Any]:
    f = Path(ckpt_dir) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: no training state to resume from (was this checkpoint saved for resuming?)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types
        raise CheckpointError(f"{f}: unreadable training state ({e})") from None
