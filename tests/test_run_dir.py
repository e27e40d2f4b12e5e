"""A run directory is claimed atomically, locked for the run's life and marked DONE last
(rlvr/run_dir.py), and MATH_experiment.py claims it before anything loads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from rlvr import run_dir as rd


@pytest.fixture(autouse=True)
def quick_refusals(monkeypatch):
    monkeypatch.setattr(rd, "CLAIM_RETRY_S", 0.1)  # a refusal waits this long for the lock


def test_two_claims_at_once_give_one_run(tmp_path):
    run = tmp_path / "runs" / "r"
    results, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        try:
            results.append(rd.claim_run_dir(run, resume=False))
        except rd.RunDirError as e:
            results.append(str(e))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claims = [r for r in results if isinstance(r, rd.Claim)]
    assert len(claims) == 1, results
    assert all("in use by a live run" in r or "already exists" in r for r in results
               if isinstance(r, str))
    assert rd.run_state(run) == "running"
    claims[0].release()
    # nothing written: nothing left, no claim's temporary directory either (the parent stays
    # when a losing claim made it: it may be another run's output directory by then)
    assert not run.exists() and not (run.parent.exists() and any(run.parent.iterdir()))


def test_a_live_run_refuses_a_second_one_and_a_resume(tmp_path):
    run = tmp_path / "r"
    with rd.claim_run_dir(run, resume=False) as claim:
        (run / "config.json").write_text("{}")
        for resume in (False, True):
            with pytest.raises(rd.RunDirError, match="in use by a live run .pid "):
                rd.claim_run_dir(run, resume=resume)
        claim.mark_ready()
    assert rd.run_state(run) == "resume"  # it wrote something: kept, and continuable
    with rd.claim_run_dir(run, resume=True) as again:
        assert not (run / rd.READY).exists()  # a resumed run is READY again only when it is
        again.mark_done(7)
    assert rd.run_state(run) == "done" and rd.read_marker(run, rd.DONE)["step"] == 7
    with pytest.raises(rd.RunDirError, match="already exists; pass --resume"):
        rd.claim_run_dir(run, resume=False)
    with rd.claim_run_dir(run, resume=True):
        assert rd.run_state(run) == "running"  # DONE goes until the continued run ends
    assert not (run / rd.DONE).exists()


def test_a_start_killed_before_its_first_file_does_not_block_a_plain_rerun(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / rd.LOCK).write_text("12345 elsewhere\n")  # what SIGKILL right after the claim leaves
    assert rd.run_state(run) == "new"
    with rd.claim_run_dir(run, resume=False):
        assert (run / rd.LOCK).read_text().split()[0] != "12345"


@pytest.mark.parametrize("where", ["below_a_file", "a_file"])
def test_an_unusable_output_dir_is_one_line(tmp_path, where):
    (tmp_path / "f").write_text("x")
    run = tmp_path / "f" / "runs" / "r" if where == "below_a_file" else tmp_path / "f" / "r"
    with pytest.raises(rd.RunDirError, match="--output_dir .* (Not a directory|is not a "
                                             "directory)") as e:
        rd.claim_run_dir(run, resume=False)
    assert "\n" not in str(e.value)


def test_resume_needs_a_config(tmp_path):
    with pytest.raises(rd.RunDirError, match="nothing to resume"):
        rd.claim_run_dir(tmp_path / "r", resume=True)


# ----------------------------------------------------------------------------- MATH_experiment


def _cfg(tmp_path: Path, *extra: str):
    from rlvr.config import parse_config

    return parse_config(["--backend", "hf", "--model_id", str(tmp_path), "--output_dir",
                         str(tmp_path / "runs"), "--exp_name", "e", *extra])


def _no_loading(monkeypatch):
    import rlvr.experiment

    def build(cfg):
        raise AssertionError("the run loaded its inputs before claiming its directory")

    monkeypatch.setattr(rlvr.experiment, "build", build)


def test_experiment_refuses_a_live_run_directory_before_loading(tmp_path, monkeypatch, capsys):
    """Two runs with one --exp_name: the second is refused in one line, exit 2, and loads
    nothing (the check used to run after the model load, and both wrote one metrics.jsonl)."""
    from rlvr.experiment import run

    _no_loading(monkeypatch)
    cfg = _cfg(tmp_path)
    with rd.claim_run_dir(cfg.run_dir, resume=False):
        with pytest.raises(SystemExit) as e:
            run(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by a live run" in err[0]


def test_experiment_refuses_an_unwritable_output_dir_before_loading(tmp_path, monkeypatch,
                                                                     capsys):
    from rlvr.experiment import run

    _no_loading(monkeypatch)
    (tmp_path / "runs").write_text("a file where the runs should go")
    with pytest.raises(SystemExit) as e:
        run(_cfg(tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output_dir {tmp_path / 'runs'} is not a directory"]


def test_experiment_claims_first_and_removes_what_a_failed_start_left(tmp_path, monkeypatch):
    """A run that fails before writing anything leaves no directory that blocks a re-run."""
    import rlvr.experiment

    seen = {}

    def build(cfg):
        seen["state"] = rd.run_state(cfg.run_dir)  # claimed by now
        raise SystemExit("error: the data is missing")

    monkeypatch.setattr(rlvr.experiment, "build", build)
    cfg = _cfg(tmp_path)
    with pytest.raises(SystemExit):
        rlvr.experiment.run(cfg)
    assert seen["state"] == "running"
    assert not (tmp_path / "runs").exists()


def test_plan_json_is_one_object_with_the_runs_settings(tmp_path, capsys, tiny_model_dir):
    """`--dry_run --plan_json`, what run_study.py asks: settings, plan (none without a budget)
    and whether the model loads; a model that cannot fit reports why."""
    from rlvr.run_plan import dry_run

    cfg = _cfg(tmp_path, "--dry_run", "--plan_json", "--lr", "2e-6")
    cfg = type(cfg)(**{**cfg.to_json(), "model_id": str(tiny_model_dir)})
    assert dry_run(cfg) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["lr"] == 2e-6 and out["plan"] is None and out["model_error"] is None
    cfg = type(cfg)(**{**cfg.to_json(), "gpu_memory_gb": 40.0})
    dry_run(cfg)
    out = json.loads(capsys.readouterr().out)
    peak = out["plan"]["planned_peak_gib"]
    assert 0 < peak <= 40.0
    assert "planned peak" in out["plan"]["table"]
    cfg = type(cfg)(**{**cfg.to_json(), "gpu_memory_gb": 0.01})
    dry_run(cfg)
    assert "needs >=" in json.loads(capsys.readouterr().out)["plan"]["error"]
    cfg = type(cfg)(**{**cfg.to_json(), "model_id": str(tmp_path / "x")})
    dry_run(cfg)
    assert "does not exist" in json.loads(capsys.readouterr().out)["model_error"]


def test_a_resume_keeps_eval_problems_consistent_with_metrics(tmp_path):
    """What a process killed after its step-3 eval logged, past its step-2 checkpoint, goes from
    both files on --resume, a line torn by the kill too."""
    from rlvr.tracking import RunLogger

    dead = RunLogger(tmp_path)
    for step in range(4):
        dead.problems(step, [{"problem_id": f"p{i}", "n": 2, "correct": 1} for i in range(3)])
        dead.log(step, {"eval/pass@1": 0.5})
    dead.close()
    with open(tmp_path / "eval_problems.jsonl", "a") as f:
        f.write('{"step": 4, "problem_id": "p0", "n"')  # torn
    RunLogger(tmp_path, resume_step=2).close()
    for name in ("eval_problems.jsonl", "metrics.jsonl"):
        steps = [json.loads(x)["step"] for x in (tmp_path / name).read_text().splitlines()]
        assert max(steps) == 2 and steps == sorted(steps), name
    assert len((tmp_path / "eval_problems.jsonl").read_text().splitlines()) == 9
