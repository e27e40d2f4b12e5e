"""The in-loop evals of a training run: the eval of step k, logged at step k.

An eval runs one of two ways, with the same records either way (the same weights and the same
per-problem seeds, rlvr/sampling.py):
- on the rollout engine, the trainer waiting for it;
- concurrently (--concurrent_eval): on an eval engine in a process of its own
  (rlvr/engine_process.py), which receives a copy of step k's weights and evaluates them while
  the next training steps run. One eval is in flight at a time; the trainer waits only when the
  next one is due before the last has finished, before a checkpoint (which must hold every eval
  up to its step) and at the end of the run.

The loop calls `start(step)` where an eval is due and `collect()` after every step; neither says
which way the eval ran.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from rlvr import dist
from rlvr.engine_process import EngineProcess
from rlvr.eval_run import EvalResult, eval_examples, run_eval, training_eval_metrics
from rlvr.evaluation import problem_results
from rlvr.fsdp import full_tensors
from rlvr.tracking import RunLogger, memory_metrics


@dataclass
class _InFlight:
    step: int
    ticket: int
    waited_s: float  # the trainer's time spent handing the weights over


class LoopEvals:
    """Starts, collects and logs a run's evals. `run` is experiment.Run."""

    def __init__(self, run, logger: RunLogger, eval_engine: EngineProcess | None = None):
        self.run, self.logger, self.eval_engine = run, logger, eval_engine
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
        if self.eval_engine is None:
            t0 = time.perf_counter()
            result = self._blocking(step)
            self._log(step, result, time.perf_counter() - t0, waited_s=None)
            return
        if self.pending is not None:  # one in flight: the engine serves requests in order
            self.collect(wait=True)
        t0 = time.perf_counter()
        self.eval_engine.load_weights(full_tensors(self.run.policy,
                                                   self.eval_engine.weights_dtype))
        ticket = self.eval_engine.submit("eval", problems=self.run.evalset, **self._params(),
                                         label=f"step {step}")
        self.pending = _InFlight(step, ticket, time.perf_counter() - t0)

    def collect(self, wait: bool = False) -> list[float]:
        """Log the evals that have finished (all of them with `wait`); the trainer's seconds
        spent on each (what the ETA counts per eval)."""
        p = self.pending
        if p is not None and (wait or self.eval_engine.ready(p.ticket)):
            t0 = time.perf_counter()
            result = self.eval_engine.result(p.ticket)
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
        if self.eval_engine is not None:
            self.eval_engine.close()
