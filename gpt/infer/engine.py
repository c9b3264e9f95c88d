"""Text generation: one prefill pass over the prompt, then one cached forward per new token.

Layers, from the bottom up:
  decode_steps(model, idx, ...)  yields the next token of every sequence in the batch, step by step
  generate(model, idx, ...)      the same as a (B, T + n) tensor (training's sample uses it)
  complete(model, tokenizer, prompt, ...)  text in, `Completion`s out: stop strings, end-of-text,
                                 UTF-8-safe streaming, log-probabilities, finish reasons

The KV cache is pre-allocated once for batch x window length; each step writes one position.
`use_kv_cache=False` runs the naive reference instead: the whole window through the model for
every token. Both see exactly the same context at every step, so greedy outputs are identical.

Context window (sliding). GPT-2 learns absolute positions, so cached keys are tied to the
position they were computed at and cannot simply be shifted. When the sequence outgrows
block_size we therefore drop the oldest half of the window at once: the context restarts at the
last `block_size - block_size // 2` tokens, which are re-encoded from position 0 in one prefill
pass, and cached decoding continues from there (one re-encoding per block_size / 2 new tokens;
the model always sees between half a window and a full one). The uncached path applies the same
rule (`window_start`), so both paths condition on the same tokens and greedy outputs match.
A prompt longer than block_size keeps its last block_size tokens.
"""

from __future__ import annotations

import codecs
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from gpt.config import ConfigError
from gpt.data.tokenizer import Tokenizer
from gpt.infer.fastpath import Decoder
from gpt.infer.sampling import SamplingParams, filter_logits, sample
from gpt.model import GPT, KVCache

FINISH_REASONS = ("length", "stop", "eos")


def window_start(n_tokens: int, start: int, block_size: int) -> int:
    """Index of the first token the model sees when predicting token `n_tokens` (see module doc)."""
    if n_tokens - start <= block_size:
        return start
    keep = max(1, block_size - block_size // 2)
    return n_tokens - keep


@dataclass
class Step:
    """One decoding step for the whole batch; log-prob fields are set when asked for."""

    ids: list[int]  # (B,) the sampled tokens
    logprobs: list[float] | None = None  # (B,) log-probability of each sampled token
    top_ids: list[list[int]] | None = None  # (B, K) the K most likely tokens
    top_logprobs: list[list[float]] | None = None


@torch.inference_mode()
def decode_steps(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    *,
    seed: int | None = None,
    vocab_limit: int | None = None,
    use_kv_cache: bool = True,
    logprobs: int = 0,
) -> Iterator[Step]:
    """Yield max_new_tokens steps for the prompts idx (B, T); stop iterating to stop early.

    vocab_limit: sample only ids below it (the model's vocabulary may be padded past the tokenizer's).
    logprobs: also report the K most likely tokens of the model's distribution (before penalties,
        temperature and truncation: what the model believes, as hosted APIs report it).
    """
    params = params or SamplingParams()
    params.validate()
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError("the prompt must be a non-empty (batch, tokens) tensor")
    cfg = model.config
    B, T = idx.shape
    V = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
    device = idx.device
    block = cfg.block_size
    was_training = model.training
    model.eval()
    try:
        tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # whole history, no cat
        tokens[:, :T] = idx
        gen = torch.Generator(device=device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        seen = counts = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, idx, True)
        if params.frequency_penalty or params.presence_penalty:
            counts = torch.zeros(B, cfg.vocab_size, device=device)
        ones = torch.ones(B, 1, device=device)

        n, start = T, max(0, T - block)
        if max_new_tokens <= 0:
            return
        if use_kv_cache:
            cached = _CachedForward(model, B, min(block, T + max_new_tokens))
            logits = cached(tokens[:, start:n], 0)
        else:
            logits = _uncached(model, tokens[:, start:n])
        for i in range(max_new_tokens):
            logits = (logits if logits.size(-1) == V else logits[:, :V]).float()
            candidates, ids = filter_logits(
                logits, params, None if seen is None else seen[:, :V], None if counts is None else counts[:, :V]
            )
            nxt = sample(candidates, ids, params, gen)
            tokens.select(1, n).copy_(nxt)
            n += 1
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            if counts is not None:
                counts.scatter_add_(1, nxt[:, None], ones)
            yield _step(nxt, logits, logprobs)
            if i == max_new_tokens - 1:
                break
            new_start = window_start(n, start, block)
            if not use_kv_cache:
                logits = _uncached(model, tokens[:, new_start:n])
            elif new_start != start:  # the window slid: re-encode the kept tokens from position 0
                logits = cached(tokens[:, new_start:n], 0)
            else:
                logits = cached(tokens[:, n - 1 : n], n - 1 - start)
            start = new_start
    finally:
        model.train(was_training)


class _CachedForward:
    """Logits of a chunk's last token, its keys/values written to a pre-allocated cache.

    Uses the lean Decoder (gpt/decode.py) when the model is a plain GPT, else GPT.forward."""

    def __init__(self, model: GPT, batch: int, max_len: int):
        dtype = next(model.parameters()).dtype
        self.model, self.decoder = model, Decoder.for_model(model)
        self.cache = KVCache.empty(model.config, batch, max_len, next(model.parameters()).device, dtype)

    def __call__(self, chunk: torch.Tensor, pos: int) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.forward(chunk, pos, self.cache)
        return self.model(chunk, kv_cache=self.cache, start_pos=pos, logits_to_keep=1)[0][:, -1]


def _uncached(model: GPT, window: torch.Tensor) -> torch.Tensor:
    """The reference: the whole window through the model, no cache."""
    return model(window, logits_to_keep=1)[0][:, -1]


def _step(nxt: torch.Tensor, logits: torch.Tensor, k: int) -> Step:
    if not k:
        return Step(nxt.tolist())
    logp = logits.log_softmax(-1)
    top = logp.topk(min(k, logp.size(-1)), dim=-1)
    chosen = logp.gather(1, nxt[:, None]).squeeze(1)
    return Step(nxt.tolist(), chosen.tolist(), top.indices.tolist(), top.values.tolist())


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    seed: int | None = None,
    vocab_limit: int | None = None,
    use_kv_cache: bool = True,
) -> torch.Tensor:
    """Append max_new_tokens tokens to idx (B, T) and return (B, T + max_new_tokens); temperature 0 is greedy."""
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty)
    steps = [s.ids for s in decode_steps(model, idx, max_new_tokens, params, seed=seed, vocab_limit=vocab_limit,
                                         use_kv_cache=use_kv_cache)]
    if not steps:
        return idx.clone()
    new = torch.tensor(steps, dtype=torch.long, device=idx.device).T  # (B, n)
    return torch.cat([idx, new], dim=1)


