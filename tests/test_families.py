"""Llama, Qwen2, Qwen3, Mistral and Gemma 3 against transformers: logits, greedy tokens, export and import.

Each family is a random transformers model with odd shapes (hidden 48, 6 query / 2 key-value heads,
head_dim 16 where the family allows it, intermediate 80, a 300-token BPE built here), its weights scaled
up so predictions are confident (flat logits hide bugs). Gemma 3 and Mistral slide a window shorter than
the sequences generated.
"""

import json
from dataclasses import asdict

import pytest
import torch
from conftest import load_hf_model, write_hf_model, write_hf_tokenizer
from safetensors.torch import load_file

from gpt import checkpoint, convert
from gpt.checkpoint import CheckpointError
from gpt.config import ModelConfig
from gpt.data import tokenizer as tokenizers
from gpt.data.tokenizer import HFTokenizer, TokenizerError
from gpt.infer.engine import generate
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT

transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")

SHAPE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=16, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=1e5,
        rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0}, rms_norm_eps=1e-6)),
}
TEXT = ("The quick brown fox jumps over the lazy dog. Grüße aus Köln! 東京 🤖 x = f(3.14)\n"
        "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.\n") * 20
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> a saved random transformers model folder (fp32) with a ~300-token byte-level BPE."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        folder = root / name
        folder.mkdir()
        config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": CHAT_TEMPLATE}
        vocab = write_hf_tokenizer(folder, TEXT, SPECIALS, config, prefix="<|im_start|>").get_vocab_size()
        write_hf_model(folder, config_cls, model_cls, **{**SHAPE, "vocab_size": vocab, **extra})
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
        out[name] = folder
    return out


def greedy_theirs(model, prompt, n=100):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(family, hf_dirs):
    ref = load_hf_model(hf_dirs[family])
    ours = convert.load_hf_folder(hf_dirs[family]).model.eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(ids).logits, rtol=0, atol=1e-4)
    prompt = ids[:1, :10]
    got = generate(ours, prompt, 100, SamplingParams(temperature=0))
    assert torch.equal(got, greedy_theirs(ref, prompt))
    assert len(set(got[0, 10:].tolist())) > 5  # not a constant stream


def test_family_options_read_from_the_configs(hf_dirs):
    cfg = {name: convert.load_hf_folder(folder).model.config for name, folder in hf_dirs.items()}
    assert (cfg["llama"].rope_scaling, cfg["llama"].rope_factor, cfg["llama"].rope_original_context) == ("llama3", 8.0, 32)
    assert cfg["llama"].tie_embeddings and not cfg["qwen2"].tie_embeddings and cfg["qwen2"].qkv_bias
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].head_dim == 16 and cfg["qwen3"].kv_heads == 2
    assert (cfg["mistral"].sliding_window, cfg["mistral"].sliding_window_pattern) == (24, 0)
    g = cfg["gemma3"]
    assert (g.sliding_window, g.sliding_window_pattern, g.rope_local_theta, g.rope_theta) == (16, 2, 1e4, 1e5)
    assert g.post_norms and g.embed_scale and g.norm_offset == 1.0 and g.mlp == "geglu" and g.logit_softcap == 30.0


