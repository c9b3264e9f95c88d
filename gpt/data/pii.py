"""PII redaction: find personal data and secrets in text and replace them before a model sees them.

Each kind is found by a pattern and then checked the way the thing itself is checked (Luhn for card
numbers, mod-97 for IBANs, octet ranges for IPv4, a parser for IPv6, issued ranges for SSNs, the
digit count of a phone number, dates and version strings turned away), so near misses stay. Rare
characters anchor the searches ("@", "://", "::"), which keeps plain text fast (bench/redact_throughput.py).

Replacement is a typed placeholder (<EMAIL>, <PHONE>, ...) or, in pseudonym mode, a fake value of
the same shape derived from the value under a secret salt (HMAC-SHA256): the same person gets the
same pseudonym everywhere, so a conversation stays coherent, and without the salt it cannot be undone.

The report holds counts per kind and per file and masked examples (j***@e***.com), never a value.
Pattern-based: names in free text need a named-entity model (see `ner_status`).

A text read in pieces (a long line is cut where a piece ends) is redacted as one string by
`Redactor.redact_stream`: text is given out only once CONTEXT characters follow it, and never cut
inside a value, so a value that straddles two pieces is found whole.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from gpt.config import ConfigError, SourceConfig
from gpt.data.files import DataError, Decoding

KINDS = ("email", "phone", "card", "iban", "ipv4", "ipv6", "ssn", "url_credentials", "secret")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "card": "<CARD>", "iban": "<IBAN>", "ipv4": "<IP>",
                "ipv6": "<IP>", "ssn": "<SSN>", "url_credentials": "<CREDENTIALS>", "secret": "<SECRET>",
                "custom": "<CUSTOM>", "term": "<TERM>", "name": "<NAME>"}
OPTIONAL = ("name",)  # needs the optional NER extra (presidio-analyzer, spaCy and a local model); not in "all"
EXAMPLES_PER_KIND = 3
CONTEXT = 1 << 14  # characters: longer than any value (a private key block) with the text that decides it
MIN_SALT_BYTES = 16  # a pseudonym secret shorter than this could be guessed, and the pseudonyms undone

Span = tuple[int, int]
DIGIT_GAP, MARGIN = 24, 8  # digits closer than DIGIT_GAP share a window; windows reach MARGIN chars further

# ---------------------------------------------------------------------------- detectors


_CLASS = np.zeros(256, dtype=np.uint8)  # byte -> 1 digit, 2 other key character ([A-Za-z_-]), 3 '=' or ':'
_CLASS[48:58] = 1
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-":
    _CLASS[_c] = 2
_CLASS[[ord("="), ord(":")]] = 3


class Scan:
    """One text and the cheap, vectorized views the detectors search from: windows around digits
    (for the numeric kinds), runs of 16+ key characters (secrets) and '='/':' (assignments). Plain
    prose has few of them, so the regular expressions run on a small part of it."""

    def __init__(self, text: str):
        self.text = text
        self._codes: np.ndarray | None = None
        self._windows: list[Span] | None = None

    def codes(self) -> np.ndarray:
        if self._codes is None:  # one byte per character (non-Latin-1 characters become '?'), then its class
            self._codes = _CLASS[np.frombuffer(self.text.encode("latin-1", "replace"), dtype=np.uint8)]
        return self._codes

    def digit_windows(self) -> list[Span]:
        if self._windows is None:
            idx = np.flatnonzero(self.codes() == 1)
            cuts = np.flatnonzero(np.diff(idx) > DIGIT_GAP)
            firsts = np.maximum(np.r_[idx[:1], idx[cuts + 1]] - MARGIN, 0)
            lasts = np.minimum(np.r_[idx[cuts], idx[-1:]] + 1 + MARGIN, len(self.text))
            self._windows = list(zip(firsts.tolist(), lasts.tolist()))
        return self._windows

    def long_runs(self, min_len: int = 16) -> list[int]:
        """Start offsets of runs of at least min_len characters of [A-Za-z0-9_-]."""
        key = np.zeros(len(self.text) + 2, dtype=np.int8)
        key[1:-1] = (self.codes() - 1) < 2  # classes 1 and 2 (uint8: 0 wraps to 255)
        edges = np.diff(key)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return starts[(ends - starts) >= min_len].tolist()

    def assignments(self) -> list[int]:
        """Offsets of '=' and ':' that are followed by something on the same line."""
        idx = np.flatnonzero(self.codes() == 3)
        idx = idx[idx + 1 < len(self.text)]
        nxt = np.frombuffer(self.text.encode("latin-1", "replace"), dtype=np.uint8)[idx + 1] if idx.size else idx
        return idx[(nxt != 10) & (nxt != 13)].tolist()


def _in_windows(rx: re.Pattern, scan: Scan) -> Iterator[re.Match]:
    for lo, hi in scan.digit_windows():
        yield from rx.finditer(scan.text, lo, hi)


def _alnum_at(text: str, i: int) -> bool:
    return 0 <= i < len(text) and text[i].isalnum()


def _at(text: str, i: int) -> str:
    """The character at i, or a space outside the text (so membership tests never see '')."""
    return text[i] if 0 <= i < len(text) else " "


_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}$")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                     r"[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")


def find_emails(scan: Scan) -> Iterator[Span]:
    """Anchored on '@': the local part is the run of allowed characters before it, the domain needs a TLD."""
    text = scan.text
    i = text.find("@")
    while i >= 0:
        local = _LOCAL.search(text, max(0, i - 64), i)
        domain = _DOMAIN.match(text, i + 1)
        end = i + 1
        if local and domain:
            start = local.start()
            while start < i and text[start] in ".-+":
                start += 1
            if start < i and text[i - 1] != "." and text[start - 3:start] != "://":  # not ssh://git@host
                end = domain.end()
                yield start, end
        i = text.find("@", end)


_PHONE = re.compile(r"""
    \+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,5}   # +44 20 7946 0958, +1 (555) 010-4477
  | \(\d{2,5}\)[ .-]?\d{3,4}[ .-]?\d{3,4}                               # (555) 123-4567, (030) 1234 5678
  | \d{3}[.-]\d{3}[.-]\d{4}                                             # 555-123-4567
  | 0\d{1,4}(?:[ .-]?\d{2,4}){2,4}                                      # 030 1234 5678, 020 7946 0958
