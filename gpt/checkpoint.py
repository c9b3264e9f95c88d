"""Checkpoint directories: written atomically, loaded safely, with readable errors.

A run's output directory holds `config.yaml`, `metrics.jsonl` and checkpoint folders:
  latest/  the newest state, for train.resume
  best/    the lowest validation loss so far, what sample.py loads by default
Each checkpoint folder holds model.safetensors (a tied lm_head is stored once, as wte),
config.yaml (the resolved run config), tokenizer.json, meta.json (iteration, val loss) and,
for resuming, train_state.pt (optimizer, scaler, RNG states; read with weights_only=True).

A folder is written under a temporary name (.<name>.tmp-<pid>) and renamed into place (gpt/outputs.py),
so a crash mid-save leaves the previous checkpoint intact; the next save or run removes the temporary folders
of processes that died, and loading never reads one. meta.json records the SHA-256 of each weights
file (`sha256sum` checks it too); loading verifies it, so bytes changed on disk are an error, not a
silently different model; tokenizer.json is checksummed the same way (a character vocabulary has no
checksum of its own). A full disk, a read-only or impossible folder and an unsafe pickle are
one-line CheckpointErrors that name the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.config import ConfigError, ModelConfig, check_ranges, from_dict, save_yaml
from gpt.data import tokenizer as tokenizers
from gpt.errors import UserError
from gpt.model import GPT
from gpt.outputs import TMP_NAME, remove_dead_temps, swap_into_place, temp_sibling

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
TIED_KEY = "lm_head.weight"  # same tensor as transformer.wte.weight
TOKENIZER_FILE = "tokenizer.json"
CHECKSUMMED = (MODEL_FILE, STATE_FILE, TOKENIZER_FILE)  # their SHA-256 goes into meta.json["sha256"]


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
    prepare_out_dir(target.parent)
    tmp = temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tied = (config.get("model") or {}).get("tie_embeddings", True)  # an untied head is a tensor of its own
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k != TIED_KEY or not tied}
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "gpt"})
        save_yaml(config, tmp / "config.yaml")
        tokenizers.save(tokenizer, tmp / TOKENIZER_FILE)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        sums = {name: sha256_of(tmp / name) for name in CHECKSUMMED if (tmp / name).is_file()}
        (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "sha256": sums}), encoding="utf-8")
        _fsync_dir(tmp)
    except BaseException as e:
        free = _free_bytes(target.parent)  # before the partial folder is removed
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {target} is intact" if target.exists() else "nothing was replaced"
        if _is_disk_full(e, free):
            needed = _nbytes(tensors) + _nbytes(train_state)
            raise CheckpointError(f"disk full: saving {target} needs about {_mb(needed)} and its file system had "
                                  f"{_mb(free)} free when the write failed; {kept}. Free some space or set "
                                  "out_dir to a larger disk") from None
        if isinstance(e, OSError):
            raise CheckpointError(f"{target}: could not write the checkpoint ({e.strerror or e}); {kept}") from None
        raise
    swap_into_place(tmp, target)
    return target


def prepare_out_dir(folder: Path) -> None:
    """Create `folder` and check that files can be written there (one-line error if not: a read-only
    disk, /dev/null/x, a file in the way); remove checkpoint temp folders of processes that died."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"out_dir {folder}: cannot write there ({e.strerror or e}); "
                              "choose a writable out_dir") from None
    remove_dead_temps(folder)


