"""Canaries: random secrets planted in the training split, so an audit can measure memorization.

Carlini et al. (2019, "The Secret Sharer") insert random sequences of a known format into the
training data and later ask how much more likely the trained model finds each one than the other
sequences of that format (its *exposure*, see gpt/audit.py). `data.canaries: N` plants N secrets,
each `data.canary_repeats` times, drawn from `data.canary_seed`.

The format language (`data.canary_format`) is plain text with placeholders:
  {N digits}  N characters from 0-9          {N letters}  N characters from a-z
  {N hex}     N characters from 0-9a-f       {N alnum}    N characters from a-z0-9
e.g. "my account number is {8 digits}" (10^8 possible secrets). Other braces are an error.

The secrets are written to canaries.json in the prepared data folder (pretraining) or the run's
out_dir (fine-tuning); they are never printed. This module knows nothing of torch.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt.config import CanaryKeys, ConfigError

ALPHABETS = {
    "digits": string.digits,
    "letters": string.ascii_lowercase,
    "hex": string.digits + "abcdef",
    "alnum": string.ascii_lowercase + string.digits,
}
PLACEHOLDER = re.compile(r"\{(\d+) (digits?|letters?|hex|alnum)\}")
FILE = "canaries.json"
MAX_SLOTS = 64


class Format:
    """A parsed canary format: literal text around placeholder slots, each with its alphabet."""

    def __init__(self, text: str, key: str = "data.canary_format"):
        self.text = text
        self.parts: list[str] = []  # the literal text before, between and after the placeholders
        self.widths: list[int] = []  # characters per placeholder
        self.slots: list[str] = []  # one alphabet per secret character
        pos = 0
        for m in PLACEHOLDER.finditer(text):
            self._literal(text[pos:m.start()], key)
            n = int(m.group(1))
            if not 1 <= n <= MAX_SLOTS:
                raise ConfigError(f"{key}: '{m.group(0)}' must have 1 to {MAX_SLOTS} characters")
            kind = m.group(2) if m.group(2) in ALPHABETS else m.group(2) + "s"  # {1 digit}
            self.slots += [ALPHABETS[kind]] * n
            self.widths.append(n)
            pos = m.end()
        self._literal(text[pos:], key)
        if not self.slots:
            raise ConfigError(f"{key}: '{text}' has no placeholder; use e.g. 'my pin is {{4 digits}}' "
                              "({N digits}, {N letters}, {N hex} or {N alnum})")

    def _literal(self, piece: str, key: str) -> None:
        if "{" in piece or "}" in piece:
            raise ConfigError(f"{key}: unknown placeholder near '{piece.strip()}'; use {{N digits}}, {{N letters}}, "
                              "{N hex} or {N alnum}")
        self.parts.append(piece)

    @property
    def space_size(self) -> int:
        return math.prod(len(a) for a in self.slots)

    @property
    def charset(self) -> str:
        """Every character a secret of this format can contain (a character vocabulary needs them all)."""
        return "".join(sorted(set("".join(self.parts) + "".join(self.slots) + "\n")))

    def render(self, codes: np.ndarray) -> str:
        """The secret whose slot i holds character codes[i] of its alphabet."""
        chars = iter(a[c] for a, c in zip(self.slots, codes))
        pieces = [self.parts[0]]
        for width, literal in zip(self.widths, self.parts[1:]):
            pieces += ["".join(next(chars) for _ in range(width)), literal]
        return "".join(pieces)

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """n secrets drawn uniformly (with replacement) from the whole space."""
        codes = np.stack([rng.integers(0, len(a), size=n) for a in self.slots], axis=1)
        return [self.render(c) for c in codes]

    def enumerate(self) -> list[str]:
        """Every secret of the format, in a fixed order (only for small spaces)."""
        sizes = [len(a) for a in self.slots]
        codes = np.stack(np.unravel_index(np.arange(self.space_size), sizes), axis=1)
        return [self.render(c) for c in codes]


def settings(cfg: CanaryKeys) -> dict | None:
    """The canary keys of a data config (None when off): preparation is redone when they change."""
    if not cfg.canaries:
        return None
    return {"canaries": cfg.canaries, "repeats": cfg.canary_repeats, "format": cfg.canary_format,
            "seed": cfg.canary_seed}


def make(cfg: CanaryKeys) -> list[str]:
    """The N distinct secrets of data config `cfg` (empty when data.canaries is 0)."""
    if not cfg.canaries:
        return []
    fmt = Format(cfg.canary_format)
    if cfg.canaries > fmt.space_size // 2:
        raise ConfigError(f"data.canaries ({cfg.canaries}) must be at most half of the {fmt.space_size} possible "
                          f"secrets of '{cfg.canary_format}'; use more placeholder characters")
    rng = np.random.default_rng([cfg.canary_seed, 0xCA7A])
    secrets: list[str] = []
    while len(secrets) < cfg.canaries:
        s = fmt.sample(1, rng)[0]
        if s not in secrets:
            secrets.append(s)
    return secrets


def insert(pieces: Iterator[tuple[str, str, bool]], secrets: list[str], repeats: int,
           seed: int = 0) -> Iterator[tuple[str, str, bool]]:
    """Plant every secret `repeats` times, in a seeded shuffled order, into the training pieces.

    The first piece of a document split by position (doc_end False: a text file, read in 4 MB pieces)
    takes all copies at random line starts; whole documents (doc_end True) are each followed by one
    copy as a document of its own, and copies left at the end of the stream become documents of their
    own. Validation never gets any.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    copies = [secrets[i] for i in rng.permutation(len(secrets) * repeats) % max(1, len(secrets))]
    for split, text, doc_end in pieces:
        if split != "train" or not copies:
            yield split, text, doc_end
        elif doc_end:
            yield split, text, doc_end
            yield split, copies.pop() + "\n", True
        else:
            yield split, _at_line_starts(text, copies, rng), doc_end
            copies = []
    for secret in copies:
        yield "train", secret + "\n", True


def _at_line_starts(text: str, copies: list[str], rng: np.random.Generator) -> str:
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    where = np.sort(rng.choice(starts, size=len(copies)))
    out, pos = [], 0
    for at, secret in zip(where, copies):
        out += [text[pos:at], secret + "\n"]
        pos = at
    return "".join(out) + text[pos:]


def write_record(folder: str | Path, secrets: list[str], cfg: CanaryKeys, context: str) -> None:
    """canaries.json in `folder` (or its removal when canaries are off), for `python -m gpt.audit`.

    context: the text a secret follows in training ("\\n" inside a corpus, "" as its own record)."""
    path = Path(folder) / FILE
    if not secrets:
        path.unlink(missing_ok=True)
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {"note": "synthetic secrets planted by data.canaries; audit with python -m gpt.audit",
              **settings(cfg), "context": context, "secrets": secrets}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(path)


def copy_record(prepared: str | Path, out_dir: str | Path) -> None:
    """Keep the run's secrets next to its checkpoints (or none, when its data has none)."""
    src, dst = Path(prepared) / FILE, Path(out_dir) / FILE
    if src.is_file():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    else:
        dst.unlink(missing_ok=True)


def read_canary_file(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
