"""No tool deletes or overwrites a user's files (gpt/outputs.py): every tool that writes refuses, in one
line with exit code 1 and nothing touched, an output that is not new, empty or its own previous output,
that is its input, holds it or lies inside it, or that lies inside a checkpoint; and it replaces its
own previous output whole (no stale file survives).

Each row of REFUSED is one hostile output path for one entry point (the whole test folder must be
byte-identical afterwards); each row of REPLACED is an output written a second time, and what must hold.
The entry points run in-process, as in tests/test_hostile.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import run_in_process, tiny_overrides, write_base

from gpt import checkpoint, convert, outputs


@dataclass
class Material:
    """Built once: a run folder (config.yaml, metrics.jsonl, best/) and its Hugging Face export."""

    run: Path
    hf: Path

    def copy_run(self, tmp: Path, name: str = "run") -> Path:
        return shutil.copytree(self.run, tmp / name)


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Material:
    root = tmp_path_factory.mktemp("outputs")
    run = write_base(root / "run")
    shutil.copy(run / "best" / "config.yaml", run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iter": i, "loss": 3.0 - i / 10}) + "\n" for i in range(5)))
    return Material(run, convert.to_hf(run / "best", root / "hf"))


def users_folder(tmp: Path, name: str) -> Path:
    """A folder of the user's own files."""
    folder = tmp / name
    (folder / "in").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "mine.jsonl").write_text('{"text": "my own data"}\n')
    (folder / "in" / "a.jsonl").write_text('{"text": "mail jane.doe@example.com"}\n')
    return folder


def users_file(tmp: Path, name: str) -> Path:
    (tmp / name).write_bytes(b"the user's own bytes\n")
    return tmp / name


