"""Typed run configuration: dataclass defaults < YAML file < `section.key=value` overrides.

Every key is checked against the dataclass it belongs to: an unknown key or a value of the
wrong type is a ConfigError naming the key (and a close match), never silently ignored. Every
numeric key declares its range next to its default (`ranged(...)`); NaN and infinities are
always refused, so a bad value fails at load time instead of fifty steps later.
This module knows nothing of torch so it can be imported and tested anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from gpt.errors import UserError


class ConfigError(UserError):
    """A bad config file, key or value; the message says which and how to fix it."""


# ---------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key: finite, and within the given bounds (None = unbounded). `most` is
    a limit of what the machinery handles rather than of what makes sense; exceeding it is named alone."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    most: float | None = None

    def holds(self, v: float) -> bool:
        finite = isinstance(v, int) or math.isfinite(v)  # ints are finite (and may be too large for floats)
        return (finite and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt)
                and (self.most is None or v <= self.most))

    def __str__(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt), ("<=", self.most))
        parts = [f"{op} {b:,}" if isinstance(b, int) else f"{op} {b:g}" for op, b in bounds if b is not None]
        return " and ".join(parts) if parts else "a finite number"

    def broken(self, v: Any) -> str:
        """What to say `v` must be: `<= most` alone when v is above that limit, else the other bounds."""
        if self.most is not None and isinstance(v, (int, float)) and v > self.most:
            return str(Range(le=self.most))
        return str(dataclasses.replace(self, most=None))


def ranged(default: float | None, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, most: float | None = None) -> Any:
    """A numeric dataclass field with its range, declared once and checked by `check_ranges`."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt, most)})


