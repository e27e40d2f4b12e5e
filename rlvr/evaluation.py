"""Evaluation metrics: unbiased pass@k and per-subject / per-level summaries of sampled answers.

Pure functions over 0/1 scores; generating and grading the samples happens elsewhere.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from statistics import fmean, stdev


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al., 2021), which never forms the
    huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list[int]:
    """The k of pass@k reported for n samples per problem: 1, 2, 4, ... <= n, and n itself.

    n is always included so that the right end of a pass@k curve is the whole sample budget
    (pass@6 for n = 6), as in the paper's curves up to pass@256.
    """
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def _se(values: list[float]) -> float:
    """Standard error of the mean over problems (0 for a single problem)."""
    return stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def subject_slug(subject: str) -> str:
    """Metric-name-safe subject: "Counting & Probability" -> "counting_and_probability"."""
    slug = subject.lower().replace("&", " and ")
    return re.sub(r"[^a-z0-9]+", "_", slug).strip("_")


def summarize_eval(
    correct: list[list[float]], subjects: list[str | None], levels: list[int | None]
) -> dict[str, float]:
    """Summary metrics of an evaluation; `correct[i]` holds the 0/1 scores of problem i's samples.

    Every problem must have the same number of samples n. pass@1 is the mean over problems of the
    per-problem accuracy; pass@1_se is its standard error over problems (the sampling noise of the
    problem set, which is what matters when comparing runs); pass@k uses the unbiased estimator
    per problem and pass@k_se is the standard error of those per-problem estimates. Problems whose
    subject is None (AIME, AMC: no subject or level metadata) count in every overall metric but
    in no per-subject or per-level group.
    """
    n_problems = len(correct)
    if n_problems == 0:
        raise ValueError("no problems to summarise")
    if len(subjects) != n_problems or len(levels) != n_problems:
        raise ValueError(
            f"{n_problems} problems but {len(subjects)} subjects and {len(levels)} levels"
        )
    n = len(correct[0])
    if n == 0 or any(len(scores) != n for scores in correct):
        raise ValueError("every problem needs the same, non-zero number of samples")

    accuracy = [fmean(scores) for scores in correct]
    n_correct = [round(sum(scores)) for scores in correct]
    out: dict[str, float] = {"pass@1": fmean(accuracy), "pass@1_se": _se(accuracy)}
    for k in ks_for(n)[1:]:  # pass@1 is above, exactly the mean accuracy
        per_problem = [pass_at_k(n, c, k) for c in n_correct]
        out[f"pass@{k}"] = fmean(per_problem)
        out[f"pass@{k}_se"] = _se(per_problem)

    groups: defaultdict[str, list[float]] = defaultdict(list)
    for acc, subject, level in zip(accuracy, subjects, levels, strict=True):
        if subject is None:
            continue
        groups[f"pass@1/{subject_slug(subject)}"].append(acc)
        groups["pass@1/level_" + ("unknown" if level is None else str(level))].append(acc)
    for key in sorted(groups):
        out[key] = fmean(groups[key])

    out["n_problems"] = n_problems
    out["n_samples_per_problem"] = n
    return out


def _k_of(key: str) -> int | None:
    match = re.fullmatch(r"pass@(\d+)", key)
    return int(match.group(1)) if match else None


def format_eval_table(history: list[tuple[int, dict]]) -> str:
    """Plain-text table of `(step, summarize_eval(...))` pairs, one row per evaluation."""
    if not history:
        return "(no evaluations)"
    ks = sorted({k for _, m in history for key in m if (k := _k_of(key)) is not None and k > 1})
    header = ["step", "pass@1 ± se"] + [f"pass@{k}" for k in ks]
    rows = []
    for step, metrics in history:
        p1 = metrics.get("pass@1")
        cell = "-" if p1 is None else f"{p1:.4f} ± {metrics.get('pass@1_se', 0.0):.4f}"
        row = [str(step), cell]
        row += [f"{metrics[f'pass@{k}']:.4f}" if f"pass@{k}" in metrics else "-" for k in ks]
        rows.append(row)
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))

    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- per-sample records

# One line of evaluate.py's samples.jsonl, and what `rlvr.eval_run.run_eval` returns per sample.
RECORD_KEYS = ("model", "dataset", "problem_id", "sample", "subject", "level", "gold", "score",
               "extracted", "response_tokens", "finish_reason", "response")


def summarize_samples(records: list[dict]) -> dict[str, float]:
    """Metrics of one model x dataset from its per-sample records (see `summarize_records`)."""
    by_problem: dict[str, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r)
    correct, subjects, levels = [], [], []
    for pid, group in by_problem.items():
        group.sort(key=lambda r: r["sample"])
        if [r["sample"] for r in group] != list(range(len(group))):
            raise ValueError(f"problem {pid}: samples {[r['sample'] for r in group]} are not "
                             f"0..{len(group) - 1} exactly once")
        correct.append([float(r["score"]) for r in group])
        subjects.append(group[0].get("subject"))
        levels.append(group[0].get("level"))
    out = summarize_eval(correct, subjects, levels)
    out["n_samples"] = len(records)
    out["no_box_frac"] = fmean(r["extracted"] is None for r in records)
    out["truncated_frac"] = fmean(r["finish_reason"] == "length" for r in records)
    out["response_len"] = fmean(r["response_tokens"] for r in records)
    return out


def summarize_records(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {dataset: metrics}} from per-sample records (the lines of samples.jsonl).

    A pure function of the records, order-insensitive (fmean and stdev sum exactly), so the
    summary.json that evaluate.py writes can be recomputed from samples.jsonl and compared.
    Metrics are `summarize_eval`'s plus n_samples, no_box_frac (no `\\boxed{}` found),
    truncated_frac (stopped by the token limit) and response_len (mean tokens).
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (model, dataset), recs in groups.items():
        out.setdefault(model, {})[dataset] = summarize_samples(recs)
    return out


# One line of a run's eval_problems.jsonl (with the eval's "step"), and what the study report
# reads from evaluate.py's samples.jsonl: the same function makes both.
EVAL_PROBLEMS_FILE = "eval_problems.jsonl"  # beside metrics.jsonl
PROBLEM_KEYS = ("model", "dataset", "problem_id", "subject", "level", "n", "correct")


def problem_results(records: list[dict]) -> list[dict]:
    """Per-problem results of per-sample records (RECORD_KEYS): model, dataset, problem_id,
    subject, level, n (samples) and correct (samples scored 1), one per model x dataset x
    problem, in the records' order."""
    out: dict[tuple, dict] = {}
    for r in records:
        key = (r["model"], r["dataset"], r["problem_id"])
        if key not in out:
            out[key] = {"model": r["model"], "dataset": r["dataset"],
                        "problem_id": r["problem_id"], "subject": r.get("subject"),
                        "level": r.get("level"), "n": 0, "correct": 0}
        out[key]["n"] += 1
        out[key]["correct"] += round(float(r["score"]))
    return list(out.values())
