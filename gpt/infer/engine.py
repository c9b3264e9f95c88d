"""Text generation: the one decode loop, shared by sample.py, the chat session, training's samples and the server.

`Engine` holds a batch of sequences in one KV cache and advances all of them by one token per
`step()`. Sequences join at the next step (`add`) and leave when they finish, so prompts of
different lengths, each with its own SamplingParams (seed, stops, max_tokens, penalties), share
a batch: continuous batching. A request with a constraint (SamplingParams.constraint: JSON schema,
regex, choice, grammar) carries its own grammar matcher, whose mask of allowed tokens applies
before its sampling rules (gpt/infer/constraints.py). Built on it:
  generate(model, idx, n, params)          (B, T) tensor in, (B, T + n) out (training's samples)
  complete(model, tokenizer, prompt, params)  text in, `Completion`s out: stop strings, end-of-text,
                                          UTF-8-safe streaming, log-probabilities, finish reasons

One step. A new sequence is prefilled into its own row of the cache (all its window but the last
token; the sequences joining at one step in one GPT.forward call, shorter windows padded at their
ends, unless a later one can reuse an earlier one's prefix-cache blocks); then every row's last token
goes through GPT.forward together (T = 1, a per-row position and a mask hiding each row's unused
tail), and each row draws its token with its own
torch.Generator, so a seeded sequence gives the same tokens whatever else shares the batch (up to
floating-point differences between batch shapes, which do not occur in float32 on the CPU tests).
`use_kv_cache=False` runs the naive reference instead: each sequence's whole window through the
model for every token. Both see exactly the same context at every step.

Context length (max_model_len, vLLM's name). The KV cache holds max_batch rows of `context_length`
tokens: the model's block_size, capped at DEFAULT_MAX_MODEL_LEN unless the caller asks for another
length (sample.py and serve.py --max-model-len), so a family whose block_size is its
max_position_embeddings (131,072 for Llama 3.2) does not allocate its whole context per row. A row
holds n_kv_head heads (grouped-query attention), so its bytes are
2 x n_layer x n_kv_head x head_dim x context x dtype size.

Context window (sliding). GPT-2 learns absolute positions, so cached keys are tied to the
position they were computed at and cannot simply be shifted. When a sequence outgrows the
context length we therefore drop the oldest half of its window at once: the context restarts at the
last `context - context // 2` tokens, which are re-encoded from position 0 into the
sequence's row, and cached decoding continues from there (one re-encoding per context / 2 new
tokens; the model always sees between half a window and a full one). The uncached path applies
the same rule (`window_start`). A prompt longer than the context keeps its last context tokens.

Chunked prefill (Engine(prefill_chunk=N), serve.py --prefill-chunk). A step computes at most N prompt tokens
(vLLM's max_num_batched_tokens, counting prompt tokens only): requests join while the step's budget lasts,
the last one may be filled part-way, and it holds the batch's last row and decodes once its window is in
(it goes on at the next steps, with the rows already decoding taking their tokens in between), so a long
prompt arriving in a decoding batch delays its rows by one chunk per step, not by its whole prefill.
A window re-encoded after a slide (below) is computed whole. 0 = whole prompts at once.

Prefix caching (Engine(prefix_cache_mb=N), serve.py --prefix-cache-mb). A row's fill copies what the
prefix cache holds of its window's beginning and runs the model on the rest only, at the positions
after it; the filled blocks are kept for the next rows (gpt/infer/prefix_cache.py).
`DecodeRequest.cached_tokens` says how many prompt tokens came from it.

Speculative decoding (Engine(speculation=...), sample.py and serve.py --speculate). At a step each
decoding row may carry guesses of its next tokens (prompt lookup in its own context, or a draft model
with its own cache rows: gpt/infer/speculative.py); the rows' last tokens and guesses then go through
GPT.forward together, k + 1 positions a row (per-row start positions, rows with fewer guesses padded),
and each row takes its tokens position by position (`_take`, the same code as a plain step's one token):
a guess is kept by the accept/resample rule, the first refused one is replaced, and the next step starts
after the last token taken (the rollback: the cache is positional). A step with no guesses at all is a
plain step. A row never guesses past its context or its max_tokens, so each token is predicted from the
window plain decoding would use; greedy output is plain decoding's, sampling keeps the target's law.
"""

