"""Prefix caching: a prompt that begins like an earlier one reuses its keys and values, and decodes exactly as cold.

Every case compares a warm engine (prefix cache on) with cold engines (off) in float32 on the CPU:
the same greedy tokens, the same log-probabilities within float tolerance (a chunked prefill sums
in another order than a whole one), for the model options that change attention.
"""

import pytest
import torch

from conftest import SERVE_BLOCK, SERVE_CHARS, Running, lively_model
from gpt.config import ModelConfig
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import CharTokenizer
from gpt.infer.engine import Engine
from gpt.infer.prefix_cache import MiB, PrefixCache
from gpt.infer.sampling import SamplingError, SamplingParams
from gpt.model import GPT

V, BLOCK = 50, 64
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
ROPE = dict(position="rope")
GEMMA3 = dict(ROPE, norm="rmsnorm", norm_offset=1.0, post_norms=True, embed_scale=True, qk_norm=True, mlp="geglu",
              sliding_window=5, sliding_window_pattern=2, rope_local_theta=100.0, logit_softcap=3.0, n_kv_head=1,
              head_dim=12, tie_embeddings=False, bias=False)
OPTIONS = {  # every ModelConfig option that changes what attention sees (positions, heads, windows)
    "gpt2": {}, "rope": ROPE, "gqa": dict(ROPE, n_kv_head=2), "mqa": dict(n_kv_head=1),
    "sliding": dict(ROPE, sliding_window=5), "llama3_rope": dict(ROPE, rope_scaling="llama3", rope_factor=4.0,
                                                                 rope_original_context=8),
    "linear_rope": dict(ROPE, rope_scaling="linear", rope_factor=4.0), "gemma3": GEMMA3,
    "qwen2": dict(ROPE, norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, n_kv_head=2),
}


def model_with(**options) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, vocab_size=V, **options))
    with torch.no_grad():  # large weights: confident, distinct predictions
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "ln" not in name else 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    return model.eval()


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = ids(1, 35)  # two whole 16-token blocks and 3 more: 32 tokens can come from the cache


def cold(model, prompt, params=GREEDY):
    """The reference: the prompt alone in an engine without a prefix cache."""
    engine = Engine(model, max_batch=1)
    req = engine.add(prompt, params)
    engine.run()
    return req


def assert_same(warm, ref):
    assert warm.out_ids == ref.out_ids and warm.finish_reason == ref.finish_reason
    torch.testing.assert_close(warm.out_logprobs, ref.out_logprobs, rtol=0, atol=1e-4)
    assert [[t for t, _ in top] for top in warm.top] == [[t for t, _ in top] for top in ref.top]


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_warm_decoding_is_cold_decoding_under_continuous_batching(options):
    """Rows join a running batch at different times; the later ones find the prefix cached and decode as a cold
    run does, past the context too (the window re-encoded from the cache); the row that shares nothing as well."""
    model = model_with(**options)
    engine = Engine(model, max_batch=3, prefix_cache_mb=1)
    other = engine.add(ids(2, 20), SamplingParams(temperature=0, max_tokens=30))
    engine.step(), engine.step()
    first = engine.add(PREFIX + ids(3, 4), GREEDY)
    engine.step()
    second = engine.add(PREFIX + ids(4, 6), SamplingParams(temperature=0, max_tokens=40, logprobs=2))  # passes 64
    engine.run()
    assert (other.cached_tokens, first.cached_tokens, second.cached_tokens) == (0, 0, 32)
    assert_same(first, cold(model, first.prompt))
    assert_same(second, cold(model, second.prompt, second.params))
    assert other.out_ids == cold(model, other.prompt, other.params).out_ids


def test_rows_of_one_batch_share_a_prefix():
    """Requests added together: the first row's fill is cached before the next rows are filled in the same step."""
    model = model_with(**ROPE)
    engine = Engine(model, max_batch=3, prefix_cache_mb=1)
    reqs = [engine.add(PREFIX + ids(10 + i, 3), GREEDY) for i in range(3)]
    engine.run()
    assert [r.cached_tokens for r in reqs] == [0, 32, 32]
    for r in reqs:
        assert_same(r, cold(model, r.prompt))
    assert len({tuple(r.out_ids) for r in reqs}) > 1  # the suffixes matter: not one answer for all


def block_mib(model: GPT, blocks: int) -> float:
    c = model.config
    return blocks * 2 * c.n_layer * c.kv_heads * c.head_size * 16 * 4 / MiB  # float32 blocks of 16 tokens


