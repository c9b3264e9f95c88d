"""Speculative decoding in the engine: greedy output identical to plain decoding (one row, and batches of rows
at different lengths joining mid-run), the accept/resample rule exact on hand-made distributions and the
engine's draws holding the target's law (statistically, fixed seeds), seeded sampling reproducible, and the
--speculate flags of sample.py and serve.py."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import run_in_process

from gpt.checkpoint import save_checkpoint
from gpt.config import ConfigError, ModelConfig
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import CharTokenizer
from gpt.infer.engine import Engine, complete
from gpt.infer.sample_cli import build_parser, check_args
from gpt.infer.sampling import Constraint, SamplingParams
from gpt.infer.speculative import (DraftProposer, DraftRow, NgramProposer, Speculation, SpeculationError,
                                   acceptance_probability, check_same_vocabulary, residual, verify_guess)
from gpt.model import GPT

CHARS = list("abcdefgh \n")
TOK = CharTokenizer(CHARS)
PROMPT = "abc abd abc abd ab"  # 18 tokens: with 40 new ones the 32-token window slides
OPTIONS = {  # the model options that touch attention and positions (seeds and scales whose greedy output varies)
    "learned": {},
    "rope_gqa": dict(position="rope", n_head=4, n_kv_head=2, seed=1, scale=0.8),
    "learned_sliding": dict(sliding_window=5, sliding_window_pattern=2, seed=1, scale=0.5),
    "rope_gqa_sliding": dict(position="rope", n_head=4, n_kv_head=2, sliding_window=5, sliding_window_pattern=2,
                             scale=0.8),
}


def model(seed: int = 0, n_embd: int = 32, block_size: int = 32, scale: float = 0.3, vocab_size: int = len(CHARS),
          **options) -> GPT:
    """A random model whose greedy output does not collapse into one repeated token (large weights)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=options.pop("n_head", 2), n_embd=n_embd, block_size=block_size,
                      vocab_size=vocab_size, **options)
    m = GPT(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" not in name:
                p.normal_(0, 1.0 if "wpe" in name else scale)
    return m.eval()


@pytest.mark.parametrize("option", OPTIONS)
def test_greedy_output_is_plain_decodings_token_for_token(option):
    target = model(**OPTIONS[option])
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = complete(target, TOK, PROMPT, params, stop_ids=())[0]
    proposers = [NgramProposer(), DraftProposer(model(seed=1, n_embd=16)),
                 DraftProposer(target)]  # a draft that is the target: every guess is kept
    for proposer in proposers:
        spec = Speculation(proposer, 4)
        out = complete(target, TOK, PROMPT, params, stop_ids=(), speculation=spec)[0]
        assert out.token_ids == plain.token_ids, proposer.name
        assert out.text == plain.text and out.finish_reason == "length" and spec.stats.tokens == 40
    assert spec.stats.acceptance_rate == 1.0 and spec.stats.rounds <= 12  # k + 1 = 5 tokens a pass, but at slides


def test_penalties_stops_logprobs_and_constraints_compose():
    target = model()
    for params in (SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.5, presence_penalty=0.5,
                                  logprobs=2, stop=("hh",)),
                   SamplingParams(temperature=0, max_tokens=30, constraint=Constraint.regex("(ab|c)+ [a-h]{3,}"))):
        plain = complete(target, TOK, PROMPT, params, stop_ids=())[0]
        out = complete(target, TOK, PROMPT, params, stop_ids=(), speculation=Speculation(NgramProposer(), 3))[0]
        assert (out.token_ids, out.text, out.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
        for mine, theirs in zip(out.logprobs or [], plain.logprobs or []):
            assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=1e-4)
            assert [a["id"] for a in mine["top"]] == [a["id"] for a in theirs["top"]]


