"""GGUF export (`python -m gpt.convert to-gguf`): the file read back with gguf's own reader (metadata, every
tensor through the documented layout, tokenizer), refusals, and llama.cpp itself (llama-cpp-python)
computing our logits and greedy tokens from it."""

import dataclasses
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import write_hf_model, write_hf_tokenizer

from gpt import checkpoint, convert, hf_families
from gpt.checkpoint import CheckpointError
from gpt.config import ModelConfig
from gpt.data.bpe import GPT2_PATTERN, train_bpe
from gpt.data.chat_template import END_TOKEN, ChatTemplate, hf_chat_template
from gpt.data.tokenizer import CharTokenizer, HFTokenizer, byte_to_unicode
from gpt.gguf_export import (LLAMA3_REGEX, QWEN2_REGEX, pre_tokenizer_name, sentencepiece_ranks, spm_space_prefix,
                              to_gguf)
from gpt.infer.chat_session import ChatSession
from gpt.infer.engine import complete, generate
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT
from gpt.outputs import OutputError

gguf = pytest.importorskip("gguf")

TEXT = ("The quick brown fox jumps over the lazy dog. Grüße aus Köln! 東京 x = f(3.14)\n"
        "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.\n") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {"llama": dict(architectures=["LlamaForCausalLM"], rope_theta=5e5, tie_word_embeddings=True,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
            "qwen2": dict(architectures=["Qwen2ForCausalLM"], rope_theta=1e6, tie_word_embeddings=False),
            "qwen3": dict(architectures=["Qwen3ForCausalLM"], head_dim=16, tie_word_embeddings=True)}
# Gemma 3 as from-hf imports it: a window of 8 keys on layers 0 and 2 (layer 1 global), their own rotary base,
# the logit soft-cap, head_dim 16 (not 48 / 6); an output matrix of its own (tied, the random model's logits are
# near flat, its greedy tokens one in 1e5 apart: closer than ggml's fp16 GELU table keeps them)
GEMMA3 = dict(tie_word_embeddings=False, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
              head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=8,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=1e5,
              rope_local_base_freq=2e4, final_logit_softcapping=5.0, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
LLAMA_CPP_MISSING = ("llama-cpp-python is not installed: pip install llama-cpp-python (it compiles llama.cpp from "
                     "source, several minutes) to check the GGUF files against llama.cpp itself")


def lively(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A random model with confident predictions (flat logits hide bugs)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.0 if "wpe" in name else 2.0 / p.shape[-1] ** 0.5)
            elif "norm" in name or "ln" in name:
                p.uniform_(0.7, 1.3) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A GPT-2-style chat model (learned positions, no biases) with a BPE trained here plus our chat markers."""
    tok = train_bpe([TEXT], 300, log=lambda _: None)
    ChatTemplate.add_tokens(tok)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=320, bias=False)
    folder = tmp_path_factory.mktemp("gpt2") / "ckpt"
    checkpoint.save_checkpoint(folder, lively(cfg).state_dict(), {"model": asdict(cfg)}, tok)
    return folder


def family_ckpt(root, family: str):
    """One of our checkpoints of a family: its config as from-hf reads config.json, a shipped tokenizer.json."""
    root.mkdir()
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    vocab = write_hf_tokenizer(root, TEXT, SPECIALS, config, prefix="<|im_start|>").get_vocab_size()
    cfg = hf_families.config_from_hf({**FAMILY, **FAMILIES[family], "vocab_size": vocab}, family)
    checkpoint.save_checkpoint(root / "ckpt", lively(cfg).state_dict(), {"model": asdict(cfg)},
                               HFTokenizer.from_folder(root))
    return root / "ckpt"


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: family_ckpt(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def gemma3_ckpt(tmp_path_factory):
    """A random transformers Gemma 3 text model (GEMMA3) with a byte-level BPE, imported with from-hf."""
    pytest.importorskip("transformers")
    hf = tmp_path_factory.mktemp("gemma3") / "hf"
    hf.mkdir()
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    vocab = write_hf_tokenizer(hf, TEXT, SPECIALS, config, prefix="<|im_start|>").get_vocab_size()
    write_hf_model(hf, "Gemma3TextConfig", "Gemma3ForCausalLM", **GEMMA3, vocab_size=vocab)
    return convert.from_hf(str(hf), hf.parent / "ckpt")


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in reader.tensors}


def test_gpt2_metadata_tensors_and_tokenizer_read_back(gpt2_ckpt, tmp_path):
    out = to_gguf(gpt2_ckpt, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    meta, got = fields(reader), tensors(reader)
    loaded = checkpoint.load_checkpoint(gpt2_ckpt)
    cfg, tok, state = loaded.model.config, loaded.tokenizer, loaded.model.state_dict()
    assert meta["general.architecture"] == "gpt2"
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"]) == (64, 32, 2)
    assert (meta["gpt2.attention.head_count"], meta["gpt2.attention.head_count_kv"], meta["gpt2.feed_forward_length"]) == (2, 2, 128)
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    # tensors: ours are nn.Linear (out, in), which is GGUF's row order; the missing biases are zeros
    np.testing.assert_array_equal(got["token_embd.weight"], state["transformer.wte.weight"].numpy())
    np.testing.assert_array_equal(got["position_embd.weight"], state["transformer.wpe.weight"].numpy())
    np.testing.assert_array_equal(got["output.weight"], state["lm_head.weight"].numpy())
    np.testing.assert_array_equal(got["blk.1.attn_qkv.weight"], state["transformer.h.1.attn.c_attn.weight"].numpy())
    np.testing.assert_array_equal(got["blk.0.ffn_up.weight"], state["transformer.h.0.mlp.c_fc.weight"].numpy())
    np.testing.assert_array_equal(got["blk.0.attn_norm.weight"], state["transformer.h.0.ln_1.weight"].numpy())
    assert not got["blk.0.attn_qkv.bias"].any() and got["blk.0.attn_qkv.bias"].shape == (96,)
    assert len(got) == 5 + 2 * 12  # wte, wpe, output, final norm and bias; 12 per block
    # tokenizer: GPT-2's byte spelling, our markers as control tokens, merges that rebuild every token
    tokens, types, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.merges"]
    b2u = byte_to_unicode()
    assert len(tokens) == cfg.vocab_size and tokens[:299] == ["".join(b2u[b] for b in t) for t in tok.tokens]
    end = tok.special_id(END_TOKEN)
    assert tokens[end] == END_TOKEN and types[end] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED  # rows past the tokenizer (vocab padding)
    assert {a + b for a, b in (m.split(" ") for m in merges)} == {t for t in tokens[256:299]}
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (tok.eot_id, end)
    assert meta["tokenizer.chat_template"] == hf_chat_template() and meta["tokenizer.ggml.add_bos_token"] is False


def test_outtypes_keep_the_values_within_their_precision(gpt2_ckpt, tmp_path):
    exact = tensors(gguf.GGUFReader(str(to_gguf(gpt2_ckpt, tmp_path / "f32.gguf"))))
    for outtype, tol in [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-2)]:
        reader = gguf.GGUFReader(str(to_gguf(gpt2_ckpt, tmp_path / f"{outtype}.gguf", outtype)))
        t = {x.name: x for x in reader.tensors}["blk.0.attn_qkv.weight"]
        assert t.tensor_type.name == outtype.upper()
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(exact["blk.0.attn_qkv.weight"].shape)
        scale = np.abs(exact["blk.0.attn_qkv.weight"]).max()
        assert np.abs(back - exact["blk.0.attn_qkv.weight"]).max() < tol * scale
        assert {x.name: x for x in reader.tensors}["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows (pairs 2i, 2i+1 per head) back to rotate-half (i, i + d/2)."""
    return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_metadata_and_tensors_read_back(family, family_ckpts, tmp_path):
    loaded = checkpoint.load_checkpoint(family_ckpts[family])
    cfg, tok, state = loaded.model.config, loaded.tokenizer, loaded.model.state_dict()
    reader = gguf.GGUFReader(str(to_gguf(family_ckpts[family], tmp_path / "m.gguf")))
    meta, got = fields(reader), tensors(reader)
    a = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
    assert meta["general.architecture"] == a
    assert (meta[f"{a}.context_length"], meta[f"{a}.embedding_length"], meta[f"{a}.feed_forward_length"]) == (64, 48, 80)
    assert (meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"]) == (6, 2)
    assert meta[f"{a}.attention.key_length"] == meta[f"{a}.rope.dimension_count"] == cfg.head_size
    assert meta[f"{a}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    q, kv = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    wq, wk, wv = np.split(state["transformer.h.1.attn.c_attn.weight"].numpy(), [q, q + kv])
    if family == "llama":  # rotate-half -> interleaved, as llama.cpp's converter permutes Hugging Face's q/k
        assert not np.array_equal(got["blk.1.attn_q.weight"], wq)
        got["blk.1.attn_q.weight"] = interleaved_to_half(got["blk.1.attn_q.weight"], cfg.n_head)
        got["blk.1.attn_k.weight"] = interleaved_to_half(got["blk.1.attn_k.weight"], cfg.kv_heads)
        np.testing.assert_allclose(1 / got["rope_freqs.weight"][[0, -1]], [1.0, 1 / 8.0])  # llama3 scaling by band
    for name, ours in [("attn_q", wq), ("attn_k", wk), ("attn_v", wv)]:
        np.testing.assert_array_equal(got[f"blk.1.{name}.weight"], ours)
    gate, up = np.split(state["transformer.h.0.mlp.c_fc.weight"].numpy(), 2)
    np.testing.assert_array_equal(got["blk.0.ffn_gate.weight"], gate)
    np.testing.assert_array_equal(got["blk.0.ffn_up.weight"], up)
    assert ("output.weight" in got) == (not cfg.tie_embeddings)
    if family == "qwen2":
        np.testing.assert_array_equal(got["blk.0.attn_k.bias"], state["transformer.h.0.attn.c_attn.bias"][q:q + kv].numpy())
    if family == "qwen3":
        np.testing.assert_array_equal(got["blk.0.attn_k_norm.weight"], state["transformer.h.0.attn.k_norm.weight"].numpy())
    spec = json.loads(tok.hf.to_str())
    assert meta["tokenizer.ggml.tokens"][:len(spec["model"]["vocab"])] == sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.chat_template"] == TEMPLATE
    ids = {n: tok.hf.token_to_id(n) for n in SPECIALS}
    assert meta["tokenizer.ggml.bos_token_id"] == ids["<|im_start|>"] and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eos_token_id"] == ids["<|im_end|>"]


def test_pre_tokenizers_get_the_names_llama_cpp_knows():
    from tokenizers import Regex, pre_tokenizers

    def named(*steps):
        return pre_tokenizer_name(json.loads(pre_tokenizers.Sequence(list(steps)).__getstate__()))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = lambda r: pre_tokenizers.Split(Regex(r), behavior="isolated")  # noqa: E731
    assert named(split(LLAMA3_REGEX), byte_level) == "llama-bpe"
    assert named(split(QWEN2_REGEX), byte_level) == "qwen2"
    assert named(split(GPT2_PATTERN), byte_level) == "gpt-2"
    assert named(pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)) == "smollm"
    with pytest.raises(CheckpointError, match="no llama.cpp name"):
        named(split(r"\w+"), byte_level)


def test_what_llama_cpp_cannot_compute_is_refused_in_one_line(tmp_path):
    bpe = train_bpe([TEXT], 280, log=lambda _: None)
    rope = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    gemma = {**rope, "mlp": "geglu", "qk_norm": True, "post_norms": True, "embed_scale": True, "norm_offset": 1.0}
    cases = [("softcap", dict(**rope, logit_softcap=30.0), bpe, "no llama.cpp llama form: logit_softcap"),
             ("window", dict(**rope, sliding_window=4), bpe, "llama form: sliding_window"),
             ("gpt2_rmsnorm", dict(norm="rmsnorm"), bpe, "no llama.cpp gpt2 form: norm"),
             ("gemma_27b", dict(**gemma, n_layer=62, head_dim=16), bpe, "no llama.cpp gemma3 form: head_dim"),
             ("gemma_rope", dict(**gemma, sliding_window=4, rope_scaling="linear", rope_factor=2.0), bpe,
              "gemma3 form: rope_local_theta")]
    for name, extra, tok, message in cases:
        cfg = ModelConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 300, **extra})
        checkpoint.save_checkpoint(tmp_path / name, GPT(cfg).state_dict(), {"model": asdict(cfg)}, tok)
        with pytest.raises(CheckpointError, match=message) as e:
            to_gguf(tmp_path / name, tmp_path / f"{name}.gguf")
        assert "\n" not in str(e.value) and not (tmp_path / f"{name}.gguf").exists()


def test_the_output_file_follows_the_rule_of_every_output(gpt2_ckpt, tmp_path, capsys):
    (tmp_path / "notes.gguf").write_text("mine")
    with pytest.raises(OutputError, match="not written by gpt.convert to-gguf"):
        to_gguf(gpt2_ckpt, tmp_path / "notes.gguf")
    assert (tmp_path / "notes.gguf").read_text() == "mine"
    convert.main(["to-gguf", str(gpt2_ckpt), str(tmp_path / "m.gguf"), "--type", "f16"])
    convert.main(["to-gguf", str(gpt2_ckpt), str(tmp_path / "m.gguf")])  # its own output: replaced
    assert "wrote" in capsys.readouterr().out
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == 0  # f32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


# ---------------------------------------------------------------------------- llama.cpp itself


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip(LLAMA_CPP_MISSING)
    return llama_cpp


def llama_cpp_model(path, n_ctx: int):
    """llama.cpp on `path` with an f32 KV cache (its default f16 one rounds keys and values) and without its
    weight repacking (`llama-cli --no-repack`): on CPUs with AMX, llama-cpp-python 0.3.36's repacked q8_0
    matrices segfault at the first decode, whatever the file."""
    llama_cpp = llama_cpp_or_skip()
    lib, default = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, seed=0,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    finally:
        lib.llama_model_default_params = default


def compare_with_llama_cpp(ckpt, path, prompt_text: str, n_new: int = 50) -> tuple[float, list, list]:
    """(largest logit difference over the prompt relative to the largest logit, llama.cpp's greedy tokens,
    ours) for `prompt_text`."""
    loaded = checkpoint.load_checkpoint(ckpt)
    model, tok = loaded.model.eval(), loaded.tokenizer
    llm = llama_cpp_model(path, model.config.block_size)
    try:
        ids = tok.encode(prompt_text)
        assert llm.tokenize(prompt_text.encode(), add_bos=False, special=False) == ids  # same tokens
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0, :, : theirs.shape[1]].numpy()
        llm.reset()
        greedy = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            greedy.append(t)
            if len(greedy) == n_new:
                break
    finally:
        llm.close()
    mine = generate(model, torch.tensor([ids]), n_new, SamplingParams(temperature=0))[0, len(ids):].tolist()
    return float(np.abs(theirs - ours).max() / np.abs(ours).max()), greedy, mine


