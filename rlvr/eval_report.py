"""evaluate.py's output directory: samples.jsonl I/O, summary.json, results.md and pass@k curves.

Every number in summary.json, results.md and the figure is recomputed from samples.jsonl with
`rlvr.evaluation.summarize_records`, so the three always agree with the raw samples.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rlvr.evaluation import ks_for, summarize_records

SAMPLES, SUMMARY, RESULTS = "samples.jsonl", "summary.json", "results.md"
CONFIG, TIMING, FIGURE = "eval_config.json", "timing.jsonl", "pass_at_k_curves.png"
DECIMALS = 1  # printed precision of percentages, as rlvr/results.py
EVALS_HEADING = "# Evaluations (evaluate.py)"


class ReportError(Exception):
    """A problem with an output directory, reported as one `error:` line."""


# ----------------------------------------------------------------------------- samples.jsonl


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append whole lines in one write, flushed to disk: a kill leaves at most one torn line."""
    if not records:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(records, torn): a last line without its newline (a write cut short) is dropped and
    reported as torn; a malformed line anywhere else is an error."""
    if not path.is_file():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines[-1] != ""  # text after the last newline was never completed
    records = []
    for i, line in enumerate(lines[:-1], 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{i}: malformed JSON ({e.msg}); delete that line (its "
                                  "problem is redone on the next run)") from None
    return records, torn


def repair_samples(path: Path, n: int, dry_run: bool = False) -> tuple[list[dict], int]:
    """Keep only whole problems (samples 0..n-1, each once) and rewrite the file if anything else
    is there (a torn last line, a chunk cut short, duplicates); returns (records, lines dropped).
    `dry_run` only reports.

    Chunks are appended whole, so only an interrupted write leaves a partial problem behind."""
    records, torn = read_jsonl(path)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["dataset"], r["problem_id"]), []).append(r)
    kept = []
    for group in groups.values():
        if sorted(r["sample"] for r in group) == list(range(n)):
            kept.extend(sorted(group, key=lambda r: r["sample"]))
    dropped = len(records) - len(kept)
    if (dropped or torn) and not dry_run:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                       encoding="utf-8")
        os.replace(tmp, path)
    return kept, dropped + torn


def done_problems(records: list[dict]) -> set[tuple[str, str, str]]:
    return {(r["model"], r["dataset"], r["problem_id"]) for r in records}


# ----------------------------------------------------------------------------- eval_config.json


def merge_config(out: Path, new: dict) -> dict:
    """The configuration of `out` after this run: protocol, datasets and models must agree with
    what is already there (datasets and models may be added)."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a directory; pass another --out")
    if not (out / CONFIG).is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ReportError(f"--out {out} exists and is not an evaluate.py output directory; "
                              "pass a new or empty --out")
        return new
    old = json.loads((out / CONFIG).read_text())
    diffs = [f"--{k} {old['protocol'].get(k)!r} -> {v!r}" for k, v in new["protocol"].items()
             if old["protocol"].get(k) != v]
    diffs += [f"dataset {d} (other problems or gold answers)" for d, v in new["datasets"].items()
              if d in old["datasets"] and old["datasets"][d]["problems_sha256"]
              != v["problems_sha256"]]
    diffs += [f"model {m} ({old['models'][m]['model_id']} -> {v['model_id']}, or its files "
              "changed)" for m, v in new["models"].items() if m in old["models"]
              and (old["models"][m]["path"], old["models"][m]["fingerprint"])
              != (v["path"], v["fingerprint"])]
    if diffs:
        raise ReportError(f"--out {out} holds an evaluation with another configuration: "
                        + "; ".join(diffs) + " (choose another --out)")
    return {"protocol": old["protocol"], "datasets": {**old["datasets"], **new["datasets"]},
            "models": {**old["models"], **new["models"]}}


def write_config(out: Path, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, out / CONFIG)


# ----------------------------------------------------------------------------- summary.json