def test_sampling_with_a_seed_is_reproducible():
    target, draft = model(), model(seed=1, n_embd=16)
    for proposer in (NgramProposer(), DraftProposer(draft)):
        runs = [complete(target, TOK, PROMPT, SamplingParams(temperature=1.0, top_k=6, max_tokens=30, seed=s),
                         speculation=Speculation(proposer))[0].token_ids for s in (7, 7, 8)]
        assert runs[0] == runs[1] and runs[0] != runs[2]


def test_streams_exactly_the_final_text_and_samples_keep_their_seeds():
    target, spec = model(), Speculation(NgramProposer())
    params = SamplingParams(temperature=0.8, max_tokens=25, seed=3, stop=("ab",))
    streamed = {0: "", 1: ""}
    pair = complete(target, TOK, PROMPT, params, num_samples=2, speculation=spec,
                    on_text=lambda i, t: streamed.update({i: streamed[i] + t}))
    assert [streamed[0], streamed[1]] == [c.text for c in pair]
    assert complete(target, TOK, PROMPT, params, speculation=spec)[0] == pair[0]
    assert pair[0].token_ids != pair[1].token_ids


# Hand-made (p, q) pairs: overlapping, disjoint supports, q a point mass, p a point mass, p = q.
P = torch.tensor([0.5, 0.3, 0.2, 0.0])
CASES = [(P, torch.tensor([0.1, 0.6, 0.1, 0.2])), (P, torch.tensor([0.0, 0.0, 0.0, 1.0])), (P, None),
         (torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0.25, 0.25, 0.25, 0.25])), (P, P)]


@pytest.mark.parametrize("p, q", CASES)
def test_accept_or_resample_gives_exactly_the_target_distribution(p, q):
    """A guess x ~ q is kept with min(1, p(x)/q(x)), else replaced by a draw from norm(max(0, p - q)): the token's
    law, sum over x of q(x) (keep(x) [y = x] + (1 - keep(x)) residual(y)), is p. A point-mass guess (n-gram
    lookup, q None) gives p whatever x is."""
    def law(x):
        keep = acceptance_probability(p, q, x)
        return keep * torch.eye(len(p))[x] + (1 - keep) * residual(p, q, x)

    if q is None:
        for x in range(len(p)):
            assert torch.allclose(law(x), p, atol=1e-6), x
    else:
        assert torch.allclose(sum(float(q[x]) * law(x) for x in range(len(p)) if q[x] > 0), p, atol=1e-6)


def test_certain_guesses_are_kept_and_impossible_ones_replaced_from_the_target():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert verify_guess(torch.tensor([0.0, 1.0, 0.0]), None, 1, g) == (1, True)
        token, kept = verify_guess(torch.tensor([0.0, 0.5, 0.5]), None, 0, g)
        assert not kept and token in (1, 2)
        token, kept = verify_guess(P, torch.tensor([0.0, 0.0, 0.0, 1.0]), 3, g)
        assert not kept and token in (0, 1, 2)
    assert acceptance_probability(P, torch.tensor([0.25, 0.6, 0.1, 0.05]), 0) == 1.0
    assert acceptance_probability(P, torch.tensor([0.25, 0.6, 0.1, 0.05]), 1) == pytest.approx(0.5)


def test_ngram_lookup_proposes_what_followed_the_latest_earlier_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 4, 2, 3]
    assert NgramProposer().propose(tokens + [1, 2, 3], 3).tokens == [7, 5, 4]  # the latest [1 2 3]
    assert NgramProposer().propose(tokens, 2).tokens == [7, 5]  # [4 2 3] unseen, [2 3] then
    assert NgramProposer().propose([1, 2, 3], 4).tokens == []
    assert NgramProposer(max_n=1).propose([5, 6, 5], 2).tokens == [6, 5]


