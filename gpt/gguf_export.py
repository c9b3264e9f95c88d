"""Our checkpoints as GGUF files for llama.cpp and Ollama (`python -m gpt.convert to-gguf CKPT OUT.gguf`).

The file is written by the `gguf` package (llama.cpp's own writer). Learned-position models are llama.cpp's
`gpt2` architecture (fused q/k/v, LayerNorm with biases: zeros where our model has none); rotary ones are
the architecture of their family (gpt/hf_families.py): Llama and Mistral `llama`, Qwen2 `qwen2`, Qwen3
`qwen3`, Gemma 3 `gemma3`. Our rotary layout is rotate-half (Hugging Face's); llama.cpp's `llama` rotates
interleaved pairs, so its q and k rows are permuted per head as llama.cpp's converter does (`interleave_rope`);
`qwen2`, `qwen3` and `gemma3` rotate halves (NeoX) and take them as they are. llama.cpp's norms scale by their
weight alone, so Gemma's (1 + weight) goes into the file as one tensor; `gemma3` scales the embeddings itself and
reads the window, which layers slide (one flag a layer), their rotary base and the logit soft-cap from the
metadata. A ModelConfig option the target architecture cannot compute (a soft cap on `llama`, a sliding window
on `llama` or `qwen`, what `_gemma3_mismatches` names) is refused in one line naming it, before anything is
written. The tokenizer goes into the metadata as llama.cpp's byte-level BPE ("gpt2"
model: tokens, token types, merges, the pre-tokenizer by the name llama.cpp knows), with the special tokens
and the chat template (the model's own, or ours for chat fine-tunes). A character vocabulary is one token per
character in GPT-2's byte spelling, with merges only inside a character, so llama.cpp splits as we do. A
SentencePiece-style tokenizer.json (BPE with byte_fallback, ▁ for spaces: Llama 2, TinyLlama, Mistral, Gemma 3)
becomes llama.cpp's SentencePiece tokenizer ("llama" model: tokens, scores from the merge ranks, token types,
whether a space goes before the text); what it cannot follow is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from gpt import checkpoint, hf_families, outputs
from gpt.checkpoint import CheckpointError
from gpt.config import ModelConfig
from gpt.data.bpe import GPT2_PATTERN, rank_merges
from gpt.data.chat_template import ChatTemplate, hf_chat_template
from gpt.data.tokenizer import CharTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer, byte_to_unicode
from gpt.model import rope_frequencies

TO_GGUF = "gpt.convert to-gguf"  # the tool, for gpt/outputs.py's rule
TOOL_KEY = "gpt.exported_by"  # metadata key naming the tool: a file it wrote may be replaced by it
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH_OF_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}
ROPE = ("rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
        "rope_original_context")
# Per architecture: the options it fixes (value) and those it takes as they are (free); every other family
# option of ModelConfig must keep its default.
FREE = {"gpt2": {"norm_eps", "intermediate_size", "n_kv_head", "tie_embeddings", "bias", "gelu", *ROPE},
        "rope": {"norm_eps", "intermediate_size", "n_kv_head", "head_dim", "tie_embeddings", "gelu",
                 "sliding_window_pattern", *ROPE}}
FREE["gemma3"] = FREE["rope"] | {"sliding_window", "rope_local_theta", "logit_softcap", "norm_offset"}
FIXED = {"gpt2": dict(norm="layernorm", position="learned", mlp="gelu"),
         "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False),
         "qwen2": dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, qkv_bias=True),
         "qwen3": dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, qk_norm=True),
         "gemma3": dict(norm="rmsnorm", position="rope", mlp="geglu", bias=False, qk_norm=True, post_norms=True,
                        embed_scale=True)}
# tokenizer.json pre-tokenizers as llama.cpp names them (tokenizer.ggml.pre)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {GPT2_PATTERN: "gpt-2", LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------- architecture


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for `cfg`; refused (one line naming the options) when it cannot compute it."""
    if cfg.position == "learned":
        arch, free = "gpt2", FREE["gpt2"]
    else:
        family = hf_families.family_of(cfg)
        arch = ARCH_OF_FAMILY[family]
        free = FREE.get(arch, FREE["rope"])
    base, fixed = ModelConfig(), FIXED[arch]
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    options = ["bias", "gelu", *names[names.index("fused_loss") + 1:]]
    wrong = [n for n in options if n not in free and getattr(cfg, n) != fixed.get(n, getattr(base, n))]
    if arch == "gpt2" and cfg.head_size * cfg.n_head != cfg.n_embd:
        wrong.append("head_dim")
    if arch in ("llama", "qwen2", "qwen3") and cfg.sliding_window and cfg.sliding_window < cfg.block_size:
        wrong.append("sliding_window")  # llama.cpp's llama/qwen attend to every earlier key
    if arch != "llama" and cfg.rope_scaling == "llama3":
        wrong.append("rope_scaling")
    if arch == "gemma3":
        wrong += _gemma3_mismatches(cfg)
    if wrong:
        raise CheckpointError(f"this model has no llama.cpp {arch} form: {', '.join(dict.fromkeys(wrong))} "
                              "not expressible there; nothing was written")
    return arch


