import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlvr.reward import (
    BatchGrader,
    GradeResult,
    box_arguments,
    extract_boxed,
    grade,
    grade_answer,
)

# --- extract_boxed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{1} then \boxed{2} and finally \boxed{3}", "3"),
        ("no box here", None),
        ("", None),
        (r"the answer is $\boxed 5$ indeed", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\}}", r"\}"),
        (r"\boxed{3} and an unclosed \boxed{4", "3"),
        (r"\boxedtext{9}", None),
        # Without braces LaTeX boxes exactly one token, and so do we.
        (r"$\boxed 5x$", "5"),
        (r"$\boxed \pi r^2$", r"\pi"),
        (r"$\boxed5$", "5"),
        (r"$\boxed\frac12$", r"\frac"),
        ("\\boxed\n  {7}", "7"),  # one line end is a space to TeX ...
        ("\\boxed{3} \\boxed\n\n{7}", "3"),  # ... a blank line ends the paragraph
        (r"\boxed{3} then $\boxed $", "3"),  # no argument: an earlier box counts
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_box_arguments_lists_every_box_by_the_same_rule():
    text = r"$\boxed 5x$, \fbox{\frac{1}{2}}, \boxed{\boxed{y}} \boxed{} \boxed{"
    assert box_arguments(text) == ["5", r"\frac{1}{2}", r"\boxed{y}", "y", "", None]


# --- grade -----------------------------------------------------------------------------------

