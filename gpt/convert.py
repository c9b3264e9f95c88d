"""Model folders between Hugging Face format and our checkpoint folders: GPT-2, and the Llama, Qwen2,
Qwen3, Mistral and Gemma 3 families (their mapping: gpt/hf_families.py).

    python -m gpt.convert from-hf HF_DIR_OR_HUB_NAME OUT_DIR
    python -m gpt.convert to-hf CKPT_DIR HF_DIR
    python -m gpt.convert to-gguf CKPT_DIR OUT.gguf [--type f32|f16|bf16|q8_0]   (gpt/gguf_export.py)

Our parameter names are GPT-2's; the differences are that Hugging Face's GPT-2 uses Conv1D layers
(weights stored as (in, out), so ours are their transpose), keeps the causal-mask buffers
(attn.bias, attn.masked_bias) in the state dict, and may or may not prefix names with
"transformer.". The other families keep their tokenizer.json as shipped (gpt.data.tokenizer.HFTokenizer).
Only safetensors, torch and tokenizers are used: transformers is not needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt import checkpoint, entry, gguf_export, hf_families, outputs
from gpt.checkpoint import CheckpointError, LoadedModel
from gpt.config import ModelConfig, to_dict
from gpt.data.bpe import GPT2_PATTERN, byte_to_unicode, hf_pre_tokenizer, rank_merges
from gpt.data.chat_template import END_TOKEN, ChatTemplate, hf_chat_template
from gpt.data.files import HUB_PREFIX
from gpt.data.tokenizer import (
    EOT,
    BPETokenizer,
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
)
from gpt.model import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GPT2_TOKENS = 50256  # GPT-2's byte-level tokens; <|endoftext|> is 50256
CHAR_UNK = "<unk>"  # never in a character vocabulary: a character the model does not know fails to encode
HUB_DOWNLOAD = ".hub_download"  # hf://org/name is downloaded into this folder of the output folder
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "chat_template.jinja"]  # what a download fetches (no other weights formats)
FROM_HF, TO_HF = "gpt.convert from-hf", "gpt.convert to-hf"  # the tools, for gpt/outputs.py's rule
IMPORTED_FILES = {checkpoint.MODEL_FILE, "config.yaml", "tokenizer.json", "meta.json", HUB_DOWNLOAD}


def is_hf_dir(path: str | Path) -> bool:
    """Hugging Face folders have config.json; ours have config.yaml."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


# ---------------------------------------------------------------------------- Hugging Face -> ours


def read_hf_config(folder: Path) -> ModelConfig:
    """config.json as our ModelConfig: GPT-2 here, the other families in gpt/hf_families.py."""
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/config.json: unreadable ({e})") from None
    if hf.get("model_type") != "gpt2":
        return hf_families.config_from_hf(hf, str(folder))
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
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the file of every tensor
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable ({e})") from None
        return {k: v for shard in shards for k, v in checkpoint.read_weights(folder / shard).items()}
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


