"""Speculative decoding at batch 1: cheap proposals, verified k at a time in one forward pass of the target.

Each round a proposer guesses the next k tokens; the target model (`GPT.forward`, the same code as
every other path) runs its last token and the k guesses as one chunk of k + 1 positions through its
KV cache, which gives the target's distribution at every guessed position at once. The guesses are
then accepted from the left while they pass the rule below; the first refused one is replaced by a
token drawn from the target, and when all k pass, the last position gives one more token for free.
A round therefore costs one target forward pass and yields between 1 and k + 1 tokens.

Two proposers (the names of `sample.py --speculate`):
  ngram  prompt lookup (vLLM's "ngram", llama.cpp's lookup decoding): the last n tokens (n from
         NGRAM_MAX down to NGRAM_MIN) are looked up in the context, and the k tokens that followed
         their latest earlier occurrence are proposed. No model, nothing to load; it shines when the
         output copies spans of the context (extraction, code edits, quoting).
  draft  a smaller checkpoint with the same vocabulary (`check_same_vocabulary`) proposes k tokens
         autoregressively from its own KV cache, drawn with the request's temperature, top-k and top-p.

The rule. Greedy: a guess is accepted when it is the target's argmax, so the output is token for
token the output of plain decoding (the target sees exactly the same context at every position).
Sampling (Leviathan et al. 2023, Chen et al. 2023): with the target's distribution p (after every
sampling rule of the request: constraint mask, logit bias, penalties, temperature, top-k, top-p) and
the proposer's q, a guess x is accepted with probability min(1, p(x) / q(x)); if refused, the token
is drawn from norm(max(0, p - q)). The token is then distributed exactly as p (`acceptance_probability`
and `residual`; tests/test_speculative.py checks the sum). An n-gram guess is a point mass: q(x) = 1.

Rollback. The cache is positional: keys and values of position i live in slot i, and a forward call
at start_pos s attends to slots 0 .. s + T - 1 only. The refused guesses' slots are therefore rolled
back by moving the next round's start back to the first position not accepted; what they hold is
never read and is overwritten. The draft model's cache is rolled back the same way (the longest
prefix of the tokens it holds that is still the sequence's).

Everything a request carries composes, because tokens are taken one position at a time through the
engine's own `DecodeRequest` (stop strings, end tokens, streaming, penalties, constraints, log-probs,
max_tokens, finish reasons); the context window follows the engine's rule (`window_start`): a round
never guesses past the context, so each token is predicted from the window plain decoding would use.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from gpt.config import ConfigError
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import Tokenizer
from gpt.infer.constraints import ConstraintError, GrammarState, token_masks
from gpt.infer.engine import (Completion, DecodeRequest, context_length, prompt_ids, sample_seed,
                              window_start)
from gpt.infer.sampling import SamplingParams, draw, filter_logits
from gpt.model import GPT, KVCache

SPECULATE_TOKENS = 5  # k: guesses verified per target forward pass (gpt-fast's and vLLM's usual 5)
NGRAM_MAX, NGRAM_MIN = 3, 1  # the n-gram lengths prompt lookup tries, longest first
NGRAM_SEARCH = 8192  # prompt lookup searches the last this many tokens (a bounded cost per round)
PROPOSERS = ("ngram", "draft")
_DRAW = SamplingParams()  # draw()'s settings for a distribution given as log-probabilities (temperature 1)


class SpeculationError(ConfigError):
    """A speculative-decoding setting that cannot work (a draft with another vocabulary, a bad k)."""


@dataclass
class Proposal:
    """A proposer's guesses and the distributions they were drawn from.

    q: (len(tokens), vocab) probabilities of the proposer at each guess; None when each guess is a
    point mass (n-gram lookup, or any greedy proposer: greedy verification needs no q).
    """

    tokens: list[int]
    q: torch.Tensor | None = None


@dataclass
class SpeculationStats:
    """What speculation did: guesses made and accepted, target forward passes (rounds), tokens produced."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def summary(self, name: str) -> str:
        per_round = self.tokens / self.rounds if self.rounds else 0.0
        return (f"[speculative decoding ({name}): {self.accepted}/{self.proposed} proposed tokens accepted "
                f"({100 * self.acceptance_rate:.1f}%), {per_round:.2f} tokens per target forward pass]")


