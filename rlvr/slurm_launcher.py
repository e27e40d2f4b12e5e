"""A study's jobs as a Slurm job array, through submitit.

Each array task is a SlurmRun: on its node it runs the job's command as a subprocess (with
--resume when the run's directory has a config.json, nothing when it is DONE), its output
appended to the study's log. Preempted or out of time, Slurm signals the task (submitit's USR2,
--slurm_time's margin), SlurmRun.checkpoint stops the run with one SIGINT and submitit requeues
the task, which then resumes the run from its last checkpoint. The runner records each task's
id in DIR/slurm/jobs.json and watches them with squeue: a re-run of the command (or another
runner after this one was killed) resubmits nothing that is still queued or running, and
--status reads the same files as on a local study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from rlvr.cli import EXIT_INTERRUPTED
from rlvr.launchers import Display, child_signals, log_path, study_table, tail
from rlvr.run_dir import DONE
from rlvr.study import REPO, StudyError, append_attempt, write_json
from rlvr.study_progress import StudyProgress
from rlvr.study_schedule import Job

JOBS_FILE = "jobs.json"
POLL_S = 1.0
# Slurm not answering for this long ends the watch (the jobs keep running; a re-run resumes it).
SQUEUE_GIVE_UP_S = 600.0
STOP_WAIT_S = 60.0  # a preempted run's time to stop after its SIGINT (submitit waits 90 s)


def _done(job: Job) -> bool:
    return (job.run_dir / DONE).is_file()


class SlurmRun:
    """One job of a study on a Slurm node (picklable; submitit requeues it on preemption)."""

    def __init__(self, study_dir: str, job: Job):
        self.study_dir, self.job = study_dir, job
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {"study_dir": self.study_dir, "job": self.job}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _proc=None)

    def _record(self, **fields) -> None:
        append_attempt(Path(self.study_dir), {"job": self.job.name, "time": time.time(),
                                              "gpu": f"slurm:{_task_id()}",
                                              "host": socket.gethostname(), **fields})

    def _env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if cpus := os.environ.get("SLURM_CPUS_PER_TASK"):
            env.setdefault("OMP_NUM_THREADS", cpus)
        return env

    def __call__(self) -> str:
        job = self.job
        if _done(job):
            return "done"
        resume = job.kind == "train" and (job.run_dir / "config.json").is_file()
        cmd = job.command(resume)
        log = log_path(Path(self.study_dir), job)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"\n===== Slurm task {_task_id()} on {socket.gethostname()} at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n".encode())
        self._record(event="start", resume=resume, cmd=cmd)
        with open(log, "ab") as f:
            self._proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                          stdin=subprocess.DEVNULL, env=self._env(),
                                          preexec_fn=child_signals)
            rc = self._proc.wait()
        self._proc = None
        self._record(event="end", rc=rc)
        if job.kind == "eval" and rc == 0:
            (job.run_dir / DONE).write_text(f'{{"time": {time.time()}}}\n')
        if rc != 0 or not _done(job):
            raise RuntimeError(f"{job.name} exited with status {rc}; see {log}")
        return "done"

    def checkpoint(self, *args, **kwargs):
        """Preempted or out of time: stop the run (its last checkpoint stays), then requeue."""
        import submitit

        if self._proc is not None:
            rc = _stop(self._proc.pid)
            self._record(event="end", rc=rc, stopped=True)
        return submitit.helpers.DelayedSubmission(SlurmRun(self.study_dir, self.job))


def _stop(pid: int) -> int | None:
    """SIGINT, then SIGKILL after STOP_WAIT_S; reaped with os.waitpid, not Popen.wait: this
    runs in a signal handler that may have interrupted Popen.wait, whose lock it holds."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.1)


def _task_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "?")


def minutes(value: str) -> int:
    """--slurm_time as minutes: 'HH:MM:SS', 'MM' or 'D-HH:MM:SS'."""
    days, _, rest = value.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if len(parts) == 1:
        total = parts[0]
    else:
        h, m, s = ([0] * (3 - len(parts)) + parts)
        total = h * 60 + m + (s > 0)
    return total + 24 * 60 * int(days or 0)


LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
               "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


def live_jobs(ids: list[str]) -> dict[str, str] | None:
    """{task id: state} of those still queued or running (squeue, one line per array task);
    None when Slurm did not answer (then nothing may be taken for gone)."""
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i %T"],  # our jobs only
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    states = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if line.strip())
    return {i: states[i] for i in ids if i in states}