""", re.X)
_GROUPS_BEFORE = re.compile(r"(?:[A-Z0-9]{2,4} ){2}$")
_GROUP_BEFORE = re.compile(r"(?<![A-Za-z0-9])(?=[A-Z]*\d)[A-Z0-9]{2,4}[ -]$")  # "DE89 ": a code goes on
_DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$")


def find_phones(scan: Scan) -> Iterator[Span]:
    """International (+ and 8-15 digits) and national (trunk 0, or North American) numbers."""
    text = scan.text
    for m in _in_windows(_PHONE, scan):
        s, e = m.span()
        value = m.group()
        digits = sum(c.isdigit() for c in value)
        if _alnum_at(text, s - 1) or _at(text, s - 1) in ".-+/" or _alnum_at(text, e):
            continue
        if _at(text, e) in ".-/" and _alnum_at(text, e + 1):  # part of a longer dotted/dashed number
            continue
        if _at(text, s - 1) in " -" and s > 0 and (_at(text, s - 2).isdigit()
                                                   or _GROUPS_BEFORE.search(text, max(0, s - 16), s)):
            continue  # the tail of a grouped number or code (an invalid IBAN or card)
        if value[0] == "+":
            ok = 8 <= digits <= 15
        elif value[0] == "0":
            ok = 9 <= digits <= 12 and not _DATE.match(value)
        else:
            ok = digits == 10 or (value[0] == "(" and 9 <= digits <= 12)
        if ok:
            yield s, e


_CARD = re.compile(r"\d{4}(?:[ -]?\d{2,7}){2,4}")
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|3(?:0[0-5]|[68])|35")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_cards(scan: Scan) -> Iterator[Span]:
    """13-19 digits, one kind of separator, a card network's prefix, and a valid Luhn check digit."""
    text = scan.text
    for m in _in_windows(_CARD, scan):
        s, e = m.span()
        value = m.group()
        if _alnum_at(text, s - 1) or _alnum_at(text, e) or (" " in value and "-" in value):
            continue
        if _GROUP_BEFORE.search(text, max(0, s - 6), s):  # the tail of a longer code (an invalid IBAN)
            continue
        digits = value.replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn_ok(digits):
            yield s, e