def check_ranges(obj: Any, where: str = "config", prefix: str = "", name: Callable[[str], str] | None = None) -> None:
    """Raise a ConfigError naming the first key of `obj` (nested dataclasses included) out of its range.

    `name` turns a key into what the user typed (sample.py passes one that gives `--top-p`)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, where, f"{key}.", name)
            continue
        rng = f.metadata.get("range")
        if rng is None or value is None or isinstance(value, (bool, str)):  # str: a Literal choice such as "auto"
            continue
        if not isinstance(value, (int, float)) or not rng.holds(value):
            shown = name(key) if name else f"key '{key}'"
            raise ConfigError(f"{where}: {shown} must be {rng.broken(value)}, got {value!r}")


# ---------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The model's shape. The keys from `norm` on choose the architecture family; their defaults are GPT-2
    (gpt/hf_families.py sets them for Llama, Qwen2, Qwen3, Mistral and Gemma 3)."""

    block_size: int = ranged(256, ge=1)  # context length in tokens
    vocab_size: int = ranged(0, ge=0)  # 0 = taken from the tokenizer (rounded up to vocab_multiple)
    vocab_multiple: int = ranged(1, ge=1)  # pad the vocabulary to a multiple of this (64 is faster for BPE)
    n_layer: int = ranged(6, ge=1)  # transformer blocks (depth)
    n_head: int = ranged(6, ge=1)  # attention heads per block; must divide n_embd
    n_embd: int = ranged(384, ge=1)  # width of the residual stream
    dropout: float = ranged(0.0, ge=0, lt=1)  # dropout on attention, residual and embedding outputs
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    # GELU form: "tanh" is GPT-2's approximation (needed to match GPT-2 weights exactly); "exact"
    # (erf) is the same curve within 1e-3 and many times faster on CPUs without AVX-512.
    gelu: Literal["tanh", "exact"] = "tanh"
    # LM head + loss computed in row chunks, never holding the (tokens, vocab) logits: "auto" = on a CPU
    # once a batch's logits reach 2^25 (far less memory; the same loss and gradients; docs/performance.md)
    fused_loss: Literal["auto", "on", "off"] = "auto"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # rmsnorm: no mean, no bias (Llama and later)
    norm_eps: float = ranged(1e-5, gt=0)  # added to the variance in every norm
    norm_offset: float = ranged(0.0, ge=0, le=1)  # rmsnorm scales by (norm_offset + weight): Gemma's 1.0
    post_norms: bool = False  # also norm the attention and MLP outputs before the residual add (Gemma 3)
    embed_scale: bool = False  # multiply the token embeddings by sqrt(n_embd) (Gemma)
    position: Literal["learned", "rope"] = "learned"  # learned table (wpe) or rotary (rotate-half layout)
    rope_theta: float = ranged(10000.0, gt=0)  # rotary base
    rope_local_theta: float = ranged(0.0, ge=0)  # sliding-window layers' base, unscaled (Gemma 3); 0 = as the rest
    rope_scaling: Literal["none", "linear", "llama3"] = "none"  # linear: positions / rope_factor; llama3: by band
    rope_factor: float = ranged(1.0, ge=1)  # linear and llama3 scaling factor
    rope_low_freq_factor: float = ranged(1.0, gt=0)  # llama3 scaling
    rope_high_freq_factor: float = ranged(4.0, gt=0)  # llama3 scaling
    rope_original_context: int = ranged(8192, ge=1)  # llama3 scaling: the context the model was trained with
    mlp: Literal["gelu", "swiglu", "geglu", "relu2"] = "gelu"  # geglu uses the `gelu` form; relu2 = relu(x)^2
    intermediate_size: int = ranged(0, ge=0)  # MLP width (gated: of gate and up each); 0 = 4 x n_embd
    n_kv_head: int = ranged(0, ge=0)  # key/value heads (GQA; 1 = MQA); must divide n_head; 0 = n_head
    head_dim: int = ranged(0, ge=0)  # width of one head; 0 = n_embd / n_head
    qk_norm: bool = False  # norm each query and key head before the rotary embedding (Qwen3, Gemma 3)
    qkv_bias: bool = False  # biases on the query/key/value projection even when `bias` is false (Qwen2)
    tie_embeddings: bool = True  # the LM head shares the token embedding's weights
    logit_softcap: float = ranged(0.0, ge=0)  # logits = c * tanh(logits / c); 0 = off
    sliding_window: int = ranged(0, ge=0)  # keys a query sees, itself included, in sliding layers; 0 = all
    sliding_window_pattern: int = ranged(0, ge=0)  # N: every Nth layer attends globally (Gemma 3: 6); 0 = none

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    def slides(self, layer: int) -> bool:
        """Whether block `layer` attends through the sliding window."""
        pattern = self.sliding_window_pattern
        return self.sliding_window > 0 and (pattern == 0 or (layer + 1) % pattern != 0)

    def shape_error(self) -> str | None:
        """What makes these shapes unbuildable, in one line (None: buildable)."""
        if not self.head_dim and self.n_embd % self.n_head:
            return f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
        if self.n_head % self.kv_heads:
            return f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})"
        if self.position == "rope" and self.head_size % 2:
            return f"rotary embeddings need an even head width, got {self.head_size}"
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            return "model.rope_high_freq_factor must exceed model.rope_low_freq_factor"
        return None


@dataclass
class CanaryKeys:
    """Random secrets planted in the training split for `python -m gpt.audit` (gpt/data/canary.py)."""

    canaries: int = ranged(0, ge=0)  # how many secrets to plant (0 = none)
    canary_repeats: int = ranged(1, ge=1)  # copies of each secret in the training split
    canary_format: str = "my account number is {8 digits}"  # placeholders: {N digits|letters|hex|alnum}
    canary_seed: int = ranged(0, ge=0)  # the secrets are a fixed function of this seed


@dataclass
class SourceConfig:
    """How pretraining and fine-tuning read their files: text encoding and redaction before tokenization."""

    encoding: str = "utf-8"  # text encoding of the data files (e.g. latin-1, cp1252)
    encoding_errors: Literal["strict", "replace"] = "strict"  # strict: refuse invalid text; replace: count it
    redact: list[str] = field(default_factory=list)  # PII kinds to redact before tokenization, or [all]
    redact_mode: Literal["placeholder", "pseudonym"] = "placeholder"  # <EMAIL>, or consistent fake values
    redact_patterns: list[str] = field(default_factory=list)  # your own regexes, replaced by <CUSTOM>
    redact_terms: str = ""  # a file of literal terms (names), one per line: case-insensitive whole words
    redact_salt_file: str = ""  # pseudonym secret; empty = a fresh random salt per preparation


