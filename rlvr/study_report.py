"""A study's answer: per model, the base and each objective with 95% intervals, and paired
differences (objective - base, objective - objective) with the smallest difference the design
detects, from the per-problem records of every eval.

Inputs, both read into one per-problem format by rlvr.evaluation.problem_results (no second
format): each run's eval_problems.jsonl (one line per eval step x problem, written by the
training loop) and, with run_study.py --final_eval, evaluate.py's samples.jsonl under
DIR/evals/<run>/ (and DIR/evals/base-<model>/ for the base model). Runs are grouped as
rlvr/results.py groups them (by the settings recorded in config.json). The statistics are
rlvr/study_stats.py's.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlvr.eval_report import SAMPLES, ReportError, read_jsonl
from rlvr.evaluation import EVAL_PROBLEMS_FILE, pass_at_k, problem_results
from rlvr.results import LoggedRun, group_runs
from rlvr.study import short_name
from rlvr.study_stats import Estimate, difference, level

# {problem key: (samples, correct)} of one eval
Scores = dict[str, tuple[int, int]]
BASE = "Base (step 0)"
REPORT_SEED = 0  # the bootstrap's own seed: the same records give the same report


def _scores(records: list[dict]) -> Scores:
    return {f"{r['dataset']}/{r['problem_id']}": (int(r["n"]), int(r["correct"]))
            for r in records}


def read_run_evals(run_dir: Path) -> dict[int, Scores]:
    """{step: scores} from a run's eval_problems.jsonl (a torn line is skipped)."""
    by_step: dict[int, list[dict]] = {}
    path = Path(run_dir) / EVAL_PROBLEMS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                by_step.setdefault(int(r["step"]), []).append(r)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return {step: _scores(recs) for step, recs in sorted(by_step.items())}


def read_final_evals(eval_dir: Path) -> dict[str, Scores]:
    """{dataset: scores} from an evaluate.py output directory's samples.jsonl, through the same
    per-problem function as the training loop's records."""
    try:
        records, _ = read_jsonl(Path(eval_dir) / SAMPLES)
    except ReportError:
        return {}
    out: dict[str, Scores] = {}
    for r in problem_results(records):
        out.setdefault(r["dataset"], {}).update(_scores([r]))
    return out


# ----------------------------------------------------------------------------- arms


@dataclass
class Arm:
    """One side of a comparison: an eval per seed."""
    label: str
    seeds: list
    evals: list[Scores]


def _matrix(arm: Arm, problems: list[str], k: int) -> np.ndarray:
    return np.array([[pass_at_k(*e[p], k) for p in problems] for e in arm.evals], dtype=float)


def common_problems(arms: list[Arm], k: int) -> list[str]:
    """The problems every eval of every arm holds with at least k samples."""
    keys = set.intersection(*(set(e) for a in arms for e in a.evals))
    return sorted(p for p in keys if all(e[p][0] >= k for a in arms for e in a.evals))


@dataclass
class Row:
    label: str
    what: str  # "pass@1", "pass@4", "diff"
    est: Estimate | None
    seeds: str  # "3", or "3 / 1" for a difference of arms with different seeds
    problems: int
    samples: int


def level_row(arm: Arm, k: int, rng: np.random.Generator) -> Row:
    problems = common_problems([arm], k)
    if not problems or not arm.evals:
        return Row(arm.label, f"pass@{k}", None, str(len(arm.evals)), 0, 0)
    x = _matrix(arm, problems, k)
    n = min(e[p][0] for e in arm.evals for p in problems)
    return Row(arm.label, f"pass@{k}", level(x, rng), str(len(arm.evals)), len(problems), n)


def diff_row(a: Arm, b: Arm, rng: np.random.Generator) -> Row:
    problems = common_problems([a, b], 1)
    label = f"{a.label} − {b.label}"
    if not problems or not a.evals or not b.evals:
        return Row(label, "diff", None, "0", 0, 0)
    est = difference(_matrix(a, problems, 1), a.seeds, _matrix(b, problems, 1), b.seeds, rng)
    n = min(e[p][0] for arm in (a, b) for e in arm.evals for p in problems)
    seeds = {len(a.evals), len(b.evals)}
    return Row(label, "diff", est, " / ".join(str(len(x.evals)) for x in (a, b))
               if len(seeds) > 1 else str(len(a.evals)), len(problems), n)


