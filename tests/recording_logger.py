"""What LoopEvals (rlvr/loop_evals.py) logs, kept in memory, for the engine-process tests."""

from __future__ import annotations


class RecordingLogger:
    """Per-problem results, scalars and the example responses, by step."""

    def __init__(self):
        self.problems_of, self.scalars, self.texts = {}, {}, {}

    def problems(self, step, results):
        self.problems_of[step] = results

    def log(self, step, metrics):
        self.scalars[step] = metrics

    def text(self, tag, text, step):
        self.texts[(step, tag)] = text
