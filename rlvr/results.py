"""Reading training runs back from their logs, aggregating seeds, and the results.md tables.

Every number comes from `<logdir>/<exp_name>/`: `metrics.jsonl`, the run's own record of its
scalars (TensorBoard events, read with TensorBoard's own EventAccumulator, for a run without one)
and `config.json`. Nothing is typed in by hand, so anyone can regenerate the figures from their
own runs with `python plot_results.py`.

Statistics, stated once so that the figures and `results.md` agree:
- runs of the same model x objective (x lambda) are seeds of one group and are averaged;
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
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Run:
    name: str
    model: str  # short name: last path component of model_id
    objective: str  # objective as configured, e.g. "W_REINFORCE"
    method: str  # group label, e.g. "W_REINFORCE (λ=0.1)"
    seed: int | None
    scalars: dict[str, dict[int, float]]  # tag -> step -> value

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
    runs: list[Run]

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


def stat_at(runs: Iterable[Run], tag: str, step_of: Callable[[Run], int]) -> Stat | None:
    vals, ses = [], []
    for r in runs:
        step = step_of(r)
        if step in r.scalars.get(tag, {}):
            vals.append(r.scalars[tag][step])
            ses.append(r.scalars.get(f"{tag}_se", {}).get(step, math.nan))
    return combine(vals, ses) if vals else None


def baseline(runs: list[Run], tag: str = PASS1) -> Stat | None:
    """Step-0 eval of a model, pooled over all its runs (they all evaluate the initial model)."""
    return stat_at(runs, tag, lambda r: 0)


def pass_at_k(runs: list[Run], step_of: Callable[[Run], int]) -> dict[int, Stat]:
    ks = sorted({int(m[1]) for r in runs for t in r.scalars if (m := PASS_K_RE.match(t))})
    out = {k: stat_at(runs, f"eval/pass@{k}", step_of) for k in ks}
    return {k: s for k, s in out.items() if s is not None}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of values[i-window+1 : i+1]."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


# ----------------------------------------------------------------------------- reading


METRICS_FILE = "metrics.jsonl"


def read_metrics_file(path: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Scalars from a run's metrics.jsonl, and what could not be read.

    A line that does not parse (torn by a crash, damaged on disk) is skipped and reported, never
    a reason to drop the lines after it. Non-finite values are logged as null: left out.
    """
    out: dict[str, dict[int, float]] = {}
    bad = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
            if type(step) is not int:
                raise TypeError(f"step {step!r}")
        except (json.JSONDecodeError, KeyError, TypeError):
            bad.append(lineno)
            continue
        for tag, value in record.items():
            if tag != "step" and type(value) in (int, float):
                out.setdefault(tag, {})[step] = float(value)  # a later line for a step wins
    problems = []
    if bad:
        lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        problems.append(f"{METRICS_FILE}: {plural(len(bad), 'unreadable line')} skipped "
                        f"(line {lines})")
    return {tag: dict(sorted(steps.items())) for tag, steps in out.items()}, problems


def read_event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """All TensorBoard scalars of a run directory, through TensorBoard's own EventAccumulator.

    Orphaned data is purged as TensorBoard itself does: a resumed run writes a restart marker at
    its checkpoint step + 1 (SummaryWriter's purge_step), and what a dead process logged from
    there on is dropped. A step still logged twice keeps the value with the latest wall_time.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir), {ea.SCALARS: 0}, purge_orphaned_data=True)
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        latest: dict[int, tuple[float, float]] = {}
        for ev in acc.Scalars(tag):
            if ev.step not in latest or ev.wall_time >= latest[ev.step][0]:
                latest[ev.step] = (ev.wall_time, ev.value)
        out[tag] = {step: v for step, (_, v) in sorted(latest.items())}
    return out


def damaged_event_files(run_dir: Path) -> list[tuple[str, int, int | None, str]]:
    """(file, records read, last step read, why) for each event file that stops being readable.

    EventAccumulator stops reading a file at the first record that fails its checksum or is cut
    short, silently; TensorBoard's own record reader says where and why.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    damaged = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        reader, n, last_step = PyRecordReader_New(str(path)), 0, None
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            except errors.DataLossError as e:
                damaged.append((path.name, n, last_step, e.message.split(" ", 1)[-1]))
                break
            n += 1
            last_step = event_pb2.Event.FromString(reader.record()).step
    return damaged