def _gemma3_mismatches(cfg: ModelConfig) -> list[str]:
    """What llama.cpp's gemma3 computes otherwise: it takes a 62-layer model for Gemma 3 27B and scales attention
    by n_embd / n_head rather than the head width, and its sliding layers rotate without the rope scaling."""
    wrong = []
    if cfg.n_layer == 62 and cfg.n_embd // cfg.n_head != cfg.head_size:
        wrong.append("head_dim")
    if cfg.rope_scaling != "none" and not cfg.rope_local_theta and any(cfg.slides(i) for i in range(cfg.n_layer)):
        wrong.append("rope_local_theta")  # 0: our sliding layers take the scaled global rope
    return wrong


def interleave_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k from rotate-half order (pairs i, i + d/2 per head) to interleaved (2i, 2i + 1), the
    order llama.cpp's `llama` rotates."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> tensors (ours are nn.Linear's (out, in), which is GGUF's order too)."""
    gguf = _gguf()
    T, name = gguf.MODEL_TENSOR, lambda t, i=None, kind="weight": gguf.TENSOR_NAMES[t].format(bid=i) + "." + kind  # noqa: E731
    out = {name(T.TOKEN_EMBD): state["transformer.wte.weight"], name(T.OUTPUT_NORM): state["transformer.ln_f.weight"]}
    if arch == "gpt2" or not cfg.tie_embeddings:  # llama.cpp's gpt2 wants its output matrix
        out[name(T.OUTPUT)] = state.get("lm_head.weight", state["transformer.wte.weight"])
    q, kv = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    for i in range(cfg.n_layer):
        h = lambda s: state[f"transformer.h.{i}.{s}"]  # noqa: E731
        out[name(T.ATTN_NORM, i)], out[name(T.FFN_NORM, i)] = h("ln_1.weight"), h("ln_2.weight")
        out[name(T.ATTN_OUT, i)], out[name(T.FFN_DOWN, i)] = h("attn.c_proj.weight"), h("mlp.c_proj.weight")
        if arch == "gpt2":
            out[name(T.ATTN_QKV, i)], out[name(T.FFN_UP, i)] = h("attn.c_attn.weight"), h("mlp.c_fc.weight")
            continue
        wq, wk, wv = h("attn.c_attn.weight").split([q, kv, kv])
        if arch == "llama":
            wq, wk = interleave_rope(wq, cfg.n_head), interleave_rope(wk, cfg.kv_heads)
        out.update({name(T.ATTN_Q, i): wq, name(T.ATTN_K, i): wk, name(T.ATTN_V, i): wv})
        out[name(T.FFN_GATE, i)], out[name(T.FFN_UP, i)] = h("mlp.c_fc.weight").split([cfg.ffn_size] * 2)
        if cfg.qkv_bias:
            bq, bk, bv = h("attn.c_attn.bias").split([q, kv, kv])
            out.update({name(T.ATTN_Q, i, "bias"): bq, name(T.ATTN_K, i, "bias"): bk, name(T.ATTN_V, i, "bias"): bv})
        if cfg.qk_norm:
            out[name(T.ATTN_Q_NORM, i)], out[name(T.ATTN_K_NORM, i)] = h("attn.q_norm.weight"), h("attn.k_norm.weight")
        if cfg.post_norms:  # Gemma 3: our ln_2 is its pre-feedforward norm, llama.cpp's ffn_norm
            out[name(T.ATTN_POST_NORM, i)] = h("post_attn_norm.weight")
            out[name(T.FFN_POST_NORM, i)] = h("post_mlp_norm.weight")
    if arch == "gpt2":
        out[name(T.POS_EMBD)] = state["transformer.wpe.weight"]
        biases = {n[: -len("weight")] + "bias": torch.zeros(t.shape[0]) for n, t in out.items()
                  if n.startswith(("blk.", "output_norm")) and not n.endswith(".bias")}
        ours = _gpt2_biases(state, cfg, name, T)
        out.update({n: ours.get(n, zero) for n, zero in biases.items()})
    if cfg.norm_offset:  # llama.cpp's norms scale by their weight alone: Gemma's 1 + weight goes into the file
        out = {n: t + cfg.norm_offset if n.endswith("norm.weight") else t for n, t in out.items()}
    if cfg.rope_scaling == "llama3":  # llama.cpp divides each frequency by its factor
        args = (cfg.head_size, cfg.rope_theta)
        extra = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_context, "cpu")
        out[name(T.ROPE_FREQS)] = rope_frequencies(*args, "none", *extra) / rope_frequencies(*args, "llama3", *extra)
    return out