@dataclass
class DataConfig(SourceConfig, CanaryKeys):
    dataset: str = "shakespeare"  # name of the prepared data set: data/<dataset>/<tokenizer>/
    path: str = ""  # corpus: text file, folder, .jsonl/.json/.csv/.parquet, a datasets folder, or hf://org/name
    text_field: str = "text"  # column holding the text in JSONL/Parquet/datasets sources
    tokenizer: str = "char"  # "char", "bpe" (trained on the corpus) or a tiktoken encoding name such as "gpt2"
    # data.tokenizer=bpe: 256 bytes + merges + <|endoftext|>; at most 2^20: the Rust trainer (`tokenizers`)
    # reserves memory for the whole vocabulary up front and aborts the process on a huge one (1e9), and the
    # largest vocabularies in use hold ~262k tokens
    bpe_vocab_size: int = ranged(8192, ge=257, most=1 << 20)
    bpe_pattern: str = ""  # data.tokenizer=bpe: pre-tokenization regex; empty = GPT-2's
    val_fraction: float = ranged(0.1, gt=0, lt=1)  # share held out for validation
    data_dir: str = "data"  # prepared data lives in <data_dir>/<dataset>/<tokenizer>/
    num_workers: int = ranged(0, ge=0)  # tokenizer threads for large corpora (0 = all cores)
    allow_download: bool = False  # fetch a built-in corpus (Tiny Shakespeare) from its public URL when absent


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    lr: float = ranged(1e-3, gt=0)  # peak learning rate
    min_lr: float = ranged(1e-4, ge=0)  # floor of the cosine decay
    weight_decay: float = ranged(0.1, ge=0)  # AdamW decay on matrices and embeddings (never biases/LayerNorm)
    beta1: float = ranged(0.9, ge=0, lt=1)  # AdamW
    beta2: float = ranged(0.99, ge=0, lt=1)  # AdamW
    eps: float = ranged(1e-8, gt=0)  # AdamW
    grad_clip: float = ranged(1.0, ge=0)  # 0 disables clipping
    warmup_iters: int = ranged(100, ge=0)  # linear warmup steps
    lr_decay_iters: int = ranged(0, ge=0)  # 0 = max_iters
    decay_lr: bool = True  # false = constant lr


@dataclass
class TrainConfig:
    max_iters: int = ranged(5000, ge=0)  # optimizer steps
    batch_size: int = ranged(64, ge=1)  # sequences per micro-batch (per rank)
    grad_accum: int = ranged(1, ge=1)  # micro-batches per optimizer step
    eval_interval: int = ranged(250, ge=1)  # evaluate every N steps
    eval_iters: int = ranged(20, ge=1)  # validation batches per evaluation
    eval_batch_size: int = ranged(0, ge=0)  # 0 = batch_size
    log_interval: int = ranged(10, ge=1)  # a console line and a metrics.jsonl row every N steps
    checkpoint_interval: int = ranged(0, ge=0)  # 0 = checkpoint at each evaluation
    early_stop_patience: int = ranged(0, ge=0)  # stop after this many evaluations without improvement (0 = never)
    resume: bool = False  # continue exactly from <out_dir>/latest
    seed: int = ranged(1337, ge=0)  # batches are a function of (seed, step): runs are reproducible
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto = bf16 where the hardware runs it natively, else fp16 + GradScaler on GPUs and fp32 on CPUs
    # (docs/performance.md#precision)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False  # wrap the model in torch.compile
    # recompute each transformer block's activations in the backward pass instead of keeping them: less
    # memory (about one block's activations plus each block's input), about a third more compute; the same
    # result (docs/performance.md#memory)
    activation_checkpointing: bool = False
    # torch CPU threads: auto = the cores other processes leave idle when the run starts (shared by the ranks
    # of a machine); 0 = torch's default (one per core); N = exactly N. The count is recorded in `latest`,
    # and a resume uses it again, so resuming stays bit-exact (docs/performance.md#threads)
    threads: Literal["auto"] | int = ranged("auto", ge=0)


