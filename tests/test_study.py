"""The study runner's parts without training: the grid, study.json, cards, shares, the
schedule, and the local launcher driving stand-in runs (tests/standin_run.py keeps the real
run-directory protocol) through packing, staggering, retries and a stop."""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

import run_study
from rlvr import run_dir as rd
from rlvr.launchers import Display, LocalPool
from rlvr.study import (
    RunnerLock,
    StudyError,
    StudySpec,
    auto_per_card,
    check_spec,
    claim_manifest,
    expand,
    manifest_differences,
    read_manifest,
    write_json,
)
from rlvr.study_progress import status_text
from rlvr.study_schedule import (
    Card,
    Job,
    eval_jobs,
    job_seconds,
    per_card_counts,
    plan_study,
    projected_aggregates,
    share_candidates,
    simulate,
    visible_cards,
)

STANDIN = REPO / "tests" / "standin_run.py"


def spec(**kw) -> StudySpec:
    base = {"name": "s", "models": ("org/M-0.5B",), "objectives": ("NSR", "W_REINFORCE"),
            "seeds": (1, 2), "lambdas": (0.1, 0.5), "flags": ("--n_train_steps", "2")}
    return StudySpec(**{**base, **kw})


def test_the_grid_names_every_axis_and_lambda_only_for_w_reinforce(tmp_path):
    runs = expand(spec())
    assert [r.name for r in runs] == [
        "M-0.5B_NSR_s1", "M-0.5B_NSR_s2", "M-0.5B_W_REINFORCE_lam0.1_s1",
        "M-0.5B_W_REINFORCE_lam0.1_s2", "M-0.5B_W_REINFORCE_lam0.5_s1",
        "M-0.5B_W_REINFORCE_lam0.5_s2"]
    args = runs[2].args(spec(), tmp_path)
    assert args[:8] == ["--model_id", "org/M-0.5B", "--objective", "W_REINFORCE", "--seed", "1",
                        "--lambda_psr", "0.1"]
    axes = json.loads(args[args.index("--study_axes") + 1])
    assert axes == {"model": "org/M-0.5B", "objective": "W_REINFORCE", "seed": 1, "lambda": 0.1}
    assert args[args.index("--output_dir") + 1] == str(tmp_path / "runs")


@pytest.mark.parametrize("kw, message", [
    ({"seeds": ()}, "--seeds is empty"),
    ({"objectives": ("NSR", "nsr")}, "unknown objective 'nsr'"),
    ({"seeds": (1, 1)}, "--seeds repeats"),
    ({"objectives": ("NSR",)}, "--lambdas applies to W_REINFORCE only"),
    ({"models": ("a/M", "b/M")}, "two models share the name 'M'"),
    ({"flags": ("--seed", "3")}, "--seed cannot follow '--': --seeds"),
    ({"flags": ("--gpu_memory_gb=20",)}, "--gpu_memory_gb cannot follow"),
])
def test_bad_grids_are_refused(kw, message):
    with pytest.raises(StudyError, match=message):
        check_spec(spec(**kw))


def test_a_study_directory_refuses_another_grid_unless_it_only_grows(tmp_path):
    claim_manifest(tmp_path, spec(), extend=False)
    assert manifest_differences(read_manifest(tmp_path), spec(), False) == []
    assert manifest_differences(read_manifest(tmp_path), spec(seeds=(1, 2, 3)), False) == [
        "--seeds adds 3 (--extend adds cells)"]
    assert manifest_differences(read_manifest(tmp_path), spec(seeds=(1, 2, 3)), True) == []
    diffs = manifest_differences(read_manifest(tmp_path),
                                 spec(seeds=(1,), flags=("--n_train_steps", "3")), True)
    assert diffs == ["--seeds lacks 2", "flags after -- '--n_train_steps 2' -> "
                     "'--n_train_steps 3'"]
    claim_manifest(tmp_path, spec(seeds=(1, 2, 3)), extend=True)
    assert read_manifest(tmp_path)["seeds"] == [1, 2, 3]


