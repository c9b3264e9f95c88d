"""Turning next-token logits into a token: penalties, temperature, top-k, top-p, min-p, then a draw.

Pure tensor functions on (B, V) float logits, applied in this order (the order of HF and vLLM):

-1. the constraint's mask (a `Constraint`: JSON schema, regex, choice, grammar; gpt/infer/constraints.py
   computes which tokens its grammar allows): every other token gets -inf first, so no later rule can
   bring it back.
1. repetition_penalty (CTRL / HF semantics): a token already in the context (prompt or output)
   has its logit divided by the penalty when positive and multiplied by it when negative.
2. frequency_penalty and presence_penalty (OpenAI semantics): logit -= count * frequency_penalty
   + (count > 0) * presence_penalty, where count is how often the token was generated so far
   (the prompt does not count). Negative values encourage repetition.
3. temperature: 0 means greedy (argmax of the penalised logits); otherwise logits / temperature.
4. top_k: keep the k most likely tokens. 5. top_p (nucleus): keep the smallest set of most likely
   tokens whose probability reaches top_p (the most likely token is always kept).
5b. min_p: keep the tokens whose probability is at least min_p times the most likely one's (after
   temperature; among what top-k and top-p left: HF's order, and vLLM's before its v1 engine).
0. logit_bias (OpenAI): added to the logits of the given token ids.
6. a draw from the remaining distribution with a seeded torch.Generator: one seed, one output.
"""

from __future__ import annotations

import math
import json
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from gpt.config import ConfigError, check_ranges, ranged

NEG_INF = float("-inf")


class SamplingError(ConfigError):
    """A decoding setting out of range; `param` names it (the server reports it as OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What the output must match: kind + text (hashable, so compiled grammars are shared).

    json_schema: a JSON schema (text = the schema as JSON; OpenAI's strict subset and more).
    json_object: any JSON object (text unused). regex: the whole output matches the regular
    expression. choice: exactly one of several strings (text = a JSON list of them). grammar: a Lark
    or GBNF (llama.cpp) grammar. Build one with the class methods: Constraint.json_schema({...}).
    """

    kind: ConstraintKind
    text: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> "Constraint":
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> "Constraint":
        return cls("grammar", text)

    def validate(self) -> "Constraint":
        """SamplingError for an unknown kind or missing text (the grammar itself is checked when compiled)."""
        if self.kind not in CONSTRAINT_KINDS:
            raise SamplingError("constraint", f"constraint kind must be one of {', '.join(CONSTRAINT_KINDS)}, "
                                              f"got {self.kind!r}")
        if self.kind == "choice":
            try:
                options = json.loads(self.text)
            except json.JSONDecodeError:
                options = None
            if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
                raise SamplingError("constraint", "a choice constraint needs a non-empty list of non-empty strings")
        elif self.kind != "json_object" and not self.text.strip():
            raise SamplingError("constraint", f"the {self.kind.replace('_', ' ')} constraint is empty")
        return self