def test_the_draft_proposes_its_own_greedy_continuation_after_a_rollback():
    draft, greedy, seq = model(seed=1, n_embd=16), SamplingParams(temperature=0), TOK.encode(PROMPT)
    own = complete(draft, TOK, seq + [4], SamplingParams(temperature=0, max_tokens=4), stop_ids=())[0].token_ids
    proposer = DraftProposer(draft)
    proposer.prepare(TOK, len(CHARS), 32, 1, 4)
    row = SimpleNamespace(tokens=seq[:-3] + [5, 5, 5, 5], params=greedy, generator=None, draft=None, row=0, start=0)
    proposer.propose_rows([row], [4])  # its cache now holds tokens past the shared prefix
    assert isinstance(row.draft, DraftRow) and len(row.draft.cached) == len(seq) + 4
    row.tokens = seq + [4]
    assert proposer.propose_rows([row], [4])[0].tokens == own


def test_a_draft_with_another_vocabulary_is_refused():
    check_same_vocabulary(TOK, CharTokenizer(CHARS))
    with pytest.raises(SpeculationError, match="draft model must share the target's vocabulary"):
        check_same_vocabulary(TOK, CharTokenizer(CHARS[::-1]))
    other = CharTokenizer(CHARS + ["z"])
    with pytest.raises(SpeculationError, match="the draft model: its tokenizer differs"):
        Engine(model(), other, speculation=Speculation(DraftProposer(model(), TOK)))
    with pytest.raises(SpeculationError, match="the draft model has 10 token ids, the target samples from 11"):
        Engine(model(vocab_size=11), other, speculation=Speculation(DraftProposer(model())))
    with pytest.raises(SpeculationError, match="--speculate-tokens must be >= 1"):
        Speculation(NgramProposer(), 0)


def test_sample_py_speculates_and_reports_the_acceptance_rate(tmp_path, capsys):
    for name, m in (("big", model()), ("small", model(seed=1, n_embd=16))):
        save_checkpoint(tmp_path / name / "best", m.state_dict(), {"model": dataclasses.asdict(m.config)}, TOK)
    base = ["--ckpt", tmp_path / "big", "--prompt", PROMPT, "--max-new-tokens", 20, "--temperature", 0,
            "--dtype", "float32", "--json"]
    plain = run_in_process(capsys, "sample.py", *base)
    for extra, name in ((["--speculate", "ngram"], "ngram"),
                        (["--speculate", tmp_path / "small", "--speculate-tokens", 3], f"--speculate {tmp_path / 'small'}"),
                        (["--speculate", "ngram", "--num-samples", 2], "ngram")):
        proc = run_in_process(capsys, "sample.py", *base, *extra)
        expected = plain.stdout if "--num-samples" not in extra else plain.stdout + plain.stdout.replace('"index": 0', '"index": 1')
        assert proc.returncode == 0 and proc.stdout == expected, proc.stderr
        assert f"speculative decoding ({name})" in proc.stderr and "proposed tokens accepted" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--speculate-tokens", "3"], "--speculate-tokens needs --speculate"),
    (["--speculate", "nowhere"], "--speculate nowhere: neither ngram nor a checkpoint folder"),
    (["--speculate", "ngram", "--speculate-tokens", "0"], "--speculate-tokens must be >= 1"),
    (["--speculate", "ngram", "--no-kv-cache"], "--no-kv-cache"),
])
def test_flags_that_do_not_compose_are_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        check_args(build_parser().parse_args(["--ckpt", "x", *flags]))


