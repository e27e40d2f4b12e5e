"""run_study.py end to end on CPU: a tiny-model grid (2 objectives x 2 seeds, HF engine,
--gpus none --parallel 2) with its report; the same grid with the runner SIGKILLed mid-study and
re-run ends with every run's metrics identical to the uninterrupted study, and runs nothing
twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

import run_study
from rlvr import run_dir as rd
from rlvr.results import read_runs

pytestmark = pytest.mark.slow

RUNS = ["tiny_model_NSR_s1", "tiny_model_NSR_s2", "tiny_model_PSR_s1", "tiny_model_PSR_s2"]


def study_cmd(model_dir, data_dir, study_dir, *extra) -> list[str]:
    return [sys.executable, str(REPO / "run_study.py"), "--models", str(model_dir),
            "--objectives", "NSR", "PSR", "--seeds", "1", "2", "--gpus", "none", "--parallel",
            "2", "--study_dir", str(study_dir), "--name", "tiny", "--status_every", "1000",
            *extra, "--", "--backend", "hf", "--n_train_steps", "2", "--rollout_batch_size",
            "4", "--max_tokens", "8", "--eval_limit", "4", "--eval_n", "2", "--eval_every", "1",
            "--grader_workers", "1", "--max_prompt_tokens", "600", "--save_every", "1",
            "--data_dir", str(data_dir)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    link = tmp_path_factory.mktemp("models") / "tiny_model"  # a name for the runs
    link.symlink_to(tiny_model_dir)
    return link


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tiny_data_dir, tmp_path_factory):
    study = tmp_path_factory.mktemp("studies") / "a"
    proc = subprocess.run(study_cmd(model_dir, tiny_data_dir, study), capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return study, proc


def metrics(run_dir) -> list[dict]:
    """Every logged number except timings and memory, which no two runs share."""
    return [{k: v for k, v in json.loads(line).items()
             if not k.startswith(("time/", "perf/", "mem/"))}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_grid_runs_end_to_end_with_its_report(uninterrupted, capsys):
    study, proc = uninterrupted
    assert all(rd.run_state(study / "runs" / r) == "done" for r in RUNS)
    cfg = json.loads((study / "runs" / RUNS[2] / "config.json").read_text())
    assert cfg["study"] == "tiny" and cfg["study_axes"]["objective"] == "PSR"
    assert cfg["study_axes"]["seed"] == 1 and cfg["seed"] == 1
    problems = [json.loads(x) for x in
                (study / "runs" / RUNS[0] / "eval_problems.jsonl").read_text().splitlines()]
    assert sorted({p["step"] for p in problems}) == [0, 1, 2] and len(problems) == 3 * 4
    assert all(p["n"] == 2 and 0 <= p["correct"] <= 2 for p in problems)
    assert (study / "logs" / f"{RUNS[0]}.log").read_text().count("step 2/2") == 1
    md = (study / "results.md").read_text()
    assert "tiny_model: NSR − PSR = " in md and "(2 seeds, 4 problems × 2 samples;" in md
    assert "tiny_model: PSR − base = " in md
    for fig in ("training_curves_smoothed.png", "study_final.png", "study_differences.png"):
        assert (study / fig).stat().st_size > 10_000
    assert f"report: {study / 'results.md'}" in proc.stdout
    runs, skipped, _ = read_runs(study / "runs")
    assert not skipped and sorted(r.method for r in runs) == ["NSR", "NSR", "PSR", "PSR"]
    assert run_study.main(["--status", str(study)]) == 0
    assert "4/4 done, 0 failed" in capsys.readouterr().out


def test_a_killed_runner_loses_nothing_and_runs_nothing_twice(uninterrupted, model_dir,
                                                             tiny_data_dir, tmp_path):
    """The uninterrupted study's directory with one run never started: re-running its command
    skips the three finished runs, and SIGKILLed while the fourth trains, then re-run, ends
    with that run's metrics as in the uninterrupted study."""
    study = tmp_path / "b"
    shutil.copytree(uninterrupted[0], study, symlinks=True)
    todo = study / "runs" / RUNS[3]
    shutil.rmtree(todo)
    shutil.rmtree(study / "logs")
    (study / "attempts.jsonl").unlink()
    cmd = study_cmd(model_dir, tiny_data_dir, study, "--no_report")
    runner = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (todo / "READY").is_file():
        time.sleep(0.05)
    os.kill(runner.pid, signal.SIGKILL)  # no handler, no clean-up: only the kernel's
    runner.wait()
    assert rd.run_state(todo) != "done"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"start {todo.name} on cpu (--resume)" in again.stdout
    for r in RUNS:
        assert metrics(study / "runs" / r) == metrics(uninterrupted[0] / "runs" / r), r
    problems = [(d / "runs" / todo.name / "eval_problems.jsonl").read_text()
                for d in (study, uninterrupted[0])]
    assert problems[0] == problems[1]  # the per-problem records resumed with the metrics
    starts = [json.loads(x)["job"] for x in (study / "attempts.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "start"]
    assert starts == [todo.name, todo.name]  # the finished runs never ran again