def load_hf_folder(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A local Hugging Face GPT-2 folder: our model and its tokenizer (GPT-2's when it has no tokenizer.json)."""
    folder = Path(folder)
    model = GPT(read_hf_config(folder))
    if model.config.position == "learned":  # GPT-2
        checkpoint.load_state_checked(model, hf_to_ours(read_hf_weights(folder)), str(folder))
        return LoadedModel(model.to(device), read_hf_tokenizer(folder), folder)
    state = hf_families.weights_from_hf(read_hf_weights(folder), model.config, str(folder))
    checkpoint.load_state_checked(model, state, str(folder))
    try:
        tok = HFTokenizer.from_folder(folder)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    return LoadedModel(model.to(device), tok, folder)


def read_hf_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json back to ours: byte-level BPE (GPT-2's own ranks become the gpt2 encoding) or
    a character vocabulary; the chat markers come back as special tokens."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return TiktokenTokenizer("gpt2")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        model, added = spec["model"], {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        vocab = {s: i for s, i in model["vocab"].items() if s not in added}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: unreadable tokenizer ({e})") from None
    order = sorted(vocab, key=vocab.get)
    if [vocab[s] for s in order] != list(range(len(order))):
        raise CheckpointError(f"{file}: token ids are not 0..{len(order) - 1}; this tokenizer cannot be imported")
    special = {n: i for n, i in added.items() if n != EOT}
    if model.get("type") == "WordLevel":
        return CharTokenizer(order, special)
    pattern = _hf_pattern(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pattern is None or added.get(EOT) != len(order):
        raise CheckpointError(f"{file}: only byte-level BPE (with {EOT} after its tokens) and character "
                              "tokenizers can be imported")
    u2b = {u: b for b, u in byte_to_unicode().items()}
    try:
        tokens = [bytes(u2b[c] for c in s) for s in order]
    except KeyError:
        raise CheckpointError(f"{file}: not a byte-level BPE vocabulary") from None
    if pattern == GPT2_PATTERN and len(tokens) == GPT2_TOKENS:
        gpt2 = TiktokenTokenizer("gpt2", special)
        if gpt2.ranks == {t: i for i, t in enumerate(tokens)}:
            return gpt2
    try:
        return BPETokenizer(tokens, pattern, special)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _hf_pattern(pre: dict | None) -> str | None:
    """The pre-tokenization regex of a byte-level tokenizer.json (GPT-2's own ByteLevel regex included)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if pre else []
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return GPT2_PATTERN
    return None


def fetch_hub(name: str, cache_dir: Path) -> Path:
    """Download a hub model, named explicitly as hf://org/name; needs huggingface_hub and a network.
    The download goes into `cache_dir` (inside the output folder), never ~/.cache. A model already
    there is used as it is, without the network: a run's starting weights never change under it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"to download {HUB_PREFIX}{name}, pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, cache_dir=cache_dir, local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not downloaded yet
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, cache_dir=cache_dir))
    except Exception as e:  # offline, unknown repo, ...
        raise CheckpointError(f"could not download '{name}' from the Hugging Face hub ({type(e).__name__}); "
                              "offline, pass a local folder with config.json and model.safetensors") from None


def read_hf_chat_template(folder: Path) -> str | None:
    """The Jinja chat template of a Hugging Face folder, if it has one."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def from_hf(src: str, out_dir: str | Path) -> Path:
    """A local Hugging Face folder (GPT-2 or a family of gpt/hf_families.py), or hf://org/name (the only
    way this touches the network). `out_dir` follows gpt/outputs.py's rule: new, empty, or a checkpoint
    from-hf wrote before (replaced whole); never the source, nor a folder of other files."""
    hub = src.startswith(HUB_PREFIX)
    target = outputs.check_target(out_dir, FROM_HF, [] if hub else [src], recognise=is_imported)
    outputs.check_replaceable(out_dir, target)
    if hub:
        folder = fetch_hub(src[len(HUB_PREFIX):], target / HUB_DOWNLOAD)
    else:
        folder = Path(src)
        if not folder.exists():
            raise CheckpointError(f"{src}: no such folder; for a Hugging Face hub model write {HUB_PREFIX}{src} "
                                  "(downloads it)")
    loaded = load_hf_folder(folder)
    model, tok = loaded.model, loaded.tokenizer
    template = read_hf_chat_template(folder)
    if (template is not None and not isinstance(tok, HFTokenizer)  # an HFTokenizer keeps its template
            and (template != hf_chat_template() or not ChatTemplate(tok).special)):
        print(f"note: {folder} has a chat template of its own; our checkpoints format chats with ours "
              "(see gpt/data/chat_template.py), so chat replies may differ from the original's")
    config = {"out_dir": str(out_dir), "init_from": str(src), "model": to_dict(model.config)}
    checkpoint.save_checkpoint(target, model.state_dict(), config, tok, {"source": str(src)})
    return Path(out_dir)


def is_imported(folder: Path) -> bool:
    """A checkpoint that from-hf wrote (its meta.json names the source), with no file added since."""
    try:
        return (outputs.is_checkpoint(folder) and "source" in checkpoint.read_checkpoint_meta(folder)
                and {p.name for p in folder.iterdir()} <= IMPORTED_FILES)
    except (CheckpointError, OSError):
        return False


# ---------------------------------------------------------------------------- ours -> Hugging Face


def with_zero_biases(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict with a zero bias for every Linear and LayerNorm that has none (model.bias=false):
    GPT-2's layers always have biases, and zeros compute the same function. The LM head has none in GPT-2."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module.bias is None and name != "lm_head":
            width = module.out_features if isinstance(module, torch.nn.Linear) else module.normalized_shape[0]
            state[f"{name}.bias"] = torch.zeros(width, dtype=module.weight.dtype)
    return state


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name == checkpoint.TIED_KEY:
            continue
        if name.endswith(CONV1D):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "bos_token_id": tok.eot_id, "eos_token_id": (end_ids(tok) or [None])[0],
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def end_ids(tok: Tokenizer) -> list[int]:
    """Ids that end generation: the end-of-turn marker of chat models first, then end-of-text."""
    return ChatTemplate(tok).end_ids


def gpt2_form_problem(cfg: ModelConfig) -> str | None:
    """The family options (those after fused_loss in ModelConfig) GPT-2 cannot express, if any are set."""
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    family = names[names.index("fused_loss") + 1 :]
    changed = [n for n in family if getattr(cfg, n) != getattr(ModelConfig(), n)]
    return f"this model has no Hugging Face GPT-2 form ({', '.join(changed)} set); nothing was written" if changed else None


def to_hf(ckpt: str | Path, hf_dir: str | Path) -> Path:
    """Write a folder transformers loads as it is: config.json, model.safetensors, generation_config.json,
    tokenizer.json + tokenizer_config.json (with the chat template for chat models). A model or tokenizer
    that cannot be exported faithfully is refused before anything is written: no half folder. Learned
    positions export as GPT-2, rotary ones as the family gpt/hf_families.py finds for the config.
    `hf_dir` follows gpt/outputs.py's rule: new, empty, or a folder to-hf wrote before (replaced whole,
    no stale file kept); never the checkpoint, its run folder, nor a folder of other files."""
    outputs.check_target(hf_dir, TO_HF, [ckpt])  # before the work: a refusal costs nothing
    loaded = checkpoint.load_checkpoint(ckpt)
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.model.config
    hf_tok = tok.hf if isinstance(tok, HFTokenizer) else hf_tokenizer(tok)  # refused here if not faithful
    eos = end_ids(tok)  # the chat template's end of turn first: transformers' generate stops where we do
    bos = tok.bos_id if isinstance(tok, HFTokenizer) else tok.eot_id
    if cfg.position == "learned":
        if gpt2_form_problem(cfg):
            raise CheckpointError(gpt2_form_problem(cfg))
        config, state = hf_config(cfg, tok), ours_to_hf(with_zero_biases(model))
    else:
        config = hf_families.config_to_hf(cfg, bos, (eos or [None])[0])
        config["eos_token_id"] = eos if len(eos) > 1 else (eos or [None])[0]
        state = hf_families.weights_to_hf(model.state_dict(), cfg)
    # max_length: transformers' pipeline would otherwise generate past the position table
    pad = tok.pad_id if isinstance(tok, HFTokenizer) and tok.pad_id is not None else (eos or [None])[-1]
    generation = {"eos_token_id": eos, "bos_token_id": bos, "pad_token_id": pad,
                  "max_length": cfg.block_size}

    def write(out: Path) -> None:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        if isinstance(tok, HFTokenizer):
            write_shipped_tokenizer(tok, out, cfg.block_size)
        else:
            write_hf_tokenizer(hf_tok, tok, out, cfg.block_size)

    return outputs.replace_dir(hf_dir, TO_HF, write, [ckpt, loaded.folder])


def write_shipped_tokenizer(tok: HFTokenizer, out: Path, block_size: int) -> None:
    """An imported tokenizer.json back as it came (plus tokens added since), its bos/eos/pad and chat template:
    the model's own, or ours when fine-tuning added our markers to a model that had none."""
    tok.hf.save(str(out / "tokenizer.json"))
    name = lambda i: tok.hf.id_to_token(i) if i is not None else None  # noqa: E731
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "bos_token": name(tok.bos_id), "eos_token": name(tok.eot_id), "pad_token": name(tok.pad_id),
              "clean_up_tokenization_spaces": False}
    template = tok.chat_template if tok.chat_template is not None else (
        hf_chat_template() if ChatTemplate(tok).special else None)
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def hf_tokenizer(tok: Tokenizer):
    """Our tokenizer as a `tokenizers.Tokenizer` (tokenizer.json), checked to encode like `tok`."""
    from tokenizers import Tokenizer as HFTokenizer

    specials = {**({EOT: tok.eot_id} if tok.eot_id is not None else {}), **tok.special_tokens}
    hf = bpe_to_hf(tok, specials) if isinstance(tok, TiktokenTokenizer) else chars_to_hf(tok, specials)
    hf = HFTokenizer.from_str(hf.to_str())  # check what the file will hold
    check_hf_tokenizer(hf, tok)
    return hf