def test_the_cli_refuses_a_changed_grid_and_a_second_runner_in_one_line(tmp_path, capsys):
    study = tmp_path / "st"
    study.mkdir()
    claim_manifest(study, spec(models=("m/X",), objectives=("NSR",), lambdas=(0.1,),
                               flags=()), extend=False)
    common = ["--models", "m/X", "--objectives", "NSR", "--study_dir", str(study), "--name", "s",
              "--gpus", "none"]
    assert run_study.main([*common, "--seeds", "1", "2", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another study: --seeds adds 3" in err[0]
    lock = RunnerLock(study)
    try:
        assert run_study.main([*common, "--seeds", "1", "2"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run_study.py (pid " in err[0]


def test_bad_runner_flags_are_one_line(capsys):
    for argv, message in [(["--models", "m", "--runs_per_gpu", "0"], "--runs_per_gpu must be"),
                          (["--models", "m", "--parallel", "2"], "--parallel is for --gpus none"),
                          (["--models", "m", "--final_eval", "math500:x"], "--final_eval"),
                          (["--objectives", "NSR"], "--models is required")]:
        assert run_study.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_runs_per_card_follow_the_plan_at_the_share_and_the_measured_table():
    fits = {"a/M-0.5B": 4, "a/M-3B": 1}
    refusals = {"a/M-3B": (2, "no plan fits 39.5 GiB (leanest plan: ...)")}
    with pytest.raises(StudyError, match=r"--runs_per_gpu 2: M-3B does not fit 2 runs on a 79.0 "
                                         r"GiB card: at 39.5 GiB a run, no plan fits 39.5 GiB"):
        per_card_counts(fits, refusals, 79.0, "2", {})
    counts, notes = per_card_counts(fits, refusals, 79.0, "auto", {})
    assert counts == {"a/M-0.5B": 1, "a/M-3B": 1} and "1 run per card" in notes[0]
    table = {"M-0.5B": {"card": "H200", "per_card": {
        "1": {"aggregate": 1.0}, "2": {"aggregate": 1.5}, "3": {"aggregate": 1.8},
        "4": {"aggregate": 1.85}}}}
    assert auto_per_card("a/M-0.5B", 4, table)[0] == 3  # 4 gains < 5% over 3
    assert auto_per_card("a/M-0.5B", 2, table)[0] == 2  # 3 would not fit
    assert "cut short" not in auto_per_card("a/M-0.5B", 2, table)[1]
    table["M-0.5B"]["per_card"]["2"]["estimated"] = True
    assert "cut short" in auto_per_card("a/M-0.5B", 2, table)[1]
    table["M-0.5B"]["per_card"]["1"].update(estimated=True, estimated_how="start-up borrowed")
    why = auto_per_card("a/M-0.5B", 2, table)[1]
    assert why.index("start-up borrowed") < why.index("cut short")  # each, in count order
    assert share_candidates("a/M-0.5B", "auto", table) == [2, 3, 4]
    assert share_candidates("a/M-3B", "auto", table) == []  # not measured: 1 per card
    assert share_candidates("a/M-3B", "3", table) == [3]
    assert share_candidates("a/M-3B", "1", table) == []


def test_a_run_that_fits_only_with_a_leaner_plan_at_its_share_may_share_a_card(
        tiny_model_dir, tiny_data_dir, tmp_path):
    """The plan is asked at 1/k of the card, not judged by the whole card's plan: on a 12 GiB
    card the tiny run's plan peaks at ~4.8 GiB (its eval engine beside it), which would allow 2,
    yet 3 runs fit at 4 GiB each with a leaner plan; 64 do not (the plan's refusal quoted)."""
    spec_ = spec(models=(str(tiny_model_dir),), objectives=("NSR",), seeds=(1, 2, 3),
                 flags=("--n_train_steps", "2", "--data_dir", str(tiny_data_dir)))
    whole = plan_study(spec_, tmp_path / "st", [Card("0", 12.0)], 12.0, "1", 1, ask_workers=2)
    plan = plan_study(spec_, tmp_path / "st", [Card("0", 12.0)], 12.0, "3", 1, ask_workers=2)
    assert plan.counts == {str(tiny_model_dir): 3}
    assert all(j.budget_gib == pytest.approx(4.0) and j.share == pytest.approx(1 / 3)
               for j in plan.jobs)
    at_share = plan.plans[plan.runs[0].name]
    assert at_share.plan["budget_gib"] == pytest.approx(4.0)
    assert at_share.planned_peak_gib < 4.0 < whole.plans[plan.runs[0].name].planned_peak_gib
    with pytest.raises(StudyError, match=r"--runs_per_gpu 64: \S+ does not fit 64 runs on a "
                                         r"12.0 GiB card: at 0.2 GiB a run, the run needs"):
        plan_study(spec_, tmp_path / "st", [Card("0", 12.0)], 12.0, "64", 1, ask_workers=2)


def test_the_schedule_projection_places_jobs_as_the_launcher_does():
    # 2 cards, up to 2 a card: four half-card jobs of 10 s run at once, then the last one
    assert simulate([(0.5, 10.0)] * 5, cards=2, max_per_card=2) == 20.0
    # a whole-card job waits for a free card; the 0.5 jobs pair up on the other
    assert simulate([(1.0, 30.0), (0.5, 10.0), (0.5, 10.0), (0.5, 10.0)], 2, 2) == 30.0


def test_a_runs_projected_time_is_its_steps_and_evals_at_the_measured_rates(tmp_path):
    """80 steps at 3 s and 9 evals (steps 0, 10, ..., 80) of 1,250 problems, measured at 250
    problems and 11 s each: 80 x 3 + 9 x 11 x 5 = 735 s."""
    table = {"M-0.5B": {"eval_problems": 250, "per_card": {"2": {"s_per_step": 3.0,
                                                               "eval_s": 11.0}}}}
    job = Job("r", "train", REPO / "MATH_experiment.py", [], tmp_path, "org/M-0.5B", 0.5,
              n_steps=80, eval_every=10, eval_problems=1250)
    assert job_seconds(job, table, 2) == pytest.approx(735.0)
    assert job_seconds(job, table, 3) is None  # not measured at 3 per card


def test_a_projection_with_measured_start_up_counts_the_waits_for_concurrent_evals(tmp_path):
    """Measured at 250 problems with an eval every 10 steps of 3 s: evals of 40 s, the trainer
    waiting 12 s for each (40 - 30 overlapped = 10, so a 2 s hand-over), the last 45 s in full,
    start-up and save 90 s. At 1,250 problems an eval takes 200 s, 170 beyond the 10 steps it
    overlaps, so each of 8 waits is 172 s: 90 + 80 x 3 + 8 x 172 + 45 x 5 = 1,931 s. At the
    measured 250 problems it is the measured waits again: 90 + 240 + 8 x 12 + 45 = 471 s."""
    table = {"M-0.5B": {"eval_problems": 250, "eval_every": 10, "per_card": {"1": {
        "s_per_step": 3.0, "eval_s": 40.0, "eval_wait_s": 12.0, "final_eval_s": 45.0,
        "fixed_s": 90.0}}}}
    job = Job("r", "train", REPO / "MATH_experiment.py", [], tmp_path, "org/M-0.5B", 1.0,
              n_steps=80, eval_every=10, eval_problems=1250)
    assert job_seconds(job, table, 1) == pytest.approx(1931.0)
    job.eval_problems = 250
    assert job_seconds(job, table, 1) == pytest.approx(471.0)
    # evals that blocked the trainer (no eval engine of their own) cost it all their time:
    # 90 + 240 + 8 x 40 + 45 = 695 at 250 problems, 90 + 240 + 8 x 200 + 225 = 2,155 at 1,250
    table["M-0.5B"]["per_card"]["1"].update(concurrent_evals=False, eval_wait_s=40.0)
    assert job_seconds(job, table, 1) == pytest.approx(695.0)
    job.eval_problems = 1250
    assert job_seconds(job, table, 1) == pytest.approx(2155.0)


def test_final_evaluations_follow_their_runs_with_the_runs_share(tmp_path):
    trains = [Job(f"M-0.5B_NSR_s{i}", "train", REPO / "MATH_experiment.py", [],
                  tmp_path / "runs" / f"M-0.5B_NSR_s{i}", "org/M-0.5B", share=0.5)
              for i in (1, 2)]
    jobs = eval_jobs(spec(final_eval="math500,amc23:16", final_eval_flags=("--limit", "4")),
                     tmp_path, trains)
    assert [(j.name, j.after) for j in jobs] == [
        ("eval:base-M-0.5B", None), ("eval:M-0.5B_NSR_s1", "M-0.5B_NSR_s1"),
        ("eval:M-0.5B_NSR_s2", "M-0.5B_NSR_s2")]
    assert jobs[1].command(resume=True) == [
        sys.executable, str(REPO / "evaluate.py"), "--model_id", str(trains[0].run_dir),
        "--out", str(tmp_path / "evals" / "M-0.5B_NSR_s1"), "--gpu_mem_util", "0.450",
        "--datasets", "math500", "amc23", "--n", "16", "--limit", "4"]
    assert jobs[0].args[:2] == ["--model_id", "org/M-0.5B"] and jobs[0].share == 0.5


def test_visible_cards_come_from_nvidia_smi_and_cuda_visible_devices(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, GPU-aaa, 81559, NVIDIA H100 80GB HBM3'\n"
                    "echo '1, GPU-bbb, 143771, NVIDIA H200'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    cards = visible_cards(None, {})
    assert [(c.id, round(c.gib, 1)) for c in cards] == [("0", 79.6), ("1", 140.4)]
    assert [c.id for c in visible_cards(None, {"CUDA_VISIBLE_DEVICES": "GPU-bbb"})] == ["GPU-bbb"]
    assert [c.id for c in visible_cards("1", {"CUDA_VISIBLE_DEVICES": "0"})] == ["1"]
    with pytest.raises(StudyError, match="GPU 7 not found"):
        visible_cards("0,7", {})


def test_a_multi_gpu_run_is_a_torchrun_command_on_whole_cards(tmp_path):
    job = Job("r", "train", REPO / "MATH_experiment.py", ["--seed", "1"], tmp_path / "r", "m",
              budget_gib=40.0, gpus=2)
    assert job.command(resume=True) == [
        "torchrun", "--standalone", "--nproc_per_node", "2", str(REPO / "MATH_experiment.py"),
        "--seed", "1", "--gpu_memory_gb", "40.00", "--resume"]
    single = Job("r", "train", REPO / "MATH_experiment.py", [], tmp_path / "r", "m")
    assert single.command(resume=False) == [sys.executable, str(REPO / "MATH_experiment.py")]
    pool = LocalPool(tmp_path, [job], [Card("0", 80), Card("1", 80), Card("2", 80)],
                     max_per_card=2, display=Display(io.StringIO(), every_s=1e9))
    assert pool._fit(job) == [0, 1]
    pool.slots[0].count = 1  # a run holds card 0: the two free cards
    assert pool._fit(job) == [1, 2]


# ----------------------------------------------------------------------------- the local pool


def standin(study: Path, name: str, *extra: str, share: float = 1.0, after: str | None = None,
            record: Path | None = None) -> Job:
    args = ["--output_dir", str(study / "runs"), "--exp_name", name, *extra]
    if record:
        args += ["--record", str(record)]
    return Job(name, "train", STANDIN, args, study / "runs" / name, "m", share, after=after,
               n_steps=1)


def make_pool(study: Path, jobs: list[Job], **kw) -> tuple[LocalPool, io.StringIO]:
    study.mkdir(parents=True, exist_ok=True)
    write_json(study / "study.json", {"name": "s", "jobs": {
        j.name: {"dir": str(j.run_dir.relative_to(study)), "kind": j.kind, "model": j.model,
                 "n_steps": 1, "eval_every": 1, "share": j.share} for j in jobs}})
    out = io.StringIO()
    return LocalPool(study, jobs, display=Display(out, every_s=1e9), **kw), out


def events(record: Path) -> dict[str, dict]:
    return {e["name"]: e for e in map(json.loads, record.read_text().splitlines())}


def test_cards_hold_their_share_and_start_a_run_once_the_last_is_ready(tmp_path):
    record = tmp_path / "events.jsonl"
    jobs = [standin(tmp_path, f"r{i}", "--ready_after", "0.4", "--run_for", "1.5", share=0.5,
                    record=record) for i in range(4)]
    pool, _ = make_pool(tmp_path, jobs, cards=[Card("0", 80), Card("1", 80)], max_per_card=2)
    assert pool.run() == 0
    ev = events(record)
    # the runner's own clock: when it started each process, and when it saw each one end
    runner = {(a["job"], a["event"]): a["time"] for a in
              map(json.loads, (tmp_path / "attempts.jsonl").read_text().splitlines())}
    assert {e["gpus"] for e in ev.values()} == {"0", "1"}
    for card in ("0", "1"):
        first, second = sorted((e for e in ev.values() if e["gpus"] == card),
                               key=lambda e: e["start"])
        assert runner[second["name"], "start"] >= first["ready"]  # the first engine was up
        assert runner[second["name"], "start"] < runner[first["name"], "end"]  # then shared
    assert all(rd.run_state(j.run_dir) == "done" for j in jobs)
    assert "4/4 done" in status_text(tmp_path)


def test_a_failing_run_is_retried_then_reported_while_the_rest_goes_on(tmp_path):
    jobs = [standin(tmp_path, "flaky", "--fail_times", "1"),
            standin(tmp_path, "broken", "--fail_times", "9"),
            standin(tmp_path, "fine"),
            Job("eval:broken", "eval", STANDIN, [], tmp_path / "evals" / "broken", "m",
                after="broken")]
    pool, out = make_pool(tmp_path, jobs, cards=None, parallel=2, max_retries=1)
    assert pool.run() == 1
    assert rd.run_state(tmp_path / "runs" / "flaky") == "done"
    assert rd.run_state(tmp_path / "runs" / "fine") == "done"
    text = out.getvalue()
    assert "flaky failed (exit 1); retrying (1/1 retries)" in text
    assert "FAILED broken (exit 1, 2 attempts)" in text
    assert "standin broken: failing on purpose (2/9)" in text  # the log's last lines
    assert pool.failed == {"broken": "exit 1", "eval:broken": "skipped: broken failed"}
    rows = {line.split()[0]: line.split()[1] for line in status_text(tmp_path).splitlines()[2:-1]}
    assert rows == {"flaky": "done", "broken": "failed", "fine": "done", "eval:broken": "new"}


def test_a_signal_stops_every_run_with_sigint_and_a_rerun_resumes_it(tmp_path):
    record = tmp_path / "events.jsonl"
    jobs = [standin(tmp_path, f"long{i}", "--run_for", "60", record=record) for i in range(2)]
    pool, out = make_pool(tmp_path, jobs, cards=None, parallel=2)

    def stop_when_ready():
        while not all((j.run_dir / rd.READY).exists() for j in jobs):
            time.sleep(0.05)
        pool._on_signal(signal.SIGTERM, None)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    t0 = time.monotonic()
    assert pool.run() == 130
    assert time.monotonic() - t0 < 30  # stopped, not run out
    assert all("interrupted" in e for e in events(record).values())
    assert all(rd.run_state(j.run_dir) == "resume" for j in jobs)
    assert "SIGTERM: stopping the runs" in out.getvalue()
    again, _ = make_pool(tmp_path, [standin(tmp_path, j.name, record=record) for j in jobs],
                         cards=None, parallel=2)
    assert again.run() == 0
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [e["resume"] for e in lines[2:]] == [True, True]  # continued with --resume


def test_the_progress_table_is_made_only_when_it_is_shown():
    """It reads every run's files: the runner's poll, several times a second, must not."""
    from rlvr.launchers import Display

    out, made = io.StringIO(), []
    display = Display(out, every_s=1e9)

    def make():
        made.append(1)
        return "table"

    display.table(make, force=True)
    for _ in range(5):
        display.table(make)
    assert len(made) == 1 and out.getvalue() == "table\n"


def test_a_dry_run_plans_for_cards_this_machine_lacks_and_writes_nothing(
        tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """--dry_run --gpus 0,1 --card_gb 79 on a machine without nvidia-smi: the grid's memory plan
    and schedule for two 79 GiB cards, a projection that says what it lacks, no study dir."""
    study = tmp_path / "st"
    argv = ["--models", str(tiny_model_dir), "--objectives", "NSR", "PSR", "--seeds", "1", "2",
            "--gpus", "0,1", "--card_gb", "79", "--dry_run", "--study_dir", str(study), "--",
            "--n_train_steps", "4", "--data_dir", str(tiny_data_dir)]
    assert run_study.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs (1 model x 2 objectives x 2 seeds)" in out, out
    assert "2 card(s): 0 (planned, 79.0 GiB), 1 (planned, 79.0 GiB)" in out, out
    assert "GPU memory plan, GiB (budget 79.0)" in out
    assert "no measured step and eval times" in out
    assert not study.exists()


def test_auto_gives_a_run_of_whole_cards_no_card_mates(tiny_model_dir, tiny_data_dir, tmp_path,
                                                       monkeypatch):
    """A measured 1.5x at 2 per card packs single-card runs; a run on 2 whole cards
    (--gpus_per_run 2, torchrun) is never told it has half of each."""
    import rlvr.study_schedule as schedule
    from rlvr.study import short_name

    table = {short_name(str(tiny_model_dir)): {"card": "H200", "per_card": {
        "1": {"aggregate": 1.0}, "2": {"aggregate": 1.5}}}}
    monkeypatch.setattr(schedule, "read_packing_table", lambda: table)
    spec_ = spec(models=(str(tiny_model_dir),), objectives=("NSR",), seeds=(1, 2),
                 flags=("--n_train_steps", "2", "--data_dir", str(tiny_data_dir)))
    cards = [Card("0", 12.0), Card("1", 12.0)]
    packed = plan_study(spec_, tmp_path / "st", cards, 12.0, "auto", 1, ask_workers=2)
    assert packed.counts == {str(tiny_model_dir): 2}
    whole = plan_study(spec_, tmp_path / "st", cards, 12.0, "auto", 2, ask_workers=2)
    assert whole.counts == {str(tiny_model_dir): 1}
    assert all(j.share == 1.0 and j.gpus == 2 for j in whole.jobs)


def test_auto_judges_packing_by_the_studys_own_run_length():
    """A 20-step measurement's aggregate counts the overlapped start-up more than an 80-step
    run does; auto projects each count for the study's runs (job_seconds) instead."""
    def entry(step_s, final_s, aggregate):
        return {"s_per_step": step_s, "eval_s": 40.0, "eval_wait_s": 0.0, "final_eval_s": final_s,
                "fixed_s": 60.0, "concurrent_evals": True, "aggregate": aggregate}

    table = {"M-0.5B": {"card": "H200", "eval_every": 10, "eval_problems": 100, "per_card": {
        "1": entry(4.0, 30.0, 1.0), "2": entry(8.0, 40.0, 1.5)}}}
    long = Job("r", "train", Path("x"), [], Path("r"), "a/M-0.5B", n_steps=80, eval_every=10,
               eval_problems=100)
    short = dataclasses.replace(long, n_steps=20)
    # 1: 60 + 80 x 4 + 30 = 410 s (no eval waits); 2: 60 + 80 x 8 + 40 = 740 s, a pair
    assert projected_aggregates(long, table, [2]) == {1: 1.0, 2: round(2 * 410 / 740, 2)}
    assert projected_aggregates(short, table, [2]) == {1: 1.0, 2: round(2 * 170 / 260, 2)}
    assert projected_aggregates(long, table, [2, 3]) == {}  # 3 per card not measured
    table["M-0.5B"]["per_card"]["2"] = entry(9.0, 40.0, 1.5)  # 820 s a pair: no gain at 80
    counts, notes = per_card_counts({"a/M-0.5B": 2}, {}, 79.0, "auto", table,
                                    {"a/M-0.5B": long})
    assert counts == {"a/M-0.5B": 1} and "projected for this study's runs" in notes[0]
    assert per_card_counts({"a/M-0.5B": 2}, {}, 79.0, "auto", table)[0] == {"a/M-0.5B": 2}
