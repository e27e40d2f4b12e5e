"""Running a study's jobs: local subprocesses packed onto cards (or CPU slots), or a Slurm job
array through submitit. Either way every job is `python MATH_experiment.py ...` (or evaluate.py)
whose state lives in its own directory, so a killed launcher loses nothing: a re-run skips what
is DONE, resumes what has a config.json, and leaves alone what a live process holds.

Local: each child runs in its own session (a Ctrl-C reaches the runner only, which then asks each
child to stop with one SIGINT, as a user's Ctrl-C would) and is sent SIGINT by the kernel if the
runner itself dies (prctl PR_SET_PDEATHSIG on Linux), so a SIGKILLed runner leaves no orphan
runs. A card takes a new run only once the run started last on it is READY (its vLLM engine has
sized its KV cache: two engines profiling at once mis-size each other).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlvr.cli import EXIT_INTERRUPTED
from rlvr.run_dir import DONE, READY, run_state
from rlvr.study import REPO, StudyError, append_attempt, job_state, read_attempts
from rlvr.study_progress import StudyProgress, format_table
from rlvr.study_schedule import Card, Job

POLL_S = 0.5
STAGGER_TIMEOUT_S = 900.0  # a card waits at most this long for a run to become READY
GRACE_S = 120.0  # after SIGINT, how long a child may take to stop before SIGKILL
TAIL_LINES = 15  # of a failed run's log, shown in the runner's output
EVAL_READY = "]: engine "  # evaluate.py's line once its engine is up


def log_path(study_dir: Path, job: Job) -> Path:
    return study_dir / "logs" / (job.name.replace(":", "-") + ".log")


def child_signals() -> None:
    """In a child between fork and exec: SIGINT stops it cleanly (Python ignores SIGINT for
    good when it starts with SIGINT ignored, as under `nohup`, `cmd &` or a Slurm step), and a
    SIGUSR2 meant for submitit (preemption) does not kill it: the job stops it with SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    child_signals()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a SIGKILLed runner leaves its runs going, and a re-run waits for them


