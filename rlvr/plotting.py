"""Figures and results tables drawn from the logs that training runs write.

Every number comes from `<logdir>/<exp_name>/`: TensorBoard scalars (read with TensorBoard's own
EventAccumulator) and `config.json`. Nothing is typed in by hand, so anyone can regenerate the
figures from their own runs with `python plot_results.py`.

Statistics, stated once so that the figures and `results.md` agree:
- runs of the same model x objective (x lambda) are seeds of one group and are averaged;
- standard error (SE): across seeds, sample std (ddof=1) / sqrt(n_seeds); for a single seed,
  the within-run SE the run logged (`eval/pass@1_se`, over eval problems);
- baseline = step-0 eval, averaged over every run of the model (all evaluate the initial model);
- smoothing is a trailing moving average over the eval points (point i averages the last
  `window` evals up to and including i), so it never looks ahead.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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
FIGURES = ["training_curves_smoothed.png", "final_performance_comparison.png", "pass_at_k.png"]


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


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """All scalars of a run directory; a step logged twice (e.g. after a resume) keeps the
    value with the latest wall_time."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    # purge_orphaned_data=False: we resolve duplicate steps ourselves, by wall_time, instead
    # of letting the accumulator drop events it considers orphaned.
    acc = ea.EventAccumulator(str(run_dir), {ea.SCALARS: 0}, purge_orphaned_data=False)
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        latest: dict[int, tuple[float, float]] = {}
        for ev in acc.Scalars(tag):
            if ev.step not in latest or ev.wall_time >= latest[ev.step][0]:
                latest[ev.step] = (ev.wall_time, ev.value)
        out[tag] = {step: v for step, (_, v) in sorted(latest.items())}
    return out


def method_label(objective: str, lambda_psr: float | None) -> str:
    if objective == "W_REINFORCE" and lambda_psr is not None:
        return f"W_REINFORCE (λ={lambda_psr:g})"
    return objective


