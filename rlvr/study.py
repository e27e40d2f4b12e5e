"""A study: the models x objectives x seeds grid as runs, their directories and states, and how
many share a card. Torch-free: run_study.py imports this, and asks MATH_experiment.py itself
(`--dry_run --plan_json`, in a subprocess) about every distinct run.

Layout of a study directory DIR:
- study.json: the grid and the flags every run gets (a re-run with another grid or other flags
  is refused; --extend may add cells), and the last schedule (cards, runs per card);
- runs/<name>/: each run's directory (MATH_experiment.py's: config.json with the study's name
  and the run's axis values, metrics.jsonl, eval_problems.jsonl, DONE ...);
- logs/<name>.log: each run's output, every attempt appended; attempts.jsonl: one line per
  attempt (start, end, exit status, card);
- evals/<name>/ (--final_eval): evaluate.py's output for each final model, evals/base-<model>/.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlvr.choices import OBJECTIVES
from rlvr.run_dir import read_marker, run_state

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "MATH_experiment.py"
EVALUATE = REPO / "evaluate.py"
MANIFEST, ATTEMPTS, RUNNER_LOCK = "study.json", "attempts.jsonl", ".runner.lock"
PACKING_TABLE = Path(__file__).with_name("packing.json")

# --study NAME: the published studies, as axes and flags
PUBLISHED = {
    "seed": {"models": ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
                        "Qwen/Qwen2.5-3B-Instruct"],
             "objectives": ["NSR", "PSR", "W_REINFORCE"], "seeds": [1, 2, 3],
             "lambdas": [0.1], "flags": ["--preset", "seed"]},
}
# MATH_experiment.py flags the runner sets for every run itself, and where to say it instead
RUNNER_FLAGS = {"--model_id": "--models", "--objective": "--objectives", "--seed": "--seeds",
                "--lambda_psr": "--lambdas", "--exp_name": "the runner names each run",
                "--output_dir": "--study_dir", "--resume": "re-running resumes",
                "--study": "--name", "--study_axes": "the runner records them",
                "--dry_run": "run_study.py --dry_run", "--plan_json": "run_study.py --dry_run",
                "--gpu_memory_gb": "--card_gb (each run gets its share)"}


class StudyError(Exception):
    """Bad input for a study, as one line (exit status 2)."""


@dataclass(frozen=True)
class StudySpec:
    name: str
    models: tuple[str, ...]
    objectives: tuple[str, ...]
    seeds: tuple[int, ...]
    lambdas: tuple[float, ...]
    flags: tuple[str, ...] = ()  # given to every run
    final_eval: str | None = None  # "math500:16": evaluate.py's datasets and --n
    final_eval_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    name: str
    model: str
    objective: str
    seed: int
    lam: float | None  # W_REINFORCE's lambda, else None
    axes: dict = field(default_factory=dict, compare=False, hash=False)

    def args(self, spec: StudySpec, study_dir: Path) -> list[str]:
        """MATH_experiment.py's arguments for this run (without --resume)."""
        lam = ["--lambda_psr", f"{self.lam:g}"] if self.lam is not None else []
        return ["--model_id", self.model, "--objective", self.objective, "--seed",
                str(self.seed), *lam, *spec.flags, "--output_dir", str(study_dir / "runs"),
                "--exp_name", self.name, "--study", spec.name,
                "--study_axes", json.dumps(self.axes, sort_keys=True)]


def short_name(model: str) -> str:
    return Path(model.rstrip("/")).name.removesuffix(".gguf")


def check_spec(spec: StudySpec) -> None:
    """Refuse what no run could make sense of: StudyError, one line."""
    for axis in ("models", "objectives", "seeds", "lambdas"):
        values = getattr(spec, axis)
        if not values:
            raise StudyError(f"--{axis} is empty: give at least one value")
        if len(set(values)) < len(values):
            raise StudyError(f"--{axis} repeats a value: {' '.join(map(str, values))}")
    if bad := [o for o in spec.objectives if o not in OBJECTIVES]:
        raise StudyError(f"--objectives: unknown objective {bad[0]!r} (expected any of "
                         f"{', '.join(OBJECTIVES)})")
    if len(spec.lambdas) > 1 and "W_REINFORCE" not in spec.objectives:
        raise StudyError("--lambdas applies to W_REINFORCE only, which --objectives leaves out")
    names = [short_name(m) for m in spec.models]
    if len(set(names)) < len(names):
        raise StudyError(f"--models: two models share the name {names[0]!r}; runs are named "
                         "after the last path component")
    for flag in spec.flags:
        if (key := flag.split("=")[0]) in RUNNER_FLAGS:
            raise StudyError(f"{key} cannot follow '--': {RUNNER_FLAGS[key]}")