def _timing(out: Path) -> dict:
    """Per model x dataset: generation and grading time summed over the (resumed) segments."""
    lines, _ = read_jsonl(out / TIMING)
    agg: dict[str, dict[str, dict]] = {}
    for t in lines:
        a = agg.setdefault(t["model"], {}).setdefault(t["dataset"], {})
        for key in ("problems", "samples", "tokens", "gen_s", "grade_s", "grade_wait_s",
                    "wall_s", "grade_timeouts"):
            a[key] = a.get(key, 0) + t.get(key, 0)
        # samples with a \boxed{} answer, the only ones math-verify sees (None: not recorded)
        a["graded"] = (a.get("graded", 0) + t["graded"]
                       if "graded" in t and a.get("graded", 0) is not None else None)
        a["segments"] = a.get("segments", 0) + 1
    for per in agg.values():
        for a in per.values():
            a["gen_tokens_per_s"] = a["tokens"] / a["gen_s"] if a["gen_s"] else None
            a["samples_per_s"] = a["samples"] / a["wall_s"] if a["wall_s"] else None
            # grading's own rate (busy time of the grader) over the samples it graded;
            # generation never waits on it unless grade_wait_s says so
            a["graded_samples_per_s"] = (a["graded"] / a["grade_s"]
                                         if a["graded"] and a["grade_s"] else None)
    return agg


def build_summary(out: Path, config: dict) -> dict:
    """summary.json's content: results recomputed from samples.jsonl, completeness, timing.
    Only whole problems count (a directory still being written, or cut short, has others)."""
    records, _ = repair_samples(out / SAMPLES, config["protocol"]["n"], dry_run=True)
    results = summarize_records(records)
    done: dict[tuple[str, str], int] = {}
    for model, dataset, _pid in done_problems(records):
        done[(model, dataset)] = done.get((model, dataset), 0) + 1
    status = {m: {d: {"problems_done": done.get((m, d), 0), "problems_total": info["n_problems"]}
                  for d, info in config["datasets"].items()} for m in config["models"]}
    return {"protocol": config["protocol"], "results": results, "status": status,
            "timing": _timing(out)}


def write_summary(out: Path, config: dict) -> dict:
    summary = build_summary(out, config)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / SUMMARY)
    return summary


# ----------------------------------------------------------------------------- tables


def _pct(x: float | None, se: float | None = None) -> str:
    if x is None:
        return "–"
    text = f"{100 * x:.{DECIMALS}f}"
    return text if se is None or math.isnan(se) else f"{text} ± {100 * se:.{DECIMALS}f}"


def _ks(metrics: dict) -> list[int]:
    return ks_for(int(metrics["n_samples_per_problem"]))


def _rows(summary: dict, dataset: str) -> tuple[list[str], list[list[str]]]:
    """Header and one row per model of one dataset: pass@k ± SE for every k, then rates."""
    models = [m for m in summary["results"] if dataset in summary["results"][m]]
    ks = sorted({k for m in models for k in _ks(summary["results"][m][dataset])})
    header = ["model", "problems × samples"] + [f"pass@{k}" for k in ks] + [
        "no box", "truncated", "mean tokens"]
    rows = []
    for m in models:
        r = summary["results"][m][dataset]
        st = summary.get("status", {}).get(m, {}).get(dataset)
        probs = f"{int(r['n_problems'])} × {int(r['n_samples_per_problem'])}"
        if st and st["problems_done"] < st["problems_total"]:
            probs += f" (partial: {st['problems_done']} of {st['problems_total']} problems)"
        rows.append([m, probs] + [_pct(r.get(f"pass@{k}"), r.get(f"pass@{k}_se")) for k in ks]
                    + [_pct(r["no_box_frac"]), _pct(r["truncated_frac"]),
                       f"{r['response_len']:.0f}"])
    return header, rows


def _datasets(summary: dict) -> list[str]:
    seen: dict[str, None] = {}
    for per in summary["results"].values():
        seen.update(dict.fromkeys(per))
    return list(seen)


