"""GPT-2 weights from and to Hugging Face format, checked against transformers itself."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file, save_file

from gpt import checkpoint, convert
from gpt.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_hf(model, folder, safetensors=True):
    model.save_pretrained(folder)
    if not safetensors:  # the older pickle format, as many hub repos still ship it
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def greedy(step, ids, n):
    for _ in range(n):
        nxt = step(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("safetensors", [True, False])
def test_import_matches_transformers(tmp_path, hf_model, safetensors):
    src = save_hf(hf_model, tmp_path / "hf", safetensors)
    assert (src / ("model.safetensors" if safetensors else "pytorch_model.bin")).is_file()
    convert.main(["from-hf", str(src), str(tmp_path / "ours")])
    loaded = checkpoint.load_checkpoint(tmp_path / "ours")
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    assert tok.to_spec()["name"] == "gpt2"
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf_model(ids).logits
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
        a = greedy(lambda x: model(x)[0], ids[:1, :5], 15)
        b = greedy(lambda x: hf_model(x).logits, ids[:1, :5], 15)
    assert torch.equal(a, b)


def test_round_trip_is_bit_identical_and_loads_cleanly(tmp_path, hf_model):
    src = save_hf(hf_model, tmp_path / "hf")
    convert.from_hf(str(src), tmp_path / "ours")
    convert.to_hf(tmp_path / "ours", tmp_path / "hf2")
    convert.from_hf(str(tmp_path / "hf2"), tmp_path / "ours2")
    w1 = load_file(str(tmp_path / "ours" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "ours2" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(ids).logits, hf_model(ids).logits, atol=1e-6)


def test_exported_tokenizer_encodes_like_tiktoken(tmp_path, hf_model):
    convert.from_hf(str(save_hf(hf_model, tmp_path / "hf")), tmp_path / "ours")
    convert.to_hf(tmp_path / "ours", tmp_path / "hf2")
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf2")
    tok = checkpoint.load_checkpoint(tmp_path / "ours").tokenizer
    for text in ["Hello, world!", "  indented\n\ttabs", "naïve café 東京 🤖", "ROMEO: O, she doth teach"]:
        assert hf_tok.encode(text) == tok.encode(text), text


def test_our_trained_checkpoint_exports(tmp_path):
    from gpt.config import ModelConfig
    from gpt.data.tokenizer import CharTokenizer
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=70, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    checkpoint.save_checkpoint(tmp_path / "c", model.state_dict(), {"model": {"vocab_size": 70, "block_size": 16,
                               "n_layer": 1, "n_head": 2, "n_embd": 16}}, CharTokenizer(list("abc")))
    convert.to_hf(tmp_path / "c", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 70, (1, 10))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-5)


def test_bias_free_models_export_with_zero_biases_and_the_same_logits(tmp_path):
    """model.bias=false (the shipped Shakespeare config) exports: GPT-2's biases are written as zeros."""
    from gpt.config import ModelConfig
    from gpt.data.tokenizer import CharTokenizer
    from gpt.model import GPT

    cfg = {"vocab_size": 10, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8, "bias": False}
    torch.manual_seed(0)
    model = GPT(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # LayerNorm gains too: a zero bias must not hide a misplaced gain
    checkpoint.save_checkpoint(tmp_path / "c", model.state_dict(), {"model": cfg}, CharTokenizer(list("abcdefghij")))
    convert.to_hf(tmp_path / "c", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-5)


def test_missing_or_misshapen_tensor_is_named(tmp_path, hf_model):
    src = save_hf(hf_model, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    broken = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    save_file(broken, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: transformer\.h\.1\.mlp\.c_fc\.weight"):
        convert.from_hf(str(src), tmp_path / "o1")
    broken = dict(state)
    broken["transformer.h.0.ln_1.weight"] = torch.ones(31)
    save_file(broken, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer\.h\.0\.ln_1\.weight \(file \(31,\)"):
        convert.from_hf(str(src), tmp_path / "o2")


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "phi", "architectures": ["PhiForCausalLM"]}))
    proc = subprocess.run([sys.executable, "-m", "gpt.convert", "from-hf", str(tmp_path / "bad"), str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {tmp_path / 'bad'}: architecture 'PhiForCausalLM' is not supported; supported: GPT2LMHeadModel, "
        "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Gemma3ForCausalLM")


def test_train_init_from_hf_dir(tmp_path, hf_model, tiny_corpus):
    from gpt.config import PretrainConfig, load_config
    from gpt.train.pretrain import pretrain

    src = save_hf(hf_model, tmp_path / "hf")
    args = tiny_overrides(tmp_path, tiny_corpus, **{"init_from": str(src), "data.tokenizer": "gpt2",
                                                    "train.max_iters": 4, "train.eval_interval": 2})
    args = [a for a in args if not a.startswith("model.")]
    cfg = load_config(PretrainConfig, None, args)
    result = pretrain(cfg)
    assert result.step == 4
    model = checkpoint.load_checkpoint(tmp_path / "out", prefer="latest").model
    assert model.config.n_embd == 32 and model.config.vocab_size == 50257
