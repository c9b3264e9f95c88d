"""Tokenizers: a character vocabulary built from the corpus, any tiktoken encoding, a byte-level
BPE learned from the corpus (gpt/data/bpe.py trains it; tiktoken encodes with it), or a Hugging Face
tokenizer.json as a model ships it (the `tokenizers` library encodes with it).

A tokenizer round-trips through a small JSON spec stored with the prepared data and every
checkpoint, so sampling and fine-tuning rebuild exactly the tokenizer training used.
Special tokens (chat markers) get ids past the base vocabulary; plain `encode` never produces
them, so user text that looks like a special token stays ordinary text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

import tiktoken

from gpt.errors import UserError


class TokenizerError(UserError):
    """An unknown or unavailable tokenizer, or text it cannot encode."""


class Tokenizer(ABC):
    """Common interface; see CharTokenizer, TiktokenTokenizer and BPETokenizer."""

    special_tokens: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:  # ids are 0 .. vocab_size-1
        ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings in `text` are encoded as plain text."""
        ...

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to raw bytes: BPE tokens can split a UTF-8 character, so streams decode bytes."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def eot_id(self) -> int | None:
        """End-of-text id separating documents, if the tokenizer has one."""
        return None

    @abstractmethod
    def to_spec(self) -> dict:
        ...

    def add_special_tokens(self, names: list[str]) -> dict[str, int]:
        """Give each new name an id past the current vocabulary; returns name -> id."""
        for name in names:
            if name not in self.special_tokens:
                self.special_tokens[name] = self.vocab_size
        return {n: self.special_tokens[n] for n in names}

    def special_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"tokenizer has no special token {name!r}")
        return self.special_tokens[name]


class CharTokenizer(Tokenizer):
    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"character {e.args[0]!r} is not in this model's character vocabulary "
                f"({len(self.chars)} characters seen in its training corpus)"
            ) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        inverse = {i: s for s, i in self.special_tokens.items()}
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else inverse.get(i, "") for i in ids).encode("utf-8")

    def to_spec(self) -> dict:
        return {"kind": "char", "chars": self.chars, "special_tokens": self.special_tokens}


EOT = "<|endoftext|>"


