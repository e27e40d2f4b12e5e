"""A deterministic stand-in for the verifier, for checks on random-weight models.

A random model never writes a correct boxed answer, so the real grader scores every sample 0:
PSR then trains on nothing and equal rewards say nothing about equal rollouts. This one scores a
response 1 when the CRC32 of its text is odd (about half, the same for the same text anywhere),
and can record every training step's scores (those graded on the main thread: the eval grades in
a thread of its own) as JSON lines, for comparing runs sample by sample.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from pathlib import Path

from rlvr.reward import GradeResult


class HashGrader:
    log: Path | None = None  # where the training steps' scores go; None: nowhere
    case = ""                # tag of the run they belong to

    def __init__(self, *args, **kwargs) -> None:
        pass

    def grade_batch(self, responses: list[str], golds: list[str]) -> GradeResult:
        scores = [float(zlib.crc32(r.encode()) % 2) for r in responses]
        if self.log is not None and threading.current_thread() is threading.main_thread():
            with open(self.log, "a") as f:
                f.write(json.dumps({"case": self.case, "rank": int(os.environ.get("RANK", 0)),
                                    "scores": scores}) + "\n")
        return GradeResult(scores=scores)

    def close(self) -> None:
        pass


def step_scores(path: Path, case: str) -> list[list[float]]:
    """The training scores recorded in `path` for `case`, one list per step: under torchrun the
    ranks' shards of the step joined in rank order (each rank holds a contiguous part of the
    global batch, rlvr.dist.shard), so they compare with a one-process run's sample by sample."""
    by_rank: dict[int, list[list[float]]] = {}
    for r in map(json.loads, Path(path).read_text().splitlines()):
        if r["case"] == case:
            by_rank.setdefault(r.get("rank", 0), []).append(r["scores"])
    steps = zip(*(by_rank[k] for k in sorted(by_rank)), strict=True)  # every rank, every step
    return [[x for part in step for x in part] for step in steps]