# ------------------------------------------------------------------------------ text level


@dataclass
class Completion:
    """One sample: text (stop sequence excluded), the generated ids, and why generation ended.

    token_ids include the token that ended generation (the end-of-text token, or the token that
    completed a stop sequence); `text` never includes either.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "eos"
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


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    logprobs: int = 0,
    use_kv_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    device: torch.device | str | None = None,
) -> list[Completion]:
    """Generate num_samples continuations of `prompt` (text or token ids) in one batch.

    Generation of a sample ends at max_new_tokens ("length"), at the first stop sequence, which is
    not included ("stop"), or at a token of stop_ids ("eos"; default: the tokenizer's end-of-text).
    on_text(sample_index, text) receives each sample's text as it is generated.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise ConfigError("the prompt is empty; give some text with --prompt or --prompt-file")
        ids = [tokenizer.eot_id]
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    stops = [s for s in stop if s]
    end_ids = set(stop_ids if stop_ids is not None else ([tokenizer.eot_id] if tokenizer.eot_id is not None else []))
    device = device or next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty)

    streams = [TextStream(tokenizer, stops) for _ in range(num_samples)]
    out_ids: list[list[int]] = [[] for _ in range(num_samples)]
    out_lp: list[list[dict]] = [[] for _ in range(num_samples)]
    reasons: list[str | None] = [None] * num_samples
    steps = decode_steps(model, idx, max_new_tokens, params, seed=seed, vocab_limit=tokenizer.vocab_size,
                         use_kv_cache=use_kv_cache, logprobs=logprobs)
    for step in steps:
        for b, tok in enumerate(step.ids):
            if reasons[b] is not None:
                continue
            out_ids[b].append(tok)
            if logprobs:
                out_lp[b].append(_logprob_entry(tokenizer, step, b))
            if tok in end_ids:
                reasons[b] = "eos"
            elif streams[b].push(tok):
                reasons[b] = "stop"
            if on_text is not None:
                new = streams[b].pop_new()
                if new:
                    on_text(b, new)
        if all(r is not None for r in reasons):
            steps.close()
            break
    results = []
    for b, s in enumerate(streams):
        s.finish()
        if on_text is not None:
            tail = s.pop_new(final=True)
            if tail:
                on_text(b, tail)
        results.append(Completion(s.text, out_ids[b], reasons[b] or "length", out_lp[b] if logprobs else None))
    return results


def _logprob_entry(tokenizer: Tokenizer, step: Step, b: int) -> dict:
    tok = step.ids[b]
    top = [
        {"id": i, "token": tokenizer.decode([i]), "logprob": lp}
        for i, lp in zip(step.top_ids[b], step.top_logprobs[b])
    ]
    return {"id": tok, "token": tokenizer.decode([tok]), "logprob": step.logprobs[b], "top": top}
