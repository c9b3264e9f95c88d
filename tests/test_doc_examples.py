"""Docs as tests: every bash and python block of README.md and docs/*.md runs, against the shipped configs
and the models the docs themselves make (tiny step counts), or says on the line before it why it cannot run
here; every block declares its language. How the blocks run: tests/docrunner.py."""

from __future__ import annotations

import tomllib

import pytest

from conftest import ROOT, SHARED
from docrunner import (CAPS, LANGUAGES, NOT_HERE, NOT_RUN_REASONS, Sandbox, blocks, commands, not_here, pages,
                       pip_extras, stray_markers)

PAGES = pages()


def page_id(page) -> str:
    return str(page.relative_to(ROOT))


def test_every_block_declares_its_language():
    bad = [f"{b.where}: ```{b.lang}" for page in PAGES for b in blocks(page) if b.lang not in LANGUAGES]
    assert not bad, "fenced blocks must say ```bash, ```python or ```text (never run):\n" + "\n".join(bad)


def test_not_run_markers_give_an_allowed_reason():
    bad = []
    for page in PAGES:
        bad += [f"{page_id(page)}:{n}: a not-run marker must be the line before a fence" for n in stray_markers(page)]
        for b in blocks(page):
            if b.reason is not None and b.reason not in NOT_RUN_REASONS:
                bad.append(f"{b.where}: reason {b.reason!r} is not one of {NOT_RUN_REASONS}")
            if b.reason is not None and b.lang == "text":
                bad.append(f"{b.where}: a text block never runs; it needs no marker")
    assert not bad, "\n".join(bad)
    assert all(why in NOT_RUN_REASONS for _, why in NOT_HERE) and len(NOT_HERE) <= 6


def test_pip_extras_named_in_the_docs_exist():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = set(project["optional-dependencies"])
    named = {(page_id(p), x) for p in PAGES for x in pip_extras(p.read_text(encoding="utf-8"))}
    assert {x for _, x in named} >= {"dev"}, "the docs should say how to install the dev extra"
    bad = [f"{where}: .[{x}]" for where, x in sorted(named) if x not in extras]
    assert not bad, f"extras named in the docs that pyproject.toml lacks ({sorted(extras)}): {bad}"


def test_shell_splitting():
    text = ('pip install -e . && python train.py a.yaml  # and a comment\n'
            'python -m gpt.redact a b --pattern "x # y && z" \\\n    --report r.json\n'
            'echo "hi" | python sample.py --ckpt out/x --prompt-file -   # stdin\n')
    assert commands(text) == [(0, "pip install -e ."), (0, "python train.py a.yaml"),
                              (1, 'python -m gpt.redact a b --pattern "x # y && z"      --report r.json'),
                              (3, 'echo "hi" | python sample.py --ckpt out/x --prompt-file -')]
    cpu_torch = "command -v nvidia-smi >/dev/null || pip install torch --index-url https://x/cpu"
    assert not_here(cpu_torch) == "needs the network"
    assert not_here("python train.py configs/shakespeare.yaml") is None
    assert "train.max_iters=2" in CAPS["train.py"] and "train.max_iters=2" in CAPS["finetune.py"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    shakespeare = next((p for p in (ROOT / "data" / "shakespeare" / "input.txt",
                                    SHARED / "data" / "tinyshakespeare" / "input.txt") if p.is_file()), None)
    if shakespeare is None:
        pytest.skip("Tiny Shakespeare is not available offline")
    box = Sandbox(tmp_path_factory.mktemp("docs"), shakespeare)
    yield box
    box.close()
    print("\ndocs examples:")
    for step in box.steps:
        print(f"  {step.seconds:6.2f} s  {step.where}: {step.command.strip()[:90]}  [{step.status}]")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_examples_run(page, sandbox):
    """The page's runnable blocks in order (earlier pages first: they make the models later ones use)."""
    sandbox.run_page(page)
