"""Training runs read back from their logs, grouped by what they are, and the results.md tables.

Every number comes from `<logdir>/<exp_name>/`: `metrics.jsonl`, the run's own record of its
scalars (rlvr/run_logs.py; TensorBoard events for a run without one) and `config.json`. Nothing
is typed in by hand, so anyone can regenerate the figures from their own runs with
`python plot_results.py`.

Statistics, stated once so that the figures and `results.md` agree:
- runs whose config.json records the same settings in everything but the seed (see
  `run_settings`) are seeds of one group and are averaged; groups of one model that differ in
  more than objective and λ are labelled with the settings they differ in;
- standard error (SE): across seeds, sample std (ddof=1) / sqrt(n_seeds); for a single seed,
  the within-run SE the run logged (`eval/pass@k_se`, over eval problems; none where it
  logged none);
- baseline = step-0 eval, averaged over every run of the model (all evaluate the initial model);
- smoothing is a trailing moving average over the eval points (point i averages the last
  `window` evals up to and including i), so it never looks ahead.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rlvr.config import RESUMABLE_FIELDS
from rlvr.run_logs import plural, read_scalars

PASS1 = "eval/pass@1"
PASS_K_RE = re.compile(r"^eval/pass@(\d+)$")
OBJECTIVE_ORDER = ["NSR", "PSR", "W_REINFORCE", "REINFORCE", "GRPO"]
# Fixed per objective so that a method has the same colour in every figure, whichever
# subset of objectives a log directory happens to contain.
OBJECTIVE_COLORS = {"NSR": "tab:red", "PSR": "tab:blue", "W_REINFORCE": "tab:purple",
                    "REINFORCE": "tab:green", "GRPO": "tab:orange"}
EXTRA_COLORS = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "darkblue", "darkred"]
BASE_COLOR = "tab:gray"
DECIMALS = 1  # printed precision of every percentage in results.md and the bar labels


# config.json keys that are no settings, and settings that do not change what a run computes:
# those a resume may change (eval cadence and size, memory, engine), names and output places, the
# study labels, and the preset (its values are recorded one by one).
NOT_WHAT_A_RUN_IS = RESUMABLE_FIELDS | {
    "exp_name", "output_dir", "study", "study_axes", "preset", "seed",
    "memory_plan", "provenance", "settings_history", "resumes"}
# resumable, so not part of what a run is, but seeds that differ in them are pooled with a warning
EVAL_SETTINGS = ("n_train_steps", "eval_n", "eval_limit", "eval_temperature", "eval_top_p",
                 "eval_max_tokens")


@dataclass
class LoggedRun:
    """A training run as read back from its directory."""
    name: str
    model: str  # short name: last path component of model_id
    objective: str  # objective as configured, e.g. "W_REINFORCE"
    method: str  # group label, e.g. "W_REINFORCE (λ=0.1)" (read_runs adds differing settings)
    seed: int | None
    scalars: dict[str, dict[int, float]]  # tag -> step -> value
    settings: dict = field(default_factory=dict)  # run_settings(config.json)
    config: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def final_step(self) -> int:
        return max(self.scalars[PASS1])


@dataclass
class Stat:
    mean: float
    se: float  # nan when no SE is available
    n: int  # runs behind the mean


@dataclass
class Group:
    model: str
    method: str
    runs: list[LoggedRun]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def final_step(self) -> int:
        return max(r.final_step for r in self.runs)

    def curve(self) -> dict[int, Stat]:
        steps = sorted({s for r in self.runs for s in r.scalars[PASS1]})
        return {s: stat_at(self.runs, PASS1, lambda r, s=s: s) for s in steps}

    def final(self, tag: str = PASS1) -> Stat | None:
        # Each seed at its own last eval, so a seed that stopped early still counts.
        return stat_at(self.runs, tag, lambda r: r.final_step)


def se_kind(n: int) -> str:
    return "within-run SE, 1 seed" if n == 1 else f"SE across {n} seeds"


def combine(values: list[float], within_se: list[float]) -> Stat:
    """Mean over runs; SE across runs when there are several, else the run's own SE."""
    n = len(values)
    if n == 1:
        return Stat(values[0], within_se[0], 1)
    return Stat(statistics.fmean(values), statistics.stdev(values) / math.sqrt(n), n)