IBAN_LENGTHS = dict(
    (cc, int(n)) for cc, n in (item.split(":") for item in (
        "AD:24 AE:23 AL:28 AT:20 AZ:28 BA:20 BE:16 BG:22 BH:22 BR:29 CH:21 CR:22 CY:28 CZ:24 DE:22 DK:18 DO:28 "
        "EE:20 EG:29 ES:24 FI:18 FO:18 FR:27 GB:22 GE:22 GI:23 GL:18 GR:27 GT:28 HR:21 HU:28 IE:22 IL:23 IQ:23 "
        "IS:26 IT:27 JO:30 KW:30 KZ:20 LB:28 LC:32 LI:21 LT:20 LU:20 LV:21 MC:27 MD:24 ME:22 MK:19 MR:27 MT:31 "
        "MU:30 NL:18 NO:15 PK:24 PL:28 PS:29 PT:25 QA:29 RO:24 RS:22 SA:24 SC:31 SE:24 SI:19 SK:24 SM:27 TN:24 "
        "TR:26 UA:29 VA:22 VG:24 XK:20").split()))
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?")


def iban_ok(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(scan: Scan) -> Iterator[Span]:
    """A known country's length and a mod-97 check; a longer match is cut to that length."""
    text = scan.text
    for m in _in_windows(_IBAN, scan):
        s = m.start()
        n = IBAN_LENGTHS.get(m.group()[:2])
        if n is None or _alnum_at(text, s - 1):
            continue
        kept, e = 0, s
        while e < m.end() and kept < n:
            kept += text[e] != " "
            e += 1
        compact = text[s:e].replace(" ", "")
        if len(compact) == n and not _alnum_at(text, e) and iban_ok(compact):
            yield s, e


_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_VERSION_WORD = re.compile(r"(?:\b(?:version|ver|release|build|v)\.?\s*|[vV])$", re.I)


def find_ipv4(scan: Scan) -> Iterator[Span]:
    """Four octets 0-255 without leading zeros; not a version string (v1.2.3.4, version 2.0.1.3) or a longer chain."""
    text = scan.text
    for m in _in_windows(_IPV4, scan):
        s, e = m.span()
        if _alnum_at(text, s - 1) or _at(text, s - 1) == "." or _alnum_at(text, e):
            continue
        if text[e:e + 1] == "." and _alnum_at(text, e + 1):
            continue
        octets = m.group().split(".")
        if any(int(o) > 255 or (len(o) > 1 and o[0] == "0") for o in octets):
            continue
        if _VERSION_WORD.search(text, max(0, s - 10), s):
            continue
        yield s, e


_IPV6_LEFT = re.compile(r"[0-9A-Fa-f:]{0,39}$")
_IPV6_RIGHT = re.compile(r"(?:[0-9A-Fa-f]{0,4}:)*(?:\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)|[0-9A-Fa-f]{0,4})")
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}:")


def find_ipv6(scan: Scan) -> Iterator[Span]:
    """Anchored on two colons a group apart; the whole hex-and-colon run must parse as an IPv6 address."""
    text, pos = scan.text, 0
    while m := _IPV6_ANCHOR.search(text, pos):
        a = m.start()
        s = _IPV6_LEFT.search(text, max(0, a - 39), a).start()
        e = _IPV6_RIGHT.match(text, a).end()
        pos = max(e, a + 1)
        while e > s and text[e - 1] == ":" and text[e - 2:e] != "::":
            e -= 1
        value = text[s:e]
        if _alnum_at(text, s - 1) or _alnum_at(text, e) or _at(text, s - 1) == ":":
            continue
        if len(value) < 6 or not any(c.isdigit() for c in value):
            continue
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            continue
        yield s, e


_SSN = re.compile(r"\d{3}-\d{2}-\d{4}")


