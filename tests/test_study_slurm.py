"""run_study.py --launcher slurm against a real single-node Slurm that the test starts itself
(tests/slurm/start_local_slurm.sh; .ci/run installs slurm-wlm and munge): the grid goes out as a
job array through submitit, a task preempted mid-run (Slurm's signal to submitit, USR2) is
requeued and resumes from its checkpoint, and --status reads the same files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from rlvr import run_dir as rd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    script = str(REPO / "tests" / "slurm" / "start_local_slurm.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"a local Slurm cannot start here: {proc.stderr.strip() or proc.stdout}")
    pytest.importorskip("submitit")
    yield
    if "already up" not in proc.stdout:  # stop only what this test started
        subprocess.run(["bash", script, "stop"], capture_output=True, timeout=60)


def wait_for(what, timeout_s: float = 240.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := what():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def test_a_job_array_with_a_preempted_task_that_resumes(slurm, tiny_model_dir, tiny_data_dir,
                                                         tmp_path):
    study = tmp_path / "st"
    cmd = [sys.executable, str(REPO / "run_study.py"), "--models", str(tiny_model_dir),
           "--objectives", "NSR", "--seeds", "1", "2", "--launcher", "slurm",
           "--slurm_gpus_per_run", "0", "--slurm_cpus_per_run", "1", "--slurm_time", "30",
           "--study_dir", str(study), "--name", "sl", "--no_report", "--status_every", "1000",
           "--", "--backend", "hf", "--n_train_steps", "4", "--rollout_batch_size", "4",
           "--max_tokens", "8", "--eval_limit", "2", "--eval_n", "1", "--eval_every", "4",
           "--grader_workers", "1", "--max_prompt_tokens", "600", "--save_every", "1",
           "--data_dir", str(tiny_data_dir)]
    runner = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        name = f"{tiny_model_dir.name}_NSR_s1"
        run = study / "runs" / name

        def first_checkpoint():
            """the run's first checkpoint"""
            return (run / "checkpoints" / "step_1").is_dir() or (run / "checkpoints" /
                                                                   "step_2").is_dir()

        wait_for(first_checkpoint)
        task = json.loads((study / "slurm" / "jobs.json").read_text())[name]
        subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=60)

        def requeued():
            """the preempted task back in the queue"""
            out = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", task.split("_")[0]],
                                 capture_output=True, text=True, timeout=60).stdout
            return "BeginTime" in out

        wait_for(requeued)
        # Slurm holds a requeued task for two minutes before it may start again: not what is tested
        subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True,
                       timeout=60)
        out, _ = runner.communicate(timeout=300)
        assert runner.returncode == 0, out[-3000:]
        assert "submitted 2 job(s) to Slurm" in out
        other = study / "runs" / f"{tiny_model_dir.name}_NSR_s2"
        assert rd.run_state(run) == "done" and rd.run_state(other) == "done"
        log = (study / "logs" / f"{name}.log").read_text()
        assert "interrupted" in log and "[resume] continuing" in log and log.count("step 4/4") == 1

        def attempts():
            """the task's own end record (it may still be closing when the runner sees DONE)"""
            recs = [json.loads(x) for x in (study / "attempts.jsonl").read_text().splitlines()]
            mine = [a for a in recs if a["job"] == name]
            return mine if len(mine) >= 4 else None

        mine = wait_for(attempts, 60)
        assert [(a["event"], a.get("stopped"), a.get("resume")) for a in mine] == [
            ("start", None, False), ("end", True, None), ("start", None, True), ("end", None, None)]
        # a requeued array task may come back under a job id of its own (Slurm splits it off)
        now = json.loads((study / "slurm" / "jobs.json").read_text())[name]
        assert mine[0]["gpu"] == f"slurm:{task}" and mine[-1]["gpu"] == f"slurm:{now}"
    finally:  # a failed test must leave no job behind to hold the node for the next one
        runner.kill()
        jobs = study / "slurm" / "jobs.json"
        if jobs.is_file():
            ids = {i.split("_")[0] for i in json.loads(jobs.read_text()).values()}
            subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)
    status = subprocess.run([sys.executable, str(REPO / "run_study.py"), "--status", str(study)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "2/2 done, 0 failed" in status.stdout


def test_the_watch_ends_when_squeue_stops_answering(tmp_path, monkeypatch, capsys):
    """Not a silent loop forever: said once at once, and the watch ends (exit 1) after
    SQUEUE_GIVE_UP_S of silence, the jobs left to Slurm."""
    import argparse

    from rlvr import slurm_launcher as sl
    from rlvr.launchers import Display
    from rlvr.study_schedule import Job

    job = Job("r", "train", Path("MATH_experiment.py"), [], tmp_path / "runs/r", "m")
    launcher = sl.SlurmLauncher(tmp_path, [job], argparse.Namespace(status_every=60),
                                Display(every_s=60))
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm/jobs.json").write_text('{"r": "7_0"}')
    calls = []
    monkeypatch.setattr(sl, "live_jobs", lambda ids: calls.append(ids))  # None: no answer
    monkeypatch.setattr(sl, "POLL_S", 0.01)
    monkeypatch.setattr(sl, "SQUEUE_GIVE_UP_S", 0.1)
    assert launcher.run() == 1
    out = capsys.readouterr().out
    assert out.count("squeue does not answer") == 1 and "stopped watching" in out
    assert len(calls) > 2 and all(ids == ["7_0"] for ids in calls)
