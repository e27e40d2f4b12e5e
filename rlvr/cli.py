"""What every command-line entry point shares: one-line errors and one exit-status convention.

Exit status, for every script of the project (MATH_experiment.py, run_study.py, evaluate.py,
data_prep.py, plot_results.py):
  0    done;
  2    refused: bad input or a state the user can fix (a flag, a missing or unwritable path, a
       run directory in use, a plan that does not fit); one line `error: <cause>; <fix>` on stderr;
  1    an unexpected failure (a traceback);
  130  interrupted (SIGINT), with a line saying how to continue.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


def fail(message: str) -> NoReturn:
    """Refuse with one line on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_REFUSED)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage block above them), exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def unwritable_reason(path: Path) -> str | None:
    """Why a directory cannot be made or written at `path` (it, or the nearest part of it that
    exists, is a file or refuses a new file), or None when it can; writes nothing that stays."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=existing).close()  # a permission or a read-only file system
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e})"
    return None
