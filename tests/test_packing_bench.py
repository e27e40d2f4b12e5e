"""bench/packing.py's arithmetic on hand-made run records: what a finished run costs, where a run
cut by a time limit would have ended, and which steps count as packed."""

import json

import pytest

from bench.packing import end_cost, packed_steps, run_records, summarize, usable


def record(start, ready, steps, waits, end=None, n_steps=None, n_evals=3):
    spans, t = [], ready
    for s in steps:  # the eval waits are not needed for these spans: the tests place them
        spans.append((t, t + s))
        t += s
    return {"name": "r", "failed": False, "start": start, "ready": ready, "end": end,
            "step_s": steps, "waits": waits, "concurrent": True,
            "eval_s": [(10 * i, w) for i, w in enumerate(waits)], "n_steps": n_steps or len(steps),
            "n_evals": n_evals, "step_spans": spans, "eval_problems": 100}


def test_a_finished_run_costs_its_wall_time_less_its_steps_and_waits():
    """start 0, READY 50, 4 steps of 2 s, waits 5 + 5 + 20 (the last eval in full), DONE at 100:
    fixed = 100 - 8 - 30 = 62; after READY the end costs 100 - 50 - 8 - 30 = 12."""
    r = record(0.0, 50.0, [2.0] * 4, [5.0, 5.0, 20.0], end=100.0)
    out = summarize([r], end_cost([r]))
    assert out["fixed_s"] == 62.0 and out["wall_s"] == 100.0
    assert out["eval_wait_s"] == 5.0 and out["final_eval_s"] == 20.0
    assert "estimated" not in out and end_cost([r]) == pytest.approx(12.0)


def test_a_cut_run_is_projected_to_its_end_at_the_measured_rates():
    """Cut after 3 of 5 planned steps and 1 of 3 evals: READY 40 + steps 3 x 2 + 2 missing steps
    at the median 2 s + wait 6 + one missing in-loop eval at the median wait 6 + the last eval
    as long as the in-loop one (6 s) + the end cost 10 = 78 from the start at 0."""
    r = record(0.0, 40.0, [2.0] * 3, [6.0], n_steps=5)
    out = summarize([r], end_cost_s=10.0)
    assert out["estimated"] is True and "end_cost_unknown" not in out
    assert out["wall_s"] == pytest.approx(40 + 6 + 4 + 6 + 6 + 6 + 10)
    assert out["fixed_s"] == pytest.approx(50.0)  # start-up 40 + the end cost 10


def test_a_cut_run_takes_the_last_eval_of_a_finished_one_and_its_in_loop_waits_apart():
    """Beside a finished run (waits 3, 3, last eval 30; DONE at 100, READY 40, 4 x 2 s steps:
    end cost 100 - 40 - 8 - 36 = 16), a run cut after its first eval (wait 5) with 2 of 4
    steps: its end is READY 50 + 2 x 2 + 2 missing x 2 + 5 + one missing in-loop eval at the
    median wait 3 (of 3, 3, 5: the finished run's last eval is not a wait) + the last eval 30
    + 16 = 112."""
    done = record(0.0, 40.0, [2.0] * 4, [3.0, 3.0, 30.0], end=100.0)
    cut = record(10.0, 50.0, [2.0] * 2, [5.0], n_steps=4)
    cost = end_cost([done, cut])
    assert cost == pytest.approx(16.0)
    out = summarize([done, cut], cost)
    assert out["eval_wait_s"] == 3.0 and out["final_eval_s"] == 30.0
    assert out["wall_s"] == pytest.approx(50 + 4 + 4 + 5 + 3 + 30 + 16)
    assert summarize([cut], None)["end_cost_unknown"] is True


