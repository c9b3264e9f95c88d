"""PEFT LoRA adapter folders read back: an adapter `peft` made on a random transformers GPT-2 or Llama, loaded
by us on its base (load_pretrained, sample.py's loader), computes PeftModel's logits; our export imports to the
same weights; init_from an adapter folder trains the adapter on; what our LoRA cannot compute is refused."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace

import pytest
import torch
from conftest import chat_template, write_base, load_hf_model, qa, sft_config, write_hf_model, write_hf_tokenizer, write_jsonl
from safetensors.torch import load_file, save_file
from test_families import CHAT_TEMPLATE, FAMILIES, SHAPE, SPECIALS, TEXT

from gpt.config import ConfigError, FinetuneConfig, LoRAConfig, ModelConfig, PretrainConfig
from gpt.infer.weights import load_for_decoding
from gpt.lora import LoRALinear, apply_lora
from gpt.lora_peft import AdapterError, write_peft_adapter
from gpt.pretrained import load_init_from, load_pretrained

# peft is imported where it is used: its import takes seconds, and every pytest worker collects this module
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install -e '.[dev]')")


def hf_folder(folder, config_cls, model_cls, **shape):
    folder.mkdir()
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    vocab = write_hf_tokenizer(folder, TEXT, SPECIALS, config).get_vocab_size()
    write_hf_model(folder, config_cls, model_cls, **shape, vocab_size=vocab)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 Hugging Face folder: our random base's to-hf export (n_embd 32, character vocabulary)."""
    from gpt import convert

    root = tmp_path_factory.mktemp("peft")
    return convert.to_hf(write_base(root / "ours"), root / "gpt2")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    config_cls, model_cls, extra = FAMILIES["llama"]
    return hf_folder(tmp_path_factory.mktemp("peft") / "llama", config_cls, model_cls, **SHAPE, **extra)


def peft_adapter(hf_dir, folder, **lora):
    """A PeftModel on transformers' model of `hf_dir` with random (non-zero) adapters, saved in `folder`."""
    import peft

    model = peft.get_peft_model(load_hf_model(hf_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


IDS = torch.tensor([[5, 40, 77, 3, 120, 9, 250, 31, 64, 2, 18, 99]])


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_a_peft_adapter_loads_on_its_base_with_peft_logits(case, gpt2, llama, tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out) with rsLoRA; a Llama adapted on q and v but not k (separate A's on our
    fused c_attn), o, and the MLP: our merged model, as gpt.eval and sample.py load it, computes PeftModel's
    logits; the adapter re-exported from our layers is the same adapter, tensor for tensor."""
    hf_dir = {"gpt2": gpt2, "llama": llama}[case]
    targets = (["c_attn", "c_proj", "c_fc"] if case == "gpt2"
               else ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs = peft_adapter(hf_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=targets,
                          fan_in_fan_out=case == "gpt2", use_rslora=case == "gpt2")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_dir)
    ids = IDS % theirs.config.vocab_size
    expected = logits(theirs, ids)
    with theirs.disable_adapter():
        assert (logits(theirs, ids) - expected).abs().max() > 1e-2  # the adapter changes the model
    scored = load_pretrained(tmp_path / "adapter").model.eval()
    torch.testing.assert_close(logits(scored, ids), expected, atol=1e-4, rtol=0)
    args = Namespace(ckpt=str(tmp_path / "adapter"), no_verify=False, quantize=None)
    decoding = load_for_decoding(args, torch.device("cpu"), torch.float32).model
    torch.testing.assert_close(logits(decoding, ids), expected, atol=1e-4, rtol=0)

    layers = load_pretrained(tmp_path / "adapter", merge=False).model
    blocked = [m for m in layers.modules() if isinstance(m, LoRALinear) and m.blocks]
    assert bool(blocked) == (case == "llama")
    layers.train()(ids, ids)[1].backward()  # training moves each projection's own block only (k_proj none)
    for m in blocked:
        assert m.lora_B.grad.abs().sum() > 0 and not (m.lora_B.grad * (1 - m.mask)).any()
    again = write_peft_adapter(layers, LoRAConfig(), tmp_path / "again", str(hf_dir))
    ours, original = load_file(again / "adapter_model.safetensors"), load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(ours[key], original[key], atol=1e-6, rtol=0)
    import peft

    reloaded = peft.PeftModel.from_pretrained(load_hf_model(hf_dir), str(again)).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_our_export_imports_to_the_same_adapters(llama, tmp_path):
    """Our LoRA on fused q/k/v and gate/up, exported per projection, comes back as the same layers: one shared
    A of rank r (not blocks), bit for bit, and the same logits."""
    model = load_pretrained(llama).model.eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["c_attn", "c_proj", "c_fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    write_peft_adapter(model, LoRAConfig(rank=4, alpha=8.0), tmp_path / "adapter", str(llama))
    back = load_pretrained(tmp_path / "adapter", merge=False).model.eval()
    assert all(m.blocks is None for m in back.modules() if isinstance(m, LoRALinear))
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(back, IDS), logits(model, IDS))


def test_init_from_an_adapter_folder_trains_the_adapter_on(tmp_path):
    """A LoRA fine-tune's out_dir/adapter as init_from: the run starts where the first one ended (same
    validation loss), trains the adapter's layers only, and writes an adapter for the original base."""
    from dataclasses import asdict

    from gpt import checkpoint, convert
    from gpt.model import GPT
    from gpt.train.sft import finetune
    from test_lora_peft import peft_logits

    tok = chat_template().tok
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=tok.vocab_size)
    checkpoint.save_checkpoint(tmp_path / "base", GPT(cfg).state_dict(), {"model": asdict(cfg)}, tok)
    data = write_jsonl(tmp_path / "qa.jsonl", [qa(f"{w}?", f"{w[::-1]}.") for w in ["cat", "sun", "red", "big"]])
    run = {"optim.lr": 5e-2, "train.max_iters": 4, "train.eval_interval": 4}
    first = finetune(sft_config(tmp_path, tmp_path / "base", data, **run, **{"lora.rank": 4}))
    with pytest.raises(ConfigError, match="lora.rank"):
        finetune(sft_config(tmp_path / "x", tmp_path / "out" / "adapter", data, **run, **{"lora.rank": 4}))
    finetune(sft_config(tmp_path / "more", tmp_path / "out" / "adapter", data, **run))
    out = tmp_path / "more" / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert next(r["val_loss"] for r in records if "val_loss" in r) == pytest.approx(first.last_val_loss, abs=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["r"] == 4
    before, after = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / "out" / "adapter", out / "adapter"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    merged, base = checkpoint.load_checkpoint(out / "latest").model, checkpoint.load_checkpoint(tmp_path / "base").model
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)  # only the adapted layers moved
    hf = convert.to_hf(tmp_path / "base", tmp_path / "hf")
    ids = torch.tensor([tok.encode("cat? tac. sun?")])
    _, tuned = peft_logits(hf, out / "adapter", ids)
    torch.testing.assert_close(tuned, logits(merged.eval(), ids), atol=1e-4, rtol=0)


