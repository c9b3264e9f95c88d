"""GPT-2 weights between Hugging Face format and our checkpoint folders.

    python -m gpt.convert from-hf HF_DIR_OR_HUB_NAME OUT_DIR
    python -m gpt.convert to-hf CKPT_DIR HF_DIR

Our parameter names are GPT-2's; the differences are that Hugging Face's GPT-2 uses Conv1D layers
(weights stored as (in, out), so ours are their transpose), keeps the causal-mask buffers
(attn.bias, attn.masked_bias) in the state dict, and may or may not prefix names with
"transformer.". Only safetensors and torch are used: transformers is not needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt import checkpoint
from gpt.checkpoint import CheckpointError
from gpt.config import ModelConfig, to_dict
from gpt.data.tokenizer import CharTokenizer, TiktokenTokenizer, Tokenizer
from gpt.errors import UserError
from gpt.model import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GPT2_VOCAB = 50257


def is_hf_dir(path: str | Path) -> bool:
    """Hugging Face folders have config.json; ours have config.yaml."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


# ---------------------------------------------------------------------------- Hugging Face -> ours


def read_hf_config(folder: Path) -> ModelConfig:
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/config.json: unreadable ({e})") from None
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{folder}: model_type is {hf.get('model_type')!r}; only GPT-2 checkpoints convert")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS and act != "gelu":
        raise CheckpointError(f"{folder}: activation_function {act!r} is not a GELU this model supports")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in hf]
    if missing:
        raise CheckpointError(f"{folder}/config.json: missing {', '.join(missing)}")
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{folder}: n_inner={hf['n_inner']} is not 4 x n_embd; not expressible here")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"{folder}: {flag}=true is not supported")
    return ModelConfig(
        block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True,
        gelu="exact" if act == "gelu" else "tanh",
    )


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return checkpoint.read_weights(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return checkpoint.safe_torch_load(folder / "pytorch_model.bin")
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def hf_to_ours(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose a GPT2LMHeadModel/GPT2Model state dict into our GPT's."""
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith(HF_BUFFERS) or name == checkpoint.TIED_KEY:
            continue
        ours = name if name.startswith("transformer.") else f"transformer.{name}"
        if ours.endswith(CONV1D):
            tensor = tensor.t()
        out[ours] = tensor.contiguous()
    return out


def load_hf(folder: str | Path) -> tuple[GPT, Tokenizer]:
    """A local Hugging Face GPT-2 folder as (our model, gpt2 tokenizer)."""
    folder = Path(folder)
    model = GPT(read_hf_config(folder))
    checkpoint.load_state_checked(model, hf_to_ours(read_hf_weights(folder)), str(folder))
    return model, TiktokenTokenizer("gpt2")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Starting weights for training: (model, tokenizer, folder) from one of our checkpoint dirs
    or a local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin)."""
    if is_hf_dir(path):
        model, tok = load_hf(path)
        return model.to(device), tok, Path(path)
    model, tok, _, folder = checkpoint.load_model(path, device)
    return model, tok, folder


def fetch_hub(name: str) -> Path:
    """Download a hub model (only when the user names one); needs huggingface_hub and a network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"'{name}' is not a local folder; to download it, pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, ...
        raise CheckpointError(f"could not download '{name}' from the Hugging Face hub ({type(e).__name__}); "
                              "offline, pass a local folder with config.json and model.safetensors") from None


def from_hf(src: str, out_dir: str | Path) -> Path:
    folder = Path(src)
    if not folder.exists():
        folder = fetch_hub(src)
    model, tok = load_hf(folder)
    config = {"out_dir": str(out_dir), "init_from": str(src), "model": to_dict(model.config)}
    return checkpoint.save_checkpoint(Path(out_dir), model.state_dict(), config, tok, {"source": str(src)})


# ---------------------------------------------------------------------------- ours -> Hugging Face


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name == checkpoint.TIED_KEY:
            continue
        if name.endswith(CONV1D):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "bos_token_id": GPT2_VOCAB - 1, "eos_token_id": GPT2_VOCAB - 1,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def to_hf(ckpt: str | Path, hf_dir: str | Path) -> Path:
    """Write config.json + model.safetensors (+ GPT-2 tokenizer files) that GPT2LMHeadModel loads."""
    model, tok, _, _ = checkpoint.load_model(ckpt)
    if not model.config.bias:
        raise CheckpointError(f"{ckpt}: model.bias=false cannot be expressed in GPT-2 (its layers always have biases)")
    out = Path(hf_dir)
    checkpoint.prepare_out_dir(out)
    save_file(ours_to_hf(model.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.config), indent=2), encoding="utf-8")
    if isinstance(tok, TiktokenTokenizer) and tok.name == "gpt2":
        write_gpt2_tokenizer(tok, out)
    elif not isinstance(tok, CharTokenizer):
        print(f"note: tokenizer {tok.to_spec()['kind']} has no Hugging Face files; only the weights were written")
    return out


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as in its vocab.json."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_gpt2_tokenizer(tok: TiktokenTokenizer, out: Path) -> None:
    """vocab.json and merges.txt rebuilt offline from tiktoken's GPT-2 ranks (plus any chat tokens)."""
    ranks = tok.base._mergeable_ranks
    b2u = _byte_to_unicode()
    text = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = {text(bs): rank for bs, rank in ranks.items()}
    merges = []
    for bs, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(bs) < 2:
            continue
        pair = _split_by_ranks(bs, ranks, rank)
        merges.append(f"{text(pair[0])} {text(pair[1])}")
    specials = {**tok.base._special_tokens, **tok.special_tokens}
    for name, i in specials.items():
        vocab[name] = i
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = [n for n in tok.special_tokens]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
        "additional_special_tokens": added,
    }), encoding="utf-8")


def _split_by_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """The two parts whose merge made `token`: replay BPE with merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], b"".join(parts[1:])


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face GPT-2 folder (or hub name, online) -> our checkpoint")
    a.add_argument("src")
    a.add_argument("out_dir")
    b = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face GPT-2 folder")
    b.add_argument("ckpt")
    b.add_argument("hf_dir")
    args = p.parse_args(argv)
    try:
        if args.command == "from-hf":
            print(f"wrote {from_hf(args.src, args.out_dir)}")
        else:
            print(f"wrote {to_hf(args.ckpt, args.hf_dir)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
