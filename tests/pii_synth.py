"""A labelled synthetic PII set: sentences holding values of every kind, and near misses that must stay.

`make_set(n, seed)` returns (text, labels) with labels = [(start, end, kind)]; `score(redactor, text,
labels)` gives precision and recall per kind (a find counts only with its exact span and kind).
Used by tests/test_privacy.py and bench/redact_throughput.py.
"""

from __future__ import annotations

import random
import string

WORDS = ("the report was sent on time and the team will review it next week before the meeting "
         "please note that our office moves in spring and the old address stays valid until then").split()
NAMES = ["anna", "li", "maria", "john", "omar", "sven", "ines", "yuki", "pierre", "zoe", "kwame", "olga"]
TLDS = ["com", "org", "net", "de", "io", "co.uk", "fr", "example"]
IBAN_BBAN = {"DE": [("n", 18)], "GB": [("a", 4), ("n", 14)], "FR": [("n", 23)], "NL": [("a", 4), ("n", 10)],
             "ES": [("n", 20)], "IT": [("a", 1), ("n", 22)], "CH": [("n", 17)]}


def luhn_digit(body: str) -> str:
    for d in "0123456789":
        total = 0
        for i, ch in enumerate(reversed(body + d)):
            v = int(ch)
            if i % 2:
                v = v * 2 - 9 if v > 4 else v * 2
            total += v
        if total % 10 == 0:
            return d
    raise AssertionError


def digits(r: random.Random, n: int) -> str:
    return "".join(r.choice(string.digits) for _ in range(n))


def email(r):
    sep = r.choice([".", "_", "", "-"])
    local = r.choice(NAMES) + sep + r.choice(NAMES) + (digits(r, 2) if r.random() < 0.3 else "")
    local += "+news" if r.random() < 0.1 else ""
    sub = r.choice(["", "", "mail.", "eu.mx."])
    return f"{local}@{sub}{r.choice(NAMES)}{r.choice(['', '-mail', 'corp'])}.{r.choice(TLDS)}"


def phone(r):
    style = r.randrange(7)
    if style == 0:
        if r.random() < 0.3:
            return f"+49 (0){digits(r, 2)} {digits(r, 7)}"  # the German trunk zero in brackets
        return f"+{r.choice(['44', '49', '33', '39', '31', '34'])} {digits(r, 2)} {digits(r, 4)} {digits(r, 4)}"
    if style == 1:
        return f"+1 ({r.randint(201, 989)}) {digits(r, 3)}-{digits(r, 4)}"
    if style == 2:
        return f"({r.randint(201, 989)}) {digits(r, 3)}-{digits(r, 4)}"
    if style == 3:
        return f"{r.randint(201, 989)}{r.choice('-.')}{digits(r, 3)}{r.choice('-.')}{digits(r, 4)}"
    if style == 4:
        return f"0{digits(r, 2)} {digits(r, 4)} {digits(r, 4)}"  # UK
    if style == 5:
        return f"0{digits(r, 1)} {digits(r, 2)} {digits(r, 2)} {digits(r, 2)} {digits(r, 2)}"  # France
    return f"+{r.choice(['91', '81', '61'])}{digits(r, 10)}"


def card(r, valid=True):
    prefix, n = r.choice([("4", 16), ("51", 16), ("55", 16), ("34", 15), ("37", 15), ("6011", 16)])
    body = prefix + digits(r, n - len(prefix) - 1)
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + r.randint(1, 9)) % 10)
    num = body + check
    if n == 15:
        return f"{num[:4]} {num[4:10]} {num[10:]}" if r.random() < 0.5 else num
    sep = r.choice([" ", "-", ""])
    return sep.join(num[i:i + 4] for i in range(0, 16, 4))


def iban(r, valid=True):
    cc = r.choice(list(IBAN_BBAN))
    bban = "".join(r.choice(string.ascii_uppercase if kind == "a" else string.digits)
                   for kind, count in IBAN_BBAN[cc] for _ in range(count))
    rearranged = bban + cc + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in rearranged)) % 97
    if not valid:
        check = (check + r.randint(1, 90)) % 97 + 2
    compact = f"{cc}{check:02d}{bban}"
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)) if r.random() < 0.5 else compact


def ipv4(r):
    return f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"


def ipv6(r):
    groups = [f"{r.randrange(65536):x}" for _ in range(8)]
    style = r.randrange(4)
    if style == 0:
        return ":".join(groups)
    if style == 3:
        return "::ffff:" + ipv4(r)  # an IPv4-mapped address
    if style == 1:
        return "2001:db8::" + ":".join(groups[:3])
    return "fe80::" + ":".join(groups[:4])