def with_readme(folder: Path) -> Path:
    (folder / "README.md").write_text("# my model card\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@dataclass
class Refused:
    name: str
    entry: str
    args: Callable[[Material, Path], list]  # (material, this row's tmp_path) -> arguments; may build files
    cause: str  # the one stderr line contains it


REFUSED = [
    Refused("from-hf into a folder of the user's files", "gpt.convert",
            lambda m, t: ["from-hf", m.hf, users_folder(t, "mine")],
            "mine: this folder exists and was not written by gpt.convert from-hf"),
    Refused("from-hf into its own source", "gpt.convert",
            lambda m, t: ["from-hf", shutil.copytree(m.hf, t / "hf"), t / "hf"], "hf: is the input"),
    Refused("from-hf into the current folder", "gpt.convert", lambda m, t: ["from-hf", m.hf, "."],
            ".: is the current folder"),
    Refused("to-hf into its own checkpoint", "gpt.convert",
            lambda m, t: ["to-hf", m.copy_run(t) / "best", t / "run" / "best"], "best: is the input"),
    Refused("to-hf into the checkpoint's run folder", "gpt.convert",
            lambda m, t: ["to-hf", m.copy_run(t) / "best", t / "run"], "run: holds the input"),
    Refused("to-hf into another checkpoint", "gpt.convert",
            lambda m, t: ["to-hf", m.run, m.copy_run(t) / "best" / "hf"], "lies inside the checkpoint folder"),
    Refused("to-hf into a folder of the user's files", "gpt.convert",
            lambda m, t: ["to-hf", m.run, users_folder(t, "p")],
            "p: this folder exists and was not written by gpt.convert to-hf"),
    Refused("to-hf again, into its export the user added a file to", "gpt.convert",
            lambda m, t: ["to-hf", m.run, with_readme(convert.to_hf(m.run, t / "hf"))],
            "gpt.convert to-hf wrote this folder, but not README.md in it"),
    Refused("from-hf again, into its import the user added a file to", "gpt.convert",
            lambda m, t: ["from-hf", m.hf, with_readme(convert.from_hf(str(m.hf), t / "ours"))],
            "ours: this folder exists and was not written by gpt.convert from-hf"),
    Refused("redact into the folder that holds its input", "gpt.redact",
            lambda m, t: [users_folder(t, "proj") / "in", t / "proj"], "proj: holds the input"),
    Refused("redact onto the user's file", "gpt.redact",
            lambda m, t: [users_folder(t, "proj") / "in" / "a.jsonl", users_file(t, "clean.jsonl")],
            "clean.jsonl: this file exists and was not written by gpt.redact"),
    Refused("redact --report onto the user's file", "gpt.redact",
            lambda m, t: [users_folder(t, "proj") / "in", t / "out", "--report", users_file(t, "notes.json")],
            "notes.json: this file exists and was not written by gpt.redact"),
    Refused("plot -o onto the user's file", "gpt.plot", lambda m, t: [m.run, "-o", users_file(t, "photo.png")],
            "photo.png: this file exists and was not written by gpt.plot"),
    Refused("plot -o into a checkpoint", "gpt.plot", lambda m, t: [m.run, "-o", m.copy_run(t) / "best" / "loss.png"],
            "lies inside the checkpoint folder"),
    Refused("train into a folder of the user's files", "train.py",
            lambda m, t: tiny_overrides(t, users_file(t, "corpus.txt"), out_dir=users_folder(t, "proj")),
            "out_dir " + "{tmp}/proj: holds files and is not a run folder"),
    Refused("train into a checkpoint", "train.py",
            lambda m, t: tiny_overrides(t, users_file(t, "corpus.txt"), out_dir=m.copy_run(t) / "best" / "x"),
            "lies inside the checkpoint folder"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_an_output_that_is_not_the_tools_own_is_refused_untouched(case: Refused, material, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    args = case.args(material, tmp_path)
    before, made = snapshot(tmp_path), snapshot(material.run.parent)
    proc = run_in_process(capsys, case.entry, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert case.cause.format(tmp=tmp_path) in lines[0]
    assert snapshot(tmp_path) == before and snapshot(material.run.parent) == made  # nothing touched, no temp left


def test_the_checkpoint_survives_a_refused_export_into_itself(material, tmp_path, capsys):
    run = material.copy_run(tmp_path)
    run_in_process(capsys, "gpt.convert", "to-hf", run / "best", run / "best")
    run_in_process(capsys, "gpt.convert", "to-hf", run / "best", run)
    assert checkpoint.resolve(run) == run / "best"  # no model.safetensors in the run folder shadows best/
    checkpoint.load_checkpoint(run)  # its SHA-256 still matches


# ---------------------------------------------------------------------------- a tool's own output, again


def stale_files(folder: Path) -> None:
    """An export that also wrote a template and a special-tokens map (as a to-hf of another model, or of
    another version, might): files of its own, in its marker, that the next export does not write."""
    (folder / "chat_template.jinja").write_text("{{ stale }}")
    (folder / "special_tokens_map.json").write_text('{"eos_token": "<stale>"}')
    outputs.mark(folder, convert.TO_HF, outputs.files_in(folder))


@dataclass
class Replaced:
    name: str
    entry: str
    args: Callable[[Material, Path], list]
    between: Callable[[Path], None]  # (tmp_path) -> what changes between the first and the second run
    check: Callable[[Path], None]  # (tmp_path) -> assertions after the second run


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def export_is_fresh(t: Path) -> None:
    assert names(t / "hf") == [outputs.MARKER, "config.json", "generation_config.json", "model.safetensors",
                               "tokenizer.json", "tokenizer_config.json"]


def import_is_fresh(t: Path) -> None:
    checkpoint.load_checkpoint(t / "ours")


def one_input_less(t: Path) -> None:
    (t / "in" / "b.jsonl").unlink()


def copy_is_fresh(t: Path) -> None:
    assert names(t / "out") == [outputs.MARKER, ".redaction.json", "a.jsonl"]  # b.jsonl went with the previous copy


def plot_is_ours(t: Path) -> None:
    assert (t / "loss.png").read_bytes().startswith(b"\x89PNG")


REPLACED = [
    Replaced("to-hf again drops the stale files", "gpt.convert", lambda m, t: ["to-hf", m.run, t / "hf"],
             lambda t: stale_files(t / "hf"), export_is_fresh),
    Replaced("from-hf again replaces its checkpoint", "gpt.convert", lambda m, t: ["from-hf", m.hf, t / "ours"],
             lambda t: None, import_is_fresh),
    Replaced("redact again: the folder is the new copy, whole", "gpt.redact",
             lambda m, t: [t / "in", t / "out", "--report", t / "report.json"], one_input_less, copy_is_fresh),
    Replaced("plot again onto its own PNG", "gpt.plot", lambda m, t: [m.run, "-o", t / "loss.png"], lambda t: None,
             plot_is_ours),
]


@pytest.mark.parametrize("case", REPLACED, ids=lambda c: c.name)
def test_a_tools_own_output_is_replaced_whole(case: Replaced, material, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.jsonl").write_text('{"text": "mail jane.doe@example.com"}\n')
    args = case.args(material, tmp_path)
    first = run_in_process(capsys, case.entry, *args)
    assert first.returncode == 0, first.stderr
    case.between(tmp_path)
    second = run_in_process(capsys, case.entry, *args)
    assert second.returncode == 0, second.stderr
    case.check(tmp_path)
    assert not [p for p in tmp_path.rglob(".*") if outputs.TMP_NAME.match(p.name) or p.name.endswith(".old")]