@dataclass
class SamplingParams:
    """Everything that decides one continuation: the one object passed through complete(), generate(),
    the chat session, sample.py and the server (the names match sample.py's flags and OpenAI's fields).

    seed: the continuation is a pure function of (model, prompt, params) when set, whatever else is in
        the batch (every sequence draws from its own generator).
    logit_bias: token id -> value added to its logit before penalties and temperature (OpenAI's).
    logprobs: also report the K most likely tokens at each step (0 = only the chosen token's).
    constraint: a JSON schema, regex, choice or grammar the output must match (None = free text).
    """

    temperature: float = ranged(1.0, ge=0)  # 0 = greedy
    top_k: int | None = ranged(None, ge=0)  # None or 0 = no limit
    top_p: float = ranged(1.0, gt=0, le=1)
    min_p: float = ranged(0.0, ge=0, le=1)  # 0 = off; keep tokens at least min_p x the top token's probability
    repetition_penalty: float = ranged(1.0, gt=0)  # 1 = off
    frequency_penalty: float = ranged(0.0)  # any finite number; 0 = off
    presence_penalty: float = ranged(0.0)
    logit_bias: dict = field(default_factory=dict)  # token id -> bias in logits (values checked in validate)
    max_tokens: int = ranged(256, ge=0)
    stop: tuple[str, ...] = ()
    seed: int | None = ranged(None)  # None = a random seed
    logprobs: int = ranged(0, ge=0)
    constraint: Constraint | None = None  # the output must match it (gpt/infer/constraints.py)

    def validate(self, name: Callable[[str], str] | None = None) -> "SamplingParams":
        """SamplingError naming the first setting out of range (NaN and infinities included); returns self.

        name turns a field into what the user typed (sample.py gives `--top-p`)."""
        failed: list[str] = []

        def shown(key: str) -> str:
            failed.append(key)
            return name(key) if name else f"key '{key}'"

        try:
            check_ranges(self, "sampling", name=shown)
        except ConfigError as e:
            raise SamplingError(failed[-1], str(e)) from None
        if any(not math.isfinite(b) for b in self.logit_bias.values()):
            raise SamplingError("logit_bias", "sampling: logit_bias values must be finite numbers")
        if self.constraint is not None:
            self.constraint.validate()
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen: (B, V) bool, tokens present in the context. Positive logits shrink, negative grow."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float):
    """counts: (B, V) how often each token was generated so far (OpenAI's c[j])."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_top_p(logits: torch.Tensor, p: float, is_sorted: bool = False) -> torch.Tensor:
    """Keep the most likely tokens until their total probability reaches p (-inf for the rest)."""
    if p >= 1.0:
        return logits
    if is_sorted:  # descending, as topk returns them
        probs = logits.softmax(-1)
        return logits.masked_fill(probs.cumsum(-1) - probs >= p, NEG_INF)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # mass of strictly more likely tokens; the top one has 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop (-inf) the tokens whose probability is below min_p times the row's most likely token's:
    p < min_p * p_max is logit < max_logit + log(min_p), so no softmax is needed."""
    if min_p <= 0.0:
        return logits
    floor = logits.max(-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < floor, NEG_INF)


def filter_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mask, bias, penalties, temperature, top-k, top-p and min-p -> (candidate logits (B, K), their ids (B, K)).

    allowed: (B, V) bool, the tokens a constraint allows (at least one per row); the others get -inf.
    ids is None when every token is a candidate (K = V). Top-k keeps only the k best candidates
    (topk), which is cheaper than masking the whole vocabulary; top-p sets dropped ones to -inf.
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, NEG_INF)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias.items())
        logits = logits.index_add(-1, torch.tensor(ids, device=logits.device),
                                  torch.tensor(bias, dtype=logits.dtype, device=logits.device).expand(len(logits), -1))
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.temperature == 0:
        return logits, None
    if params.temperature != 1.0:
        logits = logits / params.temperature
    ids = None
    if params.top_k and params.top_k < logits.size(-1):
        logits, ids = torch.topk(logits, params.top_k, dim=-1)  # sorted, most likely first
    return apply_min_p(apply_top_p(logits, params.top_p, is_sorted=ids is not None), params.min_p), ids


def scores(logits: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (..., padded vocab) logits, of any dtype -> (their float32 copy cut to the vocabulary, its
    log-normalizer logsumexp (...,)): a token's log-probability is its logit minus the normalizer, without a
    log-softmax over the vocabulary built every step. The compiled decode step runs this inside its graph."""
    logits = logits[..., :vocab].float()
    return logits, logits.logsumexp(-1)


def draw(logits: torch.Tensor, ids: torch.Tensor | None, params: SamplingParams, generator) -> torch.Tensor:
    """Draw one token per row from filter_logits' output -> (B,) token ids; argmax at temperature 0.

    The draw inverts the cumulative distribution with one uniform number per row: a cumsum and a
    binary search, several times cheaper than torch.multinomial over a 50k vocabulary on CPU.
    """
    if params.temperature == 0:
        choice = logits.max(-1, keepdim=True).indices  # argmax's first maximum, 2-3x faster on CPU (torch 2.13)
    else:
        cdf = logits.softmax(-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # first cdf > u
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)