def read_run(run_dir: Path) -> Run | str:
    """The run, or the reason it cannot be used."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "no config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        model = str(cfg["model_id"]).rstrip("/").split("/")[-1]
        objective = str(cfg["objective"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable config.json ({type(e).__name__}: {e})"
    scalars = read_scalars(run_dir)
    if not scalars.get(PASS1):
        return f"no {PASS1} scalars"
    method = method_label(objective, cfg.get("lambda_psr"))
    return Run(run_dir.name, model, objective, method, cfg.get("seed"), scalars)


def read_runs(logdir: Path) -> tuple[list[Run], list[tuple[str, str]], list[tuple[str, str]]]:
    """(usable runs, skipped (name, reason), warnings (name, message)) for each run directory:
    a direct subdirectory holding config.json or TensorBoard event files (or logdir itself,
    when it is one run)."""
    runs, skipped, warnings = [], [], []
    dirs = sorted(p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in [logdir] if (logdir / "config.json").is_file() else dirs:
        if not (d / "config.json").exists() and not any(d.glob("events.out.tfevents.*")):
            continue
        run = read_run(d)
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


def _model_key(model: str) -> tuple[float, str]:
    # Order models by parameter count ("0.5B" < "1.5B" < "7B") where the name states it.
    m = re.search(r"(\d+(?:\.\d+)?)B", model)
    return (float(m[1]) if m else math.inf, model)


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
        "the SE is within-run (over eval problems, `eval/pass@1_se`); with several seeds it is "
        "across seeds (sample std / sqrt(n)), and pass@k>1 has an SE only across seeds.",
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


# ----------------------------------------------------------------------------- figures


_NOTE = {"text": ""}  # set by make_all(note=...): a footer on every figure


def _save(fig, path: Path, dpi: int) -> None:
    if _NOTE["text"]:
        fig.text(0.005, 0.005, _NOTE["text"], fontsize=8, color="firebrick", ha="left",
                 va="bottom")
    fig.savefig(path, dpi=dpi)


def _panels(n: int, title: str):
    fig, axes = plt.subplots(1, n, figsize=(max(7.0, 4.8 * n + 0.8), 4.6), squeeze=False,
                             layout="constrained")
    fig.suptitle(title, fontsize=11)
    return fig, list(axes[0])


def _pass_rate_ylim(ax) -> None:
    # A pass rate is never negative, and all-zero runs (e.g. a tiny random model) still need a
    # readable axis rather than matplotlib's +-0.05 around zero.
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(0.0, lo), max(hi, max(0.0, lo) + 2.0))


def _legend_below(fig, axes) -> None:
    """One legend under the figure (never over data); per panel when the panels' entries differ,
    e.g. when a model has a different number of seeds."""
    entries = [dict(zip(*ax.get_legend_handles_labels()[::-1], strict=True)) for ax in axes]
    if all(list(e) == list(entries[0]) for e in entries):
        # As many columns as fit across the figure (~0.07 in per character at 9 pt + the handle).
        entry_in = 0.07 * max(len(label) for label in entries[0]) + 0.7
        ncol = max(1, min(len(entries[0]), int(fig.get_figwidth() / entry_in)))
        fig.legend(entries[0].values(), entries[0].keys(), loc="outside lower center", ncol=ncol,
                   fontsize=9, frameon=False)
    else:
        for ax in axes:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)


def plot_training_curves(runs: list[Run], window: int, path: Path, dpi: int) -> None:
    models, methods, groups = group_runs(runs)
    colors = method_colors(methods)
    fig, axes = _panels(len(models), "MATH eval pass@1 during RL training\n"
                        f"line: trailing moving average of {window} evals · dots: raw evals · "
                        "band: ±1 SE")
    for ax, model in zip(axes, models, strict=True):
        for method in methods:
            if (g := groups.get((model, method))) is None:
                continue
            curve = g.curve()
            steps = list(curve)
            y = [100 * s.mean for s in curve.values()]
            se = [100 * s.se for s in curve.values()]
            c = colors[method]
            ax.scatter(steps, y, color=c, alpha=0.4, s=14, linewidths=0)
            ax.plot(steps, smooth(y, window), color=c, lw=2, label=f"{method} ({se_kind(g.n)})")
            # The band follows the raw eval means it describes (clipped to the possible 0-100 %);
            # a nan SE leaves a gap.
            lo = [max(0.0, a - b) for a, b in zip(y, se, strict=True)]
            hi = [min(100.0, a + b) for a, b in zip(y, se, strict=True)]
            ax.fill_between(steps, lo, hi, color=c, alpha=0.12, lw=0)
        ax.set(title=model, xlabel="training step (policy updates)", ylabel="pass@1 (%)")
        _pass_rate_ylim(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    _save(fig, path, dpi)
    plt.close(fig)


def plot_final_comparison(runs: list[Run], path: Path, dpi: int) -> None:
    models, methods, groups = group_runs(runs)
    colors = {"Base (step 0)": BASE_COLOR, **method_colors(methods)}
    bars = list(colors)
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(7.5, 0.6 * len(models) * len(bars) + 1.5), 4.8),
                           layout="constrained")
    top = 0.0
    for j, name in enumerate(bars):
        for i, model in enumerate(models):
            if j == 0:
                s = baseline([r for r in runs if r.model == model])
            else:
                s = groups[(model, name)].final() if (model, name) in groups else None
            if s is None:
                continue
            x = i + (j - (len(bars) - 1) / 2) * width
            err = 0.0 if math.isnan(s.se) else 100 * s.se
            ax.bar(x, 100 * s.mean, width, color=colors[name], yerr=err, capsize=3,
                   error_kw={"lw": 1}, label=name)
            # Label above the error bar, so the two never overlap.
            ax.annotate(f"{100 * s.mean:.{DECIMALS}f}", (x, 100 * s.mean + err), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
            top = max(top, 100 * s.mean + err)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, max(top * 1.12, 2.0))
    ax.set_title("MATH eval pass@1: base model vs. final checkpoint of each objective\n"
                 "error bars: ±1 SE (within-run for one run, across runs/seeds otherwise)",
                 fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax])
    _save(fig, path, dpi)
    plt.close(fig)


def plot_pass_at_k(runs: list[Run], path: Path, dpi: int) -> bool:
    """Draw pass@k vs k; False (and no file) when no run logged pass@k for k > 1."""
    models, methods, groups = group_runs(runs)
    colors = {"Base (step 0)": BASE_COLOR, **method_colors(methods)}
    curves = {model: {"Base (step 0)": pass_at_k([r for r in runs if r.model == model],
                                                 lambda r: 0)} for model in models}
    for (model, method), g in groups.items():
        curves[model][method] = pass_at_k(g.runs, lambda r: r.final_step)
    if not any(len(d) > 1 for cs in curves.values() for d in cs.values()):
        return False
    fig, axes = _panels(len(models), "MATH eval pass@k: base model vs. final checkpoint of each "
                        "objective\nerror bars: ±1 SE across seeds (one seed: pass@1 only, "
                        "within-run)")
    for ax, model in zip(axes, models, strict=True):
        for name in colors:  # fixed order, so legends agree across panels
            if not (d := curves[model].get(name)):
                continue
            y = [100 * s.mean for s in d.values()]
            se = [0.0 if math.isnan(s.se) else 100 * s.se for s in d.values()]
            ax.errorbar(list(d), y, yerr=[[min(e, m) for m, e in zip(y, se, strict=True)],
                                          [min(e, 100 - m) for m, e in zip(y, se, strict=True)]],
                        color=colors[name], marker="o", ms=4, lw=1.8, capsize=3, label=name,
                        # base dashed and on top, so it stays visible where a method matches it
                        ls="--" if name.startswith("Base") else "-",
                        zorder=3 if name.startswith("Base") else 2)
        ks = sorted({k for d in curves[model].values() for k in d})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set(title=model, xlabel="k (samples per problem, log2 scale)", ylabel="pass@k (%)")
        _pass_rate_ylim(ax)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    _save(fig, path, dpi)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI


class PlotError(Exception):
    """A problem with the inputs, reported as one `error:` line."""


def make_all(logdir: Path, out: Path, window: int = 2, dpi: int = 150,
             note: str = "") -> list[Path]:
    """Read every run under logdir and write the figures and results.md into out.

    `note` is printed as a footer on every figure and at the top of results.md (e.g. to mark
    figures drawn from demo logs)."""
    _NOTE["text"] = note
    if not logdir.is_dir():
        raise PlotError(f"log directory '{logdir}' does not exist")
    runs, skipped, warnings = read_runs(logdir)
    for name, why in skipped:
        print(f"warning: skipping run '{name}': {why}", file=sys.stderr)
    for name, msg in warnings:
        print(f"warning: run '{name}': {msg}", file=sys.stderr)
    if not runs:
        what = f"{len(skipped)} run(s) found but none usable" if skipped else "no runs found"
        raise PlotError(f"{what} under '{logdir}' (expected <logdir>/<exp_name>/ with "
                        f"config.json and TensorBoard event files logging {PASS1})")
    # Draw into a temporary directory first, so a failure leaves no partial outputs in `out`.
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        plot_training_curves(runs, window, t / FIGURES[0], dpi)
        plot_final_comparison(runs, t / FIGURES[1], dpi)
        drew_pass_k = plot_pass_at_k(runs, t / FIGURES[2], dpi)
        md = results_markdown(runs, skipped, logdir, warnings)
        (t / "results.md").write_text(f"> {note}\n\n{md}" if note else md)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(t.iterdir()):
            shutil.move(str(f), out / f.name)
            written.append(out / f.name)
    if not drew_pass_k:
        print(f"note: no run logged pass@k for k > 1; {FIGURES[2]} not drawn", file=sys.stderr)
        # A figure left from earlier logs would disagree with the new results.md.
        (out / FIGURES[2]).unlink(missing_ok=True)
    return written
