"""A study's progress from its files alone: one row per run (state, card, step/total, reward,
last pass@1, s/step, ETA) and the study's ETA, for the live table and `run_study.py --status`.

Every number is read back from what the runs write (metrics.jsonl, DONE, the run's lock) and what
the runner records (study.json, attempts.jsonl), so a running or finished study, on this machine
or under Slurm, shows the same table. metrics.jsonl is read incrementally: only what was added
since the last look (or all of it again after a --resume rewrote it).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlvr.study import job_state, read_attempts, read_manifest
from rlvr.study_schedule import simulate

RECENT_STEPS = 10  # s/step is the mean of the last this many steps


@dataclass
class RunProgress:
    """What one run's metrics.jsonl says so far."""
    path: Path
    total: int
    eval_every: int
    step: int = 0
    reward: float | None = None
    pass1: float | None = None
    step_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    evals_done: set[int] = field(default_factory=set)
    _offset: int = 0
    _steps: dict[int, float] = field(default_factory=dict)

    def refresh(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self._offset:  # rewritten by a resume: read it all again
            self.__init__(self.path, self.total, self.eval_every)
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
        self._offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._take(rec)

    def _take(self, rec: dict) -> None:
        step = rec.get("step")
        if not isinstance(step, int):
            return
        if rec.get("train/reward_mean") is not None:
            self.step = max(self.step, step)
            self.reward = rec["train/reward_mean"]
            if rec.get("time/step_s") is not None:
                self._steps[step] = rec["time/step_s"]
        if rec.get("eval/pass@1") is not None:
            self.pass1 = rec["eval/pass@1"]
            self.evals_done.add(step)
            if rec.get("time/eval_s") is not None:
                self.eval_s.append(rec["time/eval_s"])

    @property
    def s_per_step(self) -> float | None:
        recent = [self._steps[s] for s in sorted(self._steps)[-RECENT_STEPS:]]
        return statistics.fmean(recent) if recent else None

    def evals_left(self) -> int:
        """Evals still due: step 0, every eval_every steps and the last step, less those logged."""
        due = {0, self.total}
        if self.eval_every:
            due |= set(range(self.eval_every, self.total + 1, self.eval_every))
        return len(due - self.evals_done)

    def eta_s(self) -> float | None:
        """Steps left at the recent s/step plus evals left at the mean eval time."""
        if self.s_per_step is None:
            return None
        eval_s = statistics.fmean(self.eval_s) if self.eval_s else 0.0
        return (self.total - self.step) * self.s_per_step + self.evals_left() * eval_s


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class Row:
    name: str
    state: str
    gpu: str
    progress: RunProgress | None
    kind: str = "train"


def format_table(rows: list[Row], study_eta: float | None) -> str:
    header = ["run", "state", "GPU", "step", "reward", "pass@1", "s/step", "ETA"]
    lines = []
    for r in rows:
        p = r.progress
        step = f"{p.step}/{p.total}" if p is not None else "-"
        lines.append([r.name, r.state, r.gpu or "-", step,
                      "-" if p is None or p.reward is None else f"{p.reward:.3f}",
                      "-" if p is None or p.pass1 is None else f"{p.pass1:.3f}",
                      "-" if p is None or p.s_per_step is None else f"{p.s_per_step:.1f}",
                      "-" if r.state in ("done", "failed") or p is None else _fmt_s(p.eta_s())])
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in [header, *lines]]
    done = sum(r.state == "done" for r in rows)
    out.append(f"{done}/{len(rows)} done, {sum(r.state == 'failed' for r in rows)} failed | "
               f"study ETA {_fmt_s(study_eta) if study_eta is not None else '?'}")
    return "\n".join(out)


class StudyProgress:
    """The rows of a study, kept up to date from its files (incrementally)."""

    def __init__(self, study_dir: Path):
        self.study_dir = Path(study_dir)
        self.runs: dict[str, RunProgress] = {}

    def rows(self, gpus: dict[str, str] | None = None) -> tuple[list[Row], dict]:
        manifest = read_manifest(self.study_dir)
        attempts = read_attempts(self.study_dir)
        out = []
        for name, info in manifest.get("jobs", {}).items():
            run_dir = self.study_dir / info["dir"]
            state = job_state(run_dir, attempts.get(name, []))
            gpu = (gpus or {}).get(name) or next(
                (a.get("gpu") for a in reversed(attempts.get(name, [])) if a.get("gpu")), "")
            prog = None
            if info.get("kind", "train") == "train":
                prog = self.runs.setdefault(name, RunProgress(run_dir / "metrics.jsonl",
                                                              info.get("n_steps", 0),
                                                              info.get("eval_every", 0)))
                prog.refresh()
            if name in (gpus or {}) and state not in ("done", "running"):
                state = "queued"  # a Slurm task that has not started it yet
            out.append(Row(name, state, gpu if state in ("running", "queued") else "", prog,
                           info.get("kind", "train")))
        return out, manifest

    def study_eta(self, rows: list[Row], manifest: dict) -> float | None:
        """Seconds left: running runs by their ETA, pending ones at the measured time of runs of
        their model, placed as the launcher places them (None: nothing measured yet)."""
        jobs = manifest.get("jobs", {})
        measured: dict[str, list[float]] = {}
        for r in rows:
            p = r.progress
            if p is not None and p.s_per_step is not None:
                eval_s = statistics.fmean(p.eval_s) if p.eval_s else 0.0
                evals = p.evals_left() + len(p.evals_done)
                measured.setdefault(jobs[r.name]["model"], []).append(
                    p.total * p.s_per_step + evals * eval_s)
        if not measured:
            return None
        work = []
        for r in rows:
            if r.state in ("done", "failed") or r.kind != "train":
                continue
            info = jobs[r.name]
            left = r.progress.eta_s() if r.progress is not None else None
            if left is None:
                same = measured.get(info["model"]) or [x for v in measured.values() for x in v]
                left = statistics.fmean(same)
            # running runs first: they hold their cards now
            work.append((r.state != "running", info.get("share", 1.0), left))
        work.sort(key=lambda w: w[0])
        sched = manifest.get("schedule", {})
        return simulate([(s, t) for _, s, t in work], max(1, sched.get("cards", 1)),
                        max(1, sched.get("max_per_card", 1)))


def status_text(study_dir: Path) -> str:
    """`run_study.py --status DIR`: the table, from the files alone."""
    progress = StudyProgress(study_dir)
    rows, manifest = progress.rows()
    return (f"study {manifest.get('name')} in {study_dir} ({time.strftime('%H:%M:%S')})\n"
            + format_table(rows, progress.study_eta(rows, manifest)))
