"""Speculative decoding: cheap proposals for the engine's rows, verified k at a time in one forward pass.

The engine (gpt/infer/engine.py) does the decoding; this module holds what it speculates with. At a step
every decoding row may carry guesses of its next k tokens from a proposer; the target model
(`GPT.forward`, the same code as every other path) then runs each row's last token and its guesses as one
chunk of k + 1 positions, all rows in one call (per-row start positions, as for uneven rows), which gives
the target's distribution at every guessed position at once. A row's guesses are accepted from the left
while they pass the rule below; the first refused one is replaced by a token drawn from the target, and
when all pass, the last position gives one more token for free. A step therefore costs one target forward
pass and yields between 1 and k + 1 tokens per row.

Two proposers (`sample.py --speculate ngram|DRAFT_CKPT`, `serve.py --speculate`):
  ngram  prompt lookup (vLLM's "ngram", llama.cpp's lookup decoding): the last n tokens (n from
         NGRAM_MAX down to NGRAM_MIN) are looked up in the row's context, and the k tokens that followed
         their latest earlier occurrence are proposed. No model, nothing to load; it shines when the
         output copies spans of the context (extraction, code edits, quoting).
  draft  a smaller checkpoint with the same vocabulary (`check_same_vocabulary`) proposes k tokens
         autoregressively, drawn with each request's temperature, top-k and top-p. It keeps its own KV
         cache with one row per engine row (moved when the engine moves a row), and drafts every row
         together: one forward pass per guess for the whole batch.

The rule. Greedy: a guess is accepted when it is the target's argmax, so the output is token for
token the output of plain decoding (the target sees exactly the same context at every position).
Sampling (Leviathan et al. 2023, Chen et al. 2023): with the target's distribution p (after every
sampling rule of the request: constraint mask, logit bias, penalties, temperature, top-k, top-p) and
the proposer's q, a guess x is accepted with probability min(1, p(x) / q(x)); if refused, the token
is drawn from norm(max(0, p - q)). The token is then distributed exactly as p (`acceptance_probability`
and `residual`; tests/test_speculative.py checks the sum, and the engine's draws statistically).
An n-gram guess is a point mass: q(x) = 1.

Ragged chunks and rollback (`ragged_chunk`). The cache is positional: keys and values of position i live
in slot i, and a query at position i attends to slots 0 .. i only. Rows with fewer guesses than the
longest are padded at the end; the padding's slots, like a refused guess's, lie after the row's last
token, so they are never read before a later step writes them again: rolling back is moving the next
start back to the first position not accepted. A row whose padded chunk would pass its cache's end
starts its chunk earlier instead, recomputing tokens it already holds. The draft's cache is rolled back
the same way (the longest prefix of the tokens it holds that is still the sequence's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from gpt.checkpoint import load_checkpoint
from gpt.config import ConfigError
from gpt.data.tokenizer import Tokenizer
from gpt.infer.sampling import SamplingParams, draw, filter_logits
from gpt.infer.weights import prepare_for_decoding
from gpt.model import GPT, KVCache

SPECULATE_TOKENS = 5  # k: guesses verified per target forward pass (gpt-fast's and vLLM's usual 5)
NGRAM_MAX, NGRAM_MIN = 3, 1  # the n-gram lengths prompt lookup tries, longest first
NGRAM_SEARCH = 8192  # prompt lookup searches the last this many tokens (a bounded cost per step)
_DRAW = SamplingParams()  # draw()'s settings for a distribution given as log-probabilities (temperature 1)


class SpeculationError(ConfigError):
    """A speculative-decoding setting that cannot work (a draft with another vocabulary, a bad k)."""


@dataclass
class Proposal:
    """A proposer's guesses for one row and the distributions they were drawn from.

    q: (len(tokens), vocab) probabilities of the proposer at each guess; None when each guess is a
    point mass (n-gram lookup, or any greedy proposer: greedy verification needs no q).
    """

    tokens: list[int]
    q: torch.Tensor | None = None


@dataclass
class SpeculationStats:
    """What speculation did: guesses made and accepted, row-steps (one target pass for one row), tokens produced."""

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
                f"({100 * self.acceptance_rate:.1f}%), {per_round:.2f} tokens per row per target forward pass]")


class Speculation:
    """What an Engine speculates with (Engine(speculation=...), complete(..., speculation=...)): a proposer,
    k guesses per row and step, and `stats` summed over every request.

        spec = Speculation(NgramProposer())   # or DraftProposer(draft_model, draft_tokenizer)
        [c] = complete(model, tokenizer, "def f(x):", SamplingParams(temperature=0), speculation=spec)
        print(spec.stats.acceptance_rate)
    """

    def __init__(self, proposer, tokens: int = SPECULATE_TOKENS):
        if tokens < 1:
            raise SpeculationError(f"--speculate-tokens must be >= 1, got {tokens}")
        self.proposer, self.k, self.stats = proposer, tokens, SpeculationStats()

    @property
    def name(self) -> str:
        return getattr(self.proposer, "label", self.proposer.name)


def load_speculation(value: str, tokens: int, device, dtype: torch.dtype, quantize: str | None = None,
                     verify: bool = True) -> Speculation:
    """`--speculate VALUE`: "ngram", or a draft checkpoint's folder (loaded and prepared as the target is)."""
    if value == "ngram":
        return Speculation(NgramProposer(), tokens)
    if not Path(value).is_dir():
        raise SpeculationError(f"--speculate {value}: neither ngram nor a checkpoint folder (a draft model)")
    loaded = load_checkpoint(value, device, verify=verify)
    prepare_for_decoding(loaded.model, dtype, quantize)
    return Speculation(DraftProposer(loaded.model, loaded.tokenizer, f"--speculate {value}"), tokens)