def test_least_recently_used_prefixes_are_evicted_at_the_limit():
    """Room for two prompts' blocks: the one used least recently goes, and is computed again (the same output)."""
    model = model_with()
    engine = Engine(model, max_batch=1, prefix_cache_mb=block_mib(model, 4))
    a, b, c = ids(20, 34), ids(21, 34), ids(22, 34)
    cached, held = [], []
    for prompt in (a, b, a, c, a, b):
        req = engine.add(prompt, GREEDY)
        engine.run()
        assert_same(req, cold(model, prompt))
        cached.append(req.cached_tokens)
        held.append(engine.prefix_cache.tokens)
    assert cached == [0, 0, 32, 0, 32, 0]  # c evicted b (a was used since); b then evicts c, not a
    assert held == [32, 64, 64, 64, 64, 64]  # never over the limit


def test_a_shared_first_block_is_kept_while_its_longer_prefixes_are_evicted():
    """Blocks are evicted leaves first: prompts sharing one block keep it while their own tails come and go."""
    cache = PrefixCache(model_with().config, block_mib(model_with(), 3), "cpu", torch.float32)
    k = torch.randn(2, 4, 64, 8)
    shared = list(range(16))
    for tail in range(5):
        cache.store(shared + [100 + tail] * 32, k, k)
        assert cache.tokens <= 48
    out = torch.zeros_like(k)
    assert cache.load(shared + [104] * 32 + [7], out, out.clone()) == 48  # the latest whole
    assert cache.load(shared + [100] * 32, out, out.clone()) == 16  # an old one: its shared block only
    assert torch.equal(out[:, :, :16], k[:, :, :16])


def test_cancelled_and_failed_requests_leave_the_cache_as_a_cold_run_would():
    model = model_with(**ROPE)
    engine = Engine(model, max_batch=2, prefix_cache_mb=1)
    never = engine.add(PREFIX + ids(30, 3), GREEDY)
    never.cancel()  # cancelled before its row was filled: nothing of it is cached
    engine.run()
    assert never.finish_reason == "cancelled" and engine.prefix_cache.tokens == 0
    mid = engine.add(PREFIX + ids(31, 3), SamplingParams(temperature=0, max_tokens=50))
    keep = engine.add(ids(32, 20), GREEDY)
    engine.step(), engine.step()
    mid.cancel()  # cancelled mid-generation: its row is freed and the other row moves into it
    engine.step()
    later = engine.add(PREFIX + ids(33, 3), GREEDY)
    engine.run()
    assert mid.finish_reason == "cancelled" and later.cached_tokens == 32
    assert_same(later, cold(model, later.prompt))
    assert_same(keep, cold(model, keep.prompt))

    broken = Engine(model, max_batch=1, prefix_cache_mb=1)
    forward = model.forward
    model.forward = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("a failed step"))
    broken.add(PREFIX + ids(34, 3), GREEDY)
    with pytest.raises(RuntimeError):
        broken.step()
    model.forward = forward
    broken.fail_all()
    assert broken.prefix_cache.tokens == 0  # a failed fill caches nothing


def test_sizes_that_cannot_work_are_refused():
    model = model_with()
    with pytest.raises(SamplingError, match="holds no block"):
        Engine(model, prefix_cache_mb=block_mib(model, 1) / 2)
    with pytest.raises(SamplingError, match="use_kv_cache=False"):
        Engine(model, prefix_cache_mb=1, use_kv_cache=False)
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(SamplingError, match=">= 0"):
            Engine(model, prefix_cache_mb=bad)
    assert Engine(model).prefix_cache is None  # off unless asked (the server asks)


@pytest.fixture(scope="module")
def server():
    tok = CharTokenizer(SERVE_CHARS)
    ChatTemplate.add_tokens(tok)
    s = Running(lively_model(tok.vocab_size, block_size=SERVE_BLOCK), tok, max_batch=4)  # the prefix cache: default
    yield s
    s.stop()


def test_the_server_reports_cached_prompt_tokens(server):
    system = "You are a terse assistant. Answer with one word, always."  # + 2: 58 tokens, 3 whole blocks cacheable
    for cached in (0, 48):
        r = server.client.completions.create(model="tiny", prompt=system + " Q", max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == cached and r.usage.prompt_tokens == 58
    r = server.client.completions.create(model="tiny", prompt=system + " R", max_tokens=3, n=3, temperature=0.5)
    assert r.usage.prompt_tokens_details.cached_tokens == 48  # per prompt, not per sample
    seen = []
    for question in ("hi", "yo"):  # the same system message: its blocks are reused by the next chat
        chunks = list(server.client.chat.completions.create(
            model="tiny", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=3, stream=True, stream_options={"include_usage": True}))
        seen.append(chunks[-1].usage.prompt_tokens_details.cached_tokens)
    assert seen[1] >= 48 and seen[1] > seen[0] and seen[1] % 16 == 0


def test_serve_refuses_a_negative_size_in_one_line():
    from gpt.serve.serve_cli import ServeError, build_parser, run

    assert build_parser().parse_args(["--ckpt", "x"]).prefix_cache_mb == 1024  # on by default
    for bad in ("-1", "inf"):
        with pytest.raises(ServeError, match="--prefix-cache-mb"):
            run(["--ckpt", "nowhere", "--prefix-cache-mb", bad])