def expand(spec: StudySpec) -> list[RunSpec]:
    """Every cell of the grid as a run; a name encodes the model, the objective (with λ for
    W_REINFORCE) and the seed."""
    runs = []
    for model in spec.models:
        for objective in spec.objectives:
            for lam in spec.lambdas if objective == "W_REINFORCE" else [None]:
                for seed in spec.seeds:
                    tag = f"_lam{lam:g}" if lam is not None else ""
                    axes = {"model": model, "objective": objective, "seed": seed}
                    if lam is not None:
                        axes["lambda"] = lam
                    runs.append(RunSpec(f"{short_name(model)}_{objective}{tag}_s{seed}", model,
                                        objective, seed, lam, axes))
    return runs


# ----------------------------------------------------------------------------- study.json


def _grid(spec: StudySpec) -> dict:
    d = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def manifest_differences(old: dict, new: StudySpec, extend: bool) -> list[str]:
    """What differs between a study directory's study.json and this command; with `extend`,
    values added to an axis are not differences (values removed still are)."""
    cur, diffs = _grid(new), []
    for axis in ("models", "objectives", "seeds", "lambdas"):
        before, now = list(old.get(axis, [])), cur[axis]
        gone = [v for v in before if v not in now]
        added = [v for v in now if v not in before]
        if gone:
            diffs.append(f"--{axis} lacks {' '.join(map(str, gone))}")
        if added and not extend:
            diffs.append(f"--{axis} adds {' '.join(map(str, added))} (--extend adds cells)")
    for key, flag in (("flags", "flags after --"), ("final_eval", "--final_eval"),
                      ("final_eval_flags", "--final_eval_flags"), ("name", "--name")):
        if old.get(key) != cur[key]:
            show = (lambda v: " ".join(v) if isinstance(v, list) else str(v))  # noqa: E731
            diffs.append(f"{flag} {show(old.get(key))!r} -> {show(cur[key])!r}")
    return diffs


def claim_manifest(study_dir: Path, spec: StudySpec, extend: bool) -> None:
    """Write study.json for a new study; check (and with --extend, widen) an existing one."""
    path = study_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if diffs := manifest_differences(old, spec, extend):
            raise StudyError(f"{study_dir} holds another study: " + "; ".join(diffs)
                             + " (re-run its own command, or choose another --study_dir)")
        data = {**old, **_grid(spec)}
    else:
        data = _grid(spec)
    write_json(path, data)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(study_dir: Path) -> dict:
    path = Path(study_dir) / MANIFEST
    if not path.is_file():
        raise StudyError(f"{study_dir} is not a study directory (no {MANIFEST})")
    return json.loads(path.read_text())


def spec_from_manifest(data: dict) -> StudySpec:
    keys = StudySpec.__dataclass_fields__
    return StudySpec(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in data.items() if k in keys})


