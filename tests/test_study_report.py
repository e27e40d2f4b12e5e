"""The report of a study (rlvr/study_report.py, plot_results.py --study) on synthetic records
with a known effect, grouping runs by the settings they record, and how big each eval was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import plot_results
from rlvr import plotting, results
from rlvr.evaluation import problem_results
from rlvr.study_report import read_final_evals, read_run_evals

P, N = 200, 4  # problems, samples per problem


def config(objective: str, seed: int, **kw) -> dict:
    return {"model_id": "org/Tiny-0.5B", "objective": objective, "lambda_psr": 0.1,
            "seed": seed, "lr": 1e-6, "n_train_steps": 10, "eval_every": 10, "eval_n": N,
            "exp_name": f"{objective}_s{seed}", "output_dir": "x", "study": "t",
            "study_axes": {"objective": objective, "seed": seed}, **kw}


def write_run(study: Path, name: str, cfg: dict, scores: dict[int, np.ndarray],
              done: bool = True) -> None:
    """A run as the training loop leaves it: config.json, metrics.jsonl, eval_problems.jsonl
    (per step, per problem: n samples, correct), DONE last."""
    d = study / "runs" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if done:
        (d / "DONE").write_text("{}")
    with open(d / "metrics.jsonl", "w") as m, open(d / "eval_problems.jsonl", "w") as e:
        for step, correct in scores.items():
            m.write(json.dumps({"step": step, "eval/pass@1": float(correct.mean() / N),
                                "eval/n_problems": P, "eval/n_samples_per_problem": N}) + "\n")
            for i, c in enumerate(correct):
                e.write(json.dumps({"step": step, "model": "m", "dataset": "math_subset",
                                    "problem_id": f"p{i}", "subject": "Algebra", "level": 3,
                                    "n": N, "correct": int(c)}) + "\n")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """3 seeds of NSR (+25 pt over the base on every problem's success rate) and PSR (no
    effect); the base solves each problem with probability q_p ~ U(0.1, 0.6)."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("study")
    q = rng.uniform(0.1, 0.6, P)
    for objective, gain in (("NSR", 0.25), ("PSR", 0.0)):
        for seed in (1, 2, 3):
            write_run(d, f"{objective}_s{seed}", config(objective, seed),
                      {0: rng.binomial(N, q), 10: rng.binomial(N, q + gain)})
    # stopped at step 5 of 10: its last eval is no final one, and must not count as a seed
    write_run(d, "PSR_s4", config("PSR", 4), {0: rng.binomial(N, q), 5: np.full(P, N)},
              done=False)
    plotting.make_study_report(d, dpi=60)
    return d


def test_the_report_finds_the_known_effect_and_not_the_absent_one(study):
    md = (study / "results.md").read_text()
    lines = {ln.split(" = ")[0]: ln for ln in md.splitlines() if ln.startswith("- Tiny-0.5B")}
    nsr = lines["- Tiny-0.5B: NSR − base"]
    assert "distinguishable: NSR higher" in nsr and "(3 seeds, 200 problems × 4 samples;" in nsr
    mean, lo, hi = map(float, re.match(r".* = ([-+\d.]+) pt \[([-+\d.]+), ([-+\d.]+)\]",
                                       nsr).groups())
    assert lo < 25.0 < hi and abs(mean - 25.0) < 5  # the truth, inside
    assert "not distinguishable at this design" in lines["- Tiny-0.5B: PSR − base"]
    assert "distinguishable: NSR higher" in lines["- Tiny-0.5B: NSR − PSR"]
    assert "| NSR | pass@4 | 3 | 200 × 4 |" in md  # pass@k where n > 1
    assert "| PSR | pass@1 | 3 | 200 × 4 |" in md
    assert "`PSR_s4`: not finished (no DONE): left out of the study's numbers" in md
    for fig in ("study_final.png", "study_differences.png", "training_curves_smoothed.png"):
        assert (study / fig).is_file()


def test_in_loop_and_final_records_are_read_through_one_function(study, tmp_path):
    """evaluate.py's samples.jsonl (one line per sample) and the loop's eval_problems.jsonl (one
    per problem) give the same per-problem scores through rlvr.evaluation.problem_results."""
    evals = read_run_evals(study / "runs" / "NSR_s1")
    samples = []
    for pid, (n, c) in evals[10].items():
        dataset, problem = pid.split("/")
        samples += [{"model": "m", "dataset": dataset, "problem_id": problem, "sample": j,
                     "subject": "Algebra", "level": 3, "score": float(j < c)} for j in range(n)]
    out = tmp_path / "evals" / "NSR_s1"
    out.mkdir(parents=True)
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert read_final_evals(out) == {"math_subset": evals[10]}
    assert problem_results(samples[:N + 1])[0]["n"] == N


def test_runs_are_grouped_by_what_they_recorded(tmp_path):
    """Seeds of one setting are pooled; another lr is another group, labelled with it, never
    averaged in; a setting a resume may change (eval_limit) pools with a warning."""
    one = {0: np.array([1, 2]), 10: np.array([2, 2])}
    write_run(tmp_path, "a1", config("NSR", 1), one)
    write_run(tmp_path, "a2", config("NSR", 2, eval_limit=2), one)
    write_run(tmp_path, "b1", config("NSR", 1, lr=2e-6), one)
    write_run(tmp_path, "c1", config("PSR", 1, lambda_psr=0.7), one)  # λ: not PSR's setting
    write_run(tmp_path, "c2", config("PSR", 2), one)
    runs, _, warnings = results.read_runs(tmp_path / "runs")
    _, methods, groups = results.group_runs(runs)
    assert sorted(methods) == ["NSR [lr=1e-06]", "NSR [lr=2e-06]", "PSR [lr=1e-06]"]
    assert sorted(r.name for r in groups[("Tiny-0.5B", "NSR [lr=1e-06]")].runs) == ["a1", "a2"]
    assert [r.name for r in groups[("Tiny-0.5B", "NSR [lr=2e-06]")].runs] == ["b1"]
    assert len(groups[("Tiny-0.5B", "PSR [lr=1e-06]")].runs) == 2
    assert any("differ in eval_limit" in msg for _, msg in warnings)


def test_tables_and_figures_say_how_big_each_eval_was(study, monkeypatch):
    """'0.0 ± 0.0' from 8 problems x 2 samples must not read as certainty."""
    runs, skipped, warnings = results.read_runs(study / "runs")
    md = results.results_markdown(runs, skipped, study, warnings)
    assert md.count("Each eval: 200 problems × 4 samples.") == 2  # one per method table
    assert "Each eval: Tiny-0.5B 200 problems × 4 samples." in md
    figures = []
    monkeypatch.setattr(plotting, "_save", lambda fig, path, dpi: figures.append(fig))
    plotting.plot_training_curves(runs, 2, study / "x.png", 50)
    plotting.plot_final_comparison(runs, study / "x.png", 50)
    plotting.plot_pass_at_k(runs, study / "x.png", 50)
    size = "200 problems × 4 samples"
    assert [ax.get_title() for ax in figures[0].axes] == [f"Tiny-0.5B\neach eval: {size}"]
    assert [t.get_text() for t in figures[1].axes[0].get_xticklabels()] == [
        f"Tiny-0.5B\neach eval: {size}"]  # the bar chart: under each model's name


def test_plot_results_writes_to_results_not_the_readme_figures(tmp_path, monkeypatch, study):
    """`python plot_results.py` as a user types it must never overwrite visualizations/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(study / "runs")
    assert plot_results.main([]) == 0
    assert (tmp_path / "results" / "results.md").is_file()
    assert not (tmp_path / "visualizations").exists()