def format_summary_table(summary: dict) -> str:
    """Plain-text tables (one per dataset) for the terminal; pass rates in %, ± 1 SE."""
    blocks = []
    for d in _datasets(summary):
        header, rows = _rows(summary, d)
        widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                 for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append(f"{d} (pass rates in %, ± 1 SE over problems)\n" + "\n".join(lines))
    timing = [f"  {m} / {d}: {t['samples']} samples in {t['wall_s'] / 60:.1f} min, generation "
              f"{t['gen_tokens_per_s'] or 0:.0f} tok/s, {_grading_rate(t)}, generation held "
              f"back {t['grade_wait_s']:.1f} s, {t['grade_timeouts']} grading timeouts"
              for m, per in summary.get("timing", {}).items() for d, t in per.items()]
    if timing:
        blocks.append("timing (all segments of this output directory)\n" + "\n".join(timing))
    return "\n\n".join(blocks) if blocks else "(no samples)"


def _grading_rate(t: dict) -> str:
    """What grading did: its rate over the samples it graded, or that there were none."""
    if t.get("graded") == 0:
        return "nothing graded (no sample has a \\boxed{} answer)"
    if t.get("graded_samples_per_s") is None:
        return "grading rate not recorded"
    return f"grading {t['graded_samples_per_s']:.0f} samples/s ({t['graded']} with a box)"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _breakdown(summary: dict, dataset: str, what: str) -> list[str]:
    """pass@1 per level or per subject of one MATH set (nothing for AIME/AMC, which have none)."""
    res = {m: per[dataset] for m, per in summary["results"].items() if dataset in per}

    def wanted(key: str) -> bool:
        if not key.startswith("pass@1/"):
            return False
        return key.startswith("pass@1/level_") == (what == "level")

    keys = sorted({k for r in res.values() for k in r if wanted(k)})
    if not keys:
        return []
    header = ["model"] + [k.removeprefix("pass@1/") for k in keys]
    return _md_table(header, [[m] + [_pct(r.get(k)) for k in keys] for m, r in res.items()])


def results_markdown(summary: dict, figure: str | None = None, title: str = "# Evaluation") -> str:
    """results.md: protocol, the pass@k table of every dataset, per-level and per-subject pass@1."""
    p = summary["protocol"]
    out = [title, "",
           f"Generated from samples.jsonl: {p['n']} samples per problem at temperature "
           f"{p['temperature']}, top-p {p['top_p']}, {p['max_tokens']} new tokens, prompt style "
           f"`{p['prompt_style']}`. Pass rates in %, mean over problems ± 1 standard error over "
           "problems; pass@k is the unbiased estimator.", ""]
    if figure:
        out += [f"![pass@k curves]({figure})", ""]
    for d in _datasets(summary):
        out += [f"## {d}", ""] + _md_table(*_rows(summary, d))
        for what in ("level", "subject"):
            if table := _breakdown(summary, d, what):
                out += [f"pass@1 by {what} (%):", ""] + table
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- several dirs


def read_eval_dir(d: Path) -> dict:
    """The summary of one evaluate.py output directory, recomputed from its samples."""
    d = Path(d)
    if not (d / CONFIG).is_file():
        raise ReportError(f"'{d}' is not an evaluate.py output directory (no {CONFIG}); pass "
                          "--evals the --out directories of evaluate.py")
    return build_summary(d, json.loads((d / CONFIG).read_text()))


def _curves(summaries: list[tuple[str, dict]]) -> dict[str, dict[str, tuple]]:
    """{dataset: {legend name: (ks, means, ses)}}; a model evaluated in several directories gets
    the directory's name appended, so its lines stay apart."""
    count: dict[str, int] = {}
    for _, s in summaries:
        for m in s["results"]:
            count[m] = count.get(m, 0) + 1
    out: dict[str, dict[str, tuple]] = {}
    for name, s in summaries:
        for m, per in s["results"].items():
            label = m if count[m] == 1 else f"{m} [{name}]"
            for d, r in per.items():
                ks = _ks(r)
                out.setdefault(d, {})[label] = (
                    ks, [100 * r[f"pass@{k}"] for k in ks],
                    [100 * r.get(f"pass@{k}_se", 0.0) for k in ks])
    return out