def ssn(r):
    area = r.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{r.randint(1, 99):02d}-{r.randint(1, 9999):04d}"


def secret(r):
    alnum = string.ascii_letters + string.digits
    pick = lambda n, chars=alnum: "".join(r.choice(chars) for _ in range(n))  # noqa: E731
    return r.choice([
        "AKIA" + pick(16, string.ascii_uppercase + string.digits), "ghp_" + pick(36), "sk-" + pick(48),
        "xoxb-" + digits(r, 12) + "-" + pick(24), "AIza" + pick(35, alnum + "_-"), "hf_" + pick(34),
        "sk_live_" + pick(24),
    ])


POSITIVE = {"email": email, "phone": phone, "card": card, "iban": iban, "ipv4": ipv4, "ipv6": ipv6, "ssn": ssn,
            "secret": secret}
CONTEXT = ["Contact {} for details.", "write to {} today", "value: {}.", "({})", "see {}, thanks",
           "on file: {}\n"]


def near_miss(r) -> str:
    """Things that look like PII and are not: they must come out unchanged."""
    return r.choice([
        lambda: card(r, valid=False), lambda: iban(r, valid=False),
        lambda: f"version {r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}.{r.randint(0, 99)}",
        lambda: f"v{r.randint(1, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}",
        lambda: f"1.3.6.1.4.1.{r.randint(1, 99999)}",  # an OID
        lambda: f"{r.randint(256, 999)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}",
        lambda: f"{r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
        lambda: f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(1990, 2030)}",
        lambda: f"{r.randint(1, 12):02d}/{r.randint(1, 28):02d}/{r.randint(1990, 2030)}",
        lambda: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
        lambda: ":".join(f"{r.randrange(256):02x}" for _ in range(6)),  # a MAC address
        lambda: f"{r.choice(['000', '666', '923'])}-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
        lambda: f"order #{digits(r, 8)}", lambda: f"${r.randint(1, 999)},{digits(r, 3)}.{digits(r, 2)}",
        lambda: "user@localhost", lambda: "std::vector<int>", lambda: f"room {digits(r, 4)}",
        lambda: f"ISBN 978-{r.randint(0, 9)}-{digits(r, 3)}-{digits(r, 5)}-{r.randint(0, 9)}",
        lambda: f"{r.randint(1, 9)}.{digits(r, 5)}", lambda: f"sk-short{r.randint(0, 9)}",
        lambda: "we must talk in secret: --nurse", lambda: "the password: forgotten",
    ])()


def make_set(n: int = 2000, seed: int = 0) -> tuple[str, list[tuple[int, int, str]]]:
    r = random.Random(seed)
    parts: list[str] = []
    labels: list[tuple[int, int, str]] = []
    pos = 0

    def add(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    for i in range(n):
        add(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 10))) + " ")
        if r.random() < 0.3:
            add(near_miss(r) + " ")
            continue
        kind = list(POSITIVE)[i % len(POSITIVE)] if r.random() < 0.85 else r.choice(["url_credentials", "assigned"])
        if kind == "assigned":  # a password or key in an assignment: the value is the secret
            add(r.choice(["password=", "api_key: ", 'secret = "', "PASSWD="]))
            value = r.choice(NAMES) + digits(r, 4) + r.choice("!#%")
            labels.append((pos, pos + len(value), "secret"))
            add(value + " ")
            continue
        if kind == "url_credentials":
            user, pw = r.choice(NAMES), digits(r, 3) + r.choice(NAMES) + "!"
            add(f"{r.choice(['postgres', 'https', 'ftp'])}://")
            labels.append((pos, pos + len(user) + 1 + len(pw), kind))
            add(f"{user}:{pw}@db{r.randint(1, 9)}.internal/app ")
            continue
        value = POSITIVE[kind](r)
        before, after = r.choice(CONTEXT).split("{}")
        add(before)
        labels.append((pos, pos + len(value), kind))
        add(value + after + " ")
    return "".join(parts), labels


def score(redactor, text: str, labels: list[tuple[int, int, str]]) -> dict[str, dict[str, float]]:
    """Precision and recall per kind: a find is right only with the exact span and kind."""
    found = {(s, e, k) for s, e, k in redactor.find(text)}
    truth = set(labels)
    out = {}
    for kind in sorted({k for *_, k in truth} | {k for *_, k in found}):
        f = {h for h in found if h[2] == kind}
        t = {h for h in truth if h[2] == kind}
        tp = len(f & t)
        out[kind] = {"precision": tp / len(f) if f else 1.0, "recall": tp / len(t) if t else 1.0,
                     "labelled": len(t), "found": len(f)}
    return out