def _by_seed(runs: list[LoggedRun], evals: list[Scores]) -> tuple[list, list[Scores]]:
    """One eval per seed (the first run of a seed), seeds in order."""
    seen: dict = {}
    for r, e in zip(runs, evals, strict=True):
        seen.setdefault(r.seed, e)
    return list(seen), list(seen.values())


# ----------------------------------------------------------------------------- comparisons


@dataclass
class ModelReport:
    model: str
    source: str  # "training evals" or "evaluate.py <dataset>"
    levels: list[Row]
    diffs: list[Row]


def _report(model: str, source: str, base: Arm | None, groups: list[tuple[Arm, Arm | None]],
            k: int, rng: np.random.Generator) -> ModelReport:
    """`groups`: (final arm, its own base arm or None) per method."""
    levels, diffs = [], []
    for arm in ([base] if base is not None else []) + [g for g, _ in groups]:
        levels.append(level_row(arm, 1, rng))
        if k > 1:
            levels.append(level_row(arm, k, rng))
    for arm, own_base in groups:
        if own_base is not None:
            diffs.append(diff_row(arm, own_base, rng))
    for (a, _), (b, _) in itertools.combinations(groups, 2):
        diffs.append(diff_row(a, b, rng))
    return ModelReport(model, source, levels, diffs)


def _largest_k(evals: list[Scores]) -> int:
    ns = [n for e in evals for n, _ in e.values()]
    return min(ns) if ns else 1


def training_reports(runs: list[LoggedRun], rng: np.random.Generator) -> list[ModelReport]:
    """From the runs' own evals: base = step 0, each method at each seed's final eval."""
    models, methods, groups = group_runs(runs)
    evals = {r.name: read_run_evals(r.path) for r in runs if r.path is not None}
    out = []
    for m in models:
        model_runs = [r for r in runs if r.model == m and evals.get(r.name)]
        with_base = [r for r in model_runs if 0 in evals[r.name]]
        seeds, base_evals = _by_seed(with_base, [evals[r.name][0] for r in with_base])
        base = Arm(BASE, seeds, base_evals)
        arms = []
        for method in methods:
            g = groups.get((m, method))
            rs = [r for r in (g.runs if g else []) if evals.get(r.name)]
            if not rs:
                continue
            final = Arm(method, [r.seed for r in rs], [evals[r.name][max(evals[r.name])]
                                                       for r in rs])
            own = [r for r in rs if 0 in evals[r.name]]
            own_base = Arm("base", [r.seed for r in own], [evals[r.name][0] for r in own])
            arms.append((final, own_base if own else None))
        k = _largest_k(base.evals + [e for a, _ in arms for e in a.evals])
        out.append(_report(m, "training evals", base if base.evals else None, arms, k, rng))
    return out


def final_eval_reports(runs: list[LoggedRun], evals_dir: Path,
                       rng: np.random.Generator) -> list[ModelReport]:
    """From evaluate.py's outputs under evals_dir (run_study.py --final_eval): base = the base
    model's evaluation (one seed), each method at its runs' final models."""
    models, methods, groups = group_runs(runs)
    out = []
    for m in models:
        base_evals = read_final_evals(evals_dir / base_eval_name(short_name(m)))
        finals = {r.name: read_final_evals(evals_dir / r.name)
                  for r in runs if r.model == m}
        datasets = sorted(set(base_evals) | {d for f in finals.values() for d in f})
        for d in datasets:
            base = Arm("base", ["base"], [base_evals[d]]) \
                if d in base_evals else None
            arms = []
            for method in methods:
                g = groups.get((m, method))
                rs = [r for r in (g.runs if g else []) if d in finals.get(r.name, {})]
                if rs:
                    arms.append((Arm(method, [r.seed for r in rs],
                                     [finals[r.name][d] for r in rs]), base))
            if not arms and base is None:
                continue
            k = _largest_k((base.evals if base else []) + [e for a, _ in arms for e in a.evals])
            out.append(_report(m, f"evaluate.py {d}", base, arms, k, rng))
    return out


def base_eval_name(model: str) -> str:
    """The evaluate.py output directory of a model's base evaluation under DIR/evals/."""
    return f"base-{model}"


# ----------------------------------------------------------------------------- results.md


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def interval(e: Estimate | None, signed: bool = False) -> str:
    if e is None:
        return "–"
    f = (lambda v: f"{100 * v:+.1f}") if signed else pct
    return f"{f(e.mean)} [{f(e.lo)}, {f(e.hi)}]"