def find_ssns(scan: Scan) -> Iterator[Span]:
    """AAA-GG-SSSS in issued ranges (area not 000, 666 or 9xx; group not 00; serial not 0000)."""
    text = scan.text
    for m in _in_windows(_SSN, scan):
        s, e = m.span()
        if _alnum_at(text, s - 1) or _at(text, s - 1) in "-." or _alnum_at(text, e) or _at(text, e) == "-":
            continue
        area, group, serial = m.group().split("-")
        if area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000":
            yield s, e


_USERINFO = re.compile(r"[^\s/?#@:]+:[^\s/?#@]+(?=@)")


def find_url_credentials(scan: Scan) -> Iterator[Span]:
    """user:password in scheme://user:password@host (the host stays)."""
    text = scan.text
    i = text.find("://")
    while i >= 0:
        m = _USERINFO.match(text, i + 3)
        if m and i > 0 and text[i - 1].isalpha():
            yield m.span()
        i = text.find("://", m.end() if m else i + 3)


_SECRET = re.compile(r"""
    (?:AKIA|ASIA)[0-9A-Z]{16}                                  # AWS access key id
  | gh[pousr]_[A-Za-z0-9]{36,255} | github_pat_[A-Za-z0-9_]{22,255}
  | glpat-[A-Za-z0-9_-]{20,}                                   # GitLab
  | xox[abpors]-[A-Za-z0-9-]{10,}                              # Slack
  | sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}                       # OpenAI, Anthropic
  | [sr]k_(?:live|test)_[A-Za-z0-9]{16,}                       # Stripe
  | AIza[0-9A-Za-z_-]{35}                                      # Google API key
  | hf_[A-Za-z0-9]{30,}                                        # Hugging Face
  | eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}   # JWT
  | -----BEGIN[A-Z ]*PRIVATE\ KEY-----[\s\S]*?-----END[A-Z ]*PRIVATE\ KEY-----
""", re.X)
_KEY_NAME = re.compile(r"(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)[\"']?\s*$",
                       re.I)
_KEY_VALUE = re.compile(r"\s*[\"']?([^\s\"',;]{6,})")


def _looks_secret(value: str) -> bool:
    """A password or key has a digit, or is long and mixes cases; "secret: --nurse" is prose."""
    return any(c.isdigit() for c in value) or (len(value) >= 10 and value.lower() != value != value.upper())


def find_secrets(scan: Scan) -> Iterator[Span]:
    """Keys of well-known shapes (checked where 16+ key characters run), private key blocks, and the
    value of password=/api_key: assignments."""
    text = scan.text
    for s in scan.long_runs():
        m = _SECRET.match(text, s)
        if m and not _alnum_at(text, m.end()):
            yield m.span()
    start = text.find("-----BEGIN")
    while start >= 0:
        m = _SECRET.match(text, start)
        if m:
            yield m.span()
        start = text.find("-----BEGIN", m.end() if m else start + 1)
    for i in scan.assignments():
        name = _KEY_NAME.search(text, max(0, i - 16), i)
        if name and not _alnum_at(text, name.start() - 1):
            value = _KEY_VALUE.match(text, i + 1)
            if value and _looks_secret(value.group(1)):
                yield value.span(1)


_PHONE_KEY = re.compile(r"phone|mobile|fax|whatsapp|(?<![a-z])tel(?![a-z])", re.I)  # record keys

DETECTORS: dict[str, Callable[[Scan], Iterator[Span]]] = {
    "email": find_emails, "phone": find_phones, "card": find_cards, "iban": find_ibans, "ipv4": find_ipv4,
    "ipv6": find_ipv6, "ssn": find_ssns, "url_credentials": find_url_credentials, "secret": find_secrets,
}