# ---------------------------------------------------------------------------- the rule


def acceptance_probability(p: torch.Tensor, q: torch.Tensor | None, x: int) -> float:
    """min(1, p(x) / q(x)): the chance that guess x, drawn from q, is kept (q None: a point mass on x)."""
    px = float(p[x])
    qx = 1.0 if q is None else float(q[x])
    return 1.0 if qx <= 0.0 else min(1.0, px / qx)


def residual(p: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """norm(max(0, p - q)): where a refused guess's replacement is drawn from (q None: a point mass on x).

    When nothing is left (p <= q everywhere, so p = q and a refusal cannot happen but for rounding), p."""
    r = p.clone()
    if q is None:
        r[x] = 0.0
    else:
        r = (r - q).clamp_(min=0.0)
    total = float(r.sum())
    return p if total <= 0.0 else r / total


def verify_guess(p: torch.Tensor, q: torch.Tensor | None, x: int, generator: torch.Generator) -> tuple[int, bool]:
    """The token at a guessed position and whether it is the guess: x with probability
    acceptance_probability, else a draw from residual. One seeded generator: one output."""
    u = float(torch.rand((), generator=generator, device=generator.device))
    if u < acceptance_probability(p, q, x):
        return x, True
    return int(draw(residual(p, q, x).log()[None], None, _DRAW, generator)), False


def distribution(candidates: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """filter_logits' (1, K) candidates (and their ids) as a (vocab,) probability vector."""
    probs = candidates.softmax(-1)[0]
    if ids is None:
        return probs
    return torch.zeros(vocab, dtype=probs.dtype, device=probs.device).scatter_(0, ids[0], probs)


# ---------------------------------------------------------------------------- proposers


class NgramProposer:
    """Prompt lookup: the k tokens after the latest earlier occurrence of the context's last n tokens."""

    name = "ngram"

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN):
        if not 1 <= min_n <= max_n:
            raise SpeculationError(f"n-gram lengths must satisfy 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def prepare(self, tokenizer: Tokenizer, vocab: int, context: int) -> None:
        """Nothing to check or allocate: the lookup needs no model."""

    def reset(self) -> None:
        """Nothing to forget: the lookup reads only the sequence it is given."""

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, generator) -> Proposal:
        context = torch.tensor(list(tokens[-NGRAM_SEARCH:]))
        L = len(context)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            windows = context.unfold(0, n, 1)[:-1]  # every earlier n-gram (the last one is the pattern itself)
            hits = (windows == context[L - n:]).all(-1).nonzero()
            if len(hits):
                at = int(hits[-1]) + n  # the latest occurrence's continuation
                return Proposal(context[at : at + k].tolist())
        return Proposal([])


class DraftProposer:
    """A smaller model with the same vocabulary guesses k tokens from its own KV cache (batch 1).

    tokenizer: the draft's own, checked against the target's (`check_same_vocabulary`) when the
    Speculator is built; name says which model an error is about."""

    name = "draft"

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, name: str = "the draft model"):
        self.model, self.tokenizer, self.label = model, tokenizer, name
        self.cache: KVCache | None = None

    def prepare(self, tokenizer: Tokenizer, vocab: int, context: int) -> None:
        """Check the vocabulary against the target's; allocate the cache for the target's context (or less)."""
        cfg = self.model.config
        if self.tokenizer is not None:
            check_same_vocabulary(tokenizer, self.tokenizer, self.label)
        if cfg.vocab_size < vocab:
            raise SpeculationError(f"{self.label} has {cfg.vocab_size} token ids, the target samples from "
                                   f"{vocab}: a draft model must share the target's vocabulary")
        p = next(self.model.parameters())
        self.vocab, self.context = vocab, max(2, min(context, cfg.block_size))
        self.cache = KVCache.empty(cfg, 1, self.context, p.device, p.dtype)
        self.reset()

    def reset(self) -> None:
        """Forget the previous sequence (a new request starts from an empty cache: one seed, one output)."""
        self.start, self.cached = 0, []  # tokens[start : start + len(cached)] have keys and values in the cache

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, generator) -> Proposal:
        k = min(k, self.context - 1)
        if not 1 <= len(tokens) - self.start <= self.context - k + 1:  # its own window, restarted as the engine's
            self.start = len(tokens) - max(1, min(self.context - k + 1, self.context - self.context // 2))
            self.cached = []
        window = list(tokens[self.start:])
        keep = min(_common_prefix(self.cached, window), len(window) - 1)  # the rollback: stale slots are rewritten
        logits = self._forward(window[keep:], keep)
        self.cached = window
        guesses, qs = [], []
        for j in range(k):
            candidates, ids = filter_logits(logits, params)  # the request's temperature, top-k, top-p, logit bias
            guesses.append(int(draw(candidates, ids, params, generator)))
            if not params.greedy:
                qs.append(distribution(candidates, ids, self.vocab))
            if j + 1 < k:
                logits = self._forward(guesses[-1:], len(self.cached))
                self.cached.append(guesses[-1])
        return Proposal(guesses, torch.stack(qs) if qs else None)

    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], device=self.cache.k.device)
        return self.model(x, kv_cache=self.cache, start_pos=start, logits_to_keep=1)[0][:, -1, : self.vocab].float()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, name: str = "the draft model") -> None:
    """SpeculationError unless both tokenizers map every id to the same bytes (chat templates may differ)."""
    strip = lambda spec: {k: v for k, v in spec.items() if k not in ("chat_template", "sha256")}  # noqa: E731
    if strip(target.to_spec()) == strip(draft.to_spec()):
        return
    if target.vocab_size == draft.vocab_size and all(
            target.decode_bytes([i]) == draft.decode_bytes([i]) for i in range(target.vocab_size)):
        return
    raise SpeculationError(f"{name}: its tokenizer differs from the target's ({draft.vocab_size} vs "
                           f"{target.vocab_size} tokens, or other bytes for a token): a draft model must share "
                           "the target's vocabulary")