from __future__ import annotations

import codecs
import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Sequence

import torch

from gpt.config import ModelConfig
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import Tokenizer
from gpt.infer.compiled_decode import compile_decoding
from gpt.infer.constraints import ConstraintError, GrammarState, token_masks
from gpt.infer.prefix_cache import MiB, PrefixCache
from gpt.infer.sampling import SamplingError, SamplingParams, draw, filter_logits, scores
from gpt.infer.speculative import Proposal, Speculation, chunk_forward, distribution, ragged_chunk, verify_guess
from gpt.model import GPT, KVCache

# Why a sequence ended: max_tokens reached, a stop string, an end-of-text (or stop) token, cancelled
# (the caller or a shutting-down server), or a failed engine step (the server's worker).
FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]
DEFAULT_MAX_MODEL_LEN = 4096  # the context decoding allows unless asked: min(block_size, this)
_NO_GUESSES = Proposal([])  # a row's proposal at a plain step (shared, never changed)


def context_length(cfg: ModelConfig, max_model_len: int | None = None) -> int:
    """The tokens a decoded sequence may hold (one KV cache row): max_model_len when given (1 .. block_size),
    else min(block_size, DEFAULT_MAX_MODEL_LEN)."""
    if max_model_len is None:
        return min(cfg.block_size, DEFAULT_MAX_MODEL_LEN)
    if not 1 <= max_model_len <= cfg.block_size:
        raise SamplingError("max_model_len", f"--max-model-len must be between 1 and the model's block_size "
                                             f"({cfg.block_size}), got {max_model_len}")
    return max_model_len