def terms_regex(terms: list[str]) -> re.Pattern:
    """One case-insensitive whole-word pattern for many literal terms, as a prefix tree (fast for thousands)."""
    trie: dict = {}
    for term in {t.strip().lower() for t in terms if t.strip()}:
        node = trie
        for ch in term:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [(r"\s+" if ch == " " else re.escape(ch)) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(r"(?<!\w)" + build(trie) + r"(?!\w)", re.I)


# ---------------------------------------------------------------------------- replacement


def mask(kind: str, value: str) -> str:
    """A report example that shows the shape, not the value: j***@e***.com, 4*** **** **** ****."""
    if kind == "email" and "@" in value:
        local, domain = value.split("@", 1)
        tld = domain.rsplit(".", 1)[-1]
        return f"{local[:1]}***@{domain[:1]}***.{tld}"
    shown = value[:1] + re.sub(r"[^\s.:/()+-]", "*", value[1:24])
    return shown + ("..." if len(value) > 24 else "")


class Redactor:
    """Finds the chosen kinds in text and replaces them; counts per kind and per file."""

    def __init__(self, kinds: list[str] | tuple[str, ...] = KINDS, mode: str = "placeholder",
                 patterns: list[str] | tuple[str, ...] = (), terms: list[str] | tuple[str, ...] = (),
                 salt: bytes | None = None):
        unknown = [k for k in kinds if k not in KINDS + OPTIONAL]
        if unknown:
            raise ConfigError(f"data.redact: unknown kind '{unknown[0]}' (kinds: all, {', '.join(KINDS + OPTIONAL)})")
        self.kinds, self.mode = list(dict.fromkeys(kinds)), mode
        self.detectors = [(k, DETECTORS[k] if k in DETECTORS else ner_detector()) for k in self.kinds]
        for i, pattern in enumerate(patterns):
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"data.redact_patterns[{i}]: not a valid regular expression ({e})") from None
            self.detectors.append(("custom", lambda scan, rx=rx: (m.span() for m in rx.finditer(scan.text)
                                                                   if m.end() > m.start())))
        if terms:
            rx = terms_regex(list(terms))
            self.detectors.append(("term", lambda scan: (m.span() for m in rx.finditer(scan.text))))
        self.salt = salt if salt is not None else os.urandom(32)
        self.reset()

    def reset(self) -> None:
        """Forget the counts (a second pass over the same data counts afresh)."""
        self.counts: dict[str, int] = {}
        self.per_file: dict[str, dict[str, int]] = {}
        self.examples: dict[str, list[str]] = {}
        self.chars = 0

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind), earliest first; of overlapping finds the longer wins."""
        scan = Scan(text)
        hits = [(s, e, kind) for kind, detect in self.detectors for s, e in detect(scan)]
        hits.sort(key=lambda h: (h[0], h[0] - h[1]))
        kept, end = [], 0
        for h in hits:
            if h[0] >= end:
                kept.append(h)
                end = h[1]
        return kept

    def redact(self, text: str, where: str = "") -> str:
        return self._replace(text, self.find(text), 0, len(text), where)

    def _replace(self, text: str, hits: list[tuple[int, int, str]], lo: int, hi: int, where: str) -> str:
        """text[lo:hi] with the hits that lie inside it replaced, and counted."""
        self.chars += hi - lo
        parts, pos = [], lo
        for s, e, kind in hits:
            if s < lo or e > hi:
                continue
            value = text[s:e]
            parts += [text[pos:s], self.replacement(kind, value)]
            pos = e
            self.counts[kind] = self.counts.get(kind, 0) + 1
            counts = self.per_file.setdefault(where, {})
            counts[kind] = counts.get(kind, 0) + 1
            examples = self.examples.setdefault(kind, [])
            if len(examples) < EXAMPLES_PER_KIND and mask(kind, value) not in examples:
                examples.append(mask(kind, value))
        parts.append(text[pos:hi])
        return "".join(parts)

    def redact_stream(self, pieces: Iterable[tuple[str, Any]], where: str = "") -> Iterator[tuple[str, Any]]:
        """Consecutive pieces of one text, each with a tag (its split, say), redacted as if they were one
        string: a value may straddle a piece's end. Text is given out once CONTEXT characters follow it,
        at a line end where there is one, never inside a value; a value that straddles two tags goes
        whole to the first. Each redacted piece comes back with its tag."""
        left, pending, held = "", [], 0  # left: the last CONTEXT characters given out (context only)
        for piece in itertools.chain(pieces, [None]):
            if piece is not None:
                if not piece[0]:
                    continue
                if pending and pending[-1][1] == piece[1]:
                    pending[-1] = (pending[-1][0] + piece[0], piece[1])
                else:
                    pending.append(piece)
                held += len(piece[0])
                if held < 2 * CONTEXT:
                    continue
            text = left + "".join(t for t, _ in pending)
            hits = [h for h in self.find(text) if h[0] >= len(left)]
            cut = len(text) if piece is None else _quiet_cut(text, hits, len(left), len(text) - CONTEXT)
            bounds = [len(left)]  # where each tag's text starts and ends, moved past a value that straddles it
            for end in itertools.accumulate((len(t) for t, _ in pending), initial=len(left)):
                if end > len(left):
                    bounds.append(max(bounds[-1], next((e for s, e, _ in hits if s < end < e), end)))
            rest = []
            for (_, tag), lo, hi in zip(pending, bounds, bounds[1:]):
                if min(hi, cut) > lo:
                    yield self._replace(text, hits, lo, min(hi, cut), where), tag
                if hi > max(lo, cut):
                    rest.append((text[max(lo, cut):hi], tag))
            left, pending, held = text[max(0, cut - CONTEXT):cut], rest, sum(len(t) for t, _ in rest)

    def redact_number(self, value: int | float, key: str = "", where: str = "") -> int | float | str:
        """A number in a record (JSON, Parquet), scanned as its text: a card number stored as a number is
        found like one written out. Under a key that names a phone number (phone, mobile, tel, fax), an
        integer of 7-15 digits is one. Returns the number when nothing was found, else its replacement
        (an integer again for a pseudonym of digits, else the placeholder string)."""
        text = str(value)
        hits = self.find(text)
        digits = len(text.lstrip("-"))
        if (not hits and "phone" in self.kinds and isinstance(value, int) and 7 <= digits <= 15
                and _PHONE_KEY.search(key)):
            hits = [(0, len(text), "phone")]
        if not hits:
            return value
        out = self._replace(text, hits, 0, len(text), where)
        return int(out) if isinstance(value, int) and out.lstrip("-").isdigit() else out

    def replacement(self, kind: str, value: str) -> str:
        return PLACEHOLDERS[kind] if self.mode == "placeholder" else pseudonym(kind, value, self.salt)

    def summary(self) -> dict:
        """What the prepared data's meta and the report record: settings and counts, never values."""
        return {"kinds": self.kinds, "mode": self.mode, "total": sum(self.counts.values()),
                "counts": dict(sorted(self.counts.items())), "files": self.per_file}

    def report(self) -> dict:
        return {**self.summary(), "examples": self.examples, "chars": self.chars}

    def log_line(self) -> str:
        found = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "nothing found"
        return f"data: redacted ({self.mode}) {found}"