def test_llama_cpp_computes_our_gpt2_logits_and_greedy_tokens(gpt2_ckpt, tmp_path):
    llama_cpp_or_skip()
    out = to_gguf(gpt2_ckpt, tmp_path / "m.gguf")
    diff, theirs, ours = compare_with_llama_cpp(gpt2_ckpt, out, "The quick brown fox jumps over")
    assert diff < 1e-3, diff  # ggml's CPU GELU reads an fp16 table (about 5e-4 here); the families' are within 1e-6
    assert theirs == ours and len(set(ours)) > 3


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_computes_our_family_logits_and_greedy_tokens(family, family_ckpts, tmp_path):
    llama_cpp_or_skip()
    out = to_gguf(family_ckpts[family], tmp_path / "m.gguf")
    diff, theirs, ours = compare_with_llama_cpp(family_ckpts[family], out, "Pack my box with five dozen")
    assert diff < 1e-4, diff
    assert theirs == ours and len(set(ours)) > 3


def test_gemma3_metadata_and_tensors_read_back(gemma3_ckpt, tmp_path):
    state = checkpoint.load_checkpoint(gemma3_ckpt).model.state_dict()
    reader = gguf.GGUFReader(str(to_gguf(gemma3_ckpt, tmp_path / "m.gguf")))
    meta, got = fields(reader), tensors(reader)
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.attention.key_length"] == meta["gemma3.rope.dimension_count"] == 16
    assert meta["gemma3.attention.sliding_window"] == 8
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False, True]  # which layers slide
    assert (meta["gemma3.rope.freq_base"], meta["gemma3.rope.freq_base_swa"]) == (1e5, 2e4)
    assert meta["gemma3.final_logit_softcapping"] == 5.0
    # llama.cpp's norms scale by the weight alone: Gemma's 1 + weight is written (every norm, q/k ones too)
    h = lambda s: state[f"transformer.h.1.{s}"].numpy()  # noqa: E731
    for theirs, ours in [("attn_norm", "ln_1"), ("post_attention_norm", "post_attn_norm"), ("ffn_norm", "ln_2"),
                         ("post_ffw_norm", "post_mlp_norm"), ("attn_q_norm", "attn.q_norm"), ("attn_k_norm", "attn.k_norm")]:
        np.testing.assert_array_equal(got[f"blk.1.{theirs}.weight"], 1 + h(f"{ours}.weight"))
    np.testing.assert_array_equal(got["output_norm.weight"], 1 + state["transformer.ln_f.weight"].numpy())
    q, kv = 6 * 16, 2 * 16  # rotate-half, as gemma3 rotates: q and k as they are
    np.testing.assert_array_equal(got["blk.1.attn_k.weight"], h("attn.c_attn.weight")[q:q + kv])
    np.testing.assert_array_equal(got["token_embd.weight"], state["transformer.wte.weight"].numpy())  # unscaled
    np.testing.assert_array_equal(got["output.weight"], state["lm_head.weight"].numpy())
    assert len(got) == 3 + 3 * 13


