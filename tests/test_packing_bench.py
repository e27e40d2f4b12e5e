"""bench/packing.py's arithmetic on hand-made run records: what a finished run costs, where a run
cut by a time limit would have ended, and which steps count as packed."""

import pytest

from bench.packing import end_cost, packed_steps, summarize


def record(start, ready, steps, waits, end=None, n_steps=None, n_evals=3):
    spans, t = [], ready
    for s in steps:  # the eval waits are not needed for these spans: the tests place them
        spans.append((t, t + s))
        t += s
    return {"start": start, "ready": ready, "end": end, "step_s": steps, "waits": waits,
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
    assert out["estimated"] is True
    assert out["wall_s"] == pytest.approx(40 + 6 + 4 + 6 + 6 + 6 + 10)
    assert out["fixed_s"] == pytest.approx(50.0)  # start-up 40 + the end cost 10


def test_only_steps_run_beside_every_other_run_count_as_packed():
    """Run a steps from 0 to 40 (10 x 4 s); run b from 20 to 60: a's steps 3+ inside b's span
    [20, 60] are those starting at 20, 24, ..., 36 (5 steps); b's inside a's [0, 40]: 28, 32, 36
    (its steps 3+ start at 28)."""
    a = record(0.0, 0.0, [4.0] * 10, [1.0], end=50.0)
    b = record(20.0, 20.0, [4.0] * 10, [1.0], end=70.0)
    assert len(packed_steps([a, b])) == 5 + 3
    assert packed_steps([a]) == []