def _eval_size(summaries: list[tuple[str, dict]], dataset: str) -> str:
    """How big the evaluation of a dataset was: problems x samples (each model's, if they
    differ), so that a 0 % from 8 x 2 does not read like one from 500 x 256."""
    sizes = dict.fromkeys(f"{int(per[dataset]['n_problems'])} problems × "
                          f"{int(per[dataset]['n_samples_per_problem'])} samples"
                          for _, s in summaries for per in s["results"].values()
                          if dataset in per)
    return "; ".join(sizes)


def pass_at_k_figure(summaries: list[tuple[str, dict]], note: str = ""):
    """The figure of `plot_pass_at_k_curves` (a matplotlib Figure), or None with nothing to
    draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(summaries)
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(max(6.0, 4.6 * len(curves) + 0.8), 4.6),
                             squeeze=False, layout="constrained")
    fig.suptitle("pass@k vs k (unbiased estimator) · band: ±1 SE over problems", fontsize=11)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(n for per in curves.values() for n in per))
    for ax, (dataset, per) in zip(axes[0], curves.items(), strict=True):
        for name, (ks, y, se) in per.items():
            c = colors[names.index(name) % len(colors)]  # a model keeps its colour in every panel
            ax.plot(ks, y, color=c, marker="o", ms=3.5, lw=1.8, label=name)
            ax.fill_between(ks, [max(0.0, a - b) for a, b in zip(y, se, strict=True)],
                            [min(100.0, a + b) for a, b in zip(y, se, strict=True)],
                            color=c, alpha=0.15, lw=0)
        ks_all = sorted({k for ks, _, _ in per.values() for k in ks})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.minorticks_off()
        ax.set(title=f"{dataset}: {_eval_size(summaries, dataset)}", ylabel="pass@k (%)",
               xlabel="k (samples per problem, log2 scale)")
        lo, hi = ax.get_ylim()
        lo, hi = max(0.0, lo), min(100.0, max(hi, max(0.0, lo) + 2.0))
        # a little room below 0 %, so that a line of zeros is drawn above the axis, not on it
        ax.set_ylim(lo - 0.03 * (hi - lo) if lo == 0.0 else lo, hi)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a model missing from the first panel still gets its entry
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3),
               fontsize=9, frameon=False)
    if note:
        fig.text(0.005, 0.005, note, fontsize=8, color="firebrick", ha="left", va="bottom")
    return fig


def plot_pass_at_k_curves(summaries: list[tuple[str, dict]], path: Path, dpi: int = 150,
                          note: str = "") -> bool:
    """pass@k vs k (log2 axis), one panel per dataset titled with its problems x samples, one
    line per model, ±1 SE band over problems. `note` is a footer (e.g. to mark random-weight or
    synthetic data). False and no file when there is nothing to draw."""
    fig = pass_at_k_figure(summaries, note)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def add_evals_to_report(eval_dirs: list[Path], out: Path, note: str = "",
                        dpi: int = 150) -> list[Path]:
    """For plot_results.py --evals: draw eval_pass_at_k.png into `out` and append a section with
    each directory's tables to out/results.md. ReportError (one line) on an unusable dir."""
    summaries = [(Path(d).name, read_eval_dir(Path(d))) for d in eval_dirs]
    out.mkdir(parents=True, exist_ok=True)
    fig = out / "eval_pass_at_k.png"
    drew = plot_pass_at_k_curves(summaries, fig, dpi, note)
    section = ["", EVALS_HEADING, ""]
    if drew:
        section += [f"![pass@k curves]({fig.name})", ""]
    for (name, s), d in zip(summaries, eval_dirs, strict=True):
        md = results_markdown(s, title=f"## `{name}`").replace("\n## ", "\n### ")
        section += [md.replace(f"## `{name}`", f"## `{name}` ({d})", 1)]
    md_path = out / RESULTS
    old = md_path.read_text() if md_path.is_file() else (f"> {note}\n" if note else "")
    old = old.split(f"\n{EVALS_HEADING}\n")[0]  # a second run replaces its section
    md_path.write_text(old.rstrip("\n") + "\n" + "\n".join(section).rstrip("\n") + "\n")
    return [fig, md_path] if drew else [md_path]