@pytest.mark.parametrize("family", FAMILIES)
def test_export_import_is_bit_exact_and_transformers_loads_the_export(family, hf_dirs, tmp_path):
    ours = convert.from_hf(str(hf_dirs[family]), tmp_path / "ours")
    exported = convert.to_hf(ours, tmp_path / "hf")
    again = convert.from_hf(str(exported), tmp_path / "again")
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tokenizers.load(ours / "tokenizer.json").to_spec() == tokenizers.load(again / "tokenizer.json").to_spec()
    original, reloaded = load_file(str(hf_dirs[family] / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert all(torch.equal(original[k], reloaded[k]) for k in reloaded)
    model = checkpoint.load_checkpoint(ours).model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy_theirs(load_hf_model(exported), prompt, 40), generate(model, prompt, 40, SamplingParams(temperature=0)))


def test_shipped_tokenizer_round_trips_through_the_checkpoint_spec(hf_dirs, tmp_path):
    folder = hf_dirs["qwen3"]
    tok = HFTokenizer.from_folder(folder)
    shipped = hf_tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "Grüße aus Köln! 東京 🤖 the lazy dog<|im_end|>"
    ids = tok.encode(text)
    plain = text.removesuffix("<|im_end|>")
    assert tok.encode(plain) == shipped.encode(plain, add_special_tokens=False).ids  # the file as shipped
    assert 2 not in ids and tok.decode(ids) == text  # special-token text stays text
    assert tok.encode(text, split_special_tokens=False)[-1] == 2  # unless asked: a rendered chat template
    assert tok.encode("dog", add_special_tokens=True)[0] == 1  # the file's post-processor adds BOS when asked
    assert (tok.bos_id, tok.eos_ids, tok.eot_id) == (1, [2, 0], 2)
    assert tok.chat_template == CHAT_TEMPLATE and tok.special_tokens["<|im_end|>"] == 2
    assert tok.vocab_size == shipped.get_vocab_size()
    piece = tok.encode("東京")
    assert b"".join(tok.decode_bytes([i]) for i in piece) == "東京".encode()  # bytes, even inside a character
    tokenizers.save(tok, tmp_path / "tok.json")
    back = tokenizers.load(tmp_path / "tok.json")
    assert back.to_spec() == tok.to_spec() and back.encode(text) == ids
    spec = json.loads((tmp_path / "tok.json").read_text())
    spec["tokenizer_json"] = spec["tokenizer_json"].replace("<|im_end|>", "<|im_END|>")
    (tmp_path / "tok.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="checksum mismatch"):
        tokenizers.load(tmp_path / "tok.json")


def test_checkpoint_saved_with_the_old_config_keys_loads_the_same(tmp_path):
    """A checkpoint written before the family options (its config has none of the new keys) is GPT-2."""
    old_keys = ["block_size", "vocab_size", "vocab_multiple", "n_layer", "n_head", "n_embd", "dropout", "bias",
                "gelu", "fused_loss"]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=30)).eval()
    record = {k: v for k, v in asdict(model.config).items() if k in old_keys}
    checkpoint.save_checkpoint(tmp_path / "c", model.state_dict(), {"model": record}, tokenizers.CharTokenizer(list("ab")))
    loaded = checkpoint.load_checkpoint(tmp_path / "c").model.eval()
    assert loaded.config == model.config and sorted(loaded.state_dict()) == sorted(model.state_dict())
    ids = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_untied_head_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=30, tie_embeddings=False,
                      position="rope", norm="rmsnorm", mlp="swiglu")
    model = GPT(cfg)
    assert model.lm_head.weight is not model.transformer.wte.weight
    checkpoint.save_checkpoint(tmp_path / "c", model.state_dict(), {"model": asdict(cfg)}, tokenizers.CharTokenizer(list("ab")))
    loaded = checkpoint.load_checkpoint(tmp_path / "c").model
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_exports_without_a_faithful_form_are_refused(tmp_path):
    tok = tokenizers.CharTokenizer(list("ab"))
    for name, extra in [("rope_layernorm", dict(position="rope")), ("gpt2_rmsnorm", dict(norm="rmsnorm"))]:
        cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=30, **extra)
        checkpoint.save_checkpoint(tmp_path / name, GPT(cfg).state_dict(), {"model": asdict(cfg)}, tok)
        with pytest.raises(CheckpointError, match="has no Hugging Face .* form"):
            convert.to_hf(tmp_path / name, tmp_path / f"hf_{name}")
        assert not (tmp_path / f"hf_{name}").exists()


def test_lora_targets_the_fused_projections_of_a_family(hf_dirs):
    """c_attn (q, k, v with GQA), c_fc (gate, up) and c_proj: the same names as GPT-2's, merged exactly."""
    from gpt.config import LoRAConfig
    from gpt.lora import apply_lora, merged_state_dict

    model = convert.load_hf_folder(hf_dirs["qwen3"]).model.eval()
    names = apply_lora(model, LoRAConfig(rank=2, targets=["c_attn", "c_proj", "c_fc"]))
    assert len(names) == 4 * 3
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged = GPT(model.config).eval()
    merged.load_state_dict(merged_state_dict(model))
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)[0], model(ids)[0], rtol=0, atol=1e-4)