def _gpt2_biases(state, cfg: ModelConfig, name, T) -> dict[str, torch.Tensor]:
    """The biases our GPT-2-style model has (none with model.bias=false), under llama.cpp's names."""
    ours = {name(T.OUTPUT_NORM, None, "bias"): state.get("transformer.ln_f.bias")}
    for i in range(cfg.n_layer):
        for mine, theirs in [("ln_1", T.ATTN_NORM), ("ln_2", T.FFN_NORM), ("attn.c_attn", T.ATTN_QKV),
                             ("attn.c_proj", T.ATTN_OUT), ("mlp.c_fc", T.FFN_UP), ("mlp.c_proj", T.FFN_DOWN)]:
            ours[name(theirs, i, "bias")] = state.get(f"transformer.h.{i}.{mine}.bias")
    return {n: t for n, t in ours.items() if t is not None}


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_metadata(tok: Tokenizer, n_vocab: int) -> dict:
    """tokenizer.ggml.*: tokens (padded with unused ones to the model's rows), types, merges, pre-tokenizer
    name, special ids, whether to add BOS, and the chat template."""
    gguf = _gguf()
    if isinstance(tok, CharTokenizer):
        meta = _char_vocab(tok)
    elif isinstance(tok, HFTokenizer):
        meta = _shipped_vocab(tok)
    else:
        meta = _tiktoken_vocab(tok)
    tokens, types = meta["tokens"], meta["types"]
    if len(tokens) > n_vocab:
        raise CheckpointError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab} rows; "
                              "nothing was written")
    if "scores" in meta:
        meta["scores"] += [0.0] * (n_vocab - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.UNUSED] * (n_vocab - len(types))
    template = ChatTemplate(tok)
    ends = template.end_ids
    own = tok.chat_template if isinstance(tok, HFTokenizer) else None
    # llama.cpp's gpt2 vocab takes id 11 as bos and eos when the file names none: a character vocabulary has no
    # end of text, so its chat end marker, or else a spare row, stands in
    spare = next((i for i, t in enumerate(types) if t == gguf.TokenType.UNUSED), None)
    eos = next((i for i in (tok.eot_id, *ends, spare) if i is not None), None)
    meta.update(eos=eos, eot=ends[0] if ends else None, bos=meta["bos"] if meta["bos"] is not None else eos,
                chat_template=own if own is not None else (hf_chat_template() if template.special else None))
    return meta


