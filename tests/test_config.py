"""Config loading: defaults < YAML < overrides, and one clear error for every bad key or value."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from gpt.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    check_finetune,
    check_pretrain,
    load_config,
)
from gpt.infer.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides_with_types_coerced(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 3e-4\nmodel:\n  n_layer: 3\n")
    cfg = load_config(PretrainConfig, p, ["model.n_layer=5", "train.resume=true", "optim.min_lr=1e-5",
                                          "logging.sample_prompt=To be"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)  # PyYAML reads 3e-4 as str
    assert cfg.model.n_layer == 5 and cfg.train.resume is True
    assert cfg.optim.min_lr == pytest.approx(1e-5)
    assert cfg.logging.sample_prompt == "To be"
    assert cfg.out_dir == str(Path("out") / "run")  # default out/<config name>


def test_on_and_off_choices_survive_yaml_booleans(tmp_path):
    # YAML 1.1 reads on/off as booleans; `model.fused_loss: on` means the choice "on"
    assert load_config(PretrainConfig, None, ["model.fused_loss=on"]).model.fused_loss == "on"
    assert load_config(PretrainConfig, write(tmp_path, "model:\n  fused_loss: off\n")).model.fused_loss == "off"
    with pytest.raises(ConfigError, match="train.dtype"):
        load_config(PretrainConfig, None, ["train.dtype=on"])  # no such choice there


def test_unknown_key_names_close_match(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_iter'.*did you mean 'train.max_iters'"):
        load_config(PretrainConfig, write(tmp_path, "train:\n  max_iter: 10\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layers'.*model.n_layer"):
        load_config(PretrainConfig, None, ["model.n_layers=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_config(PretrainConfig, write(tmp_path, "modle:\n  n_layer: 2\n"))


@pytest.mark.parametrize("text, key", [
    ("train:\n  max_iters: many\n", "train.max_iters"),
    ("train:\n  resume: 3\n", "train.resume"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("train:\n  dtype: float8\n", "train.dtype"),
    ("model:\n  n_layer: 2.5\n", "model.n_layer"),
])
def test_ill_typed_value_names_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(PretrainConfig, write(tmp_path, text))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: 2\n  n_head: [1, 2\ntrain:\n  x: 1\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line \d+: malformed YAML"):
        load_config(PretrainConfig, p)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(PretrainConfig, None, ["model.n_layer"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(PretrainConfig, None, ["model=3"])


def test_cross_field_checks():
    cfg = load_config(PretrainConfig, None, ["model.n_embd=30", "model.n_head=4"])
    with pytest.raises(ConfigError, match="divisible"):
        check_pretrain(cfg)
    cfg = load_config(FinetuneConfig, None, ["init_from=x", "data.path=x.jsonl", "data.val_fraction=0"])
    with pytest.raises(ConfigError, match="val_fraction must be in \\(0, 1\\) when data.val_path is empty"):
        check_finetune(cfg)
    check_finetune(load_config(FinetuneConfig, None, ["init_from=x", "data.path=x.jsonl", "data.val_fraction=0",
                                                      "data.val_path=v.jsonl"]))


@pytest.mark.parametrize("cls, override, message", [
    (PretrainConfig, "optim.min_lr=nan", "key 'optim.min_lr' must be >= 0, got nan"),
    (PretrainConfig, "optim.grad_clip=nan", "key 'optim.grad_clip' must be >= 0, got nan"),
    (PretrainConfig, "optim.lr=inf", "key 'optim.lr' must be > 0, got inf"),
    (PretrainConfig, "optim.lr=-1e-3", "key 'optim.lr' must be > 0"),
    (PretrainConfig, "optim.warmup_iters=-10", "key 'optim.warmup_iters' must be >= 0, got -10"),
    (PretrainConfig, "optim.beta2=1", "key 'optim.beta2' must be >= 0 and < 1"),
    (PretrainConfig, "train.threads=-1", "key 'train.threads' must be >= 0, got -1"),
    (PretrainConfig, "train.batch_size=0", "key 'train.batch_size' must be >= 1"),
    (PretrainConfig, "model.dropout=1.0", "key 'model.dropout' must be >= 0 and < 1"),
    (PretrainConfig, "data.val_fraction=0", "key 'data.val_fraction' must be > 0 and < 1"),
    (FinetuneConfig, "lora.alpha=0", "key 'lora.alpha' must be > 0"),
    (FinetuneConfig, "sft.block_size=-1", "key 'sft.block_size' must be >= 0"),
])
def test_out_of_range_values_fail_at_load_naming_the_key(cls, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cls, None, [override])


def test_ranges_apply_to_yaml_files_too(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: key 'optim.min_lr' must be >= 0, got nan"):
        load_config(PretrainConfig, write(tmp_path, "optim:\n  min_lr: .nan\n"))


def numeric_fields(cls, prefix=""):
    """(key, field) for every int/float key of a config dataclass, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from numeric_fields(typ, f"{prefix}{f.name}.")
        elif {int, float} & ({typ} | set(typing.get_args(typ))):
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig, SamplingParams])
def test_every_numeric_key_declares_its_range(cls):
    """A new numeric key must say its range next to its default: `x: int = ranged(0, ge=0)`."""
    fields = list(numeric_fields(cls))
    assert fields
    missing = [key for key, f in fields if "range" not in f.metadata]
    assert not missing, f"declare a range with gpt.config.ranged(...) for: {', '.join(missing)}"


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:  # fine-tuning configs are named sft_*.yaml or dpo_*.yaml
        if path.stem.startswith(("sft", "dpo")):
            check_finetune(load_config(FinetuneConfig, path))
        else:
            check_pretrain(load_config(PretrainConfig, path))