def _quiet_cut(text: str, hits: list[tuple[int, int, str]], lo: int, limit: int) -> int:
    """Where redact_stream may end what it gives out: the last line end before `limit` (else `limit`),
    moved back to the start of a value that crosses it."""
    cut = text.rfind("\n", lo, limit) + 1 or limit
    return next((s for s, e, _ in hits if s < cut < e), cut)


def pseudonym(kind: str, value: str, salt: bytes) -> str:
    """A fake value of the same shape, the same for the same input under the same salt."""
    key = value.lower() if kind in ("email", "term", "name") else value
    digest = hmac.new(salt, f"{kind}\0{key}".encode(), "sha256").digest()
    if kind == "email":
        return f"user{digest.hex()[:8]}@example.com"
    if kind == "ipv4":
        return f"10.{digest[0]}.{digest[1]}.{digest[2]}"
    if kind == "ipv6":
        return "fd00::" + ":".join(digest[i:i + 2].hex() for i in range(0, 8, 2))
    if kind in ("phone", "card", "ssn", "iban"):
        stream = iter(str(int.from_bytes(digest, "big")).zfill(78))
        chars = [next(stream) if c.isdigit() else c for c in value]
        places = [i for i, c in enumerate(chars) if c.isalnum()]
        if kind == "ssn":
            chars[places[0]] = "9"  # area 9xx is never issued
        elif kind == "card":
            chars[places[0]] = value[places[0]]  # keep the network's first digit
            digits = "".join(chars[i] for i in places[:-1])
            chars[places[-1]] = next(str(d) for d in range(10) if luhn_ok(digits + str(d)))
        elif kind == "iban":
            chars[places[0]], chars[places[1]] = value[places[0]], value[places[1]]  # keep the country
            compact = "".join(chars[i] for i in places)
            check = 98 - int("".join(str(int(c, 36)) for c in compact[4:] + compact[:2] + "00")) % 97
            chars[places[2]], chars[places[3]] = f"{check:02d}"
        return "".join(chars)
    if kind in ("term", "name"):
        return "Name" + digest.hex()[:6]
    return f"<{kind.upper()}_{digest.hex()[:8]}>"