def still_known(job_id: str) -> bool | None:
    """Whether Slurm still holds a task squeue did not list (a requeue in between), from
    `scontrol show job`: True, False, or None when it did not answer."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    state = next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("JobState=")),
                 "")
    return state in LIVE_STATES


class SlurmLauncher:
    def __init__(self, study_dir: Path, jobs: list[Job], a: argparse.Namespace,
                 display: Display | None = None):
        self.study_dir, self.jobs, self.a = study_dir, jobs, a
        self.display = display or Display(every_s=a.status_every)
        self.folder = study_dir / "slurm"
        self.ids: dict[str, str] = {}
        self.tries: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.progress = StudyProgress(study_dir)
        self.stopping = False

    def _executor(self):
        import submitit

        a = self.a
        ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm")
        params = {"name": f"study-{self.study_dir.resolve().name}",
                  "timeout_min": minutes(a.slurm_time), "cpus_per_task": a.slurm_cpus_per_run,
                  "slurm_array_parallelism": max(1, len(self.jobs)),
                  "slurm_signal_delay_s": 120}
        if a.slurm_gpus_per_run:
            params["gpus_per_node"] = a.slurm_gpus_per_run
        if a.slurm_partition:
            params["slurm_partition"] = a.slurm_partition
        if a.slurm_mem_gb:
            params["mem_gb"] = a.slurm_mem_gb
        extra = {k: getattr(a, f"slurm_{k}") for k in ("account", "qos", "constraint")
                 if getattr(a, f"slurm_{k}")}
        if extra:
            params["slurm_additional_parameters"] = extra
        ex.update_parameters(**params)
        return ex

    def _submit(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        # the node's Python finds rlvr (the task unpickles SlurmRun) wherever sbatch starts it
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        ex = self._executor()
        try:
            with ex.batch():
                handles = [ex.submit(SlurmRun(str(self.study_dir), j)) for j in jobs]
        except Exception as e:  # sbatch refused: bad partition, account, ...
            raise StudyError("sbatch refused the job array: "
                             f"{str(e).strip().splitlines()[-1]}") from None
        for j, h in zip(jobs, handles, strict=True):
            self.ids[j.name] = h.job_id
            self.tries[j.name] = self.tries.get(j.name, 0) + 1
        write_json(self.folder / JOBS_FILE, self.ids)
        self.display.event(f"submitted {len(jobs)} job(s) to Slurm: "
                           + ", ".join(f"{j.name} {self.ids[j.name]}" for j in jobs))

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _no_answer(self, since: float | None) -> float | None:
        """Say once that squeue does not answer; None (give up, saying so) after
        SQUEUE_GIVE_UP_S of silence."""
        now = time.monotonic()
        if since is None:
            self.display.event("squeue does not answer: watching again every "
                               f"{POLL_S:g} s (the jobs are Slurm's, nothing is resubmitted)")
            return now
        if now - since > SQUEUE_GIVE_UP_S:
            self.display.event(f"squeue has not answered for {SQUEUE_GIVE_UP_S / 60:.0f} min: "
                               "stopped watching; the jobs keep running (re-run the same command "
                               f"to watch them again, or --status {self.study_dir})")
            return None
        return since

    def run(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / JOBS_FILE
        self.ids = json.loads(path.read_text()) if path.is_file() else {}
        pending = [j for j in self.jobs if not _done(j)]
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        silent_since = None  # when Slurm stopped answering
        try:
            while pending and not self.stopping:
                live = live_jobs([self.ids[j.name] for j in pending if j.name in self.ids])
                if live is None:  # Slurm did not answer: look again, resubmit nothing
                    silent_since = self._no_answer(silent_since)
                    if silent_since is None:
                        return 1
                    time.sleep(POLL_S)
                    continue
                silent_since = None
                ready = []
                for j in list(pending):
                    if (what := self._next(j, live)) == "submit":
                        ready.append(j)
                    elif what != "wait":
                        pending.remove(j)
                self._submit(ready)
                self._show(live)
                time.sleep(POLL_S)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        if self.stopping:
            ids = " ".join(sorted(self.ids.values()))
            self.display.event(f"stopped watching; the Slurm jobs keep running (scancel {ids} "
                               f"stops them); --status {self.study_dir} shows them")
            return EXIT_INTERRUPTED
        self._show({}, force=True)
        return 1 if self.failed else 0

    def _next(self, j: Job, live: dict[str, str]) -> str:
        """What a pending job needs now: "wait", "submit", or it is over ("done", "failed")."""
        job_id = self.ids.get(j.name)
        if _done(j):  # DONE is written last: the task may still be closing
            self.display.event(f"done {j.name}")
            return "done"
        if job_id in live or (job_id is not None and still_known(job_id) is not False):
            return "wait"
        if j.after is not None and j.after in self.failed:
            self.failed[j.name] = f"skipped: {j.after} failed"
            return "failed"
        if j.after is not None and not _done(self._job(j.after)):
            return "wait"
        if job_id is not None and self.tries.get(j.name, 1) > self.a.max_retries:
            self.failed[j.name] = f"Slurm task {job_id} ended without DONE"
            log = log_path(self.study_dir, j)
            self.display.event(f"FAILED {j.name} (task {job_id}); the rest goes on. Last "
                               f"lines of {log}:\n{tail(log)}")
            return "failed"
        return "submit"

    def _job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)

    def _show(self, live: dict[str, str], force: bool = False) -> None:
        gpus = {n: f"slurm:{i}" for n, i in self.ids.items() if i in live}
        try:
            self.display.table(lambda: study_table(self.progress, gpus), force=force)
        except (OSError, ValueError, KeyError, StudyError):
            pass