class TiktokenTokenizer(Tokenizer):
    def __init__(self, name: str, special_tokens: dict[str, int] | None = None):
        self.name = name
        try:
            self.base = tiktoken.get_encoding(name)
        except ValueError as e:
            raise TokenizerError(f"unknown tokenizer {name!r}: use 'char' or a tiktoken encoding such as 'gpt2'") from e
        except Exception as e:  # no network and no cache
            cache = os.environ.get("TIKTOKEN_CACHE_DIR") or "tiktoken's default cache"
            raise TokenizerError(
                f"could not load the tiktoken encoding {name!r}: it is not in {cache} and fetching it failed "
                f"({type(e).__name__}); offline, point TIKTOKEN_CACHE_DIR at a folder holding its cached file"
            ) from None
        self.special_tokens = dict(special_tokens or {})
        self._rebuild()

    def _rebuild(self) -> None:
        if not self.special_tokens:
            self.enc = self.base
            return
        self.enc = tiktoken.Encoding(
            name=f"{self.name}+chat",
            pat_str=self.base._pat_str,
            mergeable_ranks=self.base._mergeable_ranks,
            special_tokens={**self.base._special_tokens, **self.special_tokens},
        )

    def add_special_tokens(self, names: list[str]) -> dict[str, int]:
        out = super().add_special_tokens(names)
        self._rebuild()
        return out

    @property
    def vocab_size(self) -> int:
        return max(self.base.n_vocab, max(self.special_tokens.values(), default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    @property
    def eot_id(self) -> int | None:
        return self.base._special_tokens.get(EOT)

    @property
    def ranks(self) -> dict[bytes, int]:
        """Token bytes -> id (= merge priority): the whole learned vocabulary, without special tokens."""
        return self.base._mergeable_ranks

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex: text is split by it before any merge."""
        return self.base._pat_str

    def to_spec(self) -> dict:
        return {"kind": "tiktoken", "name": self.name, "special_tokens": self.special_tokens}


class BPETokenizer(TiktokenTokenizer):
    """A byte-level BPE learned from the corpus, encoded by tiktoken (as fast as GPT-2's).

    `tokens[i]` is the byte string of id i; ids are also merge priorities (tiktoken merges the
    neighbours that form the lowest id first). Every single byte is a token, so any text round-trips (lone surrogates,
    which UTF-8 cannot hold, become U+FFFD as in tiktoken). <|endoftext|> follows the last token.
    The spec carries a checksum: a tokenizer file edited by hand is refused, not silently used.
    """

    def __init__(self, tokens: list[bytes], pattern: str, special_tokens: dict[str, int] | None = None):
        have = set(tokens)
        if len(have) != len(tokens) or any(bytes([b]) not in have for b in range(256)):
            raise TokenizerError("BPE vocabulary must hold every single byte once and no token twice")
        self.name, self.tokens = "bpe", list(tokens)
        try:
            self.base = tiktoken.Encoding(
                name="bpe", pat_str=pattern, mergeable_ranks={t: i for i, t in enumerate(self.tokens)},
                special_tokens={EOT: len(self.tokens)},
            )
        except ValueError as e:
            raise TokenizerError(f"BPE pattern {pattern!r} is not a valid regular expression ({e})") from None
        self.special_tokens = dict(special_tokens or {})
        self._rebuild()

    def to_spec(self) -> dict:
        spec = {"kind": "bpe", "pattern": self.pattern,
                "tokens": [base64.b64encode(t).decode("ascii") for t in self.tokens],
                "special_tokens": self.special_tokens}
        return {**spec, "sha256": _checksum(spec)}

    @classmethod
    def from_spec(cls, spec: dict) -> "BPETokenizer":
        _verify(spec, "BPE tokenizer checksum mismatch: the file was edited or damaged; restore it from the run "
                      "that trained it")
        return cls([base64.b64decode(t) for t in spec["tokens"]], spec["pattern"], spec.get("special_tokens"))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` as shipped, encoded and decoded by the `tokenizers` library.

    Plain `encode` adds no special tokens (no BOS) and reads special-token strings in the text as
    ordinary text, like every tokenizer here; `add_special_tokens=True` lets the file's post-processor
    add its BOS, `split_special_tokens=False` reads markers such as <|im_end|> as their tokens (for
    rendered chat templates). bos/eos ids come from tokenizer_config.json, generation_config.json and
    config.json (`from_folder`; several eos ids are kept), the pad id from tokenizer_config.json; the first
    eos id is the end-of-text id. The spec
    stores the file's text and the model's Jinja chat template (gpt/data/jinja_template.py renders it) with a
    checksum: an edited file is refused.
    """

    def __init__(self, tokenizer_json: str, *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 chat_template: str | None = None, pad_id: int | None = None):
        from tokenizers import Tokenizer as Backend

        try:
            self.hf = Backend.from_str(tokenizer_json)
            self.literal = Backend.from_str(tokenizer_json)  # the same file, special tokens read as text
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise TokenizerError(f"unreadable tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None
        self.literal.encode_special_tokens = True
        self.bos_id, self.eos_ids, self.chat_template, self.pad_id = bos_id, list(eos_ids), chat_template, pad_id
        self.special_tokens = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(tokenizer_json).get("decoder"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "HFTokenizer":
        """tokenizer.json of a Hugging Face model folder, with its bos/eos ids and chat template."""
        folder = Path(folder)
        try:
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        except OSError as e:
            raise TokenizerError(f"{folder}/tokenizer.json: unreadable ({e.strerror or e})") from None
        tok = cls(text)
        configs = [_json_or_empty(folder / n) for n in ("tokenizer_config.json", "generation_config.json", "config.json")]
        tok_config = configs[0]
        ids = lambda key: [i for c in configs[1:] for i in _ids(c.get(f"{key}_token_id"))]  # noqa: E731
        by_name = lambda key: [tok.hf.token_to_id(n) for n in [_content(tok_config.get(f"{key}_token"))] if n]  # noqa: E731
        bos, eos = ([i for i in by_name(key) + ids(key) if i is not None] for key in ("bos", "eos"))
        pad = [i for i in by_name("pad") if i is not None]  # the tokenizer's own pad (generation's is often eos)
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8") if (
            folder / "chat_template.jinja").is_file() else tok_config.get("chat_template")
        return cls(text, bos_id=bos[0] if bos else None, eos_ids=list(dict.fromkeys(eos)),
                   chat_template=_default_template(template), pad_id=pad[0] if pad else None)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = True) -> list[int]:
        backend = self.literal if split_special_tokens else self.hf
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [e.ids for e in self.literal.encode_batch(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Exact bytes for byte-level BPEs (a token may hold part of a character); else the decoded text."""
        ids = list(ids)
        if not self._byte_level:
            return self.hf.decode(ids, skip_special_tokens=False).encode("utf-8")
        u2b, added = {u: b for b, u in byte_to_unicode().items()}, self.hf.get_added_tokens_decoder()
        out = bytearray()
        for i in ids:
            token = self.hf.id_to_token(i)
            if token is None:
                continue
            out += token.encode("utf-8") if i in added else bytes(u2b[c] for c in token)
        return bytes(out)

    @property
    def eot_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def add_special_tokens(self, names: list[str]) -> dict[str, int]:
        from tokenizers import AddedToken

        new = [AddedToken(n, special=True, normalized=False) for n in names if n not in self.special_tokens]
        for backend in (self.hf, self.literal):
            backend.add_special_tokens(new)
        self.special_tokens.update({t.content: self.hf.token_to_id(t.content) for t in new})
        return {n: self.special_tokens[n] for n in names}

    def to_spec(self) -> dict:
        spec = {"kind": "hf", "tokenizer_json": self.hf.to_str(), "bos_id": self.bos_id, "eos_ids": self.eos_ids,
                "chat_template": self.chat_template, **({"pad_id": self.pad_id} if self.pad_id is not None else {})}
        return {**spec, "sha256": _checksum(spec)}

    @classmethod
    def from_spec(cls, spec: dict) -> "HFTokenizer":
        _verify(spec, "tokenizer checksum mismatch: the file was edited or damaged; convert the Hugging Face "
                      "folder again")
        return cls(spec["tokenizer_json"], bos_id=spec.get("bos_id"), eos_ids=spec.get("eos_ids") or (),
                   chat_template=spec.get("chat_template"), pad_id=spec.get("pad_id"))


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (how byte-level BPE files spell raw bytes)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _json_or_empty(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    """A config's token id field: one id, a list of them, or absent."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _content(token) -> str | None:
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def _default_template(value) -> str | None:
    """tokenizer_config.json's chat_template: the text, or (older files) a list of named ones, "default" used."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _verify(spec: dict, message: str) -> None:
    """Raise TokenizerError(message) unless spec["sha256"] is the checksum of the rest of the spec."""
    if spec.get("sha256") != _checksum({k: v for k, v in spec.items() if k != "sha256"}):
        raise TokenizerError(message)


def _checksum(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"], spec.get("special_tokens"))
    if kind == "tiktoken":
        return TiktokenTokenizer(spec["name"], spec.get("special_tokens"))
    if kind == "bpe":
        return BPETokenizer.from_spec(spec)
    if kind == "hf":
        return HFTokenizer.from_spec(spec)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in tokenizer spec")


def save(tok: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tok.to_spec(), ensure_ascii=False), encoding="utf-8")


def load(path: str | Path) -> Tokenizer:
    p = Path(path)
    try:
        return from_spec(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        # ValueError: bad JSON, bad base64 in a BPE spec
        raise TokenizerError(f"{p}: unreadable tokenizer file ({type(e).__name__}: {e})") from None
    except TokenizerError as e:
        raise TokenizerError(f"{p}: {e}") from None