# ---------------------------------------------------------------------------- decoding


class Speculator:
    """Batch-1 speculative decoding of one target model with one proposer; `stats` sums every request.

        spec = Speculator(model, tokenizer, NgramProposer())   # or DraftProposer(draft_model, draft_tokenizer)
        [completion] = spec.complete("def f(x):", SamplingParams(temperature=0, max_tokens=64))
        print(spec.stats.acceptance_rate)
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, proposer, *, speculate_tokens: int = SPECULATE_TOKENS,
                 max_model_len: int | None = None):
        if speculate_tokens < 1:
            raise SpeculationError(f"--speculate-tokens must be >= 1, got {speculate_tokens}")
        cfg = model.config
        self.model, self.tokenizer, self.proposer, self.k = model, tokenizer, proposer, speculate_tokens
        self.context = context_length(cfg, max_model_len)
        self.vocab = min(tokenizer.vocab_size, cfg.vocab_size)  # sample only ids below it, as the engine does
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache.empty(cfg, 1, self.context, p.device, p.dtype)
        self.stats = SpeculationStats()
        proposer.prepare(tokenizer, self.vocab, self.context)

    def complete(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, num_samples: int = 1,
                 stop_ids: Sequence[int] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """engine.complete()'s contract (stops, end ids, seeds per sample, streaming), one sample after another."""
        params = (params or SamplingParams()).validate()
        if num_samples < 1:
            raise SpeculationError(f"num_samples must be >= 1, got {num_samples}")
        ids = prompt_ids(self.tokenizer, prompt)
        end_ids = list(stop_ids) if stop_ids is not None else ChatTemplate(self.tokenizer).end_ids
        out = []
        for i in range(num_samples):
            show = None if on_text is None else (lambda _r, _t, text, i=i: text and on_text(i, text))
            req = DecodeRequest(ids, replace(params, seed=sample_seed(params.seed, i)), end_ids, self.tokenizer, show,
                                self.vocab, self.device)
            if params.constraint is not None:
                req.grammar = self._grammar(params, req.stop_ids)
            if params.max_tokens == 0:
                req.end("length")
            else:
                with torch.no_grad(), _eval_mode(self.model), _eval_mode(getattr(self.proposer, "model", None)):
                    self._run(req)
            out.append(req.completion(self.tokenizer))
        return out

    def _grammar(self, params: SamplingParams, stop_ids: set[int]) -> GrammarState:
        """The constraint's matcher, refused in one line if the vocabulary cannot even begin it (the engine's check)."""
        state = GrammarState(params.constraint, self.tokenizer)
        if not token_masks([state], [stop_ids], self.vocab).any():
            raise ConstraintError(f"this model's vocabulary ({self.vocab} tokens) cannot begin the "
                                  f"{params.constraint.kind.replace('_', ' ')} constraint")
        return state

    def _run(self, req: DecodeRequest) -> None:
        self.proposer.reset()
        req.start = max(0, len(req.tokens) - self.context)
        self._prefill(req)
        while not req.done:
            self._round(req)
            if not req.done:
                start = window_start(len(req.tokens), req.start, self.context)
                if start != req.start:
                    req.start = start
                    self._prefill(req)

    def _prefill(self, req: DecodeRequest) -> None:
        """The window but its last token into the cache from slot 0 (the last one starts the next round)."""
        window = req.tokens[req.start : -1]
        if window:
            self.model(torch.tensor([window], device=self.device), kv_cache=self.cache, start_pos=0, logits_to_keep=1)

    def _round(self, req: DecodeRequest) -> None:
        """One target forward pass over the last token and k guesses; take the tokens it decides."""
        n, p = len(req.tokens), req.params
        k = min(self.k, self.context - (n - req.start), p.max_tokens - len(req.out_ids) - 1)
        proposal = self.proposer.propose(req.tokens, k, p, req.generator) if k > 0 else Proposal([])
        guesses = proposal.tokens[:k]
        x = torch.tensor([[req.tokens[-1], *guesses]], device=self.device)
        logits = self.model(x, kv_cache=self.cache, start_pos=n - 1 - req.start)[0][0, :, : self.vocab].float()
        self.stats.accepted += self._take(req, logits, guesses, proposal.q)
        self.stats.proposed += len(guesses)
        self.stats.rounds += 1
        self.stats.tokens += len(req.tokens) - n

    def _take(self, req: DecodeRequest, logits: torch.Tensor, guesses: list[int], q: torch.Tensor | None) -> int:
        """Append the tokens of one verified chunk, position by position; returns how many guesses were kept.

        Each position's rules see the request's state after the tokens before it (penalty counts, the
        grammar), exactly as plain decoding would."""
        p, logp = req.params, logits.log_softmax(-1)
        for j in range(len(guesses) + 1):
            allowed = None
            if req.grammar is not None:
                allowed = token_masks([req.grammar], [req.stop_ids], self.vocab).to(self.device)
                if not allowed.any():  # the grammar is complete, or stuck (the engine's rule)
                    req.end("stop" if req.grammar.accepting else "error")
                    return j
            candidates, ids = filter_logits(logits[j : j + 1], p, req.seen, req.counts, allowed)  # (1, vocab) state
            if j == len(guesses) or p.greedy:  # the free token after the last guess; greedy: the argmax
                token = int(draw(candidates, ids, p, req.generator))
                kept = j < len(guesses) and token == guesses[j]
            else:
                target = distribution(candidates, ids, self.vocab)
                token, kept = verify_guess(target, None if q is None else q[j], guesses[j], req.generator)
            top = None
            if p.logprobs:
                values, indices = logp[j].topk(min(p.logprobs, self.vocab))
                top = list(zip(indices.tolist(), values.tolist()))
            req.append(token, float(logp[j, token]), top)
            if not kept or req.done:
                return j + kept
        return len(guesses)


@contextmanager
def _eval_mode(model: torch.nn.Module | None):
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


# ---------------------------------------------------------------------------- sample.py


def build_proposer(kind: str, draft: GPT | None = None, draft_tokenizer: Tokenizer | None = None,
                   draft_name: str = "the draft model"):
    """The proposer sample.py's --speculate names: "ngram", or "draft" with its model and tokenizer."""
    if kind == "ngram":
        return NgramProposer()
    if kind != "draft":
        raise SpeculationError(f"--speculate must be one of {', '.join(PROPOSERS)}, got {kind!r}")
    if draft is None or draft_tokenizer is None:
        raise SpeculationError("--speculate draft needs --draft-ckpt (a smaller checkpoint with the same tokenizer)")
    return DraftProposer(draft, draft_tokenizer, draft_name)
