"""A run directory's life: claimed atomically at start, locked while the run lives, DONE last.

MATH_experiment.py claims `<output_dir>/<exp_name>` before anything loads, so two runs can never
write one directory, and a bad --output_dir is one line at once. Files inside a run directory:

- `.lock`: held (flock, exclusive) by the live run for its whole life; the kernel drops it when
  the process ends, however it ends (SIGKILL too), so a held lock means a live run. It holds
  "pid host" for the refusal message.
- `READY`: the run's models and rollout engine are up (vLLM has sized its KV cache) and
  config.json is written. run_study.py waits for it before starting the next run on that card.
- `DONE`: written last, after the final model, the last checkpoint and every metric: the run is
  finished. A --resume removes it (and READY) until the continued run finishes in its turn.

A new run's directory appears complete with its lock (made under a temporary name and renamed),
and a run that ends before writing anything removes it again, with the parents it created: a
failed start never blocks a plain re-run. Torch-free: run_study.py reads the same files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

LOCK, READY, DONE = ".lock", "READY", "DONE"
CONFIG = "config.json"
# A reader (run_study.py --status) probes a lock by taking it shared for an instant; a claim
# retries this long before it calls the directory taken.
CLAIM_RETRY_S = 2.0


class RunDirError(Exception):
    """Why a run directory cannot be claimed, as one line."""


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _try_lock(fd: int, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _lock_with_retry(fd: int) -> bool:
    deadline = time.monotonic() + CLAIM_RETRY_S
    while not _try_lock(fd):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def holder(run_dir: Path) -> str:
    """'pid N on HOST' of the lock's last holder, as it wrote itself down ('' if unknown)."""
    try:
        pid, host = (run_dir / LOCK).read_text().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return ""


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (probed without creating anything)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        if _try_lock(fd, shared=True):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def _in_use(run_dir: Path) -> RunDirError:
    who = holder(run_dir)
    return RunDirError(f"run directory {run_dir} is in use by a live run"
                       + (f" ({who})" if who else "")
                       + "; wait for it to end, or choose another --exp_name / --output_dir")


def _make_parents(parent: Path) -> list[Path]:
    """Create `parent` and its missing ancestors; return the ones created (deepest first)."""
    if parent.exists() and not parent.is_dir():
        raise RunDirError(f"--output_dir {parent} is not a directory")
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create --output_dir {parent}: {_why(e)}") from None
    if not parent.is_dir():
        raise RunDirError(f"--output_dir {parent} is not a directory")
    return missing


class Claim:
    """A claimed run directory: locked until `release()`, which removes it again when the run
    wrote nothing into it (and the parent directories the claim made, when empty)."""

    def __init__(self, run_dir: Path, fd: int, created: bool, parents: list[Path]):
        self.run_dir, self.fd, self.created, self.parents = run_dir, fd, created, parents

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def mark_ready(self) -> None:
        _write_marker(self.run_dir / READY, {"pid": os.getpid(), "time": time.time()})

    def mark_done(self, step: int) -> None:
        _write_marker(self.run_dir / DONE, {"step": step, "time": time.time()})

    def release(self) -> None:
        if self.fd < 0:
            return
        empty = self.created and {p.name for p in self.run_dir.iterdir()} <= {LOCK}
        if empty:  # unlink before unlocking: a claimer that opened it meanwhile keeps its own
            with contextlib.suppress(OSError):
                (self.run_dir / LOCK).unlink()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1
        if empty:
            for d in [self.run_dir, *self.parents]:
                try:
                    d.rmdir()
                except OSError:  # no longer empty: someone else's now
                    break


def _write_marker(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _note_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def _claim_existing(run_dir: Path) -> int:
    """Take the lock of an existing directory, or raise that a live run holds it."""
    try:
        fd = _open_lock(run_dir / LOCK)
    except OSError as e:
        raise RunDirError(f"cannot write in run directory {run_dir}: {_why(e)}") from None
    if not _lock_with_retry(fd):
        os.close(fd)
        raise _in_use(run_dir)
    return fd


def _claim_new(run_dir: Path, parents: list[Path]) -> Claim:
    parent = run_dir.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.claim-", dir=parent))
    except OSError as e:
        raise RunDirError(f"cannot write in --output_dir {parent}: {_why(e)}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as mkdir would make it (mkdtemp's is private)
    fd = _open_lock(tmp / LOCK)
    _try_lock(fd)  # nobody else knows this directory yet
    _note_holder(fd)
    try:
        os.rename(tmp, run_dir)  # atomic: the directory appears with its lock held
        return Claim(run_dir, fd, True, parents)
    except OSError as e:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        if not run_dir.is_dir():
            raise RunDirError(f"cannot create run directory {run_dir}: {_why(e)}") from None
    # It exists. What a start killed before its first file leaves is only the lock: take it over.
    fd = _claim_existing(run_dir)
    if {p.name for p in run_dir.iterdir()} <= {LOCK}:
        _note_holder(fd)
        return Claim(run_dir, fd, True, parents)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    raise RunDirError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                      "or choose another --exp_name / --output_dir")


def claim_run_dir(run_dir: Path, resume: bool) -> Claim:
    """Claim `run_dir` for a run (RunDirError: why not, in one line). A new run gets a new
    directory, or a leftover one holding nothing but a lock; a resumed one needs its
    config.json and no live process on it."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / CONFIG).is_file():
            raise RunDirError(f"nothing to resume: {run_dir / CONFIG} not found")
        fd = _claim_existing(run_dir)
        _note_holder(fd)
        for marker in (DONE, READY):  # unfinished again until the continued run ends
            (run_dir / marker).unlink(missing_ok=True)
        return Claim(run_dir, fd, False, [])
    parents = _make_parents(run_dir.parent)
    try:
        return _claim_new(run_dir, parents)
    except RunDirError:
        for d in parents:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def claim_or_exit(run_dir: Path, resume: bool) -> Claim:
    """claim_run_dir for MATH_experiment.py: a refusal is one `error:` line, exit status 2."""
    from rlvr.cli import fail

    try:
        return claim_run_dir(run_dir, resume)
    except RunDirError as e:
        fail(str(e))


def read_marker(run_dir: Path, name: str) -> dict | None:
    try:
        return json.loads((Path(run_dir) / name).read_text())
    except (OSError, ValueError):
        return None


def run_state(run_dir: Path) -> str:
    """'done' (DONE written), 'running' (a live process holds the lock), 'resume' (it has a
    config.json: continue it with --resume) or 'new' (nothing a run could continue from)."""
    run_dir = Path(run_dir)
    if (run_dir / DONE).is_file():
        return "done"
    if is_locked(run_dir):
        return "running"
    if (run_dir / CONFIG).is_file():
        return "resume"
    return "new"
