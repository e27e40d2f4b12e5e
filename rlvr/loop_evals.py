"""The in-loop evals of a training run: the eval of step k, logged at step k.

An eval runs one of two ways, with the same records either way (the same weights and the same
per-problem seeds, rlvr/sampling.py):
- on the rollout engine, the trainer waiting for it;
- concurrently (--concurrent_eval): on eval engines in processes of their own
  (rlvr/engine_process.py), each of which receives a copy of step k's weights and evaluates its
  contiguous share of the problems while the next training steps run (one vLLM engine is bound
  by its per-step CPU work, so several share the card's GPU time). One eval is in flight at a
  time; the trainer waits only when the next one is due before the last has finished, before a
  checkpoint (which must hold every eval up to its step) and at the end of the run.

The loop calls `start(step)` where an eval is due and `collect()` after every step; neither says
which way the eval ran.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlvr import dist
from rlvr.engine_process import EngineProcess
from rlvr.eval_run import (
    EvalResult,
    eval_examples,
    merge_eval_results,
    run_eval,
    training_eval_metrics,
)
from rlvr.evaluation import problem_results
from rlvr.fsdp import full_tensors
from rlvr.tracking import RunLogger, memory_metrics


@dataclass
class _InFlight:
    step: int
    tickets: list[int]  # one per eval engine, in shard order
    waited_s: float  # the trainer's time spent handing the weights over


class LoopEvals:
    """Starts, collects and logs a run's evals. `run` is experiment.Run; no `eval_engines`:
    every eval blocks on the rollout engine."""

    def __init__(self, run, logger: RunLogger, eval_engines: Sequence[EngineProcess] = ()):
        self.run, self.logger, self.eval_engines = run, logger, list(eval_engines)
        self.pending: _InFlight | None = None
        self.done: list[float] = []  # the trainer's seconds per eval since the last collect()

    def _params(self) -> dict:
        cfg = self.run.cfg
        greedy = cfg.eval_temperature == 0
        return dict(n=1 if greedy else cfg.eval_n, temperature=cfg.eval_temperature,
                    top_p=cfg.eval_top_p, max_tokens=cfg.eval_max_tokens or cfg.max_tokens,
                    seed=cfg.seed, model=cfg.model_id)

    def start(self, step: int) -> None:
        """Evaluate the policy's weights as they are now, as the eval of `step`."""
        if not self.eval_engines:
            t0 = time.perf_counter()
            result = self._blocking(step)
            self._log(step, result, time.perf_counter() - t0, waited_s=None)
            return
        if self.pending is not None:  # one in flight: the engines serve requests in order
            self.collect(wait=True)
        t0 = time.perf_counter()
        tickets, n = [], len(self.eval_engines)
        for i, engine in enumerate(self.eval_engines):
            # each engine starts on its share as soon as it holds the weights, while the next
            # one receives them
            engine.load_weights(full_tensors(self.run.policy, engine.weights_dtype))
            tickets.append(engine.submit("eval", problems=dist.shard(self.run.evalset, n, i),
                                         **self._params(), label=f"step {step}"))
        self.pending = _InFlight(step, tickets, time.perf_counter() - t0)

    def collect(self, wait: bool = False) -> list[float]:
        """Log the evals that have finished (all of them with `wait`); the trainer's seconds
        spent on each (what the ETA counts per eval)."""
        p = self.pending
        pairs = list(zip(self.eval_engines, p.tickets)) if p is not None else []
        if p is not None and (wait or all(e.ready(t) for e, t in pairs)):
            t0 = time.perf_counter()
            result = merge_eval_results([e.result(t) for e, t in pairs])
            waited = p.waited_s + time.perf_counter() - t0
            self.pending = None
            self._log(p.step, result, p.waited_s + result.wall_s, waited)
        done, self.done = self.done, []
        return done

    def _blocking(self, step: int) -> EvalResult:
        run, cfg = self.run, self.run.cfg
        # [dist] each rollout engine evaluates its share of the problems (the ranks of a
        # tensor-parallel engine the same share); every rank then holds every record once
        n_engines, engine = dist.engines(cfg.rollout_tp)
        result = run_eval(run.engine, run.grader, dist.shard(run.evalset, n_engines, engine),
                          **self._params(), progress=sys.stdout, label=f"step {step}")
        parts = dist.all_gather_objects((result.records, result.n_timeouts))[::cfg.rollout_tp]
        result.records = [r for records, _ in parts for r in records]
        result.n_timeouts = sum(n for _, n in parts)
        return result

    def _log(self, step: int, result: EvalResult, eval_s: float, waited_s: float | None) -> None:
        run, logger = self.run, self.logger
        metrics = {f"eval/{k}": v for k, v in training_eval_metrics(result).items()}
        metrics["time/eval_s"] = eval_s
        if waited_s is not None:  # concurrent: what the trainer itself spent on it
            metrics["time/eval_wait_s"] = waited_s
        else:  # under their own names: the step with the same number logs its own mem/ figures
            metrics.update({k.replace("mem/", "mem/eval_"): v
                            for k, v in memory_metrics(run.device, run.mem_sampler).items()})
            if run.device.type == "cuda":
                # the sampler's large eval batches leave blocks in torch's cache that the next
                # update cannot reuse
                torch.cuda.empty_cache()
        logger.problems(step, problem_results(result.records))
        logger.log(step, metrics)
        for i, ex in enumerate(eval_examples(result, run.cfg.n_eval_examples_logged)):
            logger.text(f"eval_samples/{i}", ex, step)
        run.history.append((step, {k.removeprefix("eval/"): v for k, v in metrics.items()}))
        run.history.sort(key=lambda h: h[0])
        how = "" if waited_s is None else f", concurrently; the trainer waited {waited_s:.1f} s"
        print(f"[eval] step {step}: pass@1 {metrics['eval/pass@1']:.4f} "
              f"± {metrics['eval/pass@1_se']:.4f} on {int(metrics['eval/n_problems'])} problems "
              f"({eval_s:.1f} s{how})", flush=True)
        self.done.append(eval_s if waited_s is None else waited_s)

    def close(self) -> None:
        for engine in self.eval_engines:
            engine.close()
