"""Weight-only int8: close to the float model, same greedy tokens, decodes through the engine."""

import dataclasses
import json

import torch
from conftest import run_in_process

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.data.tokenizer import CharTokenizer
from gpt.infer.engine import generate
from gpt.infer.quantize import Int8Linear, quantize_int8
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT

GREEDY = SamplingParams(temperature=0)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


def test_int8_linear_matches_float_within_quantization_error_on_both_paths():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,)
    for rows in (1, 40):  # the int8 kernel (few rows) and dequantize-then-matmul (prefill)
        x = torch.randn(rows, 64)
        err = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
        assert err < 2e-2


def test_quantized_model_keeps_float_embedding_and_greedy_tokens():
    model, ref = tiny(), tiny()
    quantize_int8(model)
    assert isinstance(model.lm_head, Int8Linear) and model.transformer.wte.weight.dtype == torch.float32
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    logits, ref_logits = model(idx)[0], ref(idx)[0]
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    out = generate(model, idx, 12, GREEDY)  # cached decoding through the model's own modules
    assert out.shape == (2, 20)
    assert (out == generate(ref, idx, 12, GREEDY)).float().mean() > 0.8



def test_sample_script_quantize_int8(tmp_path, capsys):
    model = tiny()
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?:;'\n-"))
    save_checkpoint(tmp_path / "best", model.state_dict(), {"model": dataclasses.asdict(model.config)}, tok)
    proc = run_in_process(capsys, "sample.py", "--ckpt", tmp_path, "--prompt", "Hi", "--temperature", 0,
                          "--max-new-tokens", 8, "--json", "--quantize", "int8", "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout.splitlines()[0])["token_ids"]) == 8
