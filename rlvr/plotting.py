"""Figures drawn from the logs that training runs write (see rlvr/results.py for the numbers)."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rlvr.results import (  # noqa: E402
    BASE_COLOR,
    DECIMALS,
    PASS1,
    LoggedRun,
    baseline,
    eval_size,
    group_runs,
    method_colors,
    pass_at_k,
    read_runs,
    results_markdown,
    se_kind,
    smooth,
)
from rlvr.study_report import ModelReport, study_markdown, study_reports  # noqa: E402

FIGURES = ["training_curves_smoothed.png", "final_performance_comparison.png", "pass_at_k.png"]


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
    # readable axis rather than matplotlib's +-0.05 around zero; the axis starts a little below
    # 0 so that a line at 0 % is drawn above the axis line, not hidden in it.
    lo, hi = ax.get_ylim()
    hi = max(hi, max(0.0, lo) + 2.0)
    ax.set_ylim(-0.03 * hi, hi)


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


def _panel_title(model: str, runs: list[LoggedRun]) -> str:
    return f"{model}\neach eval: {eval_size(r for r in runs if r.model == model)}"


def plot_training_curves(runs: list[LoggedRun], window: int, path: Path, dpi: int) -> None:
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
        ax.set(title=_panel_title(model, runs), xlabel="training step (policy updates)",
               ylabel="pass@1 (%)")
        _pass_rate_ylim(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    _save(fig, path, dpi)
    plt.close(fig)


def plot_final_comparison(runs: list[LoggedRun], path: Path, dpi: int) -> None:
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
            ax.bar(x, 100 * s.mean, width, color=colors[name], edgecolor=colors[name],
                   yerr=err, capsize=3,
                   error_kw={"lw": 1}, label=name)
            # Label above the error bar, so the two never overlap.
            ax.annotate(f"{100 * s.mean:.{DECIMALS}f}", (x, 100 * s.mean + err), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
            top = max(top, 100 * s.mean + err)
    ax.set_xticks(range(len(models)), [_panel_title(m, runs) for m in models], fontsize=8)
    ax.set_ylabel("pass@1 (%)")
    top = max(top * 1.12, 2.0)
    ax.set_ylim(-0.03 * top, top)  # a 0 % bar (drawn as its edge) stays above the axis line
    ax.set_title("MATH eval pass@1: base model vs. final checkpoint of each objective\n"
                 "error bars: ±1 SE (within-run for one run, across runs/seeds otherwise)",
                 fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, [ax])
    _save(fig, path, dpi)
    plt.close(fig)


def plot_pass_at_k(runs: list[LoggedRun], path: Path, dpi: int) -> bool:
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
                        "objective\nerror bars: ±1 SE across seeds (one seed: within-run, where "
                        "logged)")
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
        ax.set(title=_panel_title(model, runs), xlabel="k (samples per problem, log2 scale)",
               ylabel="pass@k (%)")
        _pass_rate_ylim(ax)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    _save(fig, path, dpi)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI


class PlotError(Exception):
    """A problem with the inputs, reported as one `error:` line."""


def _load_runs(logdir: Path, out: Path) -> tuple[list[LoggedRun], list, list]:
    if not logdir.is_dir():
        raise PlotError(f"log directory '{logdir}' does not exist")
    if out.exists() and not out.is_dir():
        raise PlotError(f"--out '{out}' exists and is not a directory")
    runs, skipped, warnings = read_runs(logdir)
    for name, why in skipped:
        print(f"warning: skipping run '{name}': {why}", file=sys.stderr)
    for name, msg in warnings:
        print(f"warning: run '{name}': {msg}", file=sys.stderr)
    if not runs:
        what = f"{len(skipped)} run(s) found but none usable" if skipped else "no runs found"
        raise PlotError(f"{what} under '{logdir}' (expected <logdir>/<exp_name>/ with "
                        f"config.json and TensorBoard event files logging {PASS1})")
    return runs, skipped, warnings


def _publish(tmp: Path, out: Path) -> list[Path]:
    """Move what was drawn in `tmp` into `out`: a failure leaves no partial outputs there."""
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            shutil.move(str(f), out / f.name)
            written.append(out / f.name)
    except OSError as e:  # a path component is a file, no permission, disk full
        raise PlotError(f"cannot write to --out '{out}': {e.strerror or e}") from None
    return written


def make_all(logdir: Path, out: Path, window: int = 2, dpi: int = 150,
             note: str = "") -> list[Path]:
    """Read every run under logdir and write the figures and results.md into out.

    `note` is printed as a footer on every figure and at the top of results.md (e.g. to mark
    figures drawn from demo logs)."""
    _NOTE["text"] = note
    runs, skipped, warnings = _load_runs(logdir, out)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        plot_training_curves(runs, window, t / FIGURES[0], dpi)
        plot_final_comparison(runs, t / FIGURES[1], dpi)
        drew_pass_k = plot_pass_at_k(runs, t / FIGURES[2], dpi)
        md = results_markdown(runs, skipped, logdir, warnings)
        (t / "results.md").write_text(f"> {note}\n\n{md}" if note else md)
        written = _publish(t, out)
    if not drew_pass_k:
        print(f"note: no run logged pass@k for k > 1; {FIGURES[2]} not drawn", file=sys.stderr)
        # A figure left from earlier logs would disagree with the new results.md.
        (out / FIGURES[2]).unlink(missing_ok=True)
    return written


# ----------------------------------------------------------------------------- a study


STUDY_FIGURES = ["study_final.png", "study_differences.png"]


def plot_study_intervals(reports: list[ModelReport], path: Path, dpi: int, diffs: bool) -> bool:
    """One panel per model (and eval source): each arm's pass@1, or each paired difference,
    with its 95% interval; False (and no file) when there is nothing to draw."""
    panels = [(r, [x for x in (r.diffs if diffs else r.levels)
                   if x.est is not None and (diffs or x.what == "pass@1")]) for r in reports]
    panels = [(r, rows) for r, rows in panels if rows]
    if not panels:
        return False
    what = "paired differences (pt)" if diffs else "pass@1 (%)"
    fig, axes = _panels(len(panels), f"Study: {what}, 95% intervals (bootstrap over seeds, "
                        "then problems)")
    for ax, (rep, rows) in zip(axes, panels, strict=True):
        y = list(range(len(rows)))[::-1]
        mean = [100 * r.est.mean for r in rows]
        err = [[100 * (r.est.mean - r.est.lo) for r in rows],
               [100 * (r.est.hi - r.est.mean) for r in rows]]
        colors = ["firebrick" if diffs and r.est.distinguishable else "black" for r in rows]
        for yi, m, lo, hi, c in zip(y, mean, *err, colors, strict=True):
            ax.errorbar([m], [yi], xerr=[[lo], [hi]], fmt="o", color=c, capsize=3, ms=4)
        ax.set_yticks(y, [f"{r.label}\n{r.seeds} seeds, {r.problems:,} × {r.samples}"
                          for r in rows], fontsize=7)
        if diffs:
            ax.axvline(0, color="gray", lw=1, ls="--")
        ax.set(title=f"{rep.model}\n{rep.source}", xlabel=what)
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path, dpi)
    plt.close(fig)
    return True


def make_study_report(study_dir: Path, window: int = 2, dpi: int = 150,
                      note: str = "") -> list[Path]:
    """The report of a run_study.py study: DIR/results.md and the figures in DIR (from the runs
    under DIR/runs and the final evaluations under DIR/evals)."""
    _NOTE["text"] = note
    runs, skipped, warnings = _load_runs(study_dir / "runs", study_dir)
    # a run without DONE stopped early (or still runs): its last eval is no final one
    unfinished = [r for r in runs if r.path is not None and not (r.path / "DONE").is_file()]
    runs = [r for r in runs if r not in unfinished]
    warnings = [*warnings, *((r.name, "not finished (no DONE): left out of the study's "
                              "numbers") for r in unfinished)]
    if not runs:
        raise PlotError(f"no finished run under '{study_dir / 'runs'}' yet")
    training, final = study_reports(runs, study_dir)
    command = f"python plot_results.py --study {study_dir}"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        plot_training_curves(runs, window, t / FIGURES[0], dpi)
        for name, diffs in zip(STUDY_FIGURES, (False, True), strict=True):
            if not plot_study_intervals(final or training, t / name, dpi, diffs=diffs):
                (study_dir / name).unlink(missing_ok=True)  # it would disagree with results.md
        name = study_dir.resolve().name
        md = study_markdown(name, training, final, len(runs), command) + "\n" + \
            results_markdown(runs, skipped, study_dir / "runs", warnings, command) \
            .replace("# Results", "# Training curves, eval by eval", 1)
        (t / "results.md").write_text(f"> {note}\n\n{md}" if note else md)
        return _publish(t, study_dir)