def window_start(n_tokens: int, start: int, context: int) -> int:
    """Index of the first token the model sees when predicting token `n_tokens` (see module doc)."""
    if n_tokens - start <= context:
        return start
    keep = max(1, context - context // 2)
    return n_tokens - keep


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th sample of a request: the request's own seed for the first, then distinct ones."""
    if seed is None or index == 0:
        return seed
    return (seed * 1_000_003 + index) % (2**63)


@dataclass
class Completion:
    """One sample: text (stop sequence excluded), the generated ids, and why generation ended.

    token_ids include the token that ended generation (the end-of-text token, or the token that
    completed a stop sequence); `text` never includes either.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[dict] | None = None  # per token: {id, token, logprob, top: [{id, token, logprob}]}

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.logprobs is None:
            d.pop("logprobs")
        return d


@dataclass
class TextStream:
    """Incremental text of one sample: UTF-8-safe decoding and stop sequences that may span tokens.

    Text that could be the beginning of a stop sequence is held back from `pop_new` until it is
    known not to be one, so a streamed stop sequence is never shown.
    """

    tokenizer: Tokenizer
    stops: Sequence[str] = ()
    text: str = ""
    emitted: int = 0
    stopped: bool = False
    _utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def push(self, token_id: int) -> bool:
        """Add one token's bytes; True when a stop sequence completed (the text is cut before it)."""
        before = len(self.text)
        self.text += self._utf8.decode(self.tokenizer.decode_bytes([token_id]))
        cut = None
        for s in self.stops:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
        return self.stopped

    def finish(self) -> None:
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)

    def pop_new(self, final: bool = False) -> str:
        """Text not yet emitted that can safely be shown now."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        new = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(new)
        return new

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


class DecodeRequest:
    """One sequence being continued: its tokens, its sampling state, its row in the cache, its output.

    on_token(request, token_id, new_text) is called after each token (new_text is "" without a
    tokenizer, or while text is held back), and once more with token_id None when the request ends
    without a new token; `finish_reason` is set once the request is done. A token of stop_ids ends
    the request; a token of hidden_ids adds no text (the server's end-of-turn marker, generated past
    under ignore_eos); neither is ever in the text.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int], tokenizer: Tokenizer | None,
                 on_token: Callable[["DecodeRequest", int | None, str], None] | None, vocab_size: int, device,
                 hidden_ids: Sequence[int] = ()):
        self.prompt, self.params, self.stop_ids, self.hidden_ids = prompt, params, set(stop_ids), set(hidden_ids)
        self.tokens = list(prompt)  # prompt + generated: the whole history
        self.out_ids: list[int] = []
        self.out_logprobs: list[float] = []  # the model's log-probability of each generated token
        self.top: list[list[tuple[int, float]]] = []  # the params.logprobs most likely tokens at each step
        self.stream = TextStream(tokenizer, [s for s in params.stop if s]) if tokenizer is not None else None
        self.on_token = on_token
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self.row: int | None = None  # its row of the KV cache while it is in the batch
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.start = 0  # first token of its window (see window_start)
        self.fresh = True  # its row must be (re)filled before it decodes
        self.filled = 0  # tokens of its window already in its row while it is being filled (chunked prefill)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed) if params.seed is not None else self.generator.seed()
        self.grammar: GrammarState | None = None  # the constraint's matcher (Engine.add sets it)
        self.draft = None  # what a draft model holds of it (speculative.DraftRow), with speculation
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(prompt, device=device).clamp(max=vocab_size - 1)] = True
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(1, vocab_size, device=device)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating (thread-safe): the request leaves at the next step, finish reason "cancelled"."""
        self.cancelled = True

    def mean_logprob(self) -> float:
        return sum(self.out_logprobs) / max(1, len(self.out_logprobs))

    def completion(self, tokenizer: Tokenizer | None = None) -> Completion:
        text = self.stream.text if self.stream is not None else ""
        lp = None
        if self.params.logprobs and tokenizer is not None:
            lp = [_logprob_entry(tokenizer, t, p, top) for t, p, top in zip(self.out_ids, self.out_logprobs, self.top)]
        return Completion(text, list(self.out_ids), self.finish_reason or "length", lp)

    def append(self, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        """Take the token drawn for this sequence (with its log-probability and the top alternatives)."""
        self.tokens.append(token)
        self.out_ids.append(token)
        self.out_logprobs.append(logprob)
        if top is not None:
            self.top.append(top)
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        if self.grammar is not None and token not in self.stop_ids:
            self.grammar.advance(token)
        if token in self.stop_ids:
            self.finish_reason = "eos"
        elif self.stream is not None and token not in self.hidden_ids and self.stream.push(token):
            self.finish_reason = "stop"
        elif len(self.out_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        self._notify(token)

    def end(self, reason: FinishReason) -> None:
        """Finish without a new token (max_tokens 0, cancelled, or a failed step) and tell on_token."""
        self.finish_reason = reason
        self._notify(None)

    def _notify(self, token: int | None) -> None:
        """Hand on_token the text that can be shown now (token None: the request ended without a new one)."""
        new = ""
        if self.stream is not None:
            if self.done:
                self.stream.finish()
            new = self.stream.pop_new(final=self.done)
        if self.on_token is not None:
            self.on_token(self, token, new)


class Engine:
    """The decode loop: up to max_batch sequences in one KV cache, joining and leaving between steps.

    add() may be called from any thread; step() from one thread at a time (the server's worker,
    or complete() running until its requests are done). prefix_cache_mb > 0 keeps the keys and values
    of prompt prefixes (block-aligned, up to that many MiB, least recently used evicted) and reuses them
    for later rows that begin with the same tokens (gpt/infer/prefix_cache.py); 0 = off. prefill_chunk > 0
    computes at most that many prompt tokens per step (chunked prefill, see the module doc); 0 = whole prompts.
    speculation: guesses verified k + 1 positions a row per forward pass (speculative decoding, module doc);
    its stats sum every request's.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer | None = None, *, max_batch: int = 8,
                 use_kv_cache: bool = True, vocab_limit: int | None = None, max_model_len: int | None = None,
                 prefix_cache_mb: float = 0, prefill_chunk: int = 0, compile: bool = False,
                 speculation: Speculation | None = None):
        if compile and use_kv_cache:  # the one-token cached step through torch.compile (gpt/infer/compiled_decode.py)
            compile_decoding(model)
        self.model, self.tokenizer, self.max_batch, self.use_kv_cache = model, tokenizer, max_batch, use_kv_cache
        if max_batch < 1:
            raise SamplingError("max_batch", f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 0 or (prefill_chunk and not use_kv_cache):
            raise SamplingError("prefill_chunk", f"prefill_chunk must be >= 0 (0 = whole prompts), and only with "
                                                 f"the KV cache; got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        cfg = model.config
        self.context = context_length(cfg, max_model_len)  # tokens per sequence (see the module doc)
        limit = vocab_limit or (tokenizer.vocab_size if tokenizer is not None else cfg.vocab_size)
        self.vocab = min(limit, cfg.vocab_size)  # sample only ids below it (the vocabulary may be padded)
        p = next(model.parameters())
        self.device = p.device
        # a compiled step's cache view must never span a whole dimension of the cache: torch would specialise
        # a second graph for a full context, compiled mid-reply when the first row fills its window
        slots = self.context + 1 if getattr(model, "compiled_decode", None) is not None else self.context
        self.cache = KVCache.empty(cfg, max_batch, slots, p.device, p.dtype) if use_kv_cache else None
        self.prefix_cache = self._prefix_cache(prefix_cache_mb)
        self.speculation = speculation
        if speculation is not None:
            if not use_kv_cache:
                raise SamplingError("speculate", "speculative decoding verifies guesses in the KV cache: "
                                                 "not with use_kv_cache=False")
            speculation.proposer.prepare(tokenizer, self.vocab, self.context, max_batch, speculation.k)
        self.active: list[DecodeRequest] = []  # active[i] lives in cache row i
        self.waiting: list[DecodeRequest] = []
        self._lock = threading.Lock()

    def add(self, prompt: Sequence[int], params: SamplingParams, *, stop_ids: Sequence[int] = (),
            hidden_ids: Sequence[int] = (),
            on_token: Callable[[DecodeRequest, int | None, str], None] | None = None) -> DecodeRequest:
        """Queue a prompt (token ids); it joins the batch at the next step with a free row."""
        params.validate()
        if not prompt:
            raise SamplingError("prompt", "the prompt is empty")
        req = DecodeRequest(list(prompt), params, stop_ids, self.tokenizer, on_token, self.vocab, self.device,
                            hidden_ids)
        if params.constraint is not None:
            req.grammar = self._grammar(params, req.stop_ids)
        if params.max_tokens == 0:
            req.end("length")
            return req
        with self._lock:
            self.waiting.append(req)
        return req

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    @property
    def held(self) -> int:
        """Requests in the batch or waiting for a row."""
        return len(self.active) + len(self.waiting)

    def cancel_all(self) -> None:
        """Cancel every held request (thread-safe): each leaves at the next step, finish reason "cancelled"."""
        with self._lock:
            for req in self.active + self.waiting:
                req.cancel()

    @property
    def decoding(self) -> list[DecodeRequest]:
        """The active requests whose window is in their row: all but a prompt still being filled (the last row)."""
        return self.active[:-1] if self._part_filled() is not None else self.active

    def fail_all(self) -> None:
        """After a step raised: every held request ends with finish reason "error" and the batch empties."""
        with self._lock:
            failed, self.active, self.waiting = self.active + self.waiting, [], []
        for req in failed:
            req.row = None
            req.end("error")

    @torch.no_grad()  # not inference_mode: FSDP2-sharded models (samples after training) update parameters in place
    def step(self) -> None:
        """Drop cancelled requests, admit and fill waiting ones (within the prefill budget), give every request
        whose window is in its row its next token (or, speculating, its next tokens)."""
        # dropout off while decoding (run() switches once for all its steps)
        with _eval_mode(self.model) if self.model.training else nullcontext():
            self._admit()
            rows = self.decoding
            if not rows:
                return
            proposals = self._proposals(rows)
            if any(p.tokens for p in proposals):
                (logits, lse), offsets = self._verify_scores(rows, proposals)
            else:
                logits, lse = self._next_scores()
                logits, lse, offsets = logits[:, None], lse[:, None], [0] * len(rows)
        masks = self._masks()
        for i, req in enumerate(rows):
            guesses = proposals[i].tokens
            at = slice(offsets[i], offsets[i] + len(guesses) + 1)
            n = len(req.tokens)
            kept = self._take(req, logits[i, at], lse[i, at], proposals[i], masks.get(i))
            if self.speculation is not None:
                stats = self.speculation.stats
                stats.proposed, stats.accepted = stats.proposed + len(guesses), stats.accepted + kept
                stats.rounds, stats.tokens = stats.rounds + 1, stats.tokens + len(req.tokens) - n
            if not req.done:
                new_start = window_start(len(req.tokens), req.start, self.context)
                if new_start != req.start:  # the window slides: its row is re-encoded at the next step
                    req.fresh, req.start, req.filled = True, new_start, 0
        self._release([r for r in self.active if r.done])

    def run(self) -> None:
        """Step until every request is done."""
        with _eval_mode(self.model):
            while self.busy:
                self.step()

    # ------------------------------------------------------------------ internals

    def _take(self, req: DecodeRequest, logits: torch.Tensor, lse: torch.Tensor, proposal: Proposal,
              allowed: torch.Tensor | None) -> int:
        """Give the request the tokens its (J, vocab) logits decide: position j's rules see the request after the
        tokens before it (penalty counts, the grammar), as plain decoding would. Without guesses (J = 1) that is
        one draw; a guess j is kept greedily when it is the argmax, sampling by the accept/resample rule
        (speculative.verify_guess); the first refused one is replaced, and when all are kept the last position
        gives one more token. allowed: the constraint's mask at the first position. -> the guesses kept."""
        p, guesses = req.params, proposal.tokens
        for j in range(len(guesses) + 1):
            if j and req.grammar is not None:
                allowed = token_masks([req.grammar], [req.stop_ids], self.vocab).to(self.device)
            if allowed is not None and not allowed.any():  # the grammar is complete, or stuck (constraints.py)
                req.end("stop" if req.grammar.accepting else "error")
                return j
            candidates, ids = filter_logits(logits[j : j + 1], p, None if req.seen is None else req.seen[:, : self.vocab],
                                            None if req.counts is None else req.counts[:, : self.vocab], allowed)
            if j == len(guesses) or p.greedy:
                token = int(draw(candidates, ids, p, req.generator))
                kept = j < len(guesses) and token == guesses[j]
            else:
                q = None if proposal.q is None else proposal.q[j]
                token, kept = verify_guess(distribution(candidates, ids, self.vocab), q, guesses[j], req.generator)
            top = None
            if p.logprobs:
                values, indices = logits[j].topk(min(p.logprobs, self.vocab))
                top = list(zip(indices.tolist(), (values - lse[j]).tolist()))
            req.append(token, float(logits[j, token] - lse[j]), top)
            if not kept or req.done:
                return j + kept
        return len(guesses)

    def _proposals(self, rows: list[DecodeRequest]) -> list[Proposal]:
        """Each decoding row's guesses (none without speculation): at most k, never past its context (the window
        plain decoding would use) or its max_tokens (the last token is always the target's own)."""
        if self.speculation is None:
            return [_NO_GUESSES] * len(rows)
        ks = [max(0, min(self.speculation.k, self.context - (len(r.tokens) - r.start),
                         r.params.max_tokens - len(r.out_ids) - 1)) for r in rows]
        proposals = self.speculation.proposer.propose_rows(rows, ks)
        return [Proposal(p.tokens[:k], None if p.q is None else p.q[:k]) for p, k in zip(proposals, ks)]

    def _verify_scores(self, rows: list[DecodeRequest],
                       proposals: list[Proposal]) -> tuple[tuple[torch.Tensor, torch.Tensor], list[int]]:
        """Every row's last token and guesses through GPT.forward in one call (speculative.ragged_chunk: rows
        with fewer guesses padded) -> (sampling.scores of the (A, T, vocab) logits, the index of each row's last
        token in them)."""
        windows = [r.tokens[r.start :] + p.tokens for r, p in zip(rows, proposals)]
        firsts = [len(r.tokens) - 1 - r.start for r in rows]
        ids, starts, _ = ragged_chunk(windows, firsts, self.context)
        logits = chunk_forward(self.model, self.cache, ids, starts)
        return scores(logits, self.vocab), [f - s for f, s in zip(firsts, starts)]

    def _prefix_cache(self, mib: float) -> PrefixCache | None:
        """The cache of prompt prefixes' keys and values (None when mib is 0); refused where it cannot work."""
        if not mib:
            return None
        if not 0 < mib < float("inf"):
            raise SamplingError("prefix_cache_mb", f"the prefix cache's size must be a number of MiB >= 0 (0 = off), "
                                                   f"got {mib}")
        if self.cache is None:
            raise SamplingError("prefix_cache_mb", "the prefix cache reuses the KV cache: not with use_kv_cache=False")
        cache = PrefixCache(self.model.config, mib, self.device, self.cache.k.dtype)
        if cache.capacity == 0:
            raise SamplingError("prefix_cache_mb", f"a prefix cache of {mib:g} MiB holds no block of "
                                                   f"{cache.block_tokens} tokens of this model "
                                                   f"({cache.block_bytes / MiB:.2f} MiB); give more or 0 (off)")
        return cache

    def _grammar(self, params: SamplingParams, stop_ids: set[int]) -> GrammarState:
        """The constraint's matcher for a new request; refused in one line if the vocabulary cannot even begin it."""
        if self.tokenizer is None:
            raise SamplingError("constraint", "constrained decoding needs the model's tokenizer")
        state = GrammarState(params.constraint, self.tokenizer)
        if not token_masks([state], [stop_ids], self.vocab).any():
            kind = params.constraint.kind.replace("_", " ")
            raise ConstraintError(f"this model's vocabulary ({self.vocab} tokens) cannot begin the {kind} "
                                  "constraint (a character it needs is not a token)")
        return state

    def _masks(self) -> dict[int, torch.Tensor]:
        """Row -> (1, vocab) bool: the tokens its constraint allows next (rows without one are absent)."""
        decoding = self.decoding
        rows = [i for i, r in enumerate(decoding) if r.grammar is not None]
        if not rows:
            return {}
        allowed = token_masks([decoding[i].grammar for i in rows], [decoding[i].stop_ids for i in rows],
                              self.vocab).to(self.device)
        return {i: allowed[k : k + 1] for k, i in enumerate(rows)}

    def _admit(self) -> None:
        """Drop cancelled requests; fill rows within the step's budget of prompt tokens (prefill_chunk): windows
        re-encoded after a slide (whole), the prompt filled part-way at the last step (the last row), then
        waiting requests join while the budget lasts; the last to join may be filled part-way."""
        self._drop_cancelled()
        budget = self.prefill_chunk or math.inf
        if self.cache is not None:
            for req in self.active:
                if req.fresh:
                    budget -= self._prefill(req, budget if req is self.active[-1] else math.inf)
        joined: list[tuple[tuple[int, list[int], int], DecodeRequest]] = []  # joining rows' chunks, not yet computed
        while budget > 0 and len(self.active) < self.max_batch and self._part_filled() is None:
            with self._lock:
                if not self.waiting:
                    break
                req = self.waiting.pop(0)
            req.row, req.start = len(self.active), max(0, len(req.tokens) - self.context)
            self.active.append(req)
            if self.cache is not None:
                budget -= self._prefill(req, budget, joined)
        self._fill_joined(joined)

    def _part_filled(self) -> DecodeRequest | None:
        """The request whose window is part-way into its row (chunked prefill): always the batch's last row."""
        last = self.active[-1] if self.active and self.cache is not None else None
        return last if last is not None and last.fresh else None

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the batch or the queue and end with finish reason "cancelled"."""
        with self._lock:
            waiting = [r for r in self.waiting if r.cancelled]
            for req in waiting:
                self.waiting.remove(req)
        active = [r for r in self.active if r.cancelled]
        self._release(active)
        for req in active + waiting:
            req.end("cancelled")

    def _release(self, done: list[DecodeRequest]) -> None:
        """Finished or cancelled requests leave; the last rows move into the freed ones (rows stay 0..A-1). A prompt
        being filled stays the last row: its filled part moves to the new last row."""
        held = self._part_filled()
        if held is not None and held not in done:
            self.active.pop()
        else:
            held = None
        for req in done:
            last = self.active.pop()
            if last is not req:
                self.active[req.row] = last
                if self.speculation is not None:
                    self.speculation.proposer.move(last, req.row)
                if self.cache is not None and not last.fresh:
                    n = len(last.tokens) - last.start
                    self.cache.k[:, req.row, :, :n] = self.cache.k[:, last.row, :, :n]
                    self.cache.v[:, req.row, :, :n] = self.cache.v[:, last.row, :, :n]
                last.row = req.row
            req.row = None
        if held is not None:
            row, n = len(self.active), held.filled
            if row != held.row and n:
                self.cache.k[:, row, :, :n] = self.cache.k[:, held.row, :, :n]
                self.cache.v[:, row, :, :n] = self.cache.v[:, held.row, :, :n]
            if self.speculation is not None:
                self.speculation.proposer.move(held, row)
            held.row = row
            self.active.append(held)

    def _prefill(self, req: DecodeRequest, budget: float, joined: list | None = None) -> int:
        """Fill the request's row with its window but the last token, from position 0, computing at most `budget`
        tokens -> the tokens computed. At the fill's start what the prefix cache holds of the window is copied;
        the rest is computed by the model at the positions after what is in (chunked prefill); a fill that
        stops short goes on at the next call. The whole window in: req.fresh is False, its blocks are cached.
        joined: the rows joining at this step whose chunks wait to be computed together (_fill_joined); this
        row's chunk joins them, after they are computed first if its window could reuse their blocks."""
        window = req.tokens[req.start : -1]
        k, v = self.cache.k[:, req.row], self.cache.v[:, req.row]  # (n_layer, n_kv_head, context, head_dim)
        if req.filled == 0 and self.prefix_cache is not None:
            if joined and self._shares_a_block(window, joined):  # computed and cached first: this row reuses them
                self._fill_joined(joined)
            req.filled = self.prefix_cache.load(window, k, v)
            if not req.out_ids:  # the prompt's own prefill (not a window re-encoded later)
                req.cached_tokens = req.filled
        n = int(max(0, min(len(window) - req.filled, budget)))
        chunk = (req.row, window[: req.filled + n], req.filled)
        req.filled += n
        req.fresh = req.filled < len(window)
        if n and joined is not None:
            joined.append((chunk, req))
        elif n:
            self._fill_joined([(chunk, req)])
        return n

    def _shares_a_block(self, window: list[int], joined: list) -> bool:
        """Whether a waiting chunk's window begins with the same prefix-cache block as `window`."""
        block = self.prefix_cache.block_tokens
        return len(window) >= block and any(r.tokens[r.start : r.start + block] == window[:block] for _, r in joined)

    def _fill_joined(self, joined: list[tuple[tuple[int, list[int], int], DecodeRequest]]) -> None:
        """Compute the waiting chunks ((row, window so far, first position computed), request), then cache the blocks
        of the windows now whole; empties `joined`. Consecutive rows from one position (requests joining at one
        step) go through GPT.forward in one call, the weights read once for all (speculative.ragged_chunk: shorter
        chunks padded at their ends, slots each row writes again before it reads them)."""
        chunks = [chunk for chunk, _ in joined]
        rows, firsts = [row for row, _, _ in chunks], {first for _, _, first in chunks}
        together = len(firsts) == 1 and rows == list(range(rows[0], rows[0] + len(rows)))
        for group in [chunks] if together else [[chunk] for chunk in chunks]:
            ids, starts, _ = ragged_chunk([seq for _, seq, _ in group], [first for _, _, first in group], self.context)
            chunk_forward(self.model, self.cache, ids, starts, first_row=group[0][0], logits_to_keep=1)
        for _, req in joined:
            if not req.fresh and self.prefix_cache is not None:
                self.prefix_cache.store(req.tokens[req.start : -1], self.cache.k[:, req.row], self.cache.v[:, req.row])
        joined.clear()

    def _next_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """sampling.scores of the (A, vocab) logits of the next token of every request in `decoding` (its rows
        0..A-1): the float logits and their log-normalizers."""
        if not self.use_kv_cache:
            rows = [self.model(torch.tensor([r.tokens[r.start :]], device=self.device), logits_to_keep=1)[0][:, -1]
                    for r in self.active]
            return scores(torch.cat(rows), self.vocab)
        decoding = self.decoding  # rows 0..a-1; their windows were filled by _admit
        a = len(decoding)
        positions = [len(r.tokens) - 1 - r.start for r in decoding]
        last = torch.tensor([[r.tokens[-1]] for r in decoding], device=self.device)
        step = getattr(self.model, "compiled_decode", None)  # gpt/infer/compiled_decode.py, when asked for
        if step is not None:
            return step(last, self.cache, positions, self.vocab)
        if len(set(positions)) == 1:  # every row at one position (batch 1): a slice write, no mask, no index_put
            view = KVCache(self.cache.k[:, :a, :, : positions[0] + 1], self.cache.v[:, :a, :, : positions[0] + 1])
            logits = self.model(last, kv_cache=view, start_pos=positions[0], logits_to_keep=1)[0][:, -1]
        else:
            length = max(positions) + 1
            view = KVCache(self.cache.k[:, :a, :, :length], self.cache.v[:, :a, :, :length])
            pos = torch.tensor(positions, device=self.device)
            logits = self.model(last, kv_cache=view, start_pos=pos, logits_to_keep=1)[0][:, -1]
        return scores(logits, self.vocab)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, params: SamplingParams | None = None, *,
             vocab_limit: int | None = None, use_kv_cache: bool = True,
             max_model_len: int | None = None, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Append max_new_tokens tokens to each row of idx (B, T) -> (B, T + max_new_tokens).

    Row b draws with sample_seed(params.seed, b); params.max_tokens and params.stop are ignored.
    A params.constraint needs the tokenizer; a row whose grammar is complete before max_new_tokens
    is padded with the tokenizer's end-of-text id (complete() returns each sample's own length).
    """
    params = replace(params or SamplingParams(), max_tokens=max_new_tokens, stop=())
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError("the prompt must be a non-empty (batch, tokens) tensor")
    engine = Engine(model, tokenizer, max_batch=idx.shape[0], use_kv_cache=use_kv_cache, vocab_limit=vocab_limit,
                    max_model_len=max_model_len)
    reqs = [engine.add(row, replace(params, seed=sample_seed(params.seed, b))) for b, row in enumerate(idx.tolist())]
    engine.run()
    pad = tokenizer.eot_id if tokenizer is not None else None
    if any(len(r.out_ids) < max_new_tokens for r in reqs) and pad is None:
        raise SamplingError("constraint", "a constrained row ended before max_new_tokens and this tokenizer has no "
                                          "end-of-text id to pad it with: use complete()")
    new = [r.out_ids + [pad] * (max_new_tokens - len(r.out_ids)) for r in reqs]
    new = torch.tensor(new, dtype=torch.long, device=idx.device).view(len(reqs), -1)
    return torch.cat([idx, new], dim=1)


def prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt; an empty one is the end-of-text token (an unconditional sample)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise SamplingError("prompt", "the prompt is empty; give some text with --prompt or --prompt-file")
        ids = [tokenizer.eot_id]
    return ids


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    num_samples: int = 1,
    stop_ids: Sequence[int] | None = None,
    use_kv_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    max_model_len: int | None = None,
    speculation: Speculation | None = None,
) -> list[Completion]:
    """Generate num_samples continuations of `prompt` (text or token ids) in one batch.

    Generation of a sample ends at params.max_tokens ("length"), at the first of params.stop, which
    is not included ("stop"), or at a token of stop_ids ("eos"; default: the model's end of turn and
    end of text, `ChatTemplate.end_ids`; () = none). Sample i draws with sample_seed(params.seed, i), as the server's n does.
    on_text(sample_index, text) receives each sample's text as it is generated. max_model_len: the
    context (see `context_length`). speculation: speculative decoding (its stats sum these samples' too).
    """
    params = params or SamplingParams()
    if num_samples < 1:
        raise SamplingError("n", f"num_samples must be >= 1, got {num_samples}")
    ids = prompt_ids(tokenizer, prompt)
    end_ids = list(stop_ids) if stop_ids is not None else ChatTemplate(tokenizer).end_ids
    engine = Engine(model, tokenizer, max_batch=num_samples, use_kv_cache=use_kv_cache,
                    max_model_len=max_model_len, speculation=speculation)
    reqs: list[DecodeRequest] = []
    for i in range(num_samples):
        show = None if on_text is None else (lambda _r, _t, text, i=i: text and on_text(i, text))
        reqs.append(engine.add(ids, replace(params, seed=sample_seed(params.seed, i)), stop_ids=end_ids, on_token=show))
    engine.run()
    return [r.completion(tokenizer) for r in reqs]


def _logprob_entry(tokenizer: Tokenizer, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    alternatives = [{"id": i, "token": tokenizer.decode([i]), "logprob": lp} for i, lp in top]
    return {"id": token, "token": tokenizer.decode([token]), "logprob": logprob, "top": alternatives}