def ragged_chunk(seqs: Sequence[Sequence[int]], firsts: Sequence[int], context: int
                 ) -> tuple[list[list[int]], list[int], list[int]]:
    """One forward call's input for rows that need different numbers of positions computed: row b needs
    positions firsts[b] .. len(seqs[b]) - 1 of its sequence (its cache slots). -> (ids (B, T) with T the
    most any row needs, each row's start position, the index in its chunk of its last real token).
    A row's chunk is padded at its end (slots after its last token, rewritten before they are read), or,
    where that would pass slot context - 1, starts earlier (tokens it holds, recomputed)."""
    T = max(len(s) - f for s, f in zip(seqs, firsts))
    ids, starts, lasts = [], [], []
    for seq, first in zip(seqs, firsts):
        start = max(0, min(first, context - T))
        chunk = list(seq[start : start + T])
        ids.append(chunk + [chunk[-1]] * (T - len(chunk)))
        starts.append(start)
        lasts.append(len(seq) - 1 - start)
    return ids, starts, lasts


def chunk_forward(model: GPT, cache: KVCache, ids: list[list[int]], starts: list[int], first_row: int = 0,
                  logits_to_keep: int = 0) -> torch.Tensor:
    """GPT.forward of a ragged chunk (rows first_row.. of the cache, row b's tokens from starts[b]) -> (B, T, vocab)
    logits (the last logits_to_keep positions when set). Every row at one start (batch 1, a prefill of rows joining
    together): the shared-position path, a slice write and no index."""
    a, T = len(ids), len(ids[0])
    x = torch.tensor(ids, device=cache.k.device)
    end, rows = max(starts) + T, slice(first_row, first_row + a)
    view = KVCache(cache.k[:, rows, :, :end], cache.v[:, rows, :, :end])
    start = starts[0] if len(set(starts)) == 1 else torch.tensor(starts, device=x.device)
    return model(x, kv_cache=view, start_pos=start, logits_to_keep=logits_to_keep)[0]


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

    def prepare(self, tokenizer: Tokenizer | None, vocab: int, context: int, rows: int, k: int) -> None:
        """Nothing to check or allocate: the lookup needs no model."""

    def propose_rows(self, reqs: Sequence, ks: Sequence[int]) -> list[Proposal]:
        """Each request's guesses (ks[b] at most) from its own tokens."""
        return [self.propose(r.tokens, k) if k else Proposal([]) for r, k in zip(reqs, ks)]

    def move(self, req, row: int) -> None:
        """Nothing held per row."""

    def propose(self, tokens: Sequence[int], k: int) -> Proposal:
        context = torch.tensor(list(tokens[-NGRAM_SEARCH:]))
        L = len(context)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            windows = context.unfold(0, n, 1)[:-1]  # every earlier n-gram (the last one is the pattern itself)
            hits = (windows == context[L - n:]).all(-1).nonzero()
            if len(hits):
                at = int(hits[-1]) + n  # the latest occurrence's continuation
                return Proposal(context[at : at + k].tolist())
        return Proposal([])


@dataclass
class DraftRow:
    """The draft's record of one request: tokens[start : start + len(cached)] have keys and values in its row."""

    start: int
    cached: list[int]


