"""The model: shapes, causality, packed documents, cache layout, helpers."""

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.model import CAUSAL, GPT, IGNORE_INDEX, KVCache, attention_mask, matmul_attention


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(cfg).eval()


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 50) and loss is None
    logits, loss = model(idx, idx)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # ~uniform at init
    last, _ = model(idx, logits_to_keep=1)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)


def test_later_tokens_never_change_earlier_logits():
    model = tiny()
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, 7:] = torch.randint(0, 50, (5,))
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :7], lb[0, :7], atol=1e-6)
    assert not torch.allclose(la[0, 7:], lb[0, 7:], atol=1e-4)


def test_packed_documents_do_not_see_each_other():
    model = tiny()
    d1, d2 = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 5))
    packed = torch.cat([d1, d2], dim=1)
    doc_ids = torch.tensor([[0] * 6 + [1] * 5])
    lp, _ = model(packed, doc_ids=doc_ids)
    l1, _ = model(d1)
    l2, _ = model(d2)
    assert torch.allclose(lp[0, :6], l1[0], atol=1e-5)
    assert torch.allclose(lp[0, 6:], l2[0], atol=1e-5)  # positions restart, attention stays inside


@pytest.mark.parametrize("case", ["causal", "one query, row masks", "packed mask"])
def test_matmul_attention_is_sdpa_with_the_same_gradients(case):
    g = torch.Generator().manual_seed(0)
    tq = 1 if case == "one query, row masks" else 9
    q = torch.randn(2, 3, tq, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, 9, 8, generator=g, requires_grad=True) for _ in range(2))
    kw = dict(is_causal=True)
    if case == "one query, row masks":  # continuous batching: each row sees its own length
        kw = dict(attn_mask=(torch.arange(9)[None, :] <= torch.tensor([[4], [8]]))[:, None, None, :])
    elif case == "packed mask":
        docs = torch.tensor([0] * 4 + [1] * 5)
        kw = dict(attn_mask=(docs[:, None] == docs[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril())
    a, b = F.scaled_dot_product_attention(q, k, v, **kw), matmul_attention(q, k, v, **kw)
    assert torch.allclose(a, b, atol=1e-6)
    up = torch.randn(a.shape, generator=g)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), up), torch.autograd.grad(b, (q, k, v), up)):
        assert torch.allclose(x, y, atol=1e-5)


def test_cpu_bf16_takes_the_matmul_attention_when_the_scores_are_small(monkeypatch):
    import gpt.model

    calls = []
    monkeypatch.setattr(gpt.model, "matmul_attention", lambda *a, **kw: calls.append(1) or matmul_attention(*a, **kw))
    model = tiny()
    idx = torch.randint(0, 50, (2, 16))  # 2 rows x 2 heads x 16 x 16 scores
    monkeypatch.setattr(gpt.model, "MATMUL_ATTENTION_SCORES", (1024, 1024))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fast = model(idx, idx)
        assert len(calls) == 2  # one per layer
        for bounds in ((0, 1023), (1025, 2**24)):  # too many scores, too few
            monkeypatch.setattr(gpt.model, "MATMUL_ATTENTION_SCORES", bounds)
            _, sdpa = model(idx, idx)
        assert len(calls) == 2
    _, fp32 = model(idx, idx)
    assert len(calls) == 2  # fp32 keeps SDPA
    assert abs(fast.item() - sdpa.item()) < 2e-2


def test_ignore_index_and_all_ignored_batch():
    model = tiny()
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[:, :4] = IGNORE_INDEX
    _, mean = model(idx, targets)
    _, total = model(idx, targets, reduction="sum")
    assert torch.allclose(mean * 8, total, atol=1e-4)  # mean over the 8 supervised tokens
    _, zero = model(idx, torch.full_like(idx, IGNORE_INDEX))
    assert zero.item() == 0.0  # not NaN


