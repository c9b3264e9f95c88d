"""Where the tools write: one rule for every output, so that no tool deletes or overwrites a user's files.

A tool (gpt.convert, gpt.redact, gpt.plot, a checkpoint save) writes its output, a file or a folder,
under a temporary name beside it (`.<name>.tmp-<pid>`) and renames it into place when it is complete;
a previous output of the same tool is replaced whole (a file or folder the new output lacks goes with
it, never merged into). Before anything is written the target is refused, in one line, when

- it exists, holds something, and is not an output of the same tool: a folder a tool wrote carries
  MARKER (a small JSON file naming the tool and the files it wrote: a file added since is the user's,
  and refused, never deleted); a few outputs are known by their layout instead (a run folder, a
  checkpoint that from-hf wrote, a PNG of gpt.plot), passed in as `recognise`;
- it is one of the tool's inputs, holds one, or lies inside one;
- it lies inside a checkpoint folder (a checkpoint holds only its own files);
- it is the current folder or holds it (for outputs that are replaced).

Training's out_dir follows the same rule (`check_run_folder`) but is never replaced: a run folder is
train.py's and finetune.py's own output, resumed and re-run in place as always. Knows nothing of torch.
For users: docs/reliability.md#your-files-are-never-overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

from gpt.errors import UserError

MARKER = ".gpt-output"  # {"tool": ...} in every folder a tool wrote
RUN_TOOL = "train.py/finetune.py"  # the tool a run folder (out_dir) belongs to
TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # a write in progress (or a dead one's leftover)

Recognise = Callable[[Path], bool]


class OutputError(UserError):
    """An output path that would delete, overwrite or mix with files the tool did not write."""


# ---------------------------------------------------------------------------- what a folder is


def written_by(folder: Path) -> str | None:
    """The tool named by the folder's MARKER (None when it has none or it is unreadable)."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("tool")
    except (OSError, ValueError, AttributeError):
        return None