def edited(src, dst, config=None, tensors=None):
    """A copy of adapter folder `src` with its config keys updated and `tensors` added."""
    dst.mkdir()
    c = {**json.loads((src / "adapter_config.json").read_text()), **(config or {})}
    (dst / "adapter_config.json").write_text(json.dumps(c))
    save_file({**load_file(src / "adapter_model.safetensors"), **(tensors or {})}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("config, tensors, message", [
    ({"use_dora": True}, None, "use_dora=True: DoRA is not supported"),
    ({"bias": "lora_only"}, None, "bias='lora_only': trained biases"),
    ({"rank_pattern": {"c_attn": 8}}, None, "rank_pattern"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"peft_type": "IA3"}, None, "peft_type 'IA3'"),
    (None, {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, "module lm_head is not supported"),
    (None, {"base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector": torch.zeros(96)}, "not a LoRA A or B"),
    ({"base_model_name_or_path": "org/base-model"}, None, "'org/base-model' (base_model_name_or_path) is not a local"),
])
def test_what_our_lora_cannot_compute_is_refused_by_name(gpt2, tmp_path, config, tensors, message):
    peft_adapter(gpt2, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pretrained(edited(tmp_path / "adapter", tmp_path / "bad", config, tensors))


def test_pretraining_refuses_an_adapter_and_adapter_base_needs_one(gpt2, tmp_path):
    peft_adapter(gpt2, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ConfigError, match="PEFT adapter folder: fine-tune"):
        load_init_from(PretrainConfig(init_from=str(tmp_path / "adapter"), out_dir=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="adapter_base applies"):
        load_init_from(FinetuneConfig(init_from=str(gpt2), adapter_base=str(gpt2), out_dir=str(tmp_path / "o")))
    moved = edited(tmp_path / "adapter", tmp_path / "moved", {"base_model_name_or_path": "org/elsewhere"})
    loaded = load_init_from(FinetuneConfig(init_from=str(moved), adapter_base=str(gpt2), out_dir=str(tmp_path / "o")))
    assert sum(isinstance(m, LoRALinear) for m in loaded.model.modules()) == 2  # c_attn of both blocks