def _char_vocab(tok: CharTokenizer) -> dict:
    """One token per character as llama.cpp's byte-level BPE: each character spelled as GPT-2 spells its UTF-8
    bytes, and merges only inside a character (its first bytes + its next byte), so no merge ever joins two
    characters and any pre-tokenizer that splits between characters (GPT-2's regex does) tokenizes as we do."""
    gguf = _gguf()
    b2u = byte_to_unicode()
    tokens = ["".join(b2u[b] for b in c.encode()) for c in tok.chars]
    merges = {}
    for c in tok.chars:
        spelled = [b2u[b] for b in c.encode()]
        for k in range(1, len(spelled)):
            merges["".join(spelled[:k]) + " " + spelled[k]] = None
    specials = {i: n for n, i in tok.special_tokens.items()}
    tokens += [specials.get(i, f"[PAD{i}]") for i in range(len(tokens), tok.vocab_size)]
    types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))]
    if not merges:  # llama.cpp refuses a gpt2 vocabulary without merges: one of byte 0xFF, never in UTF-8 text
        merges[f"{b2u[0xFF]} {b2u[0xFF]}"] = None
    return dict(tokens=tokens, types=types, merges=list(merges), pre="gpt-2", bos=None, add_bos=False, pad=None)


def _tiktoken_vocab(tok: TiktokenTokenizer) -> dict:
    gguf = _gguf()
    if tok.pattern != GPT2_PATTERN:
        raise CheckpointError(f"the tokenizer's pre-tokenization pattern {tok.pattern!r} has no llama.cpp "
                              "pre-tokenizer (GPT-2's has); nothing was written")
    b2u = byte_to_unicode()
    by_id = {i: "".join(b2u[b] for b in t) for t, i in tok.ranks.items()}
    specials = {**({"<|endoftext|>": tok.eot_id} if tok.eot_id is not None else {}), **tok.special_tokens}
    by_id.update({i: n for n, i in specials.items()})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(tok.vocab_size)]
    control = set(specials.values())
    types = [gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL if i in by_id
             else gguf.TokenType.UNUSED for i in range(tok.vocab_size)]
    merges = [f"{a} {b}" for a, b in rank_merges(tok.ranks)]
    return dict(tokens=tokens, types=types, merges=merges, pre="gpt-2", bos=tok.eot_id, add_bos=False,
                pad=None)