def test_prompt_longer_than_block_size_is_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_cached_forward_matches_full_forward():
    model = tiny()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)
    cache = KVCache.empty(model.config, 2, 16, "cpu", torch.float32)
    a, _ = model(idx[:, :5], kv_cache=cache)  # prefill
    b, _ = model(idx[:, 5:9], kv_cache=cache, start_pos=5)  # chunked prefill: explicit mask
    c = [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t)[0] for t in range(9, 12)]  # decode
    got = torch.cat([a, b, *c], dim=1)
    assert torch.allclose(got, full, atol=1e-5)


def test_one_mask_builder_answers_every_position_case():
    """The table in gpt/model.py's docstring: plain causal and one-token decoding build no mask tensor."""
    model = tiny()
    x = torch.zeros(3, 4, dtype=torch.long)
    cache = KVCache.empty(model.config, 3, 16, "cpu", torch.float32)
    assert model.positions(x).mask is CAUSAL  # training, scoring
    assert model.positions(x, kv_cache=cache).mask is CAUSAL  # prefill
    assert model.positions(x[:, :1], 5, kv_cache=cache).mask is None  # decode, shared position
    chunk = model.positions(x, 5, kv_cache=cache)  # chunked prefill: queries 5..8 against keys 0..8
    assert torch.equal(chunk.pos, torch.arange(5, 9)[None])
    assert torch.equal(chunk.mask[0, 0], torch.arange(9)[None, :] <= torch.arange(5, 9)[:, None])
    rows = model.positions(x[:, :2], torch.tensor([0, 3, 7]), kv_cache=cache)  # per-row starts, two tokens
    assert torch.equal(rows.pos, torch.tensor([[0, 1], [3, 4], [7, 8]])) and rows.mask.shape == (3, 1, 2, 16)
    assert rows.mask[1, 0].sum(-1).tolist() == [4, 5] and rows.start is None
    packed = model.positions(x[:1, :4].repeat(1, 2), doc_ids=torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0]]))
    assert packed.pos.tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]  # a repeated id after another document starts anew
    docs = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    assert torch.equal(packed.mask[0, 0], (docs[:, None] == docs[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril())
    assert attention_mask(torch.arange(3)[None], 3, shared=True) is CAUSAL


def test_positions_and_mask_are_built_once_per_call(monkeypatch):
    import gpt.model

    calls = []
    monkeypatch.setattr(gpt.model, "attention_mask", lambda *a, **kw: calls.append(1) or attention_mask(*a, **kw))
    model = tiny()
    cache = KVCache.empty(model.config, 2, 16, "cpu", torch.float32)
    model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache, start_pos=torch.tensor([3, 5]))
    assert len(calls) == 1  # not once per layer


def test_per_row_chunks_match_the_full_forward():
    """Rows prefilled to different lengths, then a chunk of several tokens per row at its own position."""
    model = tiny()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(idx)
    cache = KVCache.empty(model.config, 2, 16, "cpu", torch.float32)
    for r, n in enumerate([3, 6]):
        model(idx[r : r + 1, :n], kv_cache=KVCache(cache.k[:, r : r + 1], cache.v[:, r : r + 1]))
    chunk = torch.stack([idx[0, 3:7], idx[1, 6:10]])
    got, _ = model(chunk, kv_cache=cache, start_pos=torch.tensor([3, 6]))
    assert torch.allclose(got[0], full[0, 3:7], atol=1e-5) and torch.allclose(got[1], full[1, 6:10], atol=1e-5)


def test_tied_embedding_and_param_counts():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    n_all = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n_all
    assert model.num_params() == n_all - 16 * 16
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 2 * 8 * 16


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=8, n_head=2, n_embd=64)
    model = GPT(cfg)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.002


def test_resize_vocab_keeps_old_rows_and_ties():
    model = tiny()
    old = model.lm_head.weight.detach().clone()
    model.resize_vocab(54)
    assert model.lm_head.weight.shape == (54, 16) and model.config.vocab_size == 54
    assert torch.equal(model.lm_head.weight[:50], old)
    assert model.lm_head.weight is model.transformer.wte.weight
