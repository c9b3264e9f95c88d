"""Constrained decoding: a grammar decides which tokens may come next (JSON schema, regex, choice, Lark/GBNF).

A request whose SamplingParams carry a `Constraint` gets its own `GrammarState` (one matcher per
request, so rows of a continuously batched engine follow different grammars or none). Before each
draw the engine asks every constrained row for its mask of allowed tokens (`token_masks`) and hands
it to `filter_logits`, which sets every other token to -inf before penalties, temperature, top-k and
top-p (gpt/infer/sampling.py). After the draw the row's matcher consumes the token.

The grammar library is llguidance (Microsoft's, used by llama.cpp, vLLM, SGLang and OpenAI's own
structured outputs): one ~8 MB wheel with no Python dependencies, JSON schema, regex, Lark and GBNF,
and a tokenizer built straight from tiktoken (GPT-2, our BPE), a tokenizer.json, or any list of token
bytes (our character vocabularies). bench/grammar_engines.py compares it with xgrammar on our
vocabularies. No grammar engine is written here.

End of text. The model's end tokens (the request's stop_ids) are allowed only where the grammar may
end (`is_accepting`); when the grammar cannot go on (`is_stopped`, e.g. the closing brace of the
object) they are the only tokens allowed, so the sample ends with finish reason "eos". With no stop
ids the request ends there with finish reason "stop". max_tokens reached before that leaves the
object unfinished with finish reason "length", never a broken object passed off as complete. A row
with no allowed token at all (the grammar needs a character the vocabulary lacks, e.g. a `{` in a
character vocabulary learned from Shakespeare) ends with finish reason "error"; when that happens
at the very first token the request is refused with one line instead.

JSON is compact (no free whitespace, "," and ":" separators): a weak model cannot loop on spaces.
Logprobs stay the model's own (before the mask), as vLLM reports them by default.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import torch

from gpt.data.tokenizer import HFTokenizer, TiktokenTokenizer, Tokenizer, TokenizerError
from gpt.infer.sampling import Constraint, SamplingError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: {"a":1,"b":[2,3]}
MAX_CACHED_GRAMMARS = 64  # compiled matchers kept per tokenizer (a request copies one: n samples compile once)
_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, tuple[int, object, dict]]" = weakref.WeakKeyDictionary()


class ConstraintError(SamplingError):
    """A constraint the grammar library refuses (bad schema, regex or grammar), or one this vocabulary cannot follow."""

    def __init__(self, message: str):
        super().__init__("constraint", message)


def _llg():
    try:
        import llguidance
    except ImportError:  # a dependency of the package: only a broken install lacks it
        raise ConstraintError("constrained decoding needs the llguidance package: pip install llguidance") from None
    return llguidance


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (not yet checked: see check_constraint)."""
    llg = _llg()
    kind, text = constraint.kind, constraint.text
    if kind in ("json_schema", "json_object"):
        try:
            schema = json.loads(text) if kind == "json_schema" else {"type": "object"}
        except json.JSONDecodeError as e:
            raise ConstraintError(f"the JSON schema is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError("the JSON schema must be a JSON object")
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llg.grammar_from("choice", text)
    try:
        return llg.grammar_from("grammar", text)  # Lark, or GBNF (llama.cpp's) converted to Lark
    except ValueError as e:
        raise ConstraintError(f"the grammar is neither Lark nor GBNF ({_one_line(str(e))})") from None


def check_constraint(constraint: Constraint, tokenizer: Tokenizer | None = None) -> str:
    """The constraint's grammar, or a ConstraintError in one line saying what is wrong with it."""
    llg = _llg()
    grammar = grammar_text(constraint)
    lltok = None if tokenizer is None else grammar_tokenizer(tokenizer)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        raise ConstraintError(f"invalid {constraint.kind.replace('_', ' ')}: {_one_line(messages[0])}")
    return grammar


def _one_line(message: str) -> str:
    """llguidance's error messages span lines (a caret under the source): keep the lines that say what failed."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("|", "^")) and not ln[:1].isdigit()]
    return "; ".join(dict.fromkeys(said or lines[:1]))[:400]


def grammar_tokenizer(tokenizer: Tokenizer):
    """The llguidance tokenizer of one of ours, built once per tokenizer (0.2 s for GPT-2's 50k tokens)."""
    return _cached(tokenizer)[1]


def _cached(tokenizer: Tokenizer) -> tuple[int, object, dict]:
    """(vocab size, llguidance tokenizer, compiled matchers by constraint), rebuilt if special tokens were added."""
    cached = _TOKENIZERS.get(tokenizer)
    if cached is None or cached[0] != tokenizer.vocab_size:
        cached = _TOKENIZERS[tokenizer] = (tokenizer.vocab_size, _build_tokenizer(tokenizer), {})
    return cached


def compiled_matcher(constraint: Constraint, tokenizer: Tokenizer):
    """A fresh llguidance matcher for the constraint: compiled once per tokenizer, then copied."""
    _, lltok, compiled = _cached(tokenizer)
    if constraint not in compiled:
        matcher = _llg().LLMatcher(lltok, grammar_text(constraint), log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {constraint.kind.replace('_', ' ')}: {_one_line(matcher.get_error())}")
        if len(compiled) >= MAX_CACHED_GRAMMARS:
            compiled.pop(next(iter(compiled)))
        compiled[constraint] = matcher
    return compiled[constraint].deep_copy()


def text_matches(constraint: Constraint, text: str, tokenizer: Tokenizer) -> bool:
    """The whole of `text` follows the constraint: the grammar engine's verdict on text written without it
    (what a constrained decoder could have produced; gpt/tool_call_eval.py checks calls with it)."""
    matcher = compiled_matcher(constraint, tokenizer)
    try:
        ids = tokenizer.encode(text)
    except TokenizerError:  # a character the vocabulary lacks: no constrained reply could hold it
        return False
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def _build_tokenizer(tok: Tokenizer):
    llg = _llg()
    if isinstance(tok, TiktokenTokenizer):  # GPT-2 and our byte-level BPE: tiktoken's ranks and pattern
        enc = tok.enc
        return llg.LLTokenizer.from_tiktoken(encoder=enc._mergeable_ranks, special_tokens=enc._special_tokens,
                                             pattern=enc._pat_str, eos_token=tok.eot_id, n_vocab=tok.vocab_size)
    if isinstance(tok, HFTokenizer):
        return llg.LLTokenizer(tok.hf.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eot_id)
    return llg.LLTokenizer(llg.TokenizerWrapper(_TokenBytes(tok)), n_vocab=tok.vocab_size + 1)


class _TokenBytes:
    """Any tokenizer as a list of token bytes (llguidance's generic form): what character vocabularies use.

    llguidance needs an end token: a phantom id past the vocabulary, which the model never draws
    (the engine allows the request's own end tokens itself, see the module doc).
    """

    def __init__(self, tok: Tokenizer):
        specials = set(tok.special_tokens.values())
        self.tokens = [tok.decode_bytes([i]) for i in range(tok.vocab_size)] + [b"<|phantom end|>"]
        self.special_token_ids = sorted(specials | {tok.vocab_size})
        self.eos_token_id, self.bos_token_id = tok.vocab_size, None
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        """Encode for llguidance's look-ahead. A character the vocabulary lacks raises: the matcher then
        enters its error state, so the row allows no token and is refused or ends (see the module doc)."""
        if not isinstance(text, str):
            raise TypeError("text only")  # llguidance probes for bytes input: tell it to pass str
        return self._tok.encode(text)


class GrammarState:
    """One request's matcher: which tokens may come next, and the tokens it has consumed."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer):
        self.constraint = constraint
        self.lltok = grammar_tokenizer(tokenizer)
        self.matcher = compiled_matcher(constraint, tokenizer)

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (the grammar may end here)."""
        return self.matcher.is_accepting()

    def advance(self, token: int) -> None:
        """Consume the drawn token (the mask allowed it, so the matcher cannot refuse it)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {_one_line(self.matcher.get_error())}")


def token_masks(states: list[GrammarState], stop_ids: list[set[int]], vocab: int) -> torch.Tensor:
    """(len(states), vocab) bool: the tokens each row's grammar allows next, its stop ids only where it may end."""
    import llguidance.numpy as llnp

    width = max(vocab, *(s.lltok.vocab_size for s in states))
    bits = llnp.allocate_token_bitmask(len(states), width)
    for i, state in enumerate(states):
        llnp.fill_next_token_bitmask(state.matcher, bits, i)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    for i, state in enumerate(states):
        if state.matcher.is_error():  # stuck: the grammar needs a token the vocabulary lacks
            allowed[i] = False
            continue
        allowed[i, [t for t in state.lltok.eos_tokens if t < vocab]] = False  # the library's end: ours below
        ends = [t for t in stop_ids[i] if t < vocab]
        if ends:
            allowed[i, ends] = state.accepting
    return torch.from_numpy(allowed)
