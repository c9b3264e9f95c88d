"""What the entry scripts share: parse `CONFIG [section.key=value ...]`, turn errors into one line."""

from __future__ import annotations

import errno
import sys
from typing import Callable

from gpt.config import ConfigError, load_config
from gpt.device import tune_allocator
from gpt.errors import UserError

# A full or read-only disk is never a bug, wherever the write happens (metrics.jsonl, prepared data, ...).
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

USAGE = "usage: python {script} CONFIG.yaml [section.key=value ...]"


def parse_run_args(cls: type, argv: list[str], script: str):
    """The config file is the first argument not of the form key=value (it may be omitted)."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(script=script) + "\n\nAll keys and their defaults: see docs/configuration-reference.md.")
        sys.exit(0)
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(files) > 1:
        raise ConfigError(f"expected one config file, got {len(files)}: {' '.join(files)}")
    return load_config(cls, files[0] if files else None, overrides)


def main(fn: Callable[[], object]):
    """Run fn and return its result; known errors print one line (no traceback) and exit 1, Ctrl-C exits 130."""
    tune_allocator()  # before the first big allocation (GPT_MALLOC_TUNE=0 turns it off)
    try:
        result = fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if getattr(result, "interrupted", False):
        sys.exit(130)
    return result
