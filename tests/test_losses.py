"""The fused (chunked) head + loss computes the same function as the plain head + cross-entropy."""

import pytest
import torch

from gpt.config import ModelConfig
from gpt.losses import IGNORE_INDEX, cross_entropy, linear_cross_entropy
from gpt.model import GPT


def inputs(n=40, c=16, v=70):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(v, c, generator=g)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    return x, w, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_same_loss_and_grads_as_plain_fp32(reduction):
    x, w, t = inputs()
    plain = cross_entropy(x @ w.t(), t, reduction)
    fused = linear_cross_entropy(x, w, t, reduction, chunk_rows=7)  # 6 chunks, the last one short
    assert torch.allclose(plain, fused, atol=1e-5, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(plain, (x, w)), torch.autograd.grad(fused, (x, w))):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_buffer_folded_many_times_and_a_scaled_backward_agree():
    x, w, t = inputs()  # C = 16: chunks of 7 rows are folded into the head's gradient 14 rows at a time
    plain = cross_entropy(x @ w.t(), t) * 0.25  # a scaled loss, as with gradient accumulation
    fused = linear_cross_entropy(x, w, t, chunk_rows=7) * 0.25
    for a, b in zip(torch.autograd.grad(plain, (x, w)), torch.autograd.grad(fused, (x, w))):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_a_second_backward_through_the_fused_loss_is_refused_not_double_scaled():
    x, w, t = inputs()
    loss = linear_cross_entropy(x, w, t, chunk_rows=7) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused_loss=off"):
        loss.backward()


def test_all_ignored_is_zero_with_zero_grads_and_no_grad_path_agrees():
    x, w, t = inputs()
    loss = linear_cross_entropy(x, w, torch.full_like(t, IGNORE_INDEX), chunk_rows=9)
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, (x, w)))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t, chunk_rows=9), cross_entropy(x @ w.t(), t), atol=1e-5)


def test_under_bf16_autocast_close_to_plain_and_grads_keep_param_dtype():
    x, w, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = cross_entropy(x @ w.t(), t)
        fused = linear_cross_entropy(x, w, t, chunk_rows=16)
    gp, gf = torch.autograd.grad(plain, (x, w)), torch.autograd.grad(fused, (x, w))
    assert abs(plain.item() - fused.item()) < 1e-2
    assert gf[1].dtype == torch.float32
    for a, b in zip(gp, gf):
        assert torch.allclose(a, b, atol=2e-3)


def test_model_fused_loss_on_matches_off_and_trains_the_tied_head():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16, fused_loss="off")
    plain = GPT(cfg)
    fused = GPT(ModelConfig(**{**cfg.__dict__, "fused_loss": "on"}))
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (3, 16))
    targets = idx.roll(-1, dims=1)
    targets[0, :5] = IGNORE_INDEX
    logits, a = plain(idx, targets)
    none, b = fused(idx, targets)
    assert logits is not None and none is None  # the fused path never builds the logits
    assert torch.allclose(a, b, atol=1e-5)
    a.backward()
    b.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert fused(idx)[0].shape == (3, 16, 97)  # no targets: logits as before
    per_token = fused(idx, targets, reduction="none")[1]  # DPO's per-token losses: the plain path
    assert per_token.shape == (3, 16) and torch.allclose(per_token.sum(), b.detach() * (targets >= 0).sum(), atol=1e-4)