class RunnerLock:
    """One runner per study directory: an flock on DIR/.runner.lock for the runner's life."""

    def __init__(self, study_dir: Path):
        path = study_dir / RUNNER_LOCK
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            who = path.read_text().strip()
            os.close(self.fd)
            raise StudyError(f"another run_study.py ({who or 'unknown pid'}) is running the study "
                             f"in {study_dir}; watch it with --status {study_dir}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


# ----------------------------------------------------------------------------- run states


def append_attempt(study_dir: Path, record: dict) -> None:
    with open(study_dir / ATTEMPTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_attempts(study_dir: Path) -> dict[str, list[dict]]:
    """Per job name, its attempts in order (a torn last line is skipped)."""
    out: dict[str, list[dict]] = {}
    path = Path(study_dir) / ATTEMPTS
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                out.setdefault(rec["job"], []).append(rec)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return out


def job_state(run_dir: Path, attempts: list[dict]) -> str:
    """done / running / resume / new (rlvr.run_dir.run_state), or failed: the last attempt
    ended with an error and nothing since has finished it."""
    state = run_state(run_dir)
    if state in ("done", "running"):
        return state
    last = attempts[-1] if attempts else None
    if last is not None and last.get("rc") not in (None, 0) and not last.get("stopped"):
        return "failed"
    return state


def done_step(run_dir: Path) -> int | None:
    marker = read_marker(run_dir, "DONE")
    return None if marker is None else marker.get("step")


# ----------------------------------------------------------------------------- asking the runs


@dataclass
class RunPlan:
    """MATH_experiment.py's answer for one distinct run (`--dry_run --plan_json`)."""
    config: dict
    plan: dict | None
    model_error: str | None
    eval_problems: int | None = None  # problems per eval

    @property
    def planned_peak_gib(self) -> float:
        return float((self.plan or {}).get("planned_peak_gib") or 0.0)


def _without(args: list[str], flags: tuple[str, ...]) -> tuple[str, ...]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return tuple(out)


def distinct_key(args: list[str]) -> tuple[str, ...]:
    """A run's arguments without what cannot change how its flags are checked."""
    return _without(args, ("--seed", "--exp_name", "--study_axes"))


def plan_key(args: list[str]) -> tuple[str, ...]:
    """A run's arguments without what cannot change its model check or memory plan."""
    return _without(args, ("--seed", "--exp_name", "--study_axes", "--objective",
                           "--lambda_psr"))


def check_flags(args: list[str], label: str) -> dict:
    """MATH_experiment.py's own checks of a run's flags (rlvr.config.parse_config, torch-free),
    in this process: the resolved settings, or StudyError with its one-line refusal. (Whether
    vLLM and CUDA are there is the run's own first check.)"""
    from rlvr.config import parse_config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_config([*args, "--dry_run"]).to_json()
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()] or ["refused"]
        why = lines[-1].split("error: ", 1)[-1]
        raise StudyError(f"MATH_experiment.py refuses the flags of {label}: {why}") from None


def ask_experiment(args: list[str], budget_gib: float | None, label: str = "") -> RunPlan:
    """MATH_experiment.py --dry_run --plan_json for these arguments, in a subprocess that sees
    no GPU; its own one-line refusal as StudyError."""
    cmd = [sys.executable, str(EXPERIMENT), *args, "--dry_run", "--plan_json"]
    if budget_gib is not None:
        cmd += ["--gpu_memory_gb", f"{budget_gib:.2f}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("error:")),
                   lines[-1] if lines else f"exit status {proc.returncode}")
        raise StudyError(f"MATH_experiment.py --dry_run refuses {label or 'a run'}: "
                         f"{why.removeprefix('error: ')}")
    return RunPlan(**json.loads(proc.stdout.strip().splitlines()[-1]))


def ask_all(asks: dict[tuple[str, ...], tuple[list[str], float | None, str]],
            workers: int) -> dict[tuple[str, ...], RunPlan]:
    """ask_experiment for each key's (arguments, budget, label), all at once (seconds each:
    the subprocess imports torch)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {k: pool.submit(ask_experiment, *v) for k, v in asks.items()}
        return {k: f.result() for k, f in futures.items()}


def read_packing_table(path: Path = PACKING_TABLE) -> dict[str, dict]:
    """{model short name: {"card_gib", "card", "per_card": {k: {"s_per_step", "eval_s",
    "aggregate"}}}} as bench/packing.py measured it (empty until measured)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {m["model"]: m for m in data.get("measurements", [])}


def auto_per_card(model: str, fits: int, table: dict[str, dict],
                  projected: dict[int, float] | None = None) -> tuple[int, str]:
    """Runs per card for --runs_per_gpu auto: the measured count with the best aggregate
    throughput (a larger count only for >= 5% more) that fits; 1 until measured. `projected`
    ({k: aggregate}, rlvr.study_schedule.projected_aggregates) replaces the measurement's own
    aggregates: those of the study's runs, which may be longer than the measured ones."""
    entry = table.get(short_name(model))
    if not entry:
        return 1, (f"no measured packing for {short_name(model)} (bench/packing.py measures "
                   "it): 1 run per card")
    per = {int(k): v for k, v in entry["per_card"].items() if int(k) <= fits}
    if not per:
        return 1, f"{short_name(model)}: no measured count fits the card: 1 run per card"
    gain = {k: (projected or {}).get(k, v["aggregate"]) for k, v in per.items()}
    best = 1
    for k in sorted(per):
        if gain[k] >= 1.05 * gain.get(best, 1.0):
            best = k
    # an entry says how it was estimated where it was not cut by a time limit
    cut = "".join(f"; {per[k].get('estimated_how', 'runs cut short, projected to their end')}"
                  for k in sorted({1, best} & set(per)) if per[k].get("estimated"))
    basis = ("projected for this study's runs from runs measured" if projected
             else "measured")
    return best, (f"{short_name(model)}: {best} per card, {gain[best]:.2f}x the "
                  f"throughput of 1 ({basis} on {entry.get('card', 'a card')}{cut})")