BATCH = [  # (prompt, params): rows of different lengths and settings sharing one speculating batch
    (PROMPT, SamplingParams(temperature=0, max_tokens=30)),
    ("ab", SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.5, presence_penalty=0.5, logprobs=2)),
    ("hgf hgf hg", SamplingParams(temperature=0, max_tokens=25, stop=("hh",))),
    ("abc ab", SamplingParams(temperature=0, max_tokens=30, constraint=Constraint.regex("(ab|c)+ [a-h]{3,}"))),
    ("cab cab ca", SamplingParams(temperature=0, max_tokens=12)),
]


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_a_speculating_batch_gives_each_row_its_plain_output(proposer):
    """Rows at different lengths, with penalties, log-probs, a stop string and a constraint, two joining mid-run
    (one into a row freed by a finished one): each row's tokens are its plain decoding's, alone."""
    target = model()
    spec = Speculation(NgramProposer() if proposer == "ngram" else DraftProposer(model(seed=1, n_embd=16)), 3)
    engine = Engine(target, TOK, max_batch=3, speculation=spec)
    reqs = [engine.add(TOK.encode(p), params) for p, params in BATCH[:3]]
    for _ in range(3):
        engine.step()
    reqs += [engine.add(TOK.encode(p), params) for p, params in BATCH[3:]]
    engine.run()
    for req, (prompt, params) in zip(reqs, BATCH):
        plain = complete(target, TOK, prompt, params, stop_ids=())[0]
        mine = req.completion(TOK)
        assert (mine.token_ids, mine.text, mine.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
        for a, b in zip(mine.logprobs or [], plain.logprobs or []):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert spec.stats.accepted > 0 and spec.stats.rounds < sum(len(r.out_ids) for r in reqs)


def test_sampled_tokens_keep_the_target_distribution():
    """Many seeded two-token samples of a 4-token vocabulary through the engine, guesses from a draft that
    disagrees with the target (so guesses are both kept and refused): the pairs' counts match the target's
    exact law p(t1) p(t2 | t1) within a chi-square bound. The seeds are fixed, so the check cannot flake;
    the draft's own law is far from the target's, so a wrong rule fails it."""
    tok = CharTokenizer(list("abcd"))
    target, draft = (model(seed=s, vocab_size=4, scale=0.6) for s in (2, 3))
    prompt, n = tok.encode("abca"), 2000
    params = SamplingParams(temperature=1.0, top_k=None, max_tokens=2)
    spec = Speculation(DraftProposer(draft), 1)
    engine = Engine(target, tok, max_batch=n, speculation=spec)
    reqs = [engine.add(prompt, dataclasses.replace(params, seed=s)) for s in range(n)]
    engine.run()
    counts = torch.zeros(4, 4)
    for r in reqs:
        counts[r.out_ids[0], r.out_ids[1]] += 1

    def law(m):
        with torch.no_grad():
            p1 = m(torch.tensor([prompt]))[0][0, -1].softmax(-1)
            p2 = torch.stack([m(torch.tensor([prompt + [t]]))[0][0, -1].softmax(-1) for t in range(4)])
        return p1[:, None] * p2

    expected = law(target) * n
    rare = expected < 5  # pooled into one cell, as the chi-square approximation wants
    observed = torch.cat([counts[~rare], counts[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert 0 < spec.stats.accepted < spec.stats.proposed
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom (at most): exceeded with probability 0.001
    assert float((law(draft) - law(target)).abs().sum()) / 2 > 0.2


def test_chat_speculates_with_the_same_replies(tmp_path, capsys):
    tok = CharTokenizer(CHARS)
    ChatTemplate.add_tokens(tok)
    save_checkpoint(tmp_path / "chat" / "best", (m := model(seed=3, vocab_size=tok.vocab_size, block_size=96)).state_dict(),
                    {"model": dataclasses.asdict(m.config)}, tok)
    base = ["--ckpt", tmp_path / "chat", "--chat", "--max-new-tokens", 20, "--temperature", 0, "--dtype", "float32"]
    stdin = "abc abd abc abd\nabd abc abd\n"
    plain = run_in_process(capsys, "sample.py", *base, stdin=stdin)
    spec = run_in_process(capsys, "sample.py", *base, "--speculate", "ngram", stdin=stdin)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and len(plain.stdout.replace("> ", "").strip()) >= 10  # replies, streamed
    assert "speculative decoding (ngram)" in spec.stderr and "speculative" not in plain.stderr
