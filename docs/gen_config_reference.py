"""Write docs/configuration-reference.md from the config dataclasses in gpt/config.py.

    python docs/gen_config_reference.py          # rewrite the page
    python docs/gen_config_reference.py --check  # exit 1 if the committed page differs

Every key of `PretrainConfig` (train.py) and `FinetuneConfig` (finetune.py) gets a row: its type (a
Literal's allowed values), its default, its range (`ranged(...)`) and the comments written next to it
in gpt/config.py (the `# ...` lines directly above the field and the one at the end of its line).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpt import config as C  # noqa: E402

PAGE = ROOT / "docs" / "configuration-reference.md"

# (heading, command, top-level class)
RUNS = (
    ("Pretraining", "python train.py CONFIG.yaml", C.PretrainConfig),
    ("Fine-tuning", "python finetune.py CONFIG.yaml", C.FinetuneConfig),
)


# ---------------------------------------------------------------------------- comments


@functools.lru_cache(maxsize=None)
def class_comments(cls: type) -> dict[str, str]:
    """{field name: its comments} for the fields `cls` itself declares (not inherited ones)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER, tokenize.ENCODING):
            for line in range(tok.start[0], tok.end[0] + 1):
                code_lines.add(line)
    tree = ast.parse(source)
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line >= 1 and line in comments and line not in code_lines and lines[line - 1].strip():
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[ln] for ln in range(stmt.lineno, stmt.end_lineno + 1) if ln in comments]
        text = " ".join(above + trailing).strip()
        if text:
            out[stmt.target.id] = text
    return out


def field_comment(cls: type, name: str) -> str:
    """The comment of field `name` of dataclass `cls`, found in the class of its MRO that declares it."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return class_comments(klass).get(name, "")
    return ""


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """The class's own fields first, then those of its bases in MRO order."""
    rank = {}
    for i, klass in enumerate(cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            rank.setdefault(name, i)
    fields = dataclasses.fields(cls)
    return sorted(fields, key=lambda f: (rank.get(f.name, 0), fields.index(f)))


# ---------------------------------------------------------------------------- rendering


DOC_REF = re.compile(r"docs/([a-z0-9-]+\.md(?:#[a-z0-9-]+)?)")


def escape(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("*", r"\*").replace("_", r"\_").replace("|", r"\|")


def md(text: str) -> str:
    """Markdown-safe cell text: HTML and table characters escaped outside `code` spans; docs/ pages linked."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        pieces = DOC_REF.split(parts[i])  # text, target, text, target, ...
        parts[i] = "".join(escape(p) if j % 2 == 0 else f"[{p.split('#')[0]}]({p})" for j, p in enumerate(pieces))
    for i in range(1, len(parts), 2):
        parts[i] = parts[i].replace("|", r"\|")
    if len(parts) % 2 == 0:  # an unbalanced backtick: keep it literal
        return "\\`".join(parts)
    return "`".join(parts)


def code(text: str) -> str:
    return "`" + text.replace("|", r"\|") + "`"


def show_type(typ: Any) -> str:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " or ".join(show_type(a) for a in typing.get_args(typ) if a is not type(None))
    if typing.get_origin(typ) is Literal:
        return ", ".join(code(str(c)) for c in typing.get_args(typ))
    if typing.get_origin(typ) in (list, tuple):
        (item,) = typing.get_args(typ)[:1] or (Any,)
        return f"list of {getattr(item, '__name__', str(item))}"
    return getattr(typ, "__name__", str(typ))


def show_number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v.is_integer() and abs(v) < 1e6:
        return f"{v:.1f}"
    text = f"{v:.0e}" if 0 < abs(v) < 0.01 and float(f"{v:.0e}") == v else f"{v:g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).replace('+', '')}{m.group(2)}", text)


def show_default(v: Any) -> str:
    if isinstance(v, bool):
        return code("true" if v else "false")
    if isinstance(v, (int, float)):
        return code(show_number(v))
    if isinstance(v, str):
        if v == "" or v != v.strip() or any(ord(c) < 32 for c in v):
            return code('"' + v.encode("unicode_escape").decode() + '"')
        return code(v)
    if isinstance(v, list):
        return code("[" + ", ".join(str(x) for x in v) + "]")
    return code(repr(v))


def section_table(prefix: str, cls: type, instance: Any) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | range | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in ordered_fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            continue
        rng = f.metadata.get("range")
        cells = [code(prefix + f.name), show_type(typ), show_default(getattr(instance, f.name)),
                 code(str(rng)) if rng is not None else "", md(field_comment(cls, f.name))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python docs/gen_config_reference.py` from gpt/config.py: do not edit by hand. -->",
        "",
        "Every key that `train.py` and `finetune.py` read, with its type, default, allowed range and the",
        "comment written next to it in `gpt/config.py`. Set a key in the YAML file under its section, or on",
        "the command line as `section.key=value`; see [Configuration](configuration.md) for how values are",
        "read and checked. Numeric keys also refuse NaN and infinities.",
        "",
    ]
    for heading, command, top in RUNS:
        instance = top()
        hints = typing.get_type_hints(top)
        doc = inspect.getdoc(top) or ""
        out += [f"## {heading}", "", f"`{command} [section.key=value ...]`. {md(doc)}", ""]
        out += [f"### {heading}: top-level keys", ""]
        out += section_table("", top, instance) + [""]
        for f in dataclasses.fields(top):
            typ = hints[f.name]
            if not dataclasses.is_dataclass(typ):
                continue
            out += [f"### {heading}: {f.name}", ""]
            note = field_comment(top, f.name)
            sdoc = inspect.getdoc(typ) if typ.__doc__ and not typ.__doc__.startswith(typ.__name__ + "(") else ""
            lead = " ".join(x for x in (md(sdoc), md(note[:1].upper() + note[1:] + ".") if note else "") if x)
            if lead:
                out += [lead, ""]
            out += section_table(f.name + ".", typ, getattr(instance, f.name)) + [""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed page differs")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        print(f"{PAGE.relative_to(ROOT)} is up to date")
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