def test_llama_cpp_computes_our_gemma3_logits_and_greedy_tokens(gemma3_ckpt, tmp_path):
    """Sliding layers see 8 keys; the prompt is longer, and 50 tokens more, so the window and which layers
    use it decide the logits: a window of 9 in the file, no per-layer flags, no local rotary base, no soft-cap
    or norms without their + 1 each put the logits 0.1 to 1.2 off."""
    llama_cpp_or_skip()
    prompt = "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow. The quick brown fox"
    assert len(checkpoint.load_checkpoint(gemma3_ckpt).tokenizer.encode(prompt)) > 2 * 8
    diff, theirs, ours = compare_with_llama_cpp(gemma3_ckpt, to_gguf(gemma3_ckpt, tmp_path / "m.gguf"), prompt)
    assert diff < 1e-3, diff  # ggml's CPU GELU reads an fp16 table, as for gpt2 (the other families': 1e-6)
    assert theirs == ours and len(set(ours)) > 3


# ---------------------------------------------------------------------------- character vocabularies, chat, q8_0


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory, shakespeare_text):
    """A character-level model as configs/shakespeare.yaml makes them (plus a few multi-byte characters), trained
    briefly so that its predictions are a language model's rather than a random one's (near-flat logits)."""
    tok = CharTokenizer.from_text(shakespeare_text + "é東🤖")
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size, bias=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    data = torch.tensor(tok.encode(shakespeare_text[:200_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (16,)).tolist()
        batch = torch.stack([data[i:i + 65] for i in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("chars") / "ckpt"
    checkpoint.save_checkpoint(folder, model.state_dict(), {"model": asdict(cfg)}, tok)
    return folder


def test_a_character_vocabulary_is_byte_level_bpe_that_never_merges_across_characters(char_ckpt, tmp_path, capsys):
    meta = fields(gguf.GGUFReader(str(to_gguf(char_ckpt, tmp_path / "m.gguf"))))
    tok = checkpoint.load_checkpoint(char_ckpt).tokenizer
    b2u = byte_to_unicode()
    assert meta["tokenizer.ggml.tokens"] == ["".join(b2u[b] for b in c.encode()) for c in tok.chars]
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    merged = ["".join(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # é: 2 bytes, 東: 3, 🤖: 4
    assert len(merged) == 1 + 2 + 3 and {"".join(b2u[b] for b in c.encode()) for c in "é東🤖"} <= set(merged)
    # no end-of-text token and no spare row: llama.cpp will end at its default id 11, and the user is told
    assert "takes token 11 (';') as end of text" in capsys.readouterr().out


def test_llama_cpp_tokenizes_characters_as_we_do_and_computes_our_greedy_tokens(char_ckpt, shakespeare_text, tmp_path):
    llama_cpp_or_skip()
    out = to_gguf(char_ckpt, tmp_path / "m.gguf")
    tok = checkpoint.load_checkpoint(char_ckpt).tokenizer
    llm = llama_cpp_model(out, 64)
    try:
        for text in (shakespeare_text[:50_000], "Café? 東 and 🤖, twice: éé東東🤖🤖\n"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    finally:
        llm.close()
    diff, theirs, ours = compare_with_llama_cpp(char_ckpt, out, "ROMEO:\nWhat say")
    assert diff < 1e-3, diff
    assert theirs == ours and len(set(ours)) > 3


def teacher_forced_agreement(llm, ids: list[int], n_prompt: int) -> float:
    """The share of positions past the prompt where llama.cpp's most likely next token is ours (`ids` is our
    greedy continuation): each position sees the same context, so one difference does not count twice."""
    llm.reset()
    llm.eval(ids[:-1])
    scores = np.array(llm.scores[: len(ids) - 1])
    return float(np.mean(scores[n_prompt - 1:].argmax(-1) == np.array(ids[n_prompt:])))


def test_lower_precision_files_agree_with_our_greedy_tokens_for_a_stated_share(char_ckpt, tmp_path):
    """The shares docs/deploying.md states: 50 greedy tokens after each of four prompts, on the briefly
    trained character model (block 64)."""
    llama_cpp_or_skip()
    loaded = checkpoint.load_checkpoint(char_ckpt)
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [tok.encode(p) for p in ("ROMEO:\nWhat", "KING RICH", "Citizen:\nWe", "O, the")]
    runs = [(p, generate(model, torch.tensor([p]), 50, SamplingParams(temperature=0))[0].tolist()) for p in prompts]
    shares = {}
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        llm = llama_cpp_model(to_gguf(char_ckpt, tmp_path / f"{outtype}.gguf", outtype), 64)
        try:
            shares[outtype] = np.mean([teacher_forced_agreement(llm, ids, len(p)) for p, ids in runs])
        finally:
            llm.close()
    print("greedy agreement with our f32 tokens:", shares)
    assert shares["f32"] == 1.0
    assert shares["f16"] >= 0.97 and shares["q8_0"] >= 0.95 and shares["bf16"] >= 0.9, shares


def chat_ckpt(kind: str, gpt2_ckpt, family_ckpts, folder):
    """A chat model with a 256-token context: our markers on a BPE or a character vocabulary, or a Qwen2 model
    with its own template. Its end-of-turn token is made to win wherever a token it likes would (a copy of that
    output row, a little larger), so its replies end as a fine-tuned model's do."""
    if kind == "qwen2":
        loaded = checkpoint.load_checkpoint(family_ckpts["qwen2"])
        tok, cfg = loaded.tokenizer, loaded.model.config
    else:
        chars = CharTokenizer.from_text(TEXT + "".join(CONVERSATION))
        tok = checkpoint.load_checkpoint(gpt2_ckpt).tokenizer if kind == "bpe" else chars
        ChatTemplate.add_tokens(tok)
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, bias=False)
    cfg = dataclasses.replace(cfg, block_size=256, tie_embeddings=False)  # output rows change, the prompt's do not
    model, template = lively(cfg), ChatTemplate(tok)
    first = [{"role": "system", "content": CONVERSATION[0]}, {"role": "user", "content": CONVERSATION[1]}]
    prompt = template.encode(first, add_generation_prompt=True)
    reply = generate(model, torch.tensor([prompt]), 12, SamplingParams(temperature=0))[0, len(prompt):].tolist()
    head = "lm_head.weight" if "lm_head.weight" in model.state_dict() else "transformer.wte.weight"
    for usual in [t for k, t in enumerate(reply) if k >= 3 and t not in reply[:k] and t not in template.end_ids]:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[head][template.stop_ids[0]] = state[head][usual] * 1.05  # ends where that token first came
        for marker in set(tok.special_tokens.values()) - set(template.end_ids):  # no role markers inside a reply
            state[head][marker] = -state[head][usual]
        model.load_state_dict(state)
        ends = generate(model, torch.tensor([prompt]), 4, SamplingParams(temperature=0))[0, len(prompt):].tolist()
        if template.stop_ids[0] not in ends:  # not too early: the reply is a few tokens long
            break
    checkpoint.save_checkpoint(folder, state, {"model": asdict(cfg)}, tok)
    return folder


CONVERSATION = ["Be brief.", "The quick brown fox?", "Pack my box, judge my vow."]  # a system prompt, two turns


def chat_both_ways(ckpt, path, max_tokens: int) -> list[tuple[list[int], str, list[int], str]]:
    """Per user turn: (our reply's ids, why it ended, llama.cpp's, why it ended), greedy. Ours as `sample.py --chat`
    computes them (ChatSession's prompt, the engine, the template's end ids); llama.cpp's through its chat
    completion (the file's Jinja template, its end-of-generation tokens) on the same history."""
    loaded = checkpoint.load_checkpoint(ckpt)
    template = ChatTemplate(loaded.tokenizer)
    session = ChatSession(template, 10_000, CONVERSATION[0])
    llm, out = llama_cpp_model(path, 256), []
    try:
        for text in CONVERSATION[1:]:
            history = session.system + session.turns + [{"role": "user", "content": text}]
            greedy = []  # llama.cpp's token at each step: the argmax of the logits it samples from at temperature 0
            record = lambda _ids, scores: greedy.append(int(np.argmax(scores))) or scores  # noqa: E731
            choice = llm.create_chat_completion(history, temperature=0, repeat_penalty=1.0, max_tokens=max_tokens,
                                                logits_processor=[record])["choices"][0]
            ids, _ = session.prompt_for(text)
            params = SamplingParams(temperature=0, max_tokens=max_tokens)
            reply = complete(loaded.model.eval(), loaded.tokenizer, ids, params, stop_ids=template.end_ids)[0]
            session.add_reply(reply.text.strip())
            # llama-cpp-python may compute a token or two past max_tokens (finishing a UTF-8 character), then drops them
            out.append((reply.token_ids, reply.finish_reason, greedy[:max_tokens], choice["finish_reason"]))
    finally:
        llm.close()
    return out


@pytest.mark.parametrize("kind", ["bpe", "chars", "qwen2"])
def test_a_chat_model_answers_in_llama_cpp_as_in_sample_chat(kind, gpt2_ckpt, family_ckpts, tmp_path):
    """A two-turn conversation with a system prompt, greedy at f32: our special-token template (BPE and
    character vocabularies) and a family's own Jinja template render, stop and answer alike in llama.cpp."""
    llama_cpp_or_skip()
    ckpt = chat_ckpt(kind, gpt2_ckpt, family_ckpts, tmp_path / "chat")
    turns = chat_both_ways(ckpt, to_gguf(ckpt, tmp_path / "chat.gguf"), 40)
    for ours, why, theirs, their_why in turns:
        assert theirs == ours and {"stop": "eos"}.get(their_why, their_why) == why
    assert turns[0][1] == "eos" and len(turns[0][0]) > 3  # the first reply ends at its end token (as engineered)
    assert all(ids for ids, *_ in turns)  # the second turn's length depends on the random weights


# ---------------------------------------------------------------------------- SentencePiece-style tokenizer.json

SPM_TEXTS = ["Hello world", "   three spaces first", "several    spaces,  then\ttab", "lines\nand\n\nmore lines\n",
             "Grüße aus Köln, café crème", "a robot 🤖 waves 東京", "def f(x):\n    return x ** 2  # code\n",
             " leading and trailing "]
CODE = "def f(x):\n    return x ** 2  # square\n\nclass Box:\n    pass\n"
# (special tokens in id order, BOS, EOS, normalizer steps): Llama 2 / TinyLlama / Mistral (a ▁ before the text),
# Gemma (none)
SPM_STYLES = {"llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>", True),
              "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", False)}


def write_spm_tokenizer(folder, style: str):
    """A SentencePiece-style tokenizer.json as Hugging Face converts SentencePiece models: special tokens, the 256
    byte tokens <0xXX> (byte_fallback), then a BPE vocabulary learned here with ▁ for spaces; its merges every split
    of a token into two tokens, ordered by the token made (SentencePiece's order, as transformers' converter writes
    them). Llama's normalizer puts a ▁ before the text, Gemma's does not."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials, bos, eos, prefix = SPM_STYLES[style]
    steps = [normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")]
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence(steps)
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # learned within words, as SentencePiece
    learner.train_from_iterator((TEXT + CODE).splitlines(keepends=True), trainers.BpeTrainer(vocab_size=300))
    learned = sorted(learner.get_vocab(), key=learner.get_vocab().get) + ["▁▁", "▁▁▁▁"]  # runs of spaces, as Llama's
    tokens = list(dict.fromkeys(specials + [f"<0x{b:02X}>" for b in range(256)] + learned))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[:k], t[k:]) for t in tokens for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    merges.sort(key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}), encoding="utf-8")
    return vocab


@pytest.fixture(scope="module")
def spm_ckpts(tmp_path_factory):
    """Our checkpoints (from-hf) of a random transformers Llama with Llama 2's style of tokenizer and a Gemma 3
    with Gemma's."""
    pytest.importorskip("transformers")
    out = {}
    for style, (config_cls, model_cls, options) in {"llama": ("LlamaConfig", "LlamaForCausalLM", FAMILY),
                                                    "gemma": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3)}.items():
        hf = tmp_path_factory.mktemp(style) / "hf"
        hf.mkdir()
        vocab = write_spm_tokenizer(hf, style)
        _, bos, eos, _ = SPM_STYLES[style]
        write_hf_model(hf, config_cls, model_cls, **{**options, "vocab_size": len(vocab), "bos_token_id": vocab[bos],
                                                     "eos_token_id": vocab[eos], "pad_token_id": None})
        out[style] = convert.from_hf(str(hf), hf.parent / "ckpt")
    return out


@pytest.mark.parametrize("style", SPM_STYLES)
def test_a_sentencepiece_tokenizer_is_llama_cpp_s_with_scores_and_token_types(style, spm_ckpts, tmp_path):
    meta = fields(gguf.GGUFReader(str(to_gguf(spm_ckpts[style], tmp_path / "m.gguf"))))
    tok = checkpoint.load_checkpoint(spm_ckpts[style]).tokenizer
    specials, bos, eos, prefix = SPM_STYLES[style]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] is prefix
    ids = {t: tok.hf.token_to_id(t) for t in [*specials, "<0x0A>", "▁the"]}
    assert tokens[ids["<0x0A>"]] == "<0x0A>" and types[ids["<0x0A>"]] == gguf.TokenType.BYTE
    assert types[ids["<unk>"]] == gguf.TokenType.UNKNOWN and types[ids[bos]] == gguf.TokenType.CONTROL
    assert types[ids["▁the"]] == gguf.TokenType.NORMAL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (ids[bos], ids[eos])
    assert meta["tokenizer.ggml.unknown_token_id"] == ids["<unk>"] and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_eos_token"] is False  # the post-processor puts the BOS first, nothing last
    # scores: minus the rank of the token's first merge, so llama.cpp joins pairs in the merges' order
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    made = ["".join(m) for m in merges]
    assert scores[ids["▁the"]] == -made.index("▁the") and scores[ids["<0x0A>"]] == 0.0


@pytest.mark.parametrize("style", SPM_STYLES)
def test_llama_cpp_tokenizes_a_sentencepiece_tokenizer_as_we_do(style, spm_ckpts, tmp_path):
    """Spaces first, runs of spaces, a tab, newlines, accents, an emoji and CJK (bytes: not in the vocabulary), code."""
    llama_cpp_or_skip()
    tok = checkpoint.load_checkpoint(spm_ckpts[style]).tokenizer
    llm = llama_cpp_model(to_gguf(spm_ckpts[style], tmp_path / "m.gguf"), 64)
    try:
        for text in SPM_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
        assert any(tok.hf.id_to_token(i).startswith("<0x") for i in tok.encode("🤖"))  # byte fallback was used
        assert llm.tokenize(b"Hello", add_bos=True) == tok.encode("Hello", add_special_tokens=True)
    finally:
        llm.close()


def test_llama_cpp_computes_our_greedy_tokens_with_a_sentencepiece_tokenizer(spm_ckpts, tmp_path):
    llama_cpp_or_skip()
    ckpt = spm_ckpts["llama"]
    diff, theirs, ours = compare_with_llama_cpp(ckpt, to_gguf(ckpt, tmp_path / "m.gguf"), " Pack my  box\nwith Köln")
    assert diff < 1e-4, diff
    assert theirs == ours and len(set(ours)) > 3


def test_sentencepiece_forms_llama_cpp_cannot_follow_are_refused_in_one_line():
    from tokenizers import normalizers, pre_tokenizers

    state = lambda x: json.loads(x.__getstate__())  # noqa: E731
    replace = state(normalizers.Replace(" ", "▁"))
    assert spm_space_prefix(state(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])),
                            None, {}) is True
    assert spm_space_prefix(replace, None, {}) is False
    assert spm_space_prefix(None, state(pre_tokenizers.Metaspace(prepend_scheme="never", split=False)), {}) is False
    cases = [(None, state(pre_tokenizers.Metaspace(prepend_scheme="first", split=False)), {}, "prepend_scheme 'first'"),
             (state(normalizers.NFKC()), None, {}, r"normalizer \(NFKC\)"),
             (None, None, {}, "writes spaces as spaces"),
             (None, state(pre_tokenizers.Metaspace(prepend_scheme="never")), {"a▁b": 0}, "Metaspace splits"),
             (replace, state(pre_tokenizers.Whitespace()), {}, r"pre-tokenizer \(Whitespace\)")]
    for normalizer, pre, vocab, message in cases:
        with pytest.raises(CheckpointError, match=message) as e:
            spm_space_prefix(normalizer, pre, vocab)
        assert "\n" not in str(e.value)
    # merges as a BPE trainer writes them: "ab" + "c" merged, but llama.cpp would also join "a" + "bc"
    with pytest.raises(CheckpointError, match="joins 'a' and 'bc'"):
        sentencepiece_ranks([("a", "b"), ("b", "c"), ("ab", "c")], ["abc"], {"a", "b", "c", "ab", "bc", "abc"})
    with pytest.raises(CheckpointError, match="not consecutive"):
        sentencepiece_ranks([("a", "bc"), ("b", "c"), ("ab", "c")], ["abc"], {"a", "b", "c", "bc", "abc"})
