"""Verifiable reward: pull the final answer out of a response and check it against the gold answer.

`box_arguments` / `extract_boxed` are shared with data preparation so that gold answers and model
answers are extracted by exactly the same rule.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from rlvr.worker_pool import TimeoutPool

# `\boxed` / `\fbox` not followed by another letter (so `\boxedtext` is not a box).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None if never closed.

    Escaped braces `\\{` and `\\}` are literal characters in LaTeX and do not count towards the
    nesting depth.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


# After the command TeX skips spaces and at most one line end (a blank line ends the paragraph).
_SKIP_RE = re.compile(r"[ \t]*(?:\n[ \t]*)?")
# One TeX token that can be an argument: a control word (`\pi`), a control symbol (`\{`), or a
# character other than those that end or cannot start one (`}`, `$`, `%`, `&`, `#`, `^`, `_`).
_TOKEN_RE = re.compile(r"\\(?:[A-Za-z]+|.)|[^\s{}$%&#^_\\]", re.S)


def _box_argument(text: str, pos: int) -> str | None:
    """The argument of the box command whose name ends at `text[pos]`, as LaTeX reads it.

    A brace group gives its content (stripped; `\\boxed{}` gives ""); anything else gives the
    single next token, as in LaTeX: `\\boxed 5x` boxes `5`, `\\boxed \\pi r` boxes `\\pi`. None when
    there is no argument: a group that is never closed, the end of the text or of the formula.
    """
    pos = _SKIP_RE.match(text, pos).end()
    if text.startswith("{", pos):
        content = _balanced_group(text, pos)
        return None if content is None else content.strip()
    token = _TOKEN_RE.match(text, pos)
    return token[0] if token else None


def box_arguments(text: str) -> list[str | None]:
    """The argument of every `\\boxed` / `\\fbox` in `text`, in order (see `_box_argument`).

    Nested boxes are each listed (outer first). The one parser of boxes: gold answers
    (`rlvr.data`) and model answers are read by exactly this rule.
    """
    return [_box_argument(text, m.end()) for m in _BOX_RE.finditer(text or "")]


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, or None if there is none.

    Braces are matched with nesting (`\\boxed{\\frac{\\sqrt{3}}{2}}` gives `\\frac{\\sqrt{3}}{2}`),
    escaped braces are ignored, and the brace-less form takes one token as LaTeX does
    (`\\boxed 5` gives `5`). A box without an argument (never closed, say) counts as no box, so an
    earlier complete one is taken.
    """
    return next((arg for arg in reversed(box_arguments(text)) if arg is not None), None)


# --------------------------------------------------------------------------------------------
# Grading with math-verify
# --------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

# Only LaTeX extraction, boxed first: we always hand math-verify a single `\boxed{...}`, and the
# plain-expression extractor would otherwise happily read a number out of LaTeX that failed to
# parse (e.g. the `5` of `5-12i`), which is a false positive waiting to happen.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0),)

# math-verify's own per-call limit (SIGALRM, whole seconds) when grading in-process.
_MV_TIMEOUT_S = 5


def _math_verify(answer: str, gold_answer: str, mv_timeout_s: int | None) -> float:
    """1.0 if `answer` is equivalent to `gold_answer`, both bare box contents; never raises."""
    # Identical text is the same answer: skip math-verify, whose ANTLR parse costs tens of ms for
    # tuples and intervals (and a trained policy mostly reproduces the gold's exact form).
    if answer.strip() and answer.strip() == gold_answer.strip():
        return 1.0
    try:
        # Re-wrap both: math-verify 0.9 finds nothing in a bare `\frac12` and reads a bare
        # `5-12i` as 5, but parses the same text inside `\boxed{}` correctly.
        gold = parse(
            f"\\boxed{{{gold_answer}}}", extraction_config=_EXTRACTION, parsing_timeout=mv_timeout_s
        )
        pred = parse(
            f"\\boxed{{{answer}}}", extraction_config=_EXTRACTION, parsing_timeout=mv_timeout_s
        )
        if not gold or not pred:
            return 0.0
        # Gold first: verify is not symmetric (assignments and equation-vs-interval matching are
        # resolved on the gold's side).
        return 1.0 if verify(gold, pred, timeout_seconds=mv_timeout_s) else 0.0
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return 0.0