def sha256_of(file: Path) -> str:
    """Streamed through one reused buffer, so memory stays flat and the hash runs at its own speed
    (about 1.5 GB/s on a CPU with SHA extensions: a 124M-parameter model adds ~0.3 s to a load)."""
    h, buf = hashlib.sha256(), bytearray(1 << 22)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors inside a (nested) state dict: what a save writes, give or take headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def _is_disk_full(e: BaseException, free: int) -> bool:
    """ENOSPC/EDQUOT, or a writer that hides the errno (torch.save: "unexpected pos") on a disk left full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, (OSError, RuntimeError, SafetensorError)) and 0 <= free < (1 << 20)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def resolve(path: str | Path, prefer: str = "best") -> Path:
    """An output dir or a checkpoint folder -> the checkpoint folder to read."""
    p = Path(path)
    if TMP_NAME.match(p.name):
        raise CheckpointError(f"{p}: an unfinished checkpoint left by an interrupted save, not a checkpoint; "
                              "load its output directory instead")
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
    f = ckpt_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f}: not UTF-8 text (byte {e.start}); the checkpoint is damaged") from None
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{f}: unreadable ({_first_line(e)})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{f}: no 'model' section")
    return cfg


def read_checkpoint_meta(ckpt_dir: Path) -> dict[str, Any]:
    """meta.json ({} when absent: checkpoints written by hand or before it existed)."""
    f = ckpt_dir / "meta.json"
    if not f.exists():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({_first_line(e)}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: expected a JSON object; the checkpoint is damaged")
    return meta


def verify_checksum(file: Path) -> None:
    """Compare `file` with the SHA-256 its folder's meta.json recorded at save time (if it recorded one)."""
    want = (read_checkpoint_meta(file.parent).get("sha256") or {}).get(file.name)
    if want is not None and file.is_file() and sha256_of(file) != want:
        raise CheckpointError(f"{file}: its SHA-256 differs from the one recorded in meta.json when it was saved: "
                              "the file was changed or damaged on disk; restore it (sample.py --no-verify "
                              "loads it anyway)")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def model_config_from(config: dict[str, Any], where: str = "checkpoint") -> ModelConfig:
    """The checkpoint's model section, checked like a config (a hand-edited file fails here, in one line)."""
    try:
        m = from_dict(ModelConfig, config["model"], where=where, prefix="model.")
        check_ranges(m, where, prefix="model.")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if m.vocab_size < 1 or (not m.head_dim and m.n_embd % m.n_head):
        raise CheckpointError(f"{where}: model.vocab_size ({m.vocab_size}) must be >= 1 and model.n_embd "
                              f"({m.n_embd}) divisible by model.n_head ({m.n_head})")
    if m.shape_error():
        raise CheckpointError(f"{where}: {m.shape_error()}")
    return m


@dataclass(frozen=True)
class LoadedModel:
    """A model with what it needs to be used: every loader returns one (ours, Hugging Face, init_from)."""

    model: GPT
    tokenizer: tokenizers.Tokenizer
    folder: Path  # the checkpoint or Hugging Face folder it came from
    config: dict[str, Any] | None = None  # our checkpoints' run config (config.yaml); None for other folders


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", prefer: str = "best",
                    verify: bool = True) -> LoadedModel:
    """One of our output dirs or checkpoint folders (its best checkpoint, else latest, unless `prefer`).

    verify=False skips the checksum (a file you changed on purpose)."""
    ckpt = resolve(path, prefer)
    config = read_config(ckpt)
    model = GPT(model_config_from(config, where=f"{ckpt}/config.yaml"))
    load_weights(model, ckpt / MODEL_FILE, verify)
    try:
        tok = tokenizers.load(ckpt / TOKENIZER_FILE)
    except tokenizers.TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if verify:  # every tokenizer kind: two swapped characters of a vocabulary change every id
        verify_checksum(ckpt / TOKENIZER_FILE)
    return LoadedModel(model.to(device), tok, ckpt, config)


def load_weights(model: torch.nn.Module, file: str | Path, verify: bool = True) -> None:
    """Load safetensors weights into `model`, naming every missing, unexpected or misshapen tensor."""
    load_state_checked(model, read_weights(Path(file), verify), str(file))


def read_weights(file: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (checked against its recorded SHA-256 when there is one)."""
    if verify:
        verify_checksum(file)
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: unreadable weights ({e})") from None


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    tied = getattr(getattr(model, "config", None), "tie_embeddings", True)
    expected = {k: v for k, v in model.state_dict().items() if k != TIED_KEY or not tied}
    state = {k: v for k, v in state.items() if k != TIED_KEY or not tied}
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
    verify_checksum(f)
    return safe_torch_load(f)


def safe_torch_load(f: Path) -> Any:
    """torch.load with weights_only=True; a refused or damaged file is one line that names it."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{f}: contains Python objects that the safe loader refuses; this project never "
                              "loads such files (use safetensors weights)") from None
    except Exception as e:  # a damaged zip or pickle raises many types
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}); the file is damaged or not a torch "
                              "file") from None
