"""Where a step's rollouts come from, and how the new weights get to the engine afterwards.

`OnPolicy` (the default) generates step t's batch when the step starts, with the weights the
update of step t - 1 left, and loads the new weights into the engine after each update: the
paper's algorithm, unchanged.

`OneStepOff` (--async_rollout) runs the rollout engine in a process of its own
(rlvr/engine_process.py) and keeps one batch in flight: while the update of step t runs, the
batch of step t + 1 is generated with the weights of step t - 1 (those the update of step t
starts from), so step t + 1 trains on samples of a policy one update behind its own. The first
step, and the first after a resume, train on samples of their own weights;
`train/rollout_staleness` logs which. New weights reach the engine when the batch in flight is
done, just before the next one is sent.

A checkpoint holds the prompt cursor of the last batch trained on (`cursor`), so a resumed run
draws the batch that was in flight again, and generates it on-policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlvr.fsdp import full_tensors
from rlvr.rollout import Completion


@dataclass
class Rollouts:
    idx: list[int]                      # this rank's prompts (indices into the training set)
    groups: list[list[Completion]]      # each prompt's samples
    weights_step: int                   # the step whose updated weights generated them


class OnPolicy:
    """Generate each batch now, with the policy's current weights."""

    def __init__(self, engine, request: Callable[[int, list[int]], dict], sampler):
        self.engine, self.request, self.sampler = engine, request, sampler

    def take(self, step: int, draw: Callable[[], list[int]]) -> Rollouts:
        idx = draw()
        return Rollouts(idx, self.engine.generate(**self.request(step, idx)), step - 1)

    def updated(self, policy) -> None:
        """Step 5: the engine samples from the updated weights from now on."""
        self.engine.load_weights(full_tensors(policy))

    def cursor(self) -> dict:
        return self.sampler.state()

    def close(self) -> None:
        pass


class OneStepOff:
    """One batch in flight on an engine process: see the module docstring."""

    def __init__(self, engine, request: Callable[[int, list[int]], dict], sampler,
                 last_step: int, weights_dtype=None, loaded_step: int = 0):
        self.engine, self.request, self.sampler = engine, request, sampler
        self.last_step, self.weights_dtype = last_step, weights_dtype
        self.policy = None  # set by updated(): weights to load before the next batch is sent
        self.loaded_step = loaded_step  # the step whose weights the engine holds
        self.in_flight: tuple[int, list[int], int, int] | None = None  # step, idx, ticket, wts
        self._cursor = sampler.state()

    def _load_pending(self, step: int) -> None:
        if self.policy is not None:
            self.engine.load_weights(full_tensors(self.policy, self.weights_dtype))
            self.loaded_step, self.policy = step, None

    def _send(self, step: int, idx: list[int]) -> None:
        ticket = self.engine.submit("generate", **self.request(step, idx))
        self.in_flight = (step, idx, ticket, self.loaded_step)

    def take(self, step: int, draw: Callable[[], list[int]]) -> Rollouts:
        if self.in_flight is None:  # the first step, or the first after a resume
            self._load_pending(step - 1)
            self._send(step, draw())
        _, idx, ticket, weights = self.in_flight
        groups = self.engine.result(ticket)
        self._cursor = self.sampler.state()  # the cursor of the batch trained on now
        self._load_pending(step - 1)  # the newest weights, before the next batch is generated
        self.in_flight = None
        if step < self.last_step:
            self._send(step + 1, draw())
        return Rollouts(idx, groups, weights)

    def updated(self, policy) -> None:
        """Step 5: the engine is busy with the next batch; the weights go over when it is done."""
        self.policy = policy

    def cursor(self) -> dict:
        return self._cursor

    def close(self) -> None:
        self.engine.close()