def test_a_study_directory_is_read_as_its_runs_say_and_a_failed_run_is_no_measurement(tmp_path):
    study = tmp_path / "k2"
    runs = study / "runs"
    lines = [{"step": 0, "time/eval_s": 9.0, "eval/n_problems": 50},
             {"step": 1, "time/step_s": 2.0}, {"step": 2, "time/step_s": 2.5},
             {"step": 2, "time/eval_s": 9.5, "time/eval_wait_s": 1.5, "eval/n_problems": 50}]
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (runs / name / "config.json").write_text(json.dumps({"n_train_steps": 2,
                                                             "eval_every": 1}))
        (runs / name / "READY").write_text(json.dumps({"time": 120.0}))
    (runs / "a" / "DONE").write_text("{}")
    (runs / "c").mkdir()  # a third run that never wrote its config: it never came up
    attempts = [{"job": "a", "event": "start", "time": 100.0},
                {"job": "b", "event": "start", "time": 110.0},
                {"job": "a", "event": "end", "time": 150.0, "rc": 0, "stopped": False},
                {"job": "b", "event": "end", "time": 151.0, "rc": 1, "stopped": False}]
    (study / "attempts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in attempts))
    a, b = run_records(study)
    assert a["concurrent"] is True  # its step-2 eval logged the trainer's wait
    assert (a["start"], a["ready"], a["end"], a["failed"]) == (100.0, 120.0, 150.0, False)
    assert (a["n_evals"], a["step_s"], a["waits"], a["eval_problems"]) == (3, [2.0, 2.5],
                                                                         [9.0, 1.5], 50)
    assert a["step_spans"] == [(129.0, 131.0), (131.0, 133.5)]  # READY + the step-0 eval first
    assert b["end"] is None and b["failed"] is True
    assert "run b failed" in usable(2, [a, b])
    assert usable(3, [a]) == "only 1 of its 3 runs came up (READY)"
    attempts[-1]["stopped"] = True  # stopped by the runner on a signal: a cut run, projected
    (study / "attempts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in attempts))
    a, b = run_records(study)
    assert b["failed"] is False and b["end"] is None and usable(2, [a, b]) is None
    assert usable(1, [dict(a, step_s=[])]) == "no step was logged"


def test_only_steps_run_beside_every_other_run_count_as_packed():
    """Run a steps from 0 to 40 (10 x 4 s); run b from 20 to 60: a's steps 3+ inside b's span
    [20, 60] are those starting at 20, 24, ..., 36 (5 steps); b's inside a's [0, 40]: 28, 32, 36
    (its steps 3+ start at 28)."""
    a = record(0.0, 0.0, [4.0] * 10, [1.0], end=50.0)
    b = record(20.0, 20.0, [4.0] * 10, [1.0], end=70.0)
    assert len(packed_steps([a, b])) == 5 + 3
    assert packed_steps([a]) == []


def test_whole_run_summary_keeps_the_last_eval_apart_from_the_in_loop_ones():
    """bench/whole_run.py: evals of 40 and 42 s beside the steps (waits 0.2 and 0.4 s), the last
    of 28 s alone; four steps of 4 s; wall 120 s, saves 4 s. eval_s = median(40, 42) = 41,
    last_eval_s = 28; the loop is 16 + 0.2 + 0.4 + 28 = 44.6 s, start-up 120 - 44.6 - 4 = 71.4;
    projected 80 x 4 + 8 x 0.3 + 28 + 71.4 + 4 = 425.8 s."""
    from bench.whole_run import summarize as whole_summary

    def step(i):
        return {"step": i, "time/step_s": 4.0, "time/rollout_s": 2.0, "time/reward_s": 0.1,
                "time/train_s": 1.8, "time/update_s": 1.7, "time/sync_s": 0.03,
                "train/response_len": 512, "mem/peak_gb": 16.0}

    lines = [{"step": 0, "time/eval_s": 40.0, "time/eval_wait_s": 0.2}, step(1), step(2),
             {"step": 2, "time/eval_s": 42.0, "time/eval_wait_s": 0.4}, step(3), step(4),
             {"step": 4, "time/eval_s": 28.0}]
    out = whole_summary(lines, wall=120.0, saves={"save_final_policy": 4.0})
    assert out["eval_s"] == 41.0 and out["last_eval_s"] == 28.0
    assert out["eval_wait_s"] == pytest.approx(0.3) and out["last_eval_wait_s"] == 28.0
    assert out["startup_s"] == pytest.approx(71.4)
    assert out["projected_80_steps_9_evals_s"] == pytest.approx(425.8)


def test_host_profile_summary_splits_stacks_by_case_and_leaves_out_the_profilers_start(
        tmp_path, capsys):
    """bench/host_profile.py --summarize: 30 + 10 samples in case_eval (30 of them in step), 20 in
    py-spy's start-up wait (left out), 5 outside any case (left out), 8 in another process (its
    own group): eval has 40 samples, step 75% of them self, generate 100% inclusive."""
    from bench.host_profile import summarize as profile_summary

    prof = tmp_path / "prof.txt"
    prof.write_text(
        "main (h.py:1);case_eval (h.py:2);generate (llm.py:3);step (core.py:4) 30\n"
        "main (h.py:1);case_eval (h.py:2);generate (llm.py:3) 10\n"
        "main (h.py:1);case_eval (h.py:2);run_case (h.py:5);_wait_for_profiler (h.py:9) 20\n"
        "main (h.py:1);build_llm (h.py:7) 5\n"
        'process 42:"python core";busy_loop (core.py:1) 8\n')
    profile_summary(str(prof))
    out = capsys.readouterr().out
    assert "== eval: 40 samples" in out
    assert " 75.0%  step (core.py:4)" in out and "100.0%  generate (llm.py:3)" in out
    assert "== other process 42: 8 samples" in out
    assert "_wait_for_profiler" not in out and "build_llm" not in out
