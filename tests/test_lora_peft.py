"""A LoRA run's adapter loads in PEFT (`PeftModel.from_pretrained`) on transformers' model of our to-hf
export of the base and computes our LoRA model's logits: GPT-2 (Conv1D, fan_in_fan_out) through finetune.py's
out_dir/adapter, and a Llama (fused q/k/v and gate/up split into PEFT's per-projection adapters)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict

import pytest
import torch
from conftest import chat_template, load_hf_model, qa, sft_config, write_jsonl

from gpt import checkpoint, convert
from gpt.checkpoint import load_checkpoint
from gpt.config import LoRAConfig, ModelConfig
from gpt.lora import apply_lora
from gpt.lora_peft import write_peft_adapter
from gpt.model import GPT
from gpt.train.sft import finetune

# peft is imported where it is used: its import takes seconds, and every pytest worker collects this module
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install -e '.[dev]')")


def peft_logits(hf_dir, adapter, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base logits, logits with the adapter) of transformers' model of `hf_dir`."""
    import peft

    base = load_hf_model(hf_dir)
    with torch.no_grad():
        plain = base(ids).logits
        return plain, peft.PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits


def test_a_gpt2_lora_finetune_writes_a_peft_adapter_of_its_final_weights(tmp_path):
    tok = chat_template().tok  # the base has the chat tokens: the run adds none, so the export is its base
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=tok.vocab_size)
    checkpoint.save_checkpoint(tmp_path / "base", GPT(cfg).state_dict(), {"model": asdict(cfg)}, tok)
    data = write_jsonl(tmp_path / "qa.jsonl", [qa(f"{w}?", f"{w[::-1]}.") for w in ["cat", "sun", "red", "big"]])
    finetune(sft_config(tmp_path, tmp_path / "base", data, **{"lora.rank": 4, "optim.lr": 5e-2, "train.max_iters": 4,
                                                               "train.eval_interval": 4}))
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["fan_in_fan_out"] and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    hf = convert.to_hf(tmp_path / "base", tmp_path / "hf")
    ids = torch.tensor([tok.encode("cat? tac. sun?")])
    plain, tuned = peft_logits(hf, adapter, ids)
    ours = load_checkpoint(tmp_path / "out" / "latest").model.eval()  # the merged LoRA model
    with torch.no_grad():
        expected = ours(ids)[0]
    assert (plain - expected).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(tuned, expected, atol=1e-4, rtol=0)


def test_a_llama_lora_on_fused_projections_splits_into_peft_per_projection_adapters(tmp_path):
    from test_family_workflows import FAMILIES, SHAPE, build_tokenizer, lively

    from gpt.data.tokenizer import HFTokenizer

    (tmp_path / "tok").mkdir()
    build_tokenizer(tmp_path / "tok")
    tok = HFTokenizer.from_folder(tmp_path / "tok")
    torch.manual_seed(0)
    model = lively(GPT(ModelConfig(**SHAPE, **FAMILIES["llama"], vocab_size=tok.vocab_size)))
    checkpoint.save_checkpoint(tmp_path / "base", model.state_dict(), {"model": asdict(model.config)}, tok)
    hf = convert.to_hf(tmp_path / "base", tmp_path / "hf")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["c_attn", "c_proj", "c_fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    adapter = write_peft_adapter(model, LoRAConfig(rank=4, alpha=8.0), tmp_path / "adapter", "base")
    names = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.0.self_attn.k_proj" in names and "model.layers.1.mlp.gate_proj" in names
    ids = torch.tensor([tok.encode("The quick brown fox jumps")])
    plain, tuned = peft_logits(hf, adapter, ids)
    with torch.no_grad():
        expected = model.eval()(ids)[0]
    assert (plain - expected).abs().max() > 1e-2
    torch.testing.assert_close(tuned, expected, atol=1e-4, rtol=0)