def tail(path: Path, n: int = TAIL_LINES, since: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def study_table(progress: StudyProgress, gpus: dict[str, str]) -> str:
    """The progress table of a study's runs (`gpus`: the running ones' cards) and its ETA."""
    rows, manifest = progress.rows(gpus)
    return format_table(rows, progress.study_eta(rows, manifest))


class Display:
    """Event lines, and the progress table: redrawn in place on a terminal, printed every
    `every_s` seconds otherwise."""

    def __init__(self, stream=None, every_s: float | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (2.0 if self.tty else 60.0)
        self.shown, self.last = 0, 0.0

    def _clear(self) -> None:
        if self.tty and self.shown:
            self.stream.write(f"\x1b[{self.shown}F\x1b[J")
            self.shown = 0

    def event(self, text: str) -> None:
        self._clear()
        print(f"[study {time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)

    def table(self, make_text: Callable[[], str], force: bool = False) -> None:
        """Show make_text()'s table if it is due (or forced); it is only made when shown (it
        reads every run's files)."""
        if not force and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        text = make_text()
        self._clear()
        print(text, file=self.stream, flush=True)
        if self.tty:
            self.shown = text.count("\n") + 1


@dataclass
class Running:
    job: Job
    proc: subprocess.Popen
    cards: list[int]
    attempt: int
    started: float
    log_offset: int
    started_wall: float = 0.0
    ready: bool = False
    stopped: bool = False


@dataclass
class _Slot:
    card: Card | None
    load: float = 0.0
    count: int = 0
    starting: str | None = None
    since: float = 0.0


@dataclass
class LocalPool:
    """Runs the jobs (in order; a job with `after` once that job is done) on `cards` (None: CPU,
    `parallel` at once), retrying a failed one `max_retries` times."""
    study_dir: Path
    jobs: list[Job]
    cards: list[Card] | None
    parallel: int = 1
    max_per_card: int = 1
    max_retries: int = 1
    display: Display = field(default_factory=Display)
    stagger_timeout_s: float = STAGGER_TIMEOUT_S
    grace_s: float = GRACE_S

    def __post_init__(self):
        self.slots = [_Slot(c) for c in self.cards] if self.cards else [_Slot(None)]
        self.capacity = self.max_per_card if self.cards else self.parallel
        self.running: dict[str, Running] = {}
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.tries: dict[str, int] = {}
        self.stopping = False
        self.progress = StudyProgress(self.study_dir)

    # ------------------------------------------------------------------ state

    def _is_done(self, job: Job) -> bool:
        if job.kind == "train":
            return run_state(job.run_dir) == "done"
        return (job.run_dir / DONE).is_file()

    def _startable(self, job: Job) -> bool:
        if job.after is not None and job.after not in self.done:
            return False
        return job.kind != "train" or run_state(job.run_dir) != "running"  # held elsewhere

    def _fit(self, job: Job) -> list[int] | None:
        if self.cards is None:
            slot = self.slots[0]
            return [0] if slot.count < self.parallel else None
        if job.gpus > 1:
            free = [i for i, s in enumerate(self.slots) if s.count == 0 and s.starting is None]
            return free[:job.gpus] if len(free) >= job.gpus else None
        for i, s in enumerate(self.slots):
            if s.starting is None and s.count < self.capacity and s.load + job.share <= 1 + 1e-9:
                return [i]
        return None

    # ------------------------------------------------------------------ one job

    def _env(self, cards: list[int]) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.cards is None:
            threads = str(max(1, (os.cpu_count() or 1) // max(1, self.parallel)))
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.slots[i].card.id for i in cards)
        return env

    def _gpu_label(self, cards: list[int]) -> str:
        return "cpu" if self.cards is None else ",".join(self.slots[i].card.id for i in cards)

    def _start(self, job: Job, cards: list[int]) -> None:
        resume = job.kind == "train" and run_state(job.run_dir) == "resume"
        cmd = job.command(resume)
        attempt = self.tries.get(job.name, 0) + 1
        number = self.earlier.get(job.name, 0) + attempt  # counting earlier invocations
        log = log_path(self.study_dir, job)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"\n===== attempt {number} at {time.strftime('%Y-%m-%d %H:%M:%S')} on "
                    f"{self._gpu_label(cards)}: {' '.join(cmd)}\n".encode())
            offset = f.tell()
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO, env=self._env(cards),
                                    start_new_session=True, preexec_fn=_die_with_parent)
        now = time.monotonic()
        for i in cards:
            s = self.slots[i]
            s.load, s.count = s.load + job.share, s.count + 1
            s.starting, s.since = job.name, now
        self.running[job.name] = Running(job, proc, cards, attempt, now, offset, time.time())
        append_attempt(self.study_dir, {"job": job.name, "attempt": number, "event": "start",
                                        "time": time.time(), "gpu": self._gpu_label(cards),
                                        "host": socket.gethostname(), "pid": proc.pid,
                                        "resume": resume, "cmd": cmd})
        budget = f", {job.budget_gib:.1f} GiB" if job.budget_gib else ""
        self.display.event(f"start {job.name} on {self._gpu_label(cards)}{budget}"
                           f"{' (--resume)' if resume else ''}, attempt {number}; log "
                           f"{log.relative_to(self.study_dir)}")

    def _check_ready(self, r: Running) -> None:
        if r.ready:
            return
        if r.job.kind == "train":
            marker = r.job.run_dir / READY
            r.ready = marker.is_file() and marker.stat().st_mtime >= r.started_wall - 1
        else:
            r.ready = EVAL_READY in tail(log_path(self.study_dir, r.job), 10 ** 6, r.log_offset)
        if r.ready or time.monotonic() - r.started > self.stagger_timeout_s:
            r.ready = True
            self._release_stagger(r)

    def _release_stagger(self, r: Running) -> None:
        for i in r.cards:
            if self.slots[i].starting == r.job.name:
                self.slots[i].starting = None

    def _finish(self, r: Running, rc: int) -> None:
        job = r.job
        self._release_stagger(r)
        for i in r.cards:
            s = self.slots[i]
            s.load, s.count = max(0.0, s.load - job.share), s.count - 1
        del self.running[job.name]
        ok = rc == 0 and (job.kind != "train" or self._is_done(job))
        if ok and job.kind == "eval":
            (job.run_dir / DONE).write_text(f'{{"time": {time.time()}}}\n')
        append_attempt(self.study_dir, {"job": job.name, "attempt": r.attempt, "event": "end",
                                        "time": time.time(), "rc": rc, "stopped": r.stopped,
                                        "gpu": self._gpu_label(r.cards)})
        minutes = (time.monotonic() - r.started) / 60
        if ok:
            self.done.add(job.name)
            self.display.event(f"done {job.name} ({minutes:.1f} min)")
        elif r.stopped or self.stopping:
            self.display.event(f"stopped {job.name} (exit {rc}); a re-run continues it")
        else:
            self.tries[job.name] = r.attempt
            log = log_path(self.study_dir, job)
            if r.attempt <= self.max_retries:
                self.display.event(f"{job.name} failed (exit {rc}); retrying "
                                   f"({r.attempt}/{self.max_retries} retries)")
                self.pending.insert(0, job)
            else:
                self.failed[job.name] = f"exit {rc}"
                self.display.event(f"FAILED {job.name} (exit {rc}, {r.attempt} attempts); the "
                                   f"rest goes on. Last lines of {log}:\n"
                                   f"{tail(log, since=r.log_offset)}")

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame) -> None:
        if not self.stopping:
            self.stopping = True
            self.display.event(f"{signal.Signals(signum).name}: stopping the runs (one SIGINT "
                               "each); a re-run of the same command continues the study")
            for r in self.running.values():
                r.stopped = True
                try:
                    os.kill(r.proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    def _skip_blocked(self) -> None:
        for job in list(self.pending):
            if job.after is not None and job.after in self.failed:
                self.pending.remove(job)
                self.failed[job.name] = f"skipped: {job.after} failed"

    def run(self) -> int:
        """0 when every job is done, 1 when some failed, 130 when stopped by a signal."""
        self.pending = []
        self.earlier = {name: sum(a.get("event") == "start" for a in recs)
                        for name, recs in read_attempts(self.study_dir).items()}
        for job in self.jobs:
            (self.done.add(job.name) if self._is_done(job) else self.pending.append(job))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        stop_deadline = None
        try:
            while self.pending or self.running:
                for r in list(self.running.values()):
                    if (rc := r.proc.poll()) is not None:
                        self._finish(r, rc)
                    else:
                        self._check_ready(r)
                if self.stopping:
                    self.pending.clear()
                    stop_deadline = stop_deadline or time.monotonic() + self.grace_s
                    if time.monotonic() > stop_deadline:
                        for r in self.running.values():
                            r.proc.kill()
                else:
                    self._skip_blocked()
                    for job in list(self.pending):
                        if self._startable(job) and (cards := self._fit(job)) is not None:
                            self.pending.remove(job)
                            self._start(job, cards)
                self._show()
                time.sleep(POLL_S)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        self._show(force=True)
        if self.stopping:
            return EXIT_INTERRUPTED
        return 1 if self.failed else 0

    def _show(self, force: bool = False) -> None:
        gpus = {n: self._gpu_label(r.cards) for n, r in self.running.items()}
        try:
            self.display.table(lambda: study_table(self.progress, gpus), force=force)
        except (OSError, ValueError, KeyError, StudyError):
            pass  # a file mid-write: the next look shows it


def attempts_of(study_dir: Path, name: str) -> list[dict]:
    return read_attempts(study_dir).get(name, [])


def state_of(study_dir: Path, job: Job) -> str:
    if job.kind == "eval":
        return "done" if (job.run_dir / DONE).is_file() else "new"
    return job_state(job.run_dir, attempts_of(study_dir, job.name))