def grade_answer(answer: str, gold_answer: str) -> float:
    """Grade an already-extracted final answer (box content) against the gold answer, in-process."""
    # math-verify's timeouts rely on SIGALRM, which only the main thread may arm; elsewhere run
    # unbounded rather than fail (BatchGrader is the way to get a hard bound).
    in_main = threading.current_thread() is threading.main_thread()
    return _math_verify(answer, gold_answer, _MV_TIMEOUT_S if in_main else None)


def grade(response: str, gold_answer: str) -> float:
    """Reward of one response: 1.0 if its last `\\boxed{}` matches `gold_answer`, else 0.0.

    In-process and single-sample; a response without a box, an unparsable answer or an error
    inside math-verify all give 0.0.
    """
    answer = extract_boxed(response)
    if answer is None:
        return 0.0
    return grade_answer(answer, gold_answer)


def _grade_in_worker(answer: str, gold_answer: str) -> float:
    # No SIGALRM inside workers: the parent's wall-clock bound is the one limit, so that every
    # timeout is a hard one and gets counted (math-verify swallows its own timeouts silently).
    return _math_verify(answer, gold_answer, None)


# --------------------------------------------------------------------------------------------
# Parallel grading with a hard per-sample bound
# --------------------------------------------------------------------------------------------

# Graded once by each worker before it reports ready, so that the first real batch does not pay
# for building math-verify's regexes, the ANTLR parser and sympy's lazily-initialised paths.
_WARMUP = (
    ("1", "1"),
    ("\\frac12", "0.5"),
    ("(3,-1)", "(3, -1)"),
    ("[1,2)", "(1,2]"),
    ("5-12i", "5+12i"),
    ("x^2+1", "1+x^2"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
)


def _warm_up_worker() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for answer, gold in _WARMUP:
        _grade_in_worker(answer, gold)


@dataclass
class GradeResult:
    scores: list[float]
    # Samples that hit the wall-clock bound, or whose worker died under them: scored 0.
    n_timeouts: int = 0
    n_no_box: int = 0  # responses without any `\boxed{}`: scored 0 without being sent anywhere


class BatchGrader:
    """Grades batches of responses with math-verify in a persistent pool of spawned worker
    processes (rlvr/worker_pool.py).

    Each sample gets a hard wall-clock bound of `timeout_s`: a worker that overruns is killed and
    replaced, the sample scores 0 and counts as a timeout, and the rest of its chunk is graded
    elsewhere. Not thread-safe: call `grade_batch` from one thread.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        *,
        _grade_fn: Callable[[str, str], float] = _grade_in_worker,
    ) -> None:
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        self._pool = TimeoutPool(_grade_fn, num_workers, timeout_s, init=_warm_up_worker,
                                 default=0.0)
        self.num_workers = num_workers
        self.timeout_s = self._pool.timeout_s

    def grade_batch(self, responses: list[str], golds: list[str]) -> GradeResult:
        """Score `responses[i]` against `golds[i]`; 1.0 correct, 0.0 wrong / no box / timeout."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        # Rollouts of one prompt share the gold and often the final answer, and grading is a pure
        # function of the two: grade each distinct (answer, gold) pair once.
        where: dict[tuple[str, str], list[int]] = {}
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            answer = extract_boxed(response)
            if answer is not None:
                where.setdefault((answer, gold), []).append(i)
        task_scores, timed_out = self._pool.map(list(where))

        scores = [0.0] * len(responses)
        n_timeouts = 0
        for task, indices in enumerate(where.values()):
            for i in indices:
                scores[i] = float(task_scores[task])
            if task in timed_out:
                n_timeouts += len(indices)
        if n_timeouts:
            logger.warning(
                "grading: %d/%d samples timed out after %.1fs and were scored 0",
                n_timeouts,
                len(responses),
                self.timeout_s,
            )
        n_no_box = len(responses) - sum(len(indices) for indices in where.values())
        return GradeResult(scores=scores, n_timeouts=n_timeouts, n_no_box=n_no_box)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> BatchGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
