"""The generation engine: cache equivalence, sliding window, decoding controls, stops, streaming, seeds."""

import math

import conftest
import pytest
import torch

from gpt.data.tokenizer import CharTokenizer, TiktokenTokenizer
from gpt.errors import UserError
from gpt.infer.engine import Engine, TextStream, complete, generate, window_start
from gpt.infer.sampling import (
    SamplingError,
    SamplingParams,
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_top_p,
    draw,
    filter_logits,
)
from gpt.model import GPT

P = SamplingParams
CHARS = list("abcdefghijklmnopqrstuvwxyz <>:.\n")


def lively_model(vocab_size=len(CHARS), block_size=16, n_embd=32, seed=0) -> GPT:
    return conftest.lively_model(vocab_size, block_size, n_embd, seed)


def reference_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Independent naive loop: the documented window rule, the full context through the model every step."""
    block = model.config.block_size
    seq, start = idx.clone(), max(0, idx.shape[1] - block)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq[:, start:])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            start = window_start(seq.shape[1], start, block)
    return seq


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23])
def test_cached_greedy_follows_the_window_rule_past_block_size(prompt_len):
    """(The uncached engine, use_kv_cache=False, is held to the cached one in tests/test_parity.py for
    every model option, and below under continuous batching.)"""
    model = lively_model()
    idx = torch.randint(0, model.config.vocab_size, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    n = 45  # about three windows of 16: the window slides several times
    cached = generate(model, idx, n, P(temperature=0))
    assert torch.equal(cached, reference_greedy(model, idx, n))
    assert len(set(cached[0, prompt_len:].tolist())) > 3  # a real sequence, not one repeated token


def test_window_rule_drops_the_oldest_half():
    assert window_start(16, 0, 16) == 0  # still fits
    assert window_start(17, 0, 16) == 9  # 17 tokens: keep the last 8 = 16 - 16 // 2
    assert window_start(25, 9, 16) == 9
    assert window_start(26, 9, 16) == 18
    assert window_start(18, 0, 17) == 9  # odd block: keep 9
    assert window_start(5, 3, 1) == 4  # block_size 1 keeps only the last token


def test_batch_rows_are_independent_samples():
    model = lively_model()
    idx = torch.zeros(4, 3, dtype=torch.long)
    out = generate(model, idx, 30, P(temperature=1.0, seed=0))
    assert len({tuple(r) for r in out[:, 3:].tolist()}) == 4
    greedy = generate(model, idx, 30, P(temperature=0))
    assert all(torch.equal(greedy[0], r) for r in greedy)


def test_seed_reproducibility():
    model = lively_model()
    idx = torch.zeros(1, 2, dtype=torch.long)
    a = generate(model, idx, 50, P(temperature=1.2, seed=123))
    assert torch.equal(a, generate(model, idx, 50, P(temperature=1.2, seed=123)))
    assert not torch.equal(a, generate(model, idx, 50, P(temperature=1.2, seed=124)))


def test_padded_vocab_ids_are_never_sampled():
    model = lively_model(vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight[40:] *= 50  # make the padding rows the most likely by far
    idx = torch.zeros(2, 2, dtype=torch.long)
    assert generate(model, idx, 30, P(temperature=0))[:, 2:].max() >= 40  # unrestricted, they win
    for t in (0.0, 1.0):
        out = generate(model, idx, 30, P(temperature=t, seed=0), vocab_limit=40)
        assert out[:, 2:].max() < 40


# ---------------------------------------------------------------------------- logits processing


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept, ids = filter_logits(logits, SamplingParams(top_k=2))
    assert ids.tolist() == [[1, 3]] and kept.tolist() == [[5.0, 4.0]]
    for k in (0, None, 5, 10):  # no limit
        kept, ids = filter_logits(logits, SamplingParams(top_k=k))
        assert ids is None and torch.equal(kept, logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(p, **kw):
        out, ids = filter_logits(logits, SamplingParams(top_p=p, **kw))
        ids = torch.arange(4)[None] if ids is None else ids
        return sorted(ids[torch.isfinite(out)].tolist())

    assert kept(0.5) == [1]  # the top token alone reaches 0.5
    assert kept(0.7) == [1, 3]  # 0.5 + 0.3
    assert kept(0.81) == [1, 2, 3]  # 0.8 is not enough: add 0.15
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(0.01) == [1]  # the most likely token is always kept
    assert kept(0.81, top_k=2) == [1, 3]  # top-k first, then top-p among the survivors
    assert kept(0.6, top_k=3) == [1, 3]  # renormalised over the top 3: 0.5/0.95 < 0.6
    renorm = apply_top_p(logits, 0.7).softmax(-1)[0]
    assert renorm[1].item() == pytest.approx(0.5 / 0.8) and renorm[3].item() == pytest.approx(0.3 / 0.8)


def test_min_p_keeps_tokens_near_the_top_one_after_temperature_top_k_and_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(min_p, **kw):
        out, ids = filter_logits(logits, SamplingParams(min_p=min_p, **kw))
        ids = torch.arange(4)[None] if ids is None else ids
        return sorted(ids[torch.isfinite(out)].tolist())

    assert kept(0.0) == [0, 1, 2, 3]  # off
    assert kept(0.2) == [1, 2, 3]  # 0.05 < 0.2 x 0.5 <= 0.15
    assert kept(0.5) == [1, 3]  # 0.3 >= 0.25
    assert kept(1.0) == [1]  # the most likely token is always kept
    assert kept(0.2, temperature=0.5) == [1, 3]  # after temperature: 0.15**2 < 0.2 x 0.5**2 (unnormalised)
    assert kept(0.2, top_k=2) == [1, 3] and kept(0.2, top_p=0.7) == [1, 3]  # among what top-k/top-p left
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(min_p=0.5)
    draws = {int(draw(*filter_logits(logits, params), params, gen)) for _ in range(200)}
    assert draws == {1, 3}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold, _ = filter_logits(logits, SamplingParams(temperature=0.5))
    hot, _ = filter_logits(logits, SamplingParams(temperature=2.0))
    assert cold.softmax(-1)[0, 0] > logits.softmax(-1)[0, 0] > hot.softmax(-1)[0, 0]


def test_sampler_draws_from_the_filtered_distribution():
    n = 40000
    logits = torch.tensor([[0.1, 0.6, 0.0, 0.3]]).log().expand(n, 4)
    gen = torch.Generator().manual_seed(0)
    draws = draw(*filter_logits(logits, SamplingParams()), SamplingParams(), gen)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert freq[2] == 0  # zero probability is never drawn
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.0, 0.3]), atol=0.01, rtol=0)
    params = SamplingParams(top_k=2)
    draws = draw(*filter_logits(logits, params), params, gen)
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]), atol=0.01, rtol=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0]])
    out = apply_frequency_presence(logits, counts, frequency=0.5, presence=0.25)
    assert out.tolist() == [[1.0 - 2 * 0.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25]]


def test_temperature_zero_is_argmax_after_penalties():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    out, ids = filter_logits(logits, params, seen=torch.tensor([[True, False, False]]))
    assert draw(out, ids, params, None).tolist() == [1]


def test_penalties_change_generation():
    model = lively_model()
    idx = torch.tensor([[1, 2, 3]])
    plain = generate(model, idx, 20, P(temperature=0))[0, 3:].tolist()
    assert len(set(plain)) < 20  # greedy repeats itself
    distinct = generate(model, idx, 20, P(temperature=0, presence_penalty=100.0))[0, 3:].tolist()
    assert len(set(distinct)) == 20  # a token once generated is never chosen again
    no_prompt = generate(model, idx, 20, P(temperature=0, repetition_penalty=1e6))[0, 3:].tolist()
    assert not {1, 2, 3} & set(no_prompt)  # repetition penalty covers the prompt too
    # frequency/presence count generated tokens only (OpenAI): the prompt's tokens stay available
    freq = generate(model, torch.tensor([[plain[0]]]), 1, P(temperature=0, presence_penalty=100.0))[0, 1:].tolist()
    assert freq == generate(model, torch.tensor([[plain[0]]]), 1, P(temperature=0))[0, 1:].tolist()


# ---------------------------------------------------------------------------- text, stops, streaming


def char_tok() -> CharTokenizer:
    return CharTokenizer(CHARS)


def test_stop_sequence_split_across_tokens_is_cut_and_never_streamed():
    tok = char_tok()
    stream = TextStream(tok, stops=["<eoc>"])
    shown = []
    for i in tok.encode("run ls <eo<eoc> more"):
        stopped = stream.push(i)
        shown.append(stream.pop_new())
        if stopped:
            break
    stream.finish()
    shown.append(stream.pop_new(final=True))
    assert stream.text == "run ls <eo" and stream.stopped
    assert "".join(shown) == "run ls <eo"
    assert "<eoc" not in "".join(shown[:-1])


def test_stop_sequence_split_across_bpe_tokens():
    tok = TiktokenTokenizer("gpt2")
    ids = tok.encode("print(x)<EOC>ignored")
    assert all(tok.decode([i]) != "<EOC>" for i in ids)  # the stop spans several tokens
    stream = TextStream(tok, stops=["<EOC>"])
    used = 0
    for i in ids:
        used += 1
        if stream.push(i):
            break
    assert stream.text == "print(x)"
    assert used < len(ids)


def test_streaming_decodes_multibyte_characters_split_across_tokens():
    tok = TiktokenTokenizer("gpt2")
    text = "naïve café 世界 🙂!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold half a character
    stream = TextStream(tok)
    pieces = []
    for i in ids:
        stream.push(i)
        pieces.append(stream.pop_new())
    stream.finish()
    pieces.append(stream.pop_new(final=True))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_complete_stops_at_a_stop_string_spanning_tokens():
    model, tok = lively_model(), char_tok()
    free = complete(model, tok, "ab", P(max_tokens=30, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop = free.text[10:13]  # three characters = three tokens
    cut = complete(model, tok, "ab", P(max_tokens=30, temperature=0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert len(cut.token_ids) == free.text.index(stop) + len(stop)  # ends on the token completing it


def test_complete_streams_exactly_the_final_text():
    model, tok = lively_model(), char_tok()
    ref = complete(model, tok, "ab", P(max_tokens=25, temperature=0.9, seed=3), num_samples=2)
    stop = ref[0].text[5:7]
    got = {0: "", 1: ""}

    def on_text(i, s):
        got[i] += s

    res = complete(model, tok, "ab", P(max_tokens=25, temperature=0.9, seed=3, stop=(stop,)), num_samples=2,
                   on_text=on_text)
    assert [got[0], got[1]] == [r.text for r in res]
    assert res[0].finish_reason == "stop" and stop not in res[0].text


def test_eos_token_ends_a_draw():
    model, tok = lively_model(), char_tok()
    free = complete(model, tok, "ab", P(max_tokens=20, temperature=0))[0]
    eos = free.token_ids[6]
    first = free.token_ids.index(eos)
    res = complete(model, tok, "ab", P(max_tokens=20, temperature=0), stop_ids=[eos])[0]
    assert res.finish_reason == "eos"
    assert res.token_ids == free.token_ids[: first + 1] and res.text == free.text[:first]


def test_logprobs_report_the_model_distribution():
    model, tok = lively_model(), char_tok()
    V = len(CHARS)
    res = complete(model, tok, "ab", P(max_tokens=5, temperature=0.7, seed=0, logprobs=V))[0]
    assert len(res.logprobs) == 5
    for tok_id, e in zip(res.token_ids, res.logprobs):
        assert e["id"] == tok_id and e["token"] == tok.decode([tok_id])
        lps = [a["logprob"] for a in e["top"]]
        assert lps == sorted(lps, reverse=True)
        assert sum(math.exp(x) for x in lps) == pytest.approx(1.0, abs=1e-4)
        assert e["logprob"] == pytest.approx(next(a["logprob"] for a in e["top"] if a["id"] == tok_id))
    # the reported distribution is the model's: one forward pass agrees
    with torch.no_grad():
        logits, _ = model(torch.tensor([tok.encode("ab")]))
    assert res.logprobs[0]["top"][0]["logprob"] == pytest.approx(logits[0, -1].log_softmax(-1).max().item(), abs=1e-5)


def test_invalid_sampling_values_are_reported():
    model = lively_model()
    for bad, param in ((P(top_p=1.5), "top_p"), (P(temperature=-1), "temperature"), (P(temperature=math.nan), "temperature"),
                       (P(frequency_penalty=math.nan), "frequency_penalty"), (P(logprobs=-1), "logprobs")):
        with pytest.raises(SamplingError, match=param) as e:
            generate(model, torch.zeros(1, 1, dtype=torch.long), 2, bad)
        assert e.value.param == param and isinstance(e.value, UserError)


# ---------------------------------------------------------------------------- continuous batching


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_requests_joining_a_running_batch_get_what_they_get_alone(use_kv_cache):
    """Alone means the cached engine, one request at a time: the uncached engine under the same joining
    schedule gives the same completions too (greedy and sampled, past the window)."""
    model, tok = lively_model(), char_tok()
    prompts = ["a", "hello there", "xyz:.", "a much longer prompt than the window"]
    params = [P(temperature=0, max_tokens=25), P(temperature=0.9, seed=1, max_tokens=30),
              P(temperature=0.7, top_k=5, seed=2, max_tokens=7), P(temperature=0, max_tokens=40, stop=("zz",))]
    alone = [complete(model, tok, pr, pa)[0] for pr, pa in zip(prompts, params)]
    engine = Engine(model, tok, max_batch=3, use_kv_cache=use_kv_cache)  # the last request waits for a free row
    reqs = []
    for i, (pr, pa) in enumerate(zip(prompts, params)):
        reqs.append(engine.add(tok.encode(pr), pa))
        for _ in range(i * 3):  # later requests join a batch that is already decoding
            engine.step()
        assert len(engine.active) <= 3
    engine.run()
    assert [r.completion(tok) for r in reqs] == alone
    assert len({len(r.out_ids) for r in reqs}) > 1  # they left the batch at different steps


def test_requests_joining_at_one_step_are_prefilled_in_one_call(monkeypatch):
    """Prompts that join at one step (a server's concurrent requests) are prefilled by one forward call, the
    weights read once for all and the shorter windows padded at their ends; each completion is what it is alone,
    greedy and sampled, past the window too."""
    model, tok = lively_model(block_size=24), char_tok()
    prompts = ["hello there", "xyz:.", "a much longer prompt", "ab"]
    params = [P(temperature=0, max_tokens=30), P(temperature=0.9, seed=1, max_tokens=10),
              P(temperature=0, max_tokens=15), P(temperature=0.7, seed=2, max_tokens=8)]
    alone = [complete(model, tok, pr, pa)[0] for pr, pa in zip(prompts, params)]
    for prefix_cache_mb in (0, 1):  # no two of these windows begin with the same cache block
        engine = Engine(model, tok, max_batch=4, prefix_cache_mb=prefix_cache_mb)
        reqs = [engine.add(tok.encode(pr), pa) for pr, pa in zip(prompts, params)]
        shapes, forward = [], model.forward
        monkeypatch.setattr(model, "forward", lambda idx, *a, **k: shapes.append(idx.shape) or forward(idx, *a, **k))
        engine.step()
        monkeypatch.undo()
        assert shapes == [(4, len("a much longer prompt") - 1), (4, 1)]  # the four windows, then the next tokens
        engine.run()
        assert [r.completion(tok) for r in reqs] == alone


LONG = "the quick brown fox jumps over the lazy dog: a prompt of sixty"  # 61 tokens, a 60-token window to fill


@pytest.mark.parametrize("prefix_cache_mb", [0, 1])
def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(prefix_cache_mb):
    """prefill_chunk=8: a long prompt joining a decoding batch takes one chunk per step, and the running row gets a
    token at every one of those steps (it is not stalled for the whole prefill); a row that finishes meanwhile
    frees its row under the part-filled prompt; every completion is what it is alone, past the window too."""
    model, tok = lively_model(block_size=64), char_tok()
    engine = Engine(model, tok, max_batch=3, prefill_chunk=8, prefix_cache_mb=prefix_cache_mb)
    params = [P(temperature=0, max_tokens=30), P(temperature=0.8, seed=3, max_tokens=9), P(temperature=0, max_tokens=12),
              P(temperature=0, max_tokens=5)]
    prompts = ["ab", "xyz", LONG, "q"]
    running = [engine.add(tok.encode(pr), pa) for pr, pa in zip(prompts[:2], params)]
    engine.step(), engine.step()
    late = engine.add(tok.encode(LONG), params[2])
    queued = engine.add(tok.encode("q"), params[3])  # a free row, but the long prompt is still being filled
    gained = []
    while not late.out_ids:
        before = len(running[0].out_ids)
        engine.step()
        gained.append(len(running[0].out_ids) - before)
        assert running[1].done or late.out_ids or not queued.out_ids
    assert gained == [1] * math.ceil(60 / 8)  # a token for the running row at each of the long prompt's chunks
    assert running[1].done  # it left while the long prompt was part-way in
    engine.run()
    reqs = running + [late, queued]
    assert [r.completion(tok) for r in reqs] == [complete(model, tok, pr, pa)[0] for pr, pa in zip(prompts, params)]


def test_prefill_chunk_and_max_batch_are_checked():
    model = lively_model()
    for kw in (dict(prefill_chunk=-1), dict(prefill_chunk=4, use_kv_cache=False), dict(max_batch=0)):
        with pytest.raises(SamplingError) as e:
            Engine(model, **kw)
        assert e.value.param in kw


def test_a_cancelled_request_leaves_and_frees_its_row():
    model, tok = lively_model(), char_tok()
    engine = Engine(model, tok, max_batch=1)
    first = engine.add(tok.encode("ab"), P(temperature=0, max_tokens=1000))
    engine.step()
    second = engine.add(tok.encode("cd"), P(temperature=0, max_tokens=5))
    first.cancel()
    engine.run()
    assert first.finish_reason == "cancelled" and len(first.out_ids) == 1
    assert second.completion(tok) == complete(model, tok, "cd", P(temperature=0, max_tokens=5))[0]


def test_engine_restores_training_mode():
    model = lively_model().train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 3, P(temperature=0))
    assert model.training


def test_n_samples_are_distinct_and_the_first_is_the_seeded_single_sample():
    model, tok = lively_model(), char_tok()
    three = complete(model, tok, "ab", P(temperature=1.0, seed=9, max_tokens=20), num_samples=3)
    assert len({r.text for r in three}) == 3
    assert three[0] == complete(model, tok, "ab", P(temperature=1.0, seed=9, max_tokens=20))[0]


def test_logit_bias_bans_and_forces_tokens():
    model, tok = lively_model(), char_tok()
    free = complete(model, tok, "ab", P(temperature=0, max_tokens=10))[0]
    banned = free.token_ids[0]
    out = complete(model, tok, "ab", P(temperature=0, max_tokens=10, logit_bias={banned: -100.0}))[0]
    assert banned not in out.token_ids
    forced = complete(model, tok, "ab", P(temperature=1.0, seed=0, max_tokens=10, logit_bias={5: 100.0}))[0]
    assert forced.token_ids == [5] * 10