def _shipped_vocab(tok: HFTokenizer) -> dict:
    """A tokenizer.json byte-level BPE as llama.cpp reads it (a SentencePiece-style one: `_sentencepiece_vocab`);
    anything else refused in one line."""
    gguf = _gguf()
    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_vocab(tok, spec)
    if model.get("type") != "BPE" or not tok._byte_level:
        raise CheckpointError(f"this tokenizer.json ({model.get('type')}) is neither a byte-level BPE nor a "
                              "SentencePiece-style one (BPE with byte_fallback); nothing was written")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    by_id = {i: s for s, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(tok.vocab_size)]
    types = [gguf.TokenType.NORMAL if i not in added else gguf.TokenType.CONTROL if added[i].get("special")
             else gguf.TokenType.USER_DEFINED for i in range(tok.vocab_size)]
    types = [t if i in by_id else gguf.TokenType.UNUSED for i, t in enumerate(types)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return dict(tokens=tokens, types=types, merges=merges, pre=pre, bos=tok.bos_id, pad=tok.pad_id,
                **_adds_specials(tok, spec))


def _adds_specials(tok: HFTokenizer, spec: dict) -> dict:
    """add_bos / add_eos: whether the file's post-processor puts a special token (the BOS) first, one (the EOS)
    last."""
    single = (spec.get("post_processor") or {}).get("single") or [{}]
    return dict(add_bos="SpecialToken" in single[0] and tok.bos_id is not None,
                add_eos=len(single) > 1 and "SpecialToken" in single[-1] and tok.eot_id is not None)


# ---------------------------------------------------------------------------- SentencePiece-style tokenizer.json

SPACE = "\u2581"  # ▁, SentencePiece's spelling of a space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_vocab(tok: HFTokenizer, spec: dict) -> dict:
    """A SentencePiece-style tokenizer.json (BPE with byte_fallback, ▁ for spaces: Llama 2, TinyLlama, Mistral,
    Gemma) as llama.cpp's SentencePiece tokenizer ("llama" model). That tokenizer joins the adjacent pair whose
    concatenation is the token of highest score, so each token's score is minus the rank of its first merge:
    the same choice as Hugging Face's BPE when the merges are SentencePiece's (every split of a token into two
    tokens is a merge, the merges of one token consecutive), which is checked. Byte tokens <0xXX> are BYTE,
    the unknown token UNKNOWN, special added tokens CONTROL, other added tokens USER_DEFINED."""
    gguf = _gguf()
    model = spec["model"]
    wrong = [k for k in ("continuing_subword_prefix", "end_of_word_suffix", "dropout") if model.get(k)]
    if model.get("ignore_merges"):
        wrong.append("ignore_merges")
    if wrong:
        raise CheckpointError(f"this tokenizer.json's BPE sets {', '.join(wrong)}, which llama.cpp's SentencePiece "
                              "tokenizer does not compute; nothing was written")
    space_prefix = spm_space_prefix(spec.get("normalizer"), spec.get("pre_tokenizer"), model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    by_id = {i: s for s, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    T = gguf.TokenType

    def kind(i: int, text: str) -> int:
        if text == model.get("unk_token"):
            return T.UNKNOWN
        if i in added:
            return T.CONTROL if added[i].get("special") else T.USER_DEFINED
        return T.BYTE if BYTE_TOKEN.fullmatch(text) else T.NORMAL

    types = [kind(i, by_id[i]) if i in by_id else T.UNUSED for i in range(tok.vocab_size)]
    tokens = [by_id.get(i, f"<unused{i}>") for i in range(tok.vocab_size)]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    plain = [t for i, t in enumerate(tokens) if types[i] == T.NORMAL]
    ranks = sentencepiece_ranks(merges, plain, set(by_id.values()))
    unk = next((i for i, t in enumerate(types) if t == T.UNKNOWN), None)
    return dict(model="llama", tokens=tokens, types=types, scores=[-float(ranks.get(t, 0)) for t in tokens],
                space_prefix=space_prefix, bos=tok.bos_id, pad=tok.pad_id, unk=unk, **_adds_specials(tok, spec))


def sentencepiece_ranks(merges: list[tuple[str, str]], plain: list[str], vocab: set[str]) -> dict[str, int]:
    """token -> rank of the first merge that makes it; refused (one line naming a pair) unless the merges are
    SentencePiece's: those making one token consecutive, and every split of a plain token into two tokens a
    merge (llama.cpp joins any such pair, Hugging Face's BPE only merges)."""
    first: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        if first.setdefault(a + b, r) != r and merges[r - 1][0] + merges[r - 1][1] != a + b:
            raise CheckpointError(f"this tokenizer.json's merges making {a + b!r} are not consecutive (not "
                                  "SentencePiece's): llama.cpp would split text otherwise; nothing was written")
    known = set(merges)
    for t in plain:
        for k in range(1, len(t)):
            if t[:k] in vocab and t[k:] in vocab and (t[:k], t[k:]) not in known:
                raise CheckpointError(f"this tokenizer.json joins {t[:k]!r} and {t[k:]!r} into {t!r} by no merge "
                                      "(not SentencePiece's merges): llama.cpp would; nothing was written")
    return first


def spm_space_prefix(normalizer: dict | None, pre: dict | None, vocab: dict) -> bool:
    """Whether llama.cpp must put a space before the text (tokenizer.ggml.add_space_prefix) to tokenize as this
    tokenizer.json's normalizer and pre-tokenizer do; a combination it cannot follow is refused by name.
    Matched: spaces replaced by ▁ in the normalizer (Gemma), after a Prepend("▁") (Llama 2, Mistral: a ▁ before
    every text, as llama.cpp adds its space), or by a Metaspace pre-tokenizer that prepends nothing (split only
    where no token holds ▁ past its start, so that splitting changes nothing)."""
    steps = (normalizer or {}).get("normalizers") if (normalizer or {}).get("type") == "Sequence" else [normalizer]
    steps = [s for s in steps or [] if s]
    names = [s.get("type") for s in steps]
    replaces = any(s.get("type") == "Replace" and s.get("pattern") == {"String": " "} and s.get("content") == SPACE
                   for s in steps)
    prepends = [s for s in steps if s.get("type") == "Prepend"]
    if (any(n not in ("Replace", "Prepend") for n in names) or len(steps) != replaces + len(prepends)
            or any(s.get("prepend") != SPACE for s in prepends) or len(prepends) > 1):
        raise CheckpointError(f"this tokenizer.json's normalizer ({', '.join(map(str, names))}) has no llama.cpp "
                              "SentencePiece form (a Replace of ' ' by '▁', after a Prepend of '▁', has); nothing "
                              "was written")
    no_op = replaces and (pre or {}).get("type") == "Split" and pre.get("pattern") == {"String": " "}
    if pre is None or no_op:
        if not replaces:
            raise CheckpointError("this tokenizer.json writes spaces as spaces (no Replace of ' ' by '▁' and no "
                                  "Metaspace): llama.cpp's SentencePiece tokenizer reads ▁; nothing was written")
        return bool(prepends)  # a Split on ' ' after every space became ▁ splits nothing
    scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
    if pre.get("type") != "Metaspace" or pre.get("replacement") != SPACE or prepends:
        raise CheckpointError(f"this tokenizer.json's pre-tokenizer ({pre.get('type')}) has no llama.cpp "
                              "SentencePiece form (a Metaspace that prepends nothing has); nothing was written")
    if scheme != "never":
        raise CheckpointError(f"this tokenizer.json's Metaspace prepend_scheme {scheme!r} adds '▁' only where the "
                              "text does not start with a space; llama.cpp adds one always; nothing was written")
    if pre.get("split", True) and any(SPACE in t[1:] for t in vocab):
        raise CheckpointError("this tokenizer.json's Metaspace splits at every '▁' but its tokens hold '▁' inside: "
                              "llama.cpp never splits; nothing was written")
    return False


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) of a tokenizer.json pre-tokenizer: GPT-2's byte-level regex,
    digits split one by one before it (SmolLM), or a Split regex of GPT-2, Llama 3 or Qwen2."""
    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise CheckpointError(f"this tokenizer.json's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) has no "
                          "llama.cpp name known here (GPT-2, SmolLM, Llama 3 and Qwen2 ones have); nothing was written")


# ---------------------------------------------------------------------------- writing


def _encode(gguf, t: torch.Tensor, outtype: str):
    """(numpy data, raw ggml type or None) for one tensor: 1-D ones and rows q8_0 cannot block stay f32."""
    a = t.detach().to(torch.float32).cpu().numpy()
    Q = gguf.GGMLQuantizationType
    if outtype == "f32" or a.ndim == 1:
        return a, None
    if outtype == "f16":
        return a.astype(np.float16), None
    if outtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    if outtype == "q8_0":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, Q.BF16), Q.BF16


def _write_metadata(w, gguf, cfg: ModelConfig, arch: str, tokens: dict, name: str, outtype: str) -> None:
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    w.add_string(TOOL_KEY, TO_GGUF)
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, file_types[outtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_key_length(cfg.head_size)
        w.add_value_length(cfg.head_size)
        w.add_rope_dimension_count(cfg.head_size)
        w.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_scaling == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_factor)
    if arch == "gemma3":
        _gemma3_metadata(w, cfg)
    _write_vocab(w, tokens)
    w.add_add_bos_token(tokens["add_bos"])
    w.add_add_eos_token(tokens.get("add_eos", False))
    if tokens["chat_template"] is not None:
        w.add_chat_template(tokens["chat_template"])


def _write_vocab(w, tokens: dict) -> None:
    """tokenizer.ggml.*: byte-level BPE ("gpt2": merges, pre-tokenizer) or SentencePiece ("llama": scores,
    whether a space goes before the text), the token list and types, the special ids."""
    w.add_tokenizer_model(tokens.get("model", "gpt2"))
    if "scores" in tokens:
        w.add_add_space_prefix(tokens["space_prefix"])
    else:
        w.add_tokenizer_pre(tokens["pre"])
    w.add_token_list(tokens["tokens"])
    w.add_token_types(tokens["types"])
    if "scores" in tokens:
        w.add_token_scores(tokens["scores"])
    else:
        w.add_token_merges(tokens["merges"])
    for key, add in [("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("eot", w.add_eot_token_id),
                     ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)]:
        if tokens.get(key) is not None:
            add(tokens[key])


def _gemma3_metadata(w, cfg: ModelConfig) -> None:
    """gemma3's window, which layers slide (one flag a layer), their rotary base, and the logit soft-cap."""
    if any(cfg.slides(i) for i in range(cfg.n_layer)):
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([cfg.slides(i) for i in range(cfg.n_layer)])
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
    if cfg.logit_softcap:
        w.add_final_logit_softcapping(cfg.logit_softcap)


def to_gguf(ckpt: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Write `out` (one .gguf file) from checkpoint `ckpt`; refused before writing when the model or
    tokenizer has no faithful GGUF form. `out` follows gpt/outputs.py's rule (a file to-gguf wrote before
    is replaced; never an input nor another file)."""
    if outtype not in OUTTYPES:
        raise CheckpointError(f"--type {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    gguf = _gguf()
    outputs.check_target(out, TO_GGUF, [ckpt], recognise=is_gguf_export)
    loaded = checkpoint.load_checkpoint(ckpt)
    cfg = loaded.model.config
    arch = architecture(cfg)
    if cfg.mlp in ("gelu", "geglu") and cfg.gelu == "exact":
        print(f"note: llama.cpp's {arch} computes GELU in its tanh form (from an fp16 table); this model was trained "
              "with the exact one: the two differ by at most 5e-4 per activation, so logits may differ slightly")
    tokens = tokenizer_metadata(loaded.tokenizer, cfg.vocab_size)
    if tokens["eos"] is None and cfg.vocab_size > 11:
        print(f"note: this vocabulary has no end-of-text token and no spare row to stand for one; llama.cpp then takes "
              f"token 11 ({loaded.tokenizer.decode([11])!r}) as end of text, and llama-cli stops there; train with "
              "model.vocab_multiple=64 (a spare row) to avoid it")
    tensors = gguf_tensors(loaded.model.state_dict(), cfg, arch)

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), arch)
        _write_metadata(w, gguf, cfg, arch, tokens, Path(loaded.folder).resolve().name, outtype)
        for n, t in tensors.items():
            data, raw = _encode(gguf, t, outtype)
            w.add_tensor(n, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return outputs.replace_file(out, TO_GGUF, write, [ckpt, loaded.folder], recognise=is_gguf_export)


def is_gguf_export(path: Path) -> bool:
    """A GGUF file that to-gguf wrote (its metadata names the tool)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get(TOOL_KEY)
        return field is not None and field.contents() == TO_GGUF
    except Exception:  # not a GGUF file, unreadable, or no gguf package
        return False

