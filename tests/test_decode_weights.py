"""Decoding's weight layout (gpt/infer/weights.py) computes the same function as the trained model."""

import torch

from gpt.config import ModelConfig
from gpt.infer.engine import generate
from gpt.infer.quantize import Int8Linear
from gpt.infer.sampling import SamplingParams
from gpt.infer.weights import MatVecLinear, prepare_for_decoding
from gpt.model import GPT


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=True))


def test_fp32_cpu_layout_is_column_major_with_the_same_logits_and_greedy_tokens():
    model, ref = tiny(), tiny().eval()
    prepare_for_decoding(model, torch.float32)
    assert not model.training
    w = model.transformer.h[0].mlp.c_fc.weight
    assert w.shape == (128, 32) and w.stride() == (1, 128)  # same shape, transposed in memory
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied
    idx = torch.randint(0, 64, (3, 20))
    assert torch.allclose(model(idx)[0], ref(idx)[0], atol=1e-5)
    greedy = SamplingParams(temperature=0)
    assert torch.equal(generate(model, idx, 12, greedy), generate(ref, idx, 12, greedy))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())


def test_bf16_keeps_row_major_and_int8_replaces_the_linears():
    bf16 = prepare_for_decoding(tiny(), torch.bfloat16)
    w = bf16.transformer.h[0].mlp.c_fc.weight
    assert w.dtype == torch.bfloat16 and w.is_contiguous()
    int8 = prepare_for_decoding(tiny(), torch.float32, "int8")
    assert isinstance(int8.transformer.h[0].mlp.c_fc, Int8Linear)


def test_bf16_cpu_linears_take_one_row_as_a_matrix_vector_product_with_the_same_values():
    """A batch-1 decode step (one row) goes through addmv; the cached step's logits and the greedy tokens are
    the ones nn.Linear gives, and several rows still go through nn.Linear."""
    model, ref = prepare_for_decoding(tiny(), torch.bfloat16), tiny().to(torch.bfloat16).eval()
    fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(fc, MatVecLinear) and isinstance(model.lm_head, MatVecLinear)
    for rows in (torch.randn(1, 1, 32), torch.randn(3, 2, 32)):
        rows = rows.to(torch.bfloat16)
        assert torch.allclose(fc(rows).float(), torch.nn.functional.linear(rows, fc.weight, fc.bias).float(),
                              atol=2e-2, rtol=2e-2)
    idx = torch.randint(0, 64, (1, 20))
    greedy = SamplingParams(temperature=0)
    assert torch.equal(generate(model, idx, 12, greedy), generate(ref, idx, 12, greedy))