class DraftProposer:
    """A smaller model with the same vocabulary guesses k tokens per row from its own KV cache, one row per
    engine row (a request's `draft` record says what its row holds).

    tokenizer: the draft's own, checked against the target's (`check_same_vocabulary`) when the engine is
    built; name says which model an error is about."""

    name = "draft"
    LONG_FILL = 16  # a row needing more new positions than this is filled alone first (a new or slid window)

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, name: str = "the draft model"):
        self.model, self.tokenizer, self.label = model, tokenizer, name
        self.cache: KVCache | None = None

    def prepare(self, tokenizer: Tokenizer | None, vocab: int, context: int, rows: int, k: int) -> None:
        """Check the vocabulary against the target's; allocate a row per engine row for the target's context
        (or the draft's block_size, if smaller)."""
        cfg = self.model.config
        if self.tokenizer is not None and tokenizer is not None:
            check_same_vocabulary(tokenizer, self.tokenizer, self.label)
        if cfg.vocab_size < vocab:
            raise SpeculationError(f"{self.label} has {cfg.vocab_size} token ids, the target samples from "
                                   f"{vocab}: a draft model must share the target's vocabulary")
        p = next(self.model.parameters())
        self.vocab, self.context = vocab, max(2, min(context, cfg.block_size))
        self.k = min(k, self.context - 1)
        self.cache = KVCache.empty(cfg, rows, self.context, p.device, p.dtype)
        self.model.eval()

    def move(self, req, row: int) -> None:
        """The engine moves `req` from its row to `row`: what the draft holds of it moves along."""
        n = len(req.draft.cached) if req.draft is not None and req.draft.cached else 0
        if n and row != req.row:
            self.cache.k[:, row, :, :n] = self.cache.k[:, req.row, :, :n]
            self.cache.v[:, row, :, :n] = self.cache.v[:, req.row, :, :n]

    @torch.no_grad()
    def propose_rows(self, reqs: Sequence, ks: Sequence[int]) -> list[Proposal]:
        """Guesses for reqs (rows 0..B-1, ks[b] at most each): the rows brought up to date in one call, then one
        call per guess for all rows. A row draws only the guesses it asked for (its generator, its seed) and
        feeds all but its last; a row done guessing feeds a stand-in, whose slot it then forgets."""
        ks = [min(k, self.k) for k in ks]
        k = max(ks)
        if k == 0:
            return [Proposal([]) for _ in reqs]
        windows = [self._window(r, max(1, kb)) for r, kb in zip(reqs, ks)]
        firsts = [self._rollback(r, w) for r, w in zip(reqs, windows)]
        ids, starts, lasts = ragged_chunk(windows, firsts, self.context)
        logits = chunk_forward(self.model, self.cache, ids, starts)
        logits = logits[torch.arange(len(reqs)), torch.tensor(lasts), : self.vocab].float()
        guesses, qs = [[] for _ in reqs], [[] for _ in reqs]
        held = [len(w) for w in windows]  # per row: the slots that hold its tokens (stand-ins cut it)
        for j in range(k):
            for b, req in enumerate(reqs):
                if j < ks[b]:
                    candidates, ids_ = filter_logits(logits[b : b + 1], req.params)  # temperature, top-k/p, bias
                    guesses[b].append(int(draw(candidates, ids_, req.params, req.generator)))
                    if not req.params.greedy:
                        qs[b].append(distribution(candidates, ids_, self.vocab))
            if j + 1 < k:
                real = [j + 1 < kb for kb in ks]
                last = [[g[j] if r else w[-1]] for g, w, r in zip(guesses, windows, real)]
                pos = [min(len(w) + j, self.context - 1) for w in windows]
                held = [h + 1 if r else min(h, p) for h, p, r in zip(held, pos, real)]
                logits = chunk_forward(self.model, self.cache, last, pos)[:, -1, : self.vocab].float()
        for req, window, g, h in zip(reqs, windows, guesses, held):
            req.draft.cached = (window + g)[:h]
        return [Proposal(g, torch.stack(q) if q else None) for g, q in zip(guesses, qs)]

    def _window(self, req, k: int) -> list[int]:
        """The request's tokens the draft sees: its own window with room for k guesses, restarted as the
        engine's is (the engine's window leaves room for them, so the two restart together)."""
        state = req.draft = req.draft or DraftRow(req.start, [])  # a new request: the engine's window
        n = len(req.tokens)
        if not 1 <= n - state.start <= self.context - k + 1:
            state.start = n - max(1, min(self.context - k + 1, self.context - self.context // 2, n))
            state.cached = []
        return list(req.tokens[state.start :])

    def _rollback(self, req, window: list[int]) -> int:
        """The first position of the window the draft must compute: after the longest prefix it holds (stale
        slots are rewritten). A long stretch (a new window) is filled alone first, all but its last token."""
        keep = min(_common_prefix(req.draft.cached, window), len(window) - 1)
        if len(window) - keep > self.LONG_FILL:
            row = KVCache(self.cache.k[:, req.row : req.row + 1], self.cache.v[:, req.row : req.row + 1])
            self.model(torch.tensor([window[keep:-1]], device=row.k.device), kv_cache=row, start_pos=keep,
                       logits_to_keep=1)
            keep = len(window) - 1
        return keep


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