def read_scalars(run_dir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """The scalars a run kept, and warnings about data that could not be read.

    metrics.jsonl is the run's record: the training loop logs every scalar there and in
    TensorBoard, and on --resume truncates it to the checkpoint step, so it holds exactly what
    the run itself reports. TensorBoard events are read (orphans purged) only for a run without
    one. Damaged event files are reported either way.
    """
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        scalars, problems = read_metrics_file(metrics)
        consequence = "TensorBoard shows less of this run (the numbers here use metrics.jsonl)"
    else:
        scalars, problems = read_event_scalars(run_dir), []
        consequence = "the rest of that file is missing here (no metrics.jsonl to use instead)"
    for name, n, step, why in damaged_event_files(run_dir):
        where = f"after record {n}" + ("" if step is None else f" (step {step})")
        problems.append(f"event file {name} is unreadable {where}: {why}; {consequence}")
    return scalars, problems


def method_label(objective: str, lambda_psr: float | None) -> str:
    if objective == "W_REINFORCE" and lambda_psr is not None:
        return f"W_REINFORCE (λ={lambda_psr:g})"
    return objective


def read_run(run_dir: Path) -> tuple[Run | str, list[str]]:
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
    return Run(run_dir.name, model, objective, method, cfg.get("seed"), scalars), problems


def read_runs(logdir: Path) -> tuple[list[Run], list[tuple[str, str]], list[tuple[str, str]]]:
    """(usable runs, skipped (name, reason), warnings (name, message)) for each run directory:
    a direct subdirectory holding config.json, metrics.jsonl or TensorBoard event files (or
    logdir itself, when it is one run)."""
    runs, skipped, warnings = [], [], []
    dirs = sorted(p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in [logdir] if (logdir / "config.json").is_file() else dirs:
        if not any((d / f).exists() for f in ("config.json", METRICS_FILE)) \
                and not any(d.glob("events.out.tfevents.*")):
            continue
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
    for g in group_runs(runs)[2].values():
        if len({r.seed for r in g.runs}) < g.n:  # a rerun would otherwise pass for a new seed
            warnings.append((", ".join(r.name for r in g.runs), "same seed in several runs of "
                             f"{g.model} {g.method}; each is still counted as a seed"))
    return runs, skipped, warnings


_SIZE_WORDS = {"XS": 0, "S": 1, "M": 2, "L": 3, "XL": 4}


def _model_key(model: str) -> tuple[float, float, str]:
    # Order models by parameter count ("0.5B" < "1.5B" < "7B") where the name states it, else by
    # a T-shirt size suffix ("demo-model-S" < "-M" < "-L"), else by name.
    m = re.search(r"(\d+(?:\.\d+)?)B", model)
    size = _SIZE_WORDS.get(model.rsplit("-", 1)[-1].upper(), math.inf)
    return (float(m[1]) if m else math.inf, size, model)


def group_runs(runs: list[Run]) -> tuple[list[str], list[str], dict[tuple[str, str], Group]]:
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


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def results_markdown(runs: list[Run], skipped: list[tuple[str, str]], logdir: Path,
                     warnings: Iterable[tuple[str, str]] = ()) -> str:
    models, methods, groups = group_runs(runs)
    out = [
        "# Results",
        "",
        f"Generated by `python plot_results.py` from {len(runs)} runs under `{logdir}`. "
        "Numbers are MATH eval pass rates in %, mean ± 1 standard error (SE). With one seed "
        "the SE is the within-run one the run logged (over eval problems, `eval/pass@k_se`; "
        "none where it logged none); with several seeds it is across seeds (sample std / sqrt(n)).",
        "",
    ]
    for method in methods:
        gs = [groups[(m, method)] for m in models if (m, method) in groups]
        steps = sorted({s for g in gs for s in g.curve()})
        out += [f"## {method}: pass@1 (%) at each eval step", ""]
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

    out += ["## Final performance", ""]
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