def stat_at(runs: Iterable[LoggedRun], tag: str,
            step_of: Callable[[LoggedRun], int]) -> Stat | None:
    vals, ses = [], []
    for r in runs:
        step = step_of(r)
        if step in r.scalars.get(tag, {}):
            vals.append(r.scalars[tag][step])
            ses.append(r.scalars.get(f"{tag}_se", {}).get(step, math.nan))
    return combine(vals, ses) if vals else None


def baseline(runs: list[LoggedRun], tag: str = PASS1) -> Stat | None:
    """Step-0 eval of a model, pooled over all its runs (they all evaluate the initial model)."""
    return stat_at(runs, tag, lambda r: 0)


def pass_at_k(runs: list[LoggedRun], step_of: Callable[[LoggedRun], int]) -> dict[int, Stat]:
    ks = sorted({int(m[1]) for r in runs for t in r.scalars if (m := PASS_K_RE.match(t))})
    out = {k: stat_at(runs, f"eval/pass@{k}", step_of) for k in ks}
    return {k: s for k, s in out.items() if s is not None}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of values[i-window+1 : i+1]."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


# ----------------------------------------------------------------------------- reading


def method_label(objective: str, lambda_psr: float | None) -> str:
    if objective == "W_REINFORCE" and lambda_psr is not None:
        return f"W_REINFORCE (λ={lambda_psr:g})"
    return objective


def run_settings(cfg: dict) -> dict:
    """What a run is, from its config.json: every setting but the seed and NOT_WHAT_A_RUN_IS,
    the optimizer as its memory plan resolved "auto", and λ only for W_REINFORCE (the one
    objective that reads it)."""
    out = {k: v for k, v in cfg.items() if k not in NOT_WHAT_A_RUN_IS}
    if plan_optim := (cfg.get("memory_plan") or {}).get("optim"):
        out["optim"] = plan_optim
    if cfg.get("objective") != "W_REINFORCE":
        out.pop("lambda_psr", None)
    return out


