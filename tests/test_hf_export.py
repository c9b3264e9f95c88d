"""Exports that transformers loads as they are: tokenizers, chat template, generation config, round trip."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_in_process
from safetensors.torch import load_file

from gpt import checkpoint, convert
from gpt.checkpoint import CheckpointError
from gpt.config import ModelConfig
from gpt.data.bpe import train_bpe
from gpt.data.chat_template import END_TOKEN, ChatTemplate
from gpt.data.tokenizer import CharTokenizer, TiktokenTokenizer
from gpt.infer.engine import complete
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT

transformers = pytest.importorskip("transformers")

# never seen in training: accents, Cyrillic, CJK, Arabic, emoji, digits, code and odd whitespace
HIDDEN = "Grüße aus Köln — Привет, мир! 東京の天気は晴れ。مرحبا بالعالم 🤖👍🏽 x = f(3.14)\n\tif a != b:  return\r\n"
MESSAGES = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "sun"}]


def save_random(folder: Path, tok, block_size: int = 48, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=tok.vocab_size)
    checkpoint.save_checkpoint(folder, GPT(cfg).state_dict(), {"model": asdict(cfg)}, tok)
    return folder


@pytest.fixture(scope="module")
def shakespeare() -> str:
    p = ROOT / "data" / "shakespeare" / "input.txt"
    if not p.is_file():
        pytest.skip("Tiny Shakespeare is not available offline")
    return p.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return train_bpe([shakespeare[:60_000]], 700, log=lambda line: None)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, bpe):
    """A custom-BPE base fine-tuned on a word -> word mapping: it learns to answer and end its turn."""
    from gpt.config import FinetuneConfig, load_config
    from gpt.train.sft import finetune

    tmp = tmp_path_factory.mktemp("chat")
    save_random(tmp / "base", bpe)
    pairs = {"sun": "moon", "cat": "dog", "red": "blue", "up": "down"}
    rows = [{"messages": [MESSAGES[0], {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs.items()]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    values = {"out_dir": tmp / "out", "init_from": tmp / "base", "data.path": tmp / "d.jsonl",
              "data.val_path": tmp / "d.jsonl", "train.max_iters": 80, "train.batch_size": 4,
              "train.eval_interval": 80, "train.eval_iters": 1, "train.device": "cpu", "train.dtype": "float32",
              "optim.lr": 1e-2, "optim.warmup_iters": 5, "logging.progress": False, "logging.sample_tokens": 0}
    finetune(load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in values.items()]))
    return tmp / "out" / "best"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe, chat_ckpt):
    """name -> (our checkpoint, exported folder) for GPT-2 BPE, custom BPE and the chat model."""
    tmp = tmp_path_factory.mktemp("export")
    ckpts = {"gpt2": save_random(tmp / "gpt2", TiktokenTokenizer("gpt2")), "bpe": save_random(tmp / "bpe", bpe),
             "chat": chat_ckpt}
    return {name: (c, convert.to_hf(c, tmp / f"hf_{name}")) for name, c in ckpts.items()}


@pytest.mark.parametrize("name", ["gpt2", "bpe", "chat"])
def test_autotokenizer_encodes_hidden_text_like_ours(exported, name):
    ckpt, folder = exported[name]
    loaded = checkpoint.load_checkpoint(ckpt)
    model, tok = loaded.model, loaded.tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.encode(HIDDEN) == tok.encode(HIDDEN)
    assert hf_tok.decode(tok.encode(HIDDEN)) == HIDDEN
    assert hf_tok.model_max_length == model.config.block_size
    assert json.loads((folder / "config.json").read_text())["n_positions"] == model.config.block_size


def test_chat_template_end_of_turn_and_greedy_generation_match(exported):
    ckpt, folder = exported["chat"]
    loaded = checkpoint.load_checkpoint(ckpt)
    model, tok = loaded.model, loaded.tokenizer
    template = ChatTemplate(tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = template.encode(MESSAGES, add_generation_prompt=True)
    assert list(hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)) == ours
    assert hf_tok.eos_token == END_TOKEN and hf_tok.eos_token_id == tok.special_id(END_TOKEN)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.special_id(END_TOKEN), tok.eot_id]

    [reply] = complete(model.eval(), tok, ours, SamplingParams(temperature=0, max_tokens=20),
                       stop_ids=template.stop_ids + [tok.eot_id])
    assert reply.finish_reason == "eos" and reply.token_ids[-1] == tok.special_id(END_TOKEN)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ours]), do_sample=False, max_new_tokens=20)
    assert out[0, len(ours):].tolist() == reply.token_ids  # the same tokens, ending at <|end|>
    assert reply.text == "moon"


def test_generate_matches_sample_py_greedy_on_a_custom_bpe_model(exported, capsys):
    ckpt, folder = exported["bpe"]
    proc = run_in_process(capsys, "sample.py", "--ckpt", ckpt, "--prompt", "ROMEO: Grüße 東京", "--max-new-tokens", 12,
                          "--temperature", 0, "--json", "--device", "cpu", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout.splitlines()[-1])["token_ids"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = hf_tok("ROMEO: Grüße 東京", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(prompt, do_sample=False, max_new_tokens=12)
    assert out[0, prompt.shape[1]:].tolist() == ours


def test_text_generation_pipeline_runs_with_no_extra_arguments(exported):
    plain = transformers.pipeline("text-generation", model=str(exported["bpe"][1]))
    assert plain("First Citizen:")[0]["generated_text"].startswith("First Citizen:")  # stops at the block size
    _, folder = exported["chat"]
    generate = transformers.pipeline("text-generation", model=str(folder))
    chat = generate(MESSAGES)[0]["generated_text"]  # the pipeline samples by default
    assert chat[-1]["role"] == "assistant" and END_TOKEN not in chat[-1]["content"]
    assert generate(MESSAGES, do_sample=False)[0]["generated_text"][-1]["content"] == "moon"


@pytest.mark.parametrize("name", ["gpt2", "bpe", "chat"])
def test_round_trip_keeps_weights_bit_exact_and_the_tokenizer_identical(exported, tmp_path, name, capsys):
    ckpt, folder = exported[name]
    back = convert.from_hf(str(folder), tmp_path / "back")
    assert "chat template of its own" not in capsys.readouterr().out
    w1, w2 = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert (ckpt / "tokenizer.json").read_text() == (back / "tokenizer.json").read_text()


def test_character_tokenizer_exports_faithfully(tmp_path, shakespeare):
    text = shakespeare[:5000]
    tok = CharTokenizer.from_text(text)
    folder = convert.to_hf(save_random(tmp_path / "c", tok), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.encode(text) == tok.encode(text) and hf_tok.decode(tok.encode(text)) == text
    with pytest.raises(Exception):  # like ours, a character outside the vocabulary cannot be encoded
        hf_tok.encode("東")
    back = convert.from_hf(str(folder), tmp_path / "back")
    assert (back / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()


def test_unfaithful_tokenizer_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    tok = CharTokenizer(list("abc"))
    ckpt = save_random(tmp_path / "c", tok)
    real = convert.chars_to_hf
    monkeypatch.setattr(convert, "chars_to_hf", lambda t, s: real(CharTokenizer(list("bac")), s))
    with pytest.raises(CheckpointError, match="char tokenizer has no faithful Hugging Face form"):
        convert.to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