EQUIVALENT = [
    (r"\frac12", "0.5"),
    ("0.5", r"\frac12"),
    ("(3,-1)", "(3, -1)"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"5\text{ cm}", "5"),
    ("5-12i", "5-12i"),
    (r"\{1,2\}", r"\{2,1\}"),
    (r"3\sqrt{2}", r"\sqrt{18}"),
    (r"\text{Sunday}", r"\text{Sunday}"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
]
NOT_EQUIVALENT = [
    (r"\frac12", r"\frac13"),
    ("(3,-1)", "(-1,3)"),
    ("5-12i", "5+12i"),
    ("5-12i", "5"),  # a bare `5-12i` would be read as 5 without the \boxed{} re-wrapping
    ("5", "5-12i"),
    ("[1,2)", "(1,2]"),
    (r"\text{Sunday}", r"\text{Monday}"),
    ("42", ""),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_grade_equivalent(pred, gold):
    assert grade(f"We find that the answer is $\\boxed{{{pred}}}$.", gold) == 1.0


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT)
def test_grade_not_equivalent(pred, gold):
    assert grade(f"We find that the answer is $\\boxed{{{pred}}}$.", gold) == 0.0


def test_grade_no_box_is_zero():
    assert grade("The answer is 5.", "5") == 0.0
    assert grade("", "5") == 0.0


def test_grade_last_box_counts():
    assert grade(r"First guess \boxed{1} ... on reflection \boxed{2}", "2") == 1.0
    assert grade(r"First guess \boxed{2} ... on reflection \boxed{1}", "2") == 0.0


def test_grade_bare_and_fbox_forms():
    assert grade(r"so $\boxed 5$", "5") == 1.0
    assert grade(r"\fbox{\frac12}", "0.5") == 1.0


def test_grade_identical_text_is_correct_even_if_unparsable():
    assert grade_answer(r"\text{two thirty}", r"\text{two thirty}") == 1.0
    assert grade_answer("", "") == 0.0


@pytest.mark.parametrize("pred", ["}{", r"\frac{", r"\left(", "\\" * 50, "?" * 1000])
def test_grade_garbage_never_raises(pred):
    assert grade_answer(pred, "5") == 0.0


# --- BatchGrader -----------------------------------------------------------------------------

HANG = "HANG-SENTINEL"
CRASH = "CRASH-SENTINEL"


def _sleepy_grade(answer: str, gold: str) -> float:
    """Worker-side grade hook that hangs or dies on a sentinel (module level: spawn pickles it)."""
    if answer == HANG:
        time.sleep(30)
    if answer == CRASH:
        os._exit(1)
    return 1.0 if answer == gold else 0.0


def _batch():
    pairs = EQUIVALENT + NOT_EQUIVALENT
    responses = [f"Reasoning... so $\\boxed{{{p}}}$." for p, _ in pairs]
    golds = [g for _, g in pairs]
    responses += ["no box at all", r"\boxed{1} then \boxed{2}"]
    golds += ["5", "2"]
    return responses, golds


def test_batch_grader_matches_grade():
    responses, golds = _batch()
    responses, golds = responses * 2, golds * 2  # duplicates are graded once, scored everywhere
    with BatchGrader(num_workers=2) as grader:
        result = grader.grade_batch(responses, golds)
        assert isinstance(result, GradeResult)
        assert result.scores == [grade(r, g) for r, g in zip(responses, golds, strict=True)]
        assert result.n_timeouts == 0
        assert result.n_no_box == 2
        assert grader.grade_batch([], []).scores == []
        with pytest.raises(ValueError):
            grader.grade_batch(["a"], [])


def test_batch_grader_timeout_cannot_hang_the_batch():
    n = 12
    answers = [str(i) for i in range(n)]
    answers[3] = answers[7] = HANG  # graded once (deduplicated), counted for both samples
    responses = [f"\\boxed{{{a}}}" for a in answers]
    golds = [str(i) for i in range(n)]
    golds[7] = golds[3]
    with BatchGrader(num_workers=2, timeout_s=1.0, _grade_fn=_sleepy_grade) as grader:
        grader.grade_batch(["\\boxed{0}"], ["0"])  # wait for start-up outside the timed part
        t0 = time.monotonic()
        result = grader.grade_batch(responses, golds)
        assert time.monotonic() - t0 < 5.0
        assert result.n_timeouts == 2
        assert result.scores == [0.0 if i in (3, 7) else 1.0 for i in range(n)]

        # The stuck worker was replaced: the next batch is complete and clean.
        keep = [i for i in range(n) if i not in (3, 7)]
        result = grader.grade_batch([responses[i] for i in keep], [golds[i] for i in keep])
        assert result.n_timeouts == 0
        assert result.scores == [1.0] * len(keep)


def test_batch_grader_survives_a_worker_crash():
    answers = ["0", "1", CRASH, "3", "4", "5"]
    responses = [f"\\boxed{{{a}}}" for a in answers]
    golds = [str(i) for i in range(len(answers))]
    with BatchGrader(num_workers=1, timeout_s=10.0, _grade_fn=_sleepy_grade) as grader:
        result = grader.grade_batch(responses, golds)
        assert result.n_timeouts == 1
        assert result.scores == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


# --- workers when the parent dies ------------------------------------------------------------

_DYING_PARENT = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from rlvr.reward import BatchGrader
grader = BatchGrader(num_workers=1, timeout_s=60)
if sys.argv[2] == "busy":  # workers mid-chunk, about to send results to a dead parent
    grader.grade_batch([r"\boxed{1}"], ["1"])
    work = ([rf"\boxed{{{i}^{{{i}}}+x}}" for i in range(4000)], ["2"] * 4000)
    threading.Thread(target=grader.grade_batch, args=work, daemon=True).start()
    time.sleep(1.0)
# "starting": killed while the workers still import and warm up, before they report ready
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("when, sig", [("starting", signal.SIGTERM), ("busy", signal.SIGKILL)])
def test_workers_exit_quietly_when_the_parent_is_killed(when, sig):
    """A SIGKILL/SIGTERM/OOM kill of the run must not add worker tracebacks to its log."""
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _DYING_PARENT, repo, when], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, sig)  # the parent only, as the OOM killer does
        # EOF once the parent and every worker (they share its stderr) have exited
        err = proc.stderr.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except ProcessLookupError:
            pass
        proc.wait()
    assert "Traceback" not in err and "Error" not in err, err


def test_the_worker_pool_is_generic_and_gives_failed_tasks_the_default():
    """rlvr/worker_pool.py knows nothing of grading: any picklable function, and a task whose
    function raises gets the default (here float division by zero)."""
    import operator

    from rlvr.worker_pool import TimeoutPool

    with TimeoutPool(operator.truediv, num_workers=1, timeout_s=10.0, default=-1.0) as pool:
        assert pool.map([(1, 2), (3, 0), (9, 3)]) == ([0.5, -1.0, 3.0], set())
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        TimeoutPool(operator.truediv, num_workers=1, timeout_s=0)