def verdict(row: Row) -> str:
    e = row.est
    if e is None:
        return "no common problems"
    if not e.distinguishable:
        return "not distinguishable at this design"
    first = row.label.split(" − ")[0]
    return f"distinguishable: {first} {'higher' if e.mean > 0 else 'lower'}"


def sentence(model: str, row: Row) -> str:
    """'Qwen2.5-1.5B-Instruct: NSR − PSR = +0.8 pt [-0.3, +1.9]: not distinguishable at this
    design (3 seeds, 1,250 problems × 4 samples; detectable: 1.6 pt)'."""
    e = row.est
    if e is None:
        return f"{model}: {row.label}: no common problems to compare"
    return (f"{model}: {row.label} = {100 * e.mean:+.1f} pt [{100 * e.lo:+.1f}, "
            f"{100 * e.hi:+.1f}]: {verdict(row)} ({row.seeds} seed{'s' * (row.seeds != '1')}, "
            f"{row.problems:,} problems × {row.samples} samples; detectable: "
            f"{100 * e.mde:.1f} pt)")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def model_section(rep: ModelReport) -> list[str]:
    out = [f"### {rep.model} ({rep.source})", ""]
    rows = [[r.label, r.what, r.seeds, f"{r.problems:,} × {r.samples}", interval(r.est)]
            for r in rep.levels]
    out += _table(["Arm", "Metric", "Seeds", "Problems × samples", "% [95% interval]"], rows)
    rows = [[r.label, r.seeds, f"{r.problems:,} × {r.samples}", interval(r.est, True),
             "–" if r.est is None else f"{100 * r.est.mde:.1f}",
             "–" if r.est is None else f"{100 * r.est.seed_share:.0f}%", verdict(r)]
            for r in rep.diffs]
    if rows:
        out += _table(["Paired difference", "Seeds", "Problems × samples",
                       "pt [95% interval]", "Detectable (pt)", "From seeds", "Verdict"], rows)
    return out


HOW = """## How these numbers are made

- Per problem, pass@1 is the share of its samples that are correct (pass@k: the unbiased
  estimator); an arm's number is the mean over its seeds and the problems all compared evals
  share. The base is each run's step-0 eval (one per seed); "objective − base" pairs every run
  with its own step 0, "objective − objective" pairs runs of the same seed.
- Intervals (95%) come from a bootstrap that resamples seeds and then problems (the same problems
  in both arms), with a t multiplier whose degrees of freedom reflect how few seeds there are:
  with 3 seeds whose means spread, the interval is ~4.3 standard errors wide on each side
  (rlvr/study_stats.py).
- "Detectable" is the smallest true difference this design (these seeds, problems and samples)
  finds with 80% probability at the 5% level; "From seeds" is the share of the difference's
  variance that comes from the seed stage (seed-to-seed spread and eval noise); more seeds shrink
  it, more problems or samples shrink the rest.
- "Not distinguishable" means the interval includes 0; it does not mean the arms are equal.
"""


def study_markdown(name: str, training: list[ModelReport], final: list[ModelReport],
                   n_runs: int, command: str) -> str:
    out = [f"# Study `{name}`: results", "",
           f"Generated by `{command}` from {n_runs} runs. Pass rates in %, differences in "
           "percentage points (pt), each with its 95% interval.", ""]
    reports = final or training
    lines = [sentence(r.model + ("" if r.source == "training evals" else f", {r.source}"), d)
             for r in reports for d in r.diffs]
    if lines:
        out += ["## The comparisons in words", ""] + [f"- {s}" for s in lines] + [""]
    for title, reps in (("Final evaluation (evaluate.py on each final model)", final),
                        ("In-loop evaluation (the runs' own evals)", training)):
        if reps:
            out += [f"## {title}", ""]
            for rep in reps:
                out += model_section(rep)
    return "\n".join(out + [HOW])


def study_reports(runs: list[LoggedRun], study_dir: Path) -> tuple[list[ModelReport],
                                                                  list[ModelReport]]:
    """(from the in-loop evals, from the final evaluations) for the runs of a study."""
    rng = np.random.default_rng(REPORT_SEED)
    return training_reports(runs, rng), final_eval_reports(runs, study_dir / "evals", rng)