def write_hf_tokenizer(hf, tok: Tokenizer, out: Path, block_size: int) -> None:
    """tokenizer.json (the fast tokenizer) + tokenizer_config.json (special tokens, chat template)."""
    hf.save(str(out / "tokenizer.json"))
    template = ChatTemplate(tok)
    eos = END_TOKEN if template.special else (EOT if tok.eot_id is not None else None)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
        "bos_token": EOT if tok.eot_id is not None else None, "eos_token": eos, "pad_token": eos,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False,
        "additional_special_tokens": [n for n in tok.special_tokens if n != eos],
    }
    if template.special:
        config["chat_template"] = hf_chat_template()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def bpe_to_hf(tok: TiktokenTokenizer, specials: dict[str, int]):
    """Byte-level BPE in tokenizers' form, encoding as tiktoken does: tiktoken merges any two
    neighbours whose bytes form a token (lowest id first) and takes a whole piece that is a token
    as it is, so every split of a token into two tokens becomes a merge at the token's rank, and
    `ignore_merges` is set."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    b2u = byte_to_unicode()
    vocab = {"".join(b2u[b] for b in t): i for t, i in tok.ranks.items()} | specials
    hf = HFTokenizer(models.BPE(vocab, rank_merges(tok.ranks), ignore_merges=True))
    hf.pre_tokenizer = hf_pre_tokenizer(tok.pattern)
    hf.decoder = decoders.ByteLevel()
    return with_specials(hf, specials)


def chars_to_hf(tok: CharTokenizer, specials: dict[str, int]):
    """One token per character: a word-level vocabulary over single characters, joined back by Fuse."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {c: i for i, c in enumerate(tok.chars)} | specials
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=CHAR_UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return with_specials(hf, specials)