@dataclass
class LoggingConfig:
    progress: bool = True  # tqdm progress bar
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "gpt"  # wandb project name
    wandb_run_name: str = ""  # wandb run name
    wandb_mode: Literal["offline", "online"] = "offline"  # offline keeps everything local; online uploads
    # print a sample of this many tokens when training ends (0 = none: a model can repeat private records)
    sample_tokens: int = ranged(0, ge=0)
    sample_prompt: str = "\n"  # the prompt of that sample
    plot: bool = True  # draw out_dir/loss.png when the run ends (python -m gpt.plot)
    show_examples: bool = False  # fine-tuning: print validation prompts, answers and replies at the end


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 shards weights, grads and optimizer state
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    timeout_s: int = ranged(600, ge=1)  # a rank waiting this long in a collective fails the run instead of hanging


@dataclass
class PretrainConfig:
    """Everything `python train.py CONFIG` reads."""

    out_dir: str = ""  # default: out/<config file name>
    init_from: str = "scratch"  # scratch, one of our checkpoint dirs, a Hugging Face folder, or hf://org/name
    allow_download: bool = False  # init_from hf://org/name: download it (once, into out_dir/.hub_download)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class SFTDataConfig(SourceConfig, CanaryKeys):
    """Fine-tuning records: local JSONL/JSON/CSV/Parquet, a folder, a `datasets` folder, or hf://org/name."""

    path: str = ""  # the training file
    val_path: str = ""  # a separate validation file; empty = hold out val_fraction of `path`
    # auto = detected per record; preference = DPO pairs (see gpt/data/record_formats.py for every accepted shape)
    format: Literal["auto", "chat", "sharegpt", "instruction", "text", "preference"] = "auto"
    val_fraction: float = ranged(0.1, ge=0, lt=1)  # used when val_path is empty
    split_seed: int = ranged(0, ge=0)  # the held-out records are a fixed function of this seed
    skip_invalid: bool = False  # skip (and count and report) malformed records instead of stopping


@dataclass
class SFTConfig:
    train_on_prompt: bool = False  # false: loss only on assistant/response tokens
    packing: bool = True  # pack several examples per window (attention kept inside each), else pad one per row
    block_size: int = ranged(0, ge=0)  # training window in tokens; 0 = the base model's block_size, at most 4096


@dataclass
class LoRAConfig:
    rank: int = ranged(0, ge=0)  # 0 = full fine-tuning; > 0 = train only low-rank adapters of this rank
    alpha: float = ranged(16.0, gt=0)  # adapter output is scaled by alpha / rank
    dropout: float = ranged(0.0, ge=0, lt=1)  # dropout on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # Linear layer names


@dataclass
class DPOConfig:
    """Preference tuning, used when the records are preference pairs (data.format: preference or detected)."""

    beta: float = ranged(0.1, gt=0)  # strength of the pull towards the reference model (the KL penalty's weight)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # sigmoid = the DPO paper; ipo = Azar et al.; hinge = SLiC
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)  # sigmoid only: share of pairs assumed mislabeled (cDPO)
    # init = a frozen copy of the starting model (with LoRA: the same weights, adapters off); precompute =
    # its log-probabilities computed once before training and cached in out_dir (one model held)
    reference: Literal["init", "precompute"] = "init"