def read_run(run_dir: Path) -> tuple[LoggedRun | str, list[str]]:
    """The run, or the reason it cannot be used; and warnings about data that could not be read."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "no config.json", []
    try:
        cfg = json.loads(cfg_path.read_text())
        model = str(cfg["model_id"]).rstrip("/").split("/")[-1]
        objective = str(cfg["objective"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable config.json ({type(e).__name__}: {e})", []
    scalars, problems = read_scalars(run_dir)
    if not scalars.get(PASS1):
        return f"no {PASS1} scalars", problems
    method = method_label(objective, cfg.get("lambda_psr"))
    return LoggedRun(run_dir.name, model, objective, method, cfg.get("seed"), scalars,
                     run_settings(cfg), cfg, run_dir), problems


def run_dirs(logdir: Path) -> list[Path]:
    """logdir itself when it is one run, else its subdirectories that look like runs (a
    config.json, metrics.jsonl or TensorBoard events)."""
    if (logdir / "config.json").is_file():
        return [logdir]
    dirs = sorted(p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [d for d in dirs if any((d / f).exists() for f in ("config.json", "metrics.jsonl"))
            or any(d.glob("events.out.tfevents.*"))]


def read_runs(logdir: Path) -> tuple[list[LoggedRun], list[tuple[str, str]],
                                     list[tuple[str, str]]]:
    """(usable runs, skipped (name, reason), warnings (name, message)) for each run directory
    (`run_dirs`), labelled by group (`label_groups`)."""
    runs, skipped, warnings = [], [], []
    for d in run_dirs(logdir):
        run, problems = read_run(d)
        warnings += [(d.name, p) for p in problems]
        if isinstance(run, str):
            skipped.append((d.name, run))
            continue
        if 0 not in run.scalars[PASS1]:
            warnings.append((d.name, "no step-0 eval: not used for the baseline"))
        if f"{PASS1}_se" not in run.scalars:
            warnings.append((d.name, f"no {PASS1}_se: within-run SE unavailable"))
        runs.append(run)
    label_groups(runs)
    for g in group_runs(runs)[2].values():
        names = ", ".join(r.name for r in g.runs)
        if len({r.seed for r in g.runs}) < g.n:  # a rerun would otherwise pass for a new seed
            warnings.append((names, f"same seed in several runs of {g.model} {g.method}; each "
                             "is still counted as a seed"))
        for k in EVAL_SETTINGS:
            if len(values := {_show(r.config.get(k)) for r in g.runs}) > 1:
                warnings.append((names, f"seeds of {g.model} {g.method} differ in {k} "
                                 f"({', '.join(sorted(values))}); pooled anyway"))
    return runs, skipped, warnings


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return " ".join(map(_show, value))
    return "–" if value is None else str(value)


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def label_groups(runs: list[LoggedRun]) -> None:
    """Set each run's `method`: objective (and λ), plus `[setting=value, ...]` for every setting
    in which groups of one model differ, so that no two groups of a model share a label."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in runs:
        by_model.setdefault(r.model, {})[_key(r.settings)] = r.settings
    differing: set[str] = set()
    for groups in by_model.values():
        names = set().union(*groups.values()) - {"objective", "lambda_psr"}
        differing |= {k for k in names if len({_show(g.get(k)) for g in groups.values()}) > 1}
    labels: dict[tuple[str, str], str] = {}
    for r in runs:
        key = (r.model, _key(r.settings))
        if key not in labels:
            base = method_label(r.objective, r.settings.get("lambda_psr"))
            extra = ", ".join(f"{k}={_show(r.settings.get(k))}" for k in sorted(differing))
            label = f"{base} [{extra}]" if extra else base
            taken = {v for (m, _), v in labels.items() if m == r.model}
            n, unique = 1, label
            while unique in taken:  # two values that print alike
                n += 1
                unique = f"{label} #{n}"
            labels[key] = unique
        r.method = labels[key]


_SIZE_WORDS = {"XS": 0, "S": 1, "M": 2, "L": 3, "XL": 4}


def _model_key(model: str) -> tuple[float, float, str]:
    # Order models by parameter count ("0.5B" < "1.5B" < "7B") where the name states it, else by
    # a T-shirt size suffix ("demo-model-S" < "-M" < "-L"), else by name.
    m = re.search(r"(\d+(?:\.\d+)?)B", model)
    size = _SIZE_WORDS.get(model.rsplit("-", 1)[-1].upper(), math.inf)
    return (float(m[1]) if m else math.inf, size, model)


def group_runs(runs: list[LoggedRun]) -> tuple[list[str], list[str],
                                             dict[tuple[str, str], Group]]:
    """(models, methods, groups keyed by (model, method)), models and methods in display order."""
    groups: dict[tuple[str, str], Group] = {}
    for r in runs:
        groups.setdefault((r.model, r.method), Group(r.model, r.method, [])).runs.append(r)
    models = sorted({r.model for r in runs}, key=_model_key)
    objective_of = {r.method: r.objective for r in runs}

    def method_key(m: str) -> tuple[int, str]:
        obj = objective_of[m]
        return (OBJECTIVE_ORDER.index(obj) if obj in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER), m)

    return models, sorted(objective_of, key=method_key), groups


def method_colors(methods: list[str]) -> dict[str, str]:
    colors, extra = {}, iter(EXTRA_COLORS * 4)
    for m in methods:
        base = m.split(" ")[0]
        # A second lambda of W_REINFORCE would otherwise share its colour with the first.
        if base in OBJECTIVE_COLORS and OBJECTIVE_COLORS[base] not in colors.values():
            colors[m] = OBJECTIVE_COLORS[base]
        else:
            colors[m] = next(extra)
    return colors


# ----------------------------------------------------------------------------- results.md