# ---------------------------------------------------------------------------- configuration


def resolve_kinds(kinds: list[str]) -> list[str]:
    return list(KINDS) if "all" in kinds else list(kinds)


def read_terms(path: str, decoding: Decoding | None = None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.redact_terms: {path}: no such file")
    return [line.strip() for line in (decoding or Decoding()).lines(p) if line.strip()]


def read_salt(path: str, key: str = "data.redact_salt_file") -> bytes:
    """The pseudonym secret from `path`, created there (readable by you only) when it does not exist;
    an existing one shorter than MIN_SALT_BYTES (an empty file, a short word) is refused."""
    p = Path(path)
    if not path or p.is_dir():
        raise ConfigError(f"{key} '{path}': not a file; name the file that holds (or will hold) the secret")
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    salt = p.read_bytes().strip()
    if len(salt) < MIN_SALT_BYTES:
        raise ConfigError(f"{key} {path}: the pseudonym secret is {len(salt)} bytes, fewer than the "
                          f"{MIN_SALT_BYTES} it needs (a short one could be guessed and the pseudonyms undone); "
                          "delete the file to have a random one created, or put at least "
                          f"{MIN_SALT_BYTES} random bytes in it")
    return salt


def from_config(cfg: SourceConfig) -> Redactor | None:
    """The redactor a data config asks for, or None when it asks for none."""
    if not (cfg.redact or cfg.redact_patterns or cfg.redact_terms):
        return None
    terms = read_terms(cfg.redact_terms, Decoding(cfg.encoding, cfg.encoding_errors)) if cfg.redact_terms else []
    salt = read_salt(cfg.redact_salt_file) if cfg.redact_salt_file else None
    return Redactor(resolve_kinds(cfg.redact), cfg.redact_mode, cfg.redact_patterns, terms, salt)


def settings(cfg: SourceConfig) -> dict | None:
    """The redaction settings prepared data depends on (the terms file by content)."""
    if not (cfg.redact or cfg.redact_patterns or cfg.redact_terms):
        return None
    terms = None
    if cfg.redact_terms:
        terms = hmac.new(b"terms", Path(cfg.redact_terms).read_bytes(), "sha256").hexdigest() \
            if Path(cfg.redact_terms).is_file() else cfg.redact_terms
    return {"kinds": resolve_kinds(cfg.redact), "mode": cfg.redact_mode, "patterns": cfg.redact_patterns,
            "terms": terms}


def ner_detector() -> Callable[[Scan], Iterator[Span]]:
    """Person names found by Presidio with a spaCy model that is already on this machine (never downloaded)."""
    status = ner_status()
    if not status.startswith("available"):
        raise ConfigError(f"redaction kind 'name' is {status}")
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    model = status.split("(")[1].split(")")[0]
    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy",
                                               "models": [{"lang_code": "en", "model_name": model}]}).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    return lambda scan: ((r.start, r.end) for r in analyzer.analyze(scan.text, entities=["PERSON"], language="en"))


def ner_status() -> str:
    """Whether named-entity detection (names in free text) could run here; it is never installed for you."""
    try:
        import presidio_analyzer  # noqa: F401
        import spacy
    except ImportError:
        return "unavailable: names in free text need presidio-analyzer and spaCy with a local model (not installed)"
    models = [m for m in ("en_core_web_lg", "en_core_web_md", "en_core_web_sm") if spacy.util.is_package(m)]
    if not models:
        return "unavailable: presidio and spaCy are installed but no spaCy model is present locally"
    return f"available ({models[0]}), not used by the pattern redactor"
