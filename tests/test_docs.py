"""The documentation cannot drift: the generated configuration reference is current and complete, every
link and anchor in README.md and docs/*.md resolves, every docs/<page>.md[#anchor] cited by the code exists,
no code still cites a README section that is gone, and (with the docs extra installed) mkdocs builds strict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

from gpt import config as C

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
TOP_LEVEL = (C.PretrainConfig, C.FinetuneConfig)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- markdown helpers

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$')
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks (snippet includes expanded)."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = SNIPPET.match(line.strip())
        if m:
            out += prose_lines(ROOT / m.group(1))
            continue
        out.append(line)
    return out


def slugify(heading: str) -> str:
    """The anchor MkDocs' toc extension gives a heading: markup stripped, lowercase, punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        slug = slugify(m.group(2))
        if slug in seen:  # toc's rule for repeated headings: slug_1, slug_2, ...
            seen[slug] += 1
            slug = f"{slug}_{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return frozenset(out)


def heading_texts(path: Path) -> set[str]:
    return {m.group(2).strip().lower() for line in prose_lines(path) if (m := HEADING.match(line))}


# ---------------------------------------------------------------------------- (a), (b) configuration reference


def test_configuration_reference_is_generated_from_config_py():
    gen = load_generator()
    committed = (DOCS / "configuration-reference.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/configuration-reference.md is stale: run python docs/gen_config_reference.py"


def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_configuration_reference_lists_every_key():
    text = (DOCS / "configuration-reference.md").read_text(encoding="utf-8")
    missing = [k for cls in TOP_LEVEL for k in all_keys(cls) if f"| `{k}` |" not in text]
    assert not missing, f"keys missing from docs/configuration-reference.md: {missing}"


def test_every_config_dataclass_is_reachable_from_train_or_finetune():
    """A new config dataclass must be a section (or a base of one) of PretrainConfig or FinetuneConfig."""
    reached: set[type] = set()

    def walk(cls: type) -> None:
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass):
                reached.add(klass)
        for typ in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(typ) and typ not in reached:
                walk(typ)

    for top in TOP_LEVEL:
        walk(top)
    defined = {obj for obj in vars(C).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == C.__name__}
    assert defined - reached - {C.Range} == set()


# ---------------------------------------------------------------------------- (c) links in the docs


def page_links(path: Path) -> list[str]:
    return [m.group(1) for line in prose_lines(path) for m in LINK.finditer(INLINE_CODE.sub("", line))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    bad = []
    for target in page_links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_file():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for needed in ("python -m pytest -q tests", "train.py configs/shakespeare.yaml"):  # .ci/run greps these
        assert needed in text


# ---------------------------------------------------------------------------- (d) docs cited by the code

DOC_REF = re.compile(r"docs/([A-Za-z0-9_-]+\.md)(?:#([A-Za-z0-9_-]+))?")
# "README, Performance", 'README, "Threads"', "README.md (Configuration)", 'README section "X"'; not another
# project's README ("its README", "nanoGPT's README").
README_REF = re.compile(r"(?<!its )(?<!'s )\bREADME(?:\.md)?(?:\s*,\s*|\s*\(\s*|\s+section\s+)"
                        r"(?:\"([^\"\n]+)\"|“([^”\n]+)”|([A-Z][\w\- ]*\w))")


def code_files() -> list[Path]:
    files = [*ROOT.glob("*.py"), *(ROOT / "configs").glob("*.yaml"), ROOT / ".ci" / "run"]
    for folder in ("gpt", "tests", "bench", "data"):
        files += (ROOT / folder).rglob("*.py")
    files += [*(ROOT / "gpt").rglob("*.html"), *(ROOT / "gpt").rglob("*.js")]
    return sorted(f for f in files if f.is_file() and f.name != Path(__file__).name)


def test_docs_cited_in_code_exist():
    bad = []
    readme_sections = heading_texts(ROOT / "README.md")
    for path in code_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            for m in DOC_REF.finditer(line):
                page, anchor = DOCS / m.group(1), m.group(2)
                if not page.is_file():
                    bad.append(f"{where}: {m.group(0)}: no such page")
                elif anchor and anchor not in anchors(page):
                    bad.append(f"{where}: {m.group(0)}: no heading with that anchor")
            for m in README_REF.finditer(line):
                section = next(g for g in m.groups() if g)
                if section.strip().lower() not in readme_sections:
                    bad.append(f"{where}: cites README section {section!r}, which README.md no longer has; "
                               f"cite docs/<page>.md#<anchor>")
            if "developer guide" in line.lower():
                bad.append(f"{where}: cites a 'Developer guide' that does not exist; cite docs/development.md")
    assert not bad, "\n".join(bad)


def test_readme_reference_pattern_catches_stale_forms():
    stale = ['(README, Performance)', 'README, "Decoding precision"', "see README.md (Configuration).",
             'README section "Decoding precision"', "(README, “Threads”)"]
    assert all(README_REF.search(s) for s in stale)
    assert not README_REF.search("nanoGPT's recipe (its README, \"I only have a macbook\")")
    assert not README_REF.search("a char model trained on the README (float32)")


def test_slugs_follow_mkdocs_toc():
    assert slugify("Where cached = uncached holds") == "where-cached-uncached-holds"
    assert slugify("Your own tokenizer (byte-level BPE)") == "your-own-tokenizer-byte-level-bpe"
    assert slugify("Scoring checkpoints: `gpt.eval`") == "scoring-checkpoints-gpteval"
    assert slugify("EPYC-2, quiet: serving (2026-11-24, commit 1006a36)") == "epyc-2-quiet-serving-2026-11-24-commit-1006a36"


# ---------------------------------------------------------------------------- (e) the site builds


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e \".[docs]\"); the site build is not checked")
    # Not --quiet: it hides warnings from strict mode's count (mkdocs issue #4126), so nothing would fail.
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