def fmt(s: Stat | None) -> str:
    """A pass rate as a percentage at the printed precision, with its SE when known."""
    if s is None:
        return "–"
    text = f"{100 * s.mean:.{DECIMALS}f}"
    return text if math.isnan(s.se) else f"{text} ± {100 * s.se:.{DECIMALS}f}"


def _span(values: set[int]) -> str:
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


def eval_size(runs: Iterable[LoggedRun]) -> str:
    """'100 problems × 4 samples' per eval, as the runs logged it (a range where they differ):
    a pass rate from 8 problems x 2 samples must not read like one from 1,250 x 4."""
    runs = list(runs)
    problems = {round(v) for r in runs for v in r.scalars.get("eval/n_problems", {}).values()}
    samples = {round(v) for r in runs
               for v in r.scalars.get("eval/n_samples_per_problem", {}).values()}
    if not problems and not samples:
        return "eval size not logged"
    return f"{_span(problems)} problems × {_span(samples)} samples"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def results_markdown(runs: list[LoggedRun], skipped: list[tuple[str, str]], logdir: Path,
                     warnings: Iterable[tuple[str, str]] = (),
                     command: str = "python plot_results.py") -> str:
    models, methods, groups = group_runs(runs)
    out = [
        "# Results",
        "",
        f"Generated by `{command}` from {len(runs)} runs under `{logdir}`. "
        "Numbers are MATH eval pass rates in %, mean ± 1 standard error (SE). With one seed "
        "the SE is the within-run one the run logged (over eval problems, `eval/pass@k_se`; "
        "none where it logged none); with several seeds it is across seeds (sample std / sqrt(n)).",
        "",
    ]
    for method in methods:
        gs = [groups[(m, method)] for m in models if (m, method) in groups]
        steps = sorted({s for g in gs for s in g.curve()})
        out += [f"## {method}: pass@1 (%) at each eval step", "",
                f"Each eval: {eval_size(r for g in gs for r in g.runs)}.", ""]
        rows = []
        for g in gs:
            curve = g.curve()
            rows.append([g.model, str(g.n)] + [fmt(curve.get(s)) for s in steps])
        out += _table(["Model", "Seeds"] + [f"step {s}" for s in steps], rows)

    finals = {key: pass_at_k(g.runs, lambda r: r.final_step) for key, g in groups.items()}
    bases = {m: pass_at_k([r for r in runs if r.model == m], lambda r: 0) for m in models}
    # One pass@K column, K the largest k any run logged; a run that stopped short shows "–".
    k = max((max(d) for d in [*finals.values(), *bases.values()] if d), default=1)
    k_col = (lambda d: [fmt(d.get(k))]) if k > 1 else (lambda d: [])

    out += ["## Final performance", "", "Each eval: " + "; ".join(
        f"{m} {eval_size(r for r in runs if r.model == m)}" for m in models) + ".", ""]
    rows = []
    for m in models:
        model_runs = [r for r in runs if r.model == m]
        n0 = sum(0 in r.scalars[PASS1] for r in model_runs)
        rows.append([m, "Base (step 0)", plural(n0, "run"), "0", fmt(baseline(model_runs)),
                     *k_col(bases[m])])
        for method in methods:
            if (g := groups.get((m, method))) is not None:
                rows.append([m, method, plural(g.n, "seed"), str(g.final_step), fmt(g.final()),
                             *k_col(finals[(m, method)])])
    header = ["Model", "Method", "Runs", "Step", "pass@1 (%)"] + ([f"pass@{k} (%)"] * (k > 1))
    out += _table(header, rows)
    out += ["The baseline pools the step-0 eval of every run of the model (the count is in "
            "'Runs'); each method is taken at each seed's final eval step.", ""]
    if skipped:
        out += ["## Skipped runs", ""] + [f"- `{name}`: {why}" for name, why in skipped] + [""]
    if warnings := list(warnings):
        out += ["## Warnings", ""] + [f"- `{name}`: {msg}" for name, msg in warnings] + [""]
    return "\n".join(out).rstrip("\n") + "\n"