@dataclass
class FinetuneConfig:
    """Everything `python finetune.py CONFIG` reads. The model section is taken from init_from."""

    out_dir: str = ""  # default: out/<config file name>
    # one of our checkpoint dirs (out/shakespeare), a Hugging Face folder, hf://org/name, or a PEFT LoRA adapter
    # folder (adapter_config.json): its base model with its adapters, which the run trains on (lora.* from the adapter)
    init_from: str = ""
    allow_download: bool = False  # init_from hf://org/name: download it (once, into out_dir/.hub_download)
    # init_from a PEFT adapter folder: its base model (one of our checkpoint dirs, a Hugging Face folder, or
    # hf://org/name with allow_download); default: the adapter's base_model_name_or_path
    adapter_base: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)  # filled from init_from; do not set
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, min_lr=1e-5, warmup_iters=20,
                                                                    weight_decay=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_iters=500, batch_size=16,
                                                                    eval_interval=50, eval_iters=10))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(sample_tokens=100))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ---------------------------------------------------------------------------- loading


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Build `cls` from its defaults, then a YAML file, then `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    cfg = from_dict(cls, raw, where=str(path) if path else "config")
    for item in overrides:
        apply_override(cfg, item)
    check_ranges(cfg, where=str(path) if path is not None else "config")
    if hasattr(cfg, "out_dir") and not cfg.out_dir:  # never the current directory by accident
        cfg.out_dir = str(Path("out") / (Path(path).stem if path is not None else "default"))
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: unreadable ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{line}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(cls: type, raw: dict[str, Any], where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a nested dict, checking every key and coercing every value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{full}'{_did_you_mean(key, names, prefix)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value or {}, where, prefix=f"{full}.")
        else:
            kwargs[key] = coerce(value, typ, full, where)
    return cls(**kwargs)


def apply_override(cfg: Any, item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML, then coerced)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    node, prefix = cfg, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            raise ConfigError(
                f"override '{item}': unknown key '{prefix}{part}'{_did_you_mean(part, names, prefix)}"
            )
        typ = typing.get_type_hints(type(node))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                raise ConfigError(f"override '{item}': '{dotted}' is a section; set one of its keys")
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
            setattr(node, part, coerce(value, typ, dotted, "override", raw_text=text))
        else:
            if not dataclasses.is_dataclass(typ):
                raise ConfigError(f"override '{item}': '{prefix}{part}' is not a section")
            node, prefix = getattr(node, part), f"{prefix}{part}."


def coerce(value: Any, typ: Any, key: str, where: str, raw_text: str | None = None) -> Any:
    """Convert a YAML value to the field's annotated type, or raise naming the key."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: key '{key}' expects {expected}, got {value!r}")

    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, where, raw_text)
            except ConfigError:
                pass
        raise bad(" or ".join(" | ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                              else getattr(a, "__name__", str(a)) for a in args if a is not type(None)))
    if origin is Literal:
        choices = typing.get_args(typ)
        if raw_text is not None and raw_text in choices:  # key=on: YAML reads on/off/yes/no as booleans
            return raw_text
        if isinstance(value, bool) and {"on", "off"} <= set(choices):  # `key: on` in a YAML file
            return "on" if value else "off"
        if value not in choices:
            raise bad("one of " + " | ".join(map(str, choices)))
        return value
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(typ) or (Any,)
        if isinstance(value, str) and raw_text is not None:
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [coerce(v, item_type, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)  # accepts "1e4"
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if typ is str:
        if raw_text is not None:  # from the command line: keep exactly what was typed
            return raw_text
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if typ is dict or typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    raise ConfigError(f"{where}: key '{key}' has unsupported type {typ}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config (a dataclass, or its dict as checkpoints record it) as YAML, keys in order."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _did_you_mean(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f"; valid keys: {', '.join(prefix + n for n in names)}"


# ---------------------------------------------------------------------------- checks


def check_pretrain(cfg: PretrainConfig) -> None:
    """Cross-field checks that single-key ranges cannot express."""
    check_common(cfg)


def check_common(cfg: Any) -> None:
    """Ranges (again: a config may be built in code) and the checks pretraining and SFT share."""
    check_ranges(cfg)
    problem = cfg.model.shape_error()
    if problem:
        raise ConfigError(problem)


def check_finetune(cfg: FinetuneConfig) -> None:
    """Cross-field checks for fine-tuning (the model section itself comes from init_from)."""
    if cfg.model != ModelConfig():
        raise ConfigError("model.* is taken from init_from and cannot be set for fine-tuning; "
                          "use sft.block_size for shorter training windows")
    if not cfg.out_dir:
        raise ConfigError("out_dir is required (it defaults to out/<config name> when a config file is given)")
    if not cfg.init_from:
        raise ConfigError("init_from is required: a checkpoint directory (e.g. out/shakespeare) or a "
                          "Hugging Face GPT-2 directory")
    if not cfg.data.path:
        raise ConfigError("data.path is required: the training file (.jsonl, .json, .csv or .parquet)")
    check_common(cfg)
    if not cfg.data.val_path and not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1) when data.val_path is empty, "
                          f"got {cfg.data.val_fraction}")
    if cfg.lora.rank and not cfg.lora.targets:
        raise ConfigError("lora.targets must name at least one Linear layer (c_attn, c_proj, c_fc)")
    if cfg.dpo.label_smoothing and cfg.dpo.loss != "sigmoid":
        raise ConfigError(f"dpo.label_smoothing applies to dpo.loss=sigmoid only, not {cfg.dpo.loss}")
