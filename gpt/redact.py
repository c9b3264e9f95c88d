"""Redact personal data from a corpus or record files: `python -m gpt.redact IN OUT [--kinds ...] [--report FILE]`.

IN is a text file, a JSONL/JSON/CSV/Parquet file or a folder of them; OUT gets the same layout with
every string (text fields, chat message contents, object keys, every CSV row, the first included)
and every number (a card number stored as a number) redacted, written as UTF-8. The report (JSON)
holds counts per kind and per file and masked examples, never a value; the console gets counts.
The engine is gpt/data/pii.py, the same one `data.redact` uses during preparation.

A folder is written whole: into a temporary folder next to OUT, which gets files.REDACTION_MARKER
last (the files, their sizes, the kinds, the counts) and is then renamed to OUT. A killed run leaves
no OUT (or the previous one, intact); data preparation refuses a folder whose marker says unfinished
or whose files are not the ones it lists.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

from gpt import entry, outputs
from gpt.data import files
from gpt.data.pii import (
    KINDS,
    Redactor,
    ner_status,
    read_salt,
    read_terms,
    resolve_kinds,
)

TOOL = "gpt.redact"  # for gpt/outputs.py's rule: OUT and --report are new files or its own


def redact_value(value: Any, redactor: Redactor, where: str, key: str = "", typed: bool = False) -> Any:
    """Every string and number inside a record (field values, message contents, object keys), structure
    kept. A redacted number becomes its placeholder string, or with `typed` (a Parquet column keeps its
    type) None when its replacement is not a number."""
    if isinstance(value, str):
        return redactor.redact(value, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = redactor.redact_number(value, key, where)
        return None if typed and isinstance(out, str) else out
    if isinstance(value, list):
        return [redact_value(v, redactor, where, key, typed) for v in value]
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            name = redactor.redact(k, where) if isinstance(k, str) and not typed else k
            while name in out:  # two keys redacted to one placeholder stay two keys
                name += "'"
            out[name] = redact_value(v, redactor, where, k if isinstance(k, str) else key, typed)
        return out
    return value


def redact_file(src: Path, dst: Path, redactor: Redactor, decoding: files.Decoding) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    where, suffix = str(src), src.suffix.lower()
    tmp = dst.with_name(dst.name + ".tmp")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        try:
            for batch in files.parquet_batches(src):
                rows = [redact_value(r, redactor, where, typed=True) for r in batch.to_pylist()]
                table = pa.Table.from_pylist(rows, schema=batch.schema)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            tmp.write_bytes(src.read_bytes())  # no rows: an empty file with the same schema
        tmp.replace(dst)
        return
    with open(tmp, "w", encoding="utf-8", newline="") as out:
        if suffix == ".csv":
            w = csv.writer(out)
            for _, cells in files.csv_lines(src, decoding):  # the first row too: a header may be data
                w.writerow([redactor.redact(c, where) for c in cells])
        elif suffix == ".jsonl" or (suffix == ".json" and not decoding.read(src).lstrip().startswith("[")):
            for line in decoding.lines(src):  # each line whole, however long
                out.write(redact_line(line, redactor, where))
        elif suffix == ".json":
            text = decoding.read(src)
            record = redact_json(text, redactor, where, indent=1)
            out.write(redactor.redact(text, where) if record is None else record + "\n")
        else:
            for text, _ in redactor.redact_stream(((text, None) for text, _ in decoding.pieces(src)), where):
                out.write(text)
    tmp.replace(dst)


def redact_json(text: str, redactor: Redactor, where: str, indent: int | None = None) -> str | None:
    """A JSON document redacted and written back; None when it is not JSON, or is nested too deeply
    for Python to read (the caller redacts it as text)."""
    try:
        return json.dumps(redact_value(json.loads(text), redactor, where), ensure_ascii=False, indent=indent)
    except (json.JSONDecodeError, RecursionError):
        return None


def redact_line(line: str, redactor: Redactor, where: str) -> str:
    """One JSONL line: its record redacted, or the line redacted as text when it is not a record."""
    if not line.strip():
        return line
    record = redact_json(line, redactor, where)
    return redactor.redact(line, where) if record is None else record + "\n"


def redact_path(src: str, dst: str, redactor: Redactor, decoding: files.Decoding) -> dict:
    """Redact a file or a folder of data files into `dst`; returns the report."""
    start = time.perf_counter()
    inp = files.local_path(src)
    outputs.check_target(dst, TOOL, [inp])  # before any work: OUT is new, empty or gpt.redact's own
    if files.is_saved_dataset(inp):
        raise files.DataError(f"{src}: a datasets folder; export it to JSONL or Parquet first")
    if inp.is_dir():
        chosen = files.folder_files(inp)

        def write(out: Path) -> None:
            redact_folder(inp, chosen, out, redactor, decoding)

        outputs.replace_dir(dst, TOOL, write, [inp])

        skipped = sorted(str(f.relative_to(inp)) for f in inp.rglob("*") if f.is_file() and f not in chosen)
    else:
        outputs.replace_file(dst, TOOL, lambda out: redact_file(inp, out, redactor, decoding), [inp])
        skipped = []
    seconds = time.perf_counter() - start
    return {"input": src, "output": dst, **redactor.report(), "replaced_bytes": decoding.replaced,
            "skipped_files": skipped, "seconds": round(seconds, 3), "names": ner_status()}


def redact_folder(inp: Path, chosen: list[Path], out: Path, redactor: Redactor, decoding: files.Decoding) -> None:
    """The chosen files of folder `inp` redacted into `out` (the temporary folder gpt/outputs.py renames into
    place): the marker says unfinished first, then complete, with the files and their sizes."""
    write_marker(out, redactor, None)
    for f in chosen:
        redact_file(f, out / f.relative_to(inp), redactor, decoding)
    write_marker(out, redactor, {f.relative_to(inp).as_posix(): (out / f.relative_to(inp)).stat().st_size
                                 for f in chosen})


def write_marker(folder: Path, redactor: Redactor, sizes: dict[str, int] | None) -> None:
    """files.REDACTION_MARKER: unfinished (sizes None), or complete with every file's size, the kinds and counts."""
    summary = redactor.summary()
    record = {"note": "written by python -m gpt.redact; data preparation reads this folder only while it "
                      "holds exactly these files", "complete": sizes is not None, "kinds": summary["kinds"],
              "mode": summary["mode"], "counts": summary["counts"], "files": sizes or {}}
    (folder / files.REDACTION_MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")


def is_report(path: Path) -> bool:
    """A report gpt.redact wrote before (a JSON object with its keys)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"input", "output", "counts", "files", "skipped_files"} <= report.keys()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt.redact", description=__doc__.splitlines()[0])
    p.add_argument("input", help="a text/JSONL/JSON/CSV/Parquet file or a folder of them")
    p.add_argument("output", help="where the redacted copy goes (same layout)")
    p.add_argument("--kinds", default="all", help=f"comma-separated: all, {', '.join(KINDS)}")
    p.add_argument("--mode", choices=["placeholder", "pseudonym"], default="placeholder")
    p.add_argument("--pattern", action="append", default=[], help="your own regex (repeatable), -> <CUSTOM>")
    p.add_argument("--terms", help="a file of literal terms (names), one per line: whole words, any case")
    p.add_argument("--salt-file", help="pseudonym secret (created if missing); default: random per run")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict")
    p.add_argument("--report", help="write the report (counts, masked examples) to this JSON file")
    args = p.parse_args(argv)
    def run() -> dict:
        kinds = resolve_kinds([k.strip() for k in args.kinds.split(",") if k.strip()])
        redactor = Redactor(kinds, args.mode, args.pattern, read_terms(args.terms) if args.terms else [],
                            read_salt(args.salt_file, "--salt-file") if args.salt_file is not None else None)
        decoding = files.Decoding(args.encoding, args.encoding_errors,
                                  hint="pass --encoding (e.g. latin-1) or --encoding-errors replace")
        if args.report:  # checked before the redaction writes anything
            outputs.check_target(args.report, TOOL, [args.input], recognise=is_report)
        report = redact_path(args.input, args.output, redactor, decoding)
        if args.report:
            text = json.dumps(report, indent=1, ensure_ascii=False)
            outputs.replace_file(args.report, TOOL, lambda f: f.write_text(text, encoding="utf-8"), [args.input],
                                 recognise=is_report)
        return report

    report = entry.main(run)
    found = ", ".join(f"{n} {k}" for k, n in report["counts"].items()) or "nothing found"
    print(f"redacted {args.input} -> {args.output}: {found} in {len(report['files'])} file(s)"
          + (f"; report: {args.report}" if args.report else ""))
    if report["skipped_files"]:
        print(f"not copied (not a data file): {len(report['skipped_files'])} file(s), listed in the report")
    print(f"names in free text: {report['names']}")


if __name__ == "__main__":
    main()