def mark(folder: Path, tool: str, files: list[str] | None = None) -> None:
    """Write MARKER: the tool and, for an output that is replaced whole, the files it wrote."""
    record = {"tool": tool} if files is None else {"tool": tool, "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=0) + "\n", encoding="utf-8")


def files_in(folder: Path) -> list[str]:
    """Every file under `folder` (relative paths, MARKER left out)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() and p.name != MARKER)


def added_since(folder: Path) -> str | None:
    """A file of a marked folder that its tool did not write (added by someone since), if any."""
    try:
        written = set(json.loads((folder / MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((f for f in files_in(folder) if f not in written), None)


def is_checkpoint(folder: Path) -> bool:
    """One of our checkpoint folders: weights and the run config side by side."""
    return (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file()


def is_run_folder(folder: Path) -> bool:
    """A training run's out_dir: marked by train.py/finetune.py, or laid out as one (config.yaml with
    metrics.jsonl, best/ or latest/: runs from before the marker)."""
    if written_by(folder) == RUN_TOOL:
        return True
    return (folder / "config.yaml").is_file() and any((folder / n).exists()
                                                       for n in ("metrics.jsonl", "best", "latest"))


def _holds_something(path: Path) -> bool:
    try:
        return any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0
    except OSError:
        return True  # unreadable: assume it holds something


# ---------------------------------------------------------------------------- the rule


def check_target(target: str | Path, tool: str, inputs: Iterable[str | Path] = (),
                 recognise: Recognise | None = None) -> Path:
    """Refuse `target` (OutputError, one line) unless `tool` may write it; returns its resolved path.

    `inputs` are what the tool reads; `recognise(path)` says whether an existing target is the tool's
    own output by its layout (besides MARKER)."""
    real = Path(target).resolve()
    for given in inputs:
        inp = Path(given).resolve()
        relation = ("is" if real == inp else "lies inside" if inp in real.parents
                    else "holds" if real in inp.parents else None)
        if relation:
            raise OutputError(f"{target}: {relation} the input {given}; nothing was written: "
                              "choose an output outside it")
    _check_outside_checkpoints(target, real)
    if real.exists() and _holds_something(real):
        own = (real.is_dir() and written_by(real) == tool) or (recognise is not None and recognise(real))
        if not own:
            what = "folder" if real.is_dir() else "file"
            raise OutputError(f"{target}: this {what} exists and was not written by {tool}; nothing was "
                              f"written: choose a new {what}, or move this one away first")
        added = added_since(real) if real.is_dir() else None
        if added:
            raise OutputError(f"{target}: {tool} wrote this folder, but not {added} in it; nothing was "
                              "written: move that file out first (the folder is replaced whole)")
    return real


def _check_outside_checkpoints(target: str | Path, real: Path) -> None:
    for folder in real.parents:
        if is_checkpoint(folder):
            raise OutputError(f"{target}: lies inside the checkpoint folder {folder}; nothing was written: "
                              "a checkpoint holds only its own files, choose an output outside it")


def check_replaceable(target: str | Path, real: Path) -> None:
    """An output that is replaced whole can be neither the current folder nor one that holds it."""
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{target}: is the current folder or holds it; nothing was written: "
                          "choose a new folder for the output")


def check_run_folder(out_dir: str | Path) -> None:
    """train.py/finetune.py's out_dir: new, empty, or a run folder (resumed or re-run as always);
    never a folder of other files, nor inside a checkpoint."""
    real = Path(out_dir).resolve()
    _check_outside_checkpoints(f"out_dir {out_dir}", real)
    if real.exists() and _holds_something(real) and not (real.is_dir() and is_run_folder(real)):
        raise OutputError(f"out_dir {out_dir}: holds files and is not a run folder (no config.yaml with "
                          "metrics.jsonl, best/ or latest/); nothing was written: choose a new or empty out_dir")


def claim_run_folder(out_dir: str | Path) -> None:
    """Mark a checked, writable out_dir as a run folder (before the run writes anything into it)."""
    if written_by(Path(out_dir)) != RUN_TOOL:
        mark(Path(out_dir), RUN_TOOL)


# ---------------------------------------------------------------------------- writing


def temp_sibling(target: Path, suffix: str = "") -> Path:
    """Where `target` is written before it is renamed into place: `.<name>.tmp-<pid>[suffix]` beside it."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}{suffix}"


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename a complete `tmp` to `target`. A folder in the way is renamed aside (`.<name>.old`) first
    and removed after, so a crash between the two renames leaves one of them whole."""
    if not tmp.is_dir() and not target.is_dir():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old"
    _remove(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_symlink() or path.exists():
        path.unlink(missing_ok=True)


def replace_dir(target: str | Path, tool: str, write: Callable[[Path], None], inputs: Iterable[str | Path] = (),
                recognise: Recognise | None = None) -> Path:
    """Check `target`, let `write(folder)` fill a temporary sibling, mark it as `tool`'s and rename it
    into place (a previous output of `tool` is replaced whole). Returns `target`."""
    real = check_target(target, tool, inputs, recognise)
    check_replaceable(target, real)
    tmp = temp_sibling(real)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"out_dir {target}: cannot write there ({e.strerror or e}); "
                          "choose a writable out_dir") from None
    try:
        write(tmp)
        mark(tmp, tool, files_in(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, real)
    return Path(target)


def replace_file(target: str | Path, tool: str, write: Callable[[Path], None], inputs: Iterable[str | Path] = (),
                 recognise: Recognise | None = None) -> Path:
    """Check `target`, let `write(path)` write a temporary sibling (same suffix) and rename it into place."""
    real = check_target(target, tool, inputs, recognise)
    check_replaceable(target, real)
    tmp = temp_sibling(real, real.suffix)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target}: cannot write there ({e.strerror or e})") from None
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    swap_into_place(tmp, real)
    return Path(target)


def remove_dead_temps(folder: Path) -> None:
    """Remove the temporary folders of writes whose process died (a live write keeps its own)."""
    for p in folder.iterdir():
        m = TMP_NAME.match(p.name)
        if m and p.is_dir() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (a live save must keep its temp folder)."""
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
