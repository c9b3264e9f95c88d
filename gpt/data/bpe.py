"""Train a byte-level BPE tokenizer on the training split of a corpus (`data.tokenizer: bpe`).

Hugging Face `tokenizers` learns the merges (a fast Rust trainer that streams: it keeps counts of
distinct pre-tokens, never the corpus); the result becomes a BPETokenizer that tiktoken encodes with.
Byte-level means the 256 single bytes are tokens before any merge, so no text is ever unknown.
Training is deterministic: the same text and settings give the same tokens, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable, Iterator

from gpt.config import ConfigError
from gpt.data.tokenizer import EOT, BPETokenizer, TiktokenTokenizer, byte_to_unicode
from gpt.errors import UserError

# GPT-2's pre-tokenization (as tiktoken writes it): contractions, letters, digits, other symbols,
# whitespace; a leading space stays with the word after it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class CorpusError(UserError):
    """The corpus cannot give the tokenizer that was asked for."""


def hf_pre_tokenizer(pattern: str):
    """Split by `pattern`, then spell bytes as GPT-2 does: the pre-tokenization tiktoken applies."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def check_pattern(pattern: str) -> None:
    """Both regex engines (tokenizers' Oniguruma for training, tiktoken's for encoding) must accept it."""
    try:
        hf_pre_tokenizer(pattern)
        BPETokenizer([bytes([b]) for b in range(256)], pattern)
    except Exception as e:  # each engine has its own error type
        raise ConfigError(f"data.bpe_pattern {pattern!r} is not a valid regular expression ({e})") from None


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = GPT2_PATTERN,
              log: Callable[[str], None] = print) -> BPETokenizer:
    """Learn vocab_size - 1 byte-level tokens (256 bytes + merges) plus <|endoftext|> from `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    check_pattern(pattern)
    seen = {"chars": 0}

    def counted() -> Iterator[str]:
        for text in texts:
            seen["chars"] += len(text)
            yield text

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = hf_pre_tokenizer(pattern)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0)
    log(f"data: training a byte-level BPE of {vocab_size} tokens on the training split")
    hf.train_from_iterator(counted(), trainer)
    if seen["chars"] == 0:
        raise CorpusError("the training split is empty: no text to learn a BPE tokenizer from")
    tokens = merged_tokens(hf)
    if len(tokens) + 1 < vocab_size:
        raise CorpusError(
            f"data.bpe_vocab_size={vocab_size} is more than this corpus supports: it yields only "
            f"{len(tokens) + 1} distinct tokens; set data.bpe_vocab_size={len(tokens) + 1} or less, or add text")
    return BPETokenizer(tokens, pattern)


def rank_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """tiktoken's ranks as BPE merges in GPT-2's byte spelling: tiktoken merges any two neighbours whose
    bytes form a token (lowest id first), so every split of a token into two tokens is a merge at the
    token's rank. Merging by these merges' order then encodes as tiktoken does (to-hf, to-gguf)."""
    b2u = byte_to_unicode()
    spell = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        merges += [(spell(token[:k]), spell(token[k:])) for k in range(1, len(token))
                   if token[:k] in ranks and token[k:] in ranks]
    return merges


def merged_tokens(hf) -> list[bytes]:
    """The 256 bytes (ids 0-255), then each merge's new token in the order learned (a merge that
    rebuilds an existing token adds nothing)."""
    u2b = {u: b for b, u in byte_to_unicode().items()}
    spell = lambda s: bytes(u2b[c] for c in s)  # noqa: E731
    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    for merge in json.loads(hf.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = spell(left) + spell(right)
        if token not in known:
            known.add(token)
            tokens.append(token)
    return tokens


GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = [GPT2_URL + "vocab.bpe", GPT2_URL + "encoder.json"]


def cached_gpt2() -> TiktokenTokenizer | None:
    """GPT-2's tokenizer if tiktoken has it cached (where tiktoken looks, under the sha1 of its URL);
    never downloads: comparing with GPT-2 is not worth a network call the user did not ask for."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not all(os.path.isfile(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in GPT2_FILES):
        return None
    try:
        return TiktokenTokenizer("gpt2")
    except Exception:  # a damaged cache: report ours only
        return None


class Compression:
    """Bytes per token on the validation text, for our tokenizer and (when cached) GPT-2's."""

    def __init__(self):
        self.bytes = self.tokens = self.gpt2_tokens = 0
        self.gpt2 = cached_gpt2()

    def add(self, texts: list[str], ids: list[list[int]]) -> None:
        self.bytes += sum(len(t.encode("utf-8", errors="replace")) for t in texts)
        self.tokens += sum(len(x) for x in ids)
        if self.gpt2 is not None:
            self.gpt2_tokens += sum(len(x) for x in self.gpt2.encode_batch(texts))

    def summary(self) -> str:
        if not self.tokens:
            return "data: no validation text to measure compression on"
        line = f"data: compression on the validation text: {self.bytes / self.tokens:.2f} bytes/token"
        if self.gpt2 is not None and self.gpt2_tokens:
            line += f" (GPT-2's tokenizer: {self.bytes / self.gpt2_tokens:.2f})"
        return line