def with_specials(hf, specials: dict[str, int]):
    """Our special tokens (end-of-text, chat markers) as tokenizers' special added tokens, at our ids."""
    from tokenizers import AddedToken

    hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in sorted(specials, key=specials.get)])
    return hf


def check_hf_tokenizer(hf, tok: Tokenizer) -> None:
    """Refuse to export a tokenizer whose Hugging Face form would encode differently from ours."""
    if isinstance(tok, CharTokenizer):
        probe = "".join(tok.chars)
    else:
        probe = "Hello, world!  naïve café 東京 🤖 \t\n\n  x = f(3.14)  # ok\r\n"
        probe += "".join(map(chr, range(32, 600, 7)))
    ids = tok.encode(probe)
    theirs = hf.encode(probe).ids
    if theirs != ids or hf.decode(ids, skip_special_tokens=False) != tok.decode(ids):
        raise CheckpointError(f"the {tok.to_spec()['kind']} tokenizer has no faithful Hugging Face form "
                              "(its tokenizer.json would encode differently); nothing was written")


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face folder (or hf://org/name, online) -> our checkpoint")
    a.add_argument("src")
    a.add_argument("out_dir")
    b = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face folder (GPT-2 or the family of its config)")
    b.add_argument("ckpt")
    b.add_argument("hf_dir")
    c = sub.add_parser("to-gguf", help="our checkpoint -> one GGUF file for llama.cpp and Ollama")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("--type", dest="outtype", choices=gguf_export.OUTTYPES, default="f32",
                   help="weights' type: f32 (exact), f16, bf16, q8_0 (8-bit blocks, about half of f16)")
    args = p.parse_args(argv)
    if args.command == "from-hf":
        entry.main(lambda: print(f"wrote {from_hf(args.src, args.out_dir)}"))
    elif args.command == "to-gguf":
        entry.main(lambda: print(f"wrote {gguf_export.to_gguf(args.ckpt, args.out, args.outtype)}"))
    else:
        entry.main(lambda: print(f"wrote {to_hf(args.ckpt, args.hf_dir)}"))


if __name__ == "__main__":
    main()
