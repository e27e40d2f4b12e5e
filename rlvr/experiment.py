"""The study loop: generate -> score -> advantages -> update -> sync weights, with periodic eval.

`train_step` is one step, top to bottom; `run` is the cadence around it (eval, checkpoints, ETA).
Building the run (inputs, models, engines) is rlvr/run_setup.py; its memory plan rlvr/run_plan.py.
"""

from __future__ import annotations

import functools
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from rlvr import dist
from rlvr.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final_policy
from rlvr.cli import EXIT_INTERRUPTED, fail
from rlvr.config import Config, parse_config
from rlvr.engine_process import EngineProcess
from rlvr.eval_run import (
    EvalProblem,
    problems_from_rows,
)
from rlvr.evaluation import EVAL_PROBLEMS_FILE, format_eval_table
from rlvr.fsdp import full_tensors
from rlvr.loop_evals import LoopEvals
from rlvr.objectives import compute_advantages
from rlvr.prompts import Problems, encode_problems
from rlvr.reward import BatchGrader
from rlvr.rollout import RolloutEngine
from rlvr.rollout_source import OneStepOff, OnPolicy
from rlvr.run_dir import Claim, claim_or_exit
from rlvr.run_plan import Resolved, dry_run, resolve_memory
from rlvr.run_setup import load_data, seed_everything, select_eval_rows, write_config
from rlvr.sampling import sampling_seed
from rlvr.tracking import ProcessMemorySampler, RunLogger, memory_metrics
from rlvr.training import UpdateBatch, UpdateSettings, policy_update


class PromptSampler:
    """Training prompts without replacement, reshuffled every epoch; resumable from (epoch, pos).
    One global sampler: every rank of a job draws the same prompts and keeps its own part."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        return random.Random(f"{self.seed}:epoch{self.epoch}").sample(range(self.n), self.n)

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos:self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


@dataclass
class Run:
    """The live objects of one run; `train_step` and the eval read and update them."""
    cfg: Config
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module   # the HF model (weights for the engine, checkpoints)
    trainer: torch.nn.Module  # what the update calls: logprobs.PolicyLogprobs, in DDP or FSDP2
    optimizer: torch.optim.Optimizer
    engine: RolloutEngine
    grader: BatchGrader
    train: Problems
    evalset: list[EvalProblem]
    mem: Resolved
    sampler: PromptSampler
    gen: torch.Generator      # the mini-batch order: the same state on every rank
    update: UpdateSettings
    ref_model: torch.nn.Module | None = None  # PolicyLogprobs of the frozen initial policy
    mem_sampler: ProcessMemorySampler | None = None
    history: list = field(default_factory=list)
    eval_engines: tuple = ()  # the concurrent evals' engine processes (rlvr/loop_evals.py)
    rollouts: OnPolicy | OneStepOff | None = None  # step 1's source (rlvr/rollout_source.py)


# ----------------------------------------------------------------------------- one step


def wants_sampler_logprobs(cfg: Config, engine_name: str, step: int) -> bool:
    """The engine's log-probs are needed for --rollout_is every step, and for the logged
    sampler/trainer gap on step 1 and every --logprob_gap_every steps. Not on the HF engine: it
    samples with the policy itself (gap 0 by construction) and its scores would hold
    [B, T, vocab] fp32 (~20 GB for Qwen at 64 x 512)."""
    if cfg.rollout_is != "none":
        return True
    every = cfg.logprob_gap_every
    return engine_name != "hf" and every > 0 and (step == 1 or step % every == 0)


def rollout_request(run: Run, step: int, idx: list[int]) -> dict:
    """The generate() call of step `step`'s rollouts of the prompts `idx`."""
    cfg = run.cfg
    return dict(prompts=[run.train.prompt_ids[i] for i in idx], n=cfg.rollouts_per_prompt,
                temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                return_logprobs=wants_sampler_logprobs(cfg, run.engine.name, step),
                seeds=[sampling_seed(cfg.seed, "train", step, i) for i in idx])


def train_step(run: Run, step: int) -> dict[str, float]:
    cfg, k = run.cfg, run.cfg.rollouts_per_prompt
    t = {"start": time.perf_counter()}
    # 1. generate  [dist] this rank's whole prompt groups of the step's global batch
    got = run.rollouts.take(step, lambda: dist.shard(run.sampler.next(cfg.prompts_per_step)))
    idx, outs = got.idx, got.groups
    comps = [c for group in outs for c in group]
    t["rollout"] = time.perf_counter()
    # 2. score
    graded = run.grader.grade_batch([c.text for c in comps],
                                    [run.train.rows[i]["answer"] for i in idx for _ in range(k)])
    correct = torch.tensor(graded.scores)
    t["reward"] = time.perf_counter()
    # 3. advantages
    adv, keep = compute_advantages(correct, cfg.objective, cfg.lambda_psr, k)
    logps = [c.logprobs for c in comps]
    batch = UpdateBatch([run.train.prompt_ids[i] for i in idx for _ in range(k)],
                        [c.token_ids for c in comps], adv, keep,
                        logps if all(lp is not None for lp in logps) else None)
    # 4. update
    sample_memory(run)  # the rollout's high-water mark, before its blocks are handed back
    run.engine.sleep()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()  # the rollout's cached blocks must not sit between activations
    t["update_start"] = time.perf_counter()
    # [dist] the mini-batch schedule and its normalisers are the global batch's (training.py)
    upd = policy_update(run.trainer, run.optimizer, batch, run.update, run.gen, run.ref_model)
    if run.device.type == "cuda":
        torch.cuda.synchronize()  # the last optimizer step's kernels belong to the update
    t["update_end"] = time.perf_counter()
    sample_memory(run)
    t["train"] = time.perf_counter()
    # 5. sync weights into the rollout engine  [dist] FSDP: each parameter gathered on every rank
    run.rollouts.updated(run.policy)
    t["sync"] = time.perf_counter()
    upd["train/rollout_staleness"] = step - 1 - got.weights_step  # updates behind (0: on-policy)
    return step_metrics(run, comps, correct, keep, graded, upd, t)


def step_metrics(run: Run, comps, correct, keep, graded, upd: dict, t: dict) -> dict[str, float]:
    # [dist] the figures of the global batch: every rank's samples and counts, gathered
    samples = dist.all_gather_rows(torch.tensor(
        [[float(r), float(kk), len(c.token_ids), float(c.truncated)]
         for r, kk, c in zip(correct.tolist(), keep.tolist(), comps)], dtype=torch.float64))
    n_timeouts, n_no_box = dist.all_reduce_sum(
        torch.tensor([graded.n_timeouts, graded.n_no_box], dtype=torch.float64)).tolist()
    correct, kept, lengths, truncated = samples.T
    groups = correct.view(-1, run.cfg.rollouts_per_prompt)
    n_gen = lengths.sum().item()
    step_s = t["sync"] - t["start"]
    passthrough = ("loss", "grad_norm", "entropy", "clip_frac", "ratio_max", "ratio_min",
                   "ratio_mean", "n_updates", "skipped_empty_minibatches",
                   "nonfinite_minibatches", "separate_old_logprob_pass")
    return {
        "train/reward_mean": correct.mean().item(),
        "train/samples_kept": int(kept.sum()),
        **{f"train/{k}": upd[k] for k in passthrough},
        **{k: v for k, v in upd.items() if k.startswith("train/")},  # mismatch / IS stats
        "train/response_len": n_gen / len(correct),
        "train/truncated_frac": truncated.mean().item(),
        "train/no_signal_frac": (groups.min(1).values == groups.max(1).values).float().mean()
        .item(),
        "train/skipped_prompts": run.train.n_skipped,
        "train/grade_timeouts": int(n_timeouts),
        "train/no_box_frac": n_no_box / len(correct),
        "train/epoch": run.sampler.epoch,
        "time/rollout_s": t["rollout"] - t["start"], "time/reward_s": t["reward"] - t["rollout"],
        "time/train_s": t["train"] - t["reward"], "time/sync_s": t["sync"] - t["train"],
        # of train_s: the forward/backward passes and optimizer steps alone (the rest is vLLM's
        # sleep, emptying torch's cache and the memory samples)
        "time/update_s": t["update_end"] - t["update_start"],
        "time/step_s": step_s,
        "perf/tokens_per_s": n_gen / step_s,
        "perf/rollout_tokens_per_s": n_gen / max(t["rollout"] - t["start"], 1e-9),
        **memory_metrics(run.device, run.mem_sampler,
                         (run.mem.plan or {}).get("planned_peak_gib")),
    }


def sample_memory(run: Run) -> None:
    if run.mem_sampler is not None:
        run.mem_sampler.sample()


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- the run


class Eta:
    """Time left: remaining steps at the mean step time plus remaining evals at the mean eval
    time. Steps are timed in this process; evals also count those of the run's eval history
    (`eval_s`, from a checkpoint on --resume), so a resumed run's first ETA includes the evals
    still to come (an eval can cost as much as many steps)."""

    def __init__(self, cfg: Config, step: int, eval_s: list[float] | None = None):
        self.cfg, self.steps, self.evals = cfg, [], list(eval_s or [])
        self.start_step = step

    def remaining_evals(self, step: int) -> int:
        last = self.cfg.n_train_steps
        return sum(1 for s in range(step + 1, last + 1) if s % self.cfg.eval_every == 0
                   or s == last)

    def minutes(self, step: int) -> float:
        step_s = np.mean(self.steps) if self.steps else 0.0
        eval_s = np.mean(self.evals) if self.evals else 0.0
        return (step_s * (self.cfg.n_train_steps - step)
                + eval_s * self.remaining_evals(step)) / 60


def history_eval_seconds(history: list) -> list[float]:
    """The measured duration of each eval in a run's eval history (LoopEvals' records)."""
    return [m["time/eval_s"] for _, m in history if "time/eval_s" in m]


def checkpoint(run: Run, at_step: int) -> Path:
    """[dist] Collective: every rank calls it (checkpoint.py: who writes what)."""
    try:
        return save_checkpoint(run.cfg.run_dir, at_step, run.policy, run.optimizer,
                               {"sampler": run.rollouts.cursor(), "generator": run.gen.get_state(),
                                "eval_history": run.history, "world_size": dist.world().size})
    except (OSError, RuntimeError) as e:  # a full disk is named as such by save_checkpoint
        fail(f"could not write the step-{at_step} checkpoint under {run.cfg.run_dir}: "
             f"{str(e).splitlines()[0]}; free disk space (or fix the directory's permissions), "
             "then continue with --resume")


def restore(run: Run) -> int:
    """Continue from the latest checkpoint (0 if there is none)."""
    cfg = run.cfg
    ckpt = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        # crashed before its first checkpoint: nothing to continue, so start it again from step 0
        print(f"[resume] no checkpoint under {cfg.run_dir}: restarting the run from step 0",
              flush=True)
        if dist.is_main():  # [dist] rank 0's files
            for old in [*cfg.run_dir.glob("events.out.tfevents.*"), cfg.run_dir / "metrics.jsonl",
                        cfg.run_dir / EVAL_PROBLEMS_FILE]:
                old.unlink(missing_ok=True)
    if ckpt is None:
        return 0
    # every rank loads it, at whatever world size it was written (the data cursor is global)
    state = load_checkpoint(ckpt, run.policy, run.optimizer)
    run.history = state["eval_history"]
    run.sampler = PromptSampler(len(run.train.rows), cfg.seed, **state["sampler"])
    run.gen.set_state(state["generator"])
    run.engine.load_weights(full_tensors(run.policy, getattr(run.engine, "weights_dtype",
                                                             torch.bfloat16)))
    print(f"[resume] continuing {cfg.run_name} from step {state['step']} ({ckpt})", flush=True)
    return state["step"]


def eval_problems(rows: list[dict], tokenizer, cfg: Config) -> list[EvalProblem]:
    enc = encode_problems(rows, tokenizer, cfg.prompt_style, cfg.max_prompt_tokens)
    return problems_from_rows(enc.rows, enc.prompt_ids, "math_subset")


def build(cfg: Config) -> Run:
    from rlvr.modeling import ModelSourceError, check_model_source
    from rlvr.run_setup import load_models

    try:  # seconds, before the data, the memory plan and any weights
        check_model_source(cfg.model_id)
    except ModelSourceError as e:
        fail(f"--model_id: {e}")
    train_rows, test_rows = load_data(cfg)
    device = (torch.device("cuda", dist.world().local_rank) if torch.cuda.is_available()
              else torch.device("cpu"))
    eval_rows = select_eval_rows(test_rows, cfg.eval_limit)
    mem = resolve_memory(cfg, device, len(eval_rows))
    models = load_models(cfg, device, mem)
    seed_everything(cfg.seed)  # after the engine: vLLM's in-process engine reseeds global RNGs
    tokenizer = models.tokenizer
    train = encode_problems(train_rows, tokenizer, cfg.prompt_style, cfg.max_prompt_tokens)
    return Run(cfg, device, tokenizer, models.policy, models.trainer, models.optimizer,
               models.engine,
               BatchGrader(num_workers=cfg.grader_workers, timeout_s=cfg.grade_timeout_s),
               train, eval_problems(eval_rows, tokenizer, cfg), mem,
               PromptSampler(len(train.rows), cfg.seed), torch.Generator().manual_seed(cfg.seed),
               UpdateSettings.for_run(cfg, mem, tokenizer.pad_token_id, device), models.reference,
               ProcessMemorySampler() if device.type == "cuda" else None,
               eval_engines=models.eval_engines)


def rollout_source(run: Run, step: int) -> OnPolicy | OneStepOff:
    """Step 1's source from step `step` on (after the restore): on-policy, or one step off."""
    request = functools.partial(rollout_request, run)
    if not run.cfg.async_rollout:
        return OnPolicy(run.engine, request, run.sampler)
    return OneStepOff(run.engine, request, run.sampler, run.cfg.n_train_steps,
                      run.engine.weights_dtype, loaded_step=step)


def run(cfg: Config) -> dict:
    if cfg.dry_run:
        dry_run(cfg)
        return {}
    # before anything loads: two runs never share a directory (rlvr/run_dir.py)  [dist] rank 0's
    with dist.on_main(lambda: claim_or_exit(cfg.run_dir, cfg.resume)) as claim:
        out = train(cfg, claim)
        claim.mark_done(cfg.n_train_steps)  # last: after the final model and every metric
    return out


def train(cfg: Config, claim: Claim) -> dict:
    r = build(cfg)
    try:
        return _train(cfg, claim, r)
    finally:  # engine processes are not daemons: a run that stops, however, ends them
        for proc in (r.engine, *r.eval_engines):
            if isinstance(proc, EngineProcess):
                proc.close()
        r.grader.close()


def _train(cfg: Config, claim: Claim, r: Run) -> dict:
    step = restore(r)
    # [dist] rank 0 writes the run's config, logs and metrics (the other ranks' logger is mute)
    launch = {"world_size": dist.world().size, "mode": "fsdp" if r.mem.fsdp
              else "ddp" if dist.under_torchrun() else "single"}
    if dist.is_main():
        write_config(cfg, r.device, step, r.mem.plan, launch)
    claim.mark_ready()
    logger = dist.on_main(lambda: RunLogger(cfg.run_dir, resume_step=step if step else None))
    print(f"[run] {cfg.run_name}: {cfg.objective} on {cfg.model_id}, engine {r.engine.name}, "
          f"device {r.device} x {launch['world_size']} ({launch['mode']}), optimizer "
          f"{r.mem.optim}, {len(r.train.rows)} train prompts "
          f"({r.train.n_skipped} skipped), {len(r.evalset)} eval problems", flush=True)
    eta = Eta(cfg, step, history_eval_seconds(r.history))
    r.rollouts = rollout_source(r, step)
    evals = LoopEvals(r, logger, r.eval_engines)  # blocking, or concurrent on engines of its own
    try:
        if step == 0 and not r.history:
            evals.start(0)
        nonfinite_streak = 0
        while step < cfg.n_train_steps:
            step += 1
            metrics = train_step(r, step)
            logger.log(step, metrics)
            eta.steps.append(metrics["time/step_s"])
            eta.evals += evals.collect()
            print(f"step {step}/{cfg.n_train_steps} | reward {metrics['train/reward_mean']:.3f} "
                  f"| kept {metrics['train/samples_kept']}/{cfg.rollout_batch_size} "
                  f"| loss {metrics['train/loss']:.4g} | clip {metrics['train/clip_frac']:.3f} "
                  f"| {metrics['time/step_s']:.1f} s/step | ETA {eta.minutes(step):.1f} min",
                  flush=True)
            nonfinite_streak = nonfinite_streak + 1 if metrics["train/nonfinite_minibatches"] else 0
            if nonfinite_streak >= 3:
                checkpoint(r, step)
                fail(f"non-finite loss or gradient in {nonfinite_streak} steps in a row (last at "
                     f"step {step}; checkpoint saved, run stopped); start a new run with a lower "
                     "--lr or --max_grad_norm")
            if step % cfg.eval_every == 0 or step == cfg.n_train_steps:
                evals.start(step)
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.n_train_steps:
                eta.evals += evals.collect(wait=True)  # a checkpoint holds every eval up to it
                checkpoint(r, step)
        evals.collect(wait=True)  # the last eval ends the run
        last = checkpoint(r, step)
        try:  # adamw_kahan: hard-links the checkpoint's bf16 weights
            save_final_policy(cfg.run_dir, r.policy, r.tokenizer, checkpoint=last)
        except OSError as e:  # a full disk is named as such (CheckpointError)
            fail(f"could not write the final model under {cfg.run_dir}: "
                 f"{str(e).splitlines()[0]}; free disk space, then re-run with --resume")
    finally:
        evals.close()
        r.rollouts.close()
        logger.close()
    print(f"\n{cfg.run_name}: eval summary\n{format_eval_table(r.history)}", flush=True)
    return {"history": r.history, "run_dir": str(cfg.run_dir)}


def interrupted_message(cfg: Config) -> str:
    """What a SIGINT prints: where the run stands and the command that continues it."""
    if not (cfg.run_dir / "config.json").is_file():
        return "interrupted before the run wrote its config.json: run the same command again"
    ckpt = latest_checkpoint(cfg.run_dir)
    command = (f"python MATH_experiment.py --output_dir {shlex.quote(cfg.output_dir)} "
               f"--exp_name {shlex.quote(cfg.run_name)} --resume")
    if ckpt is None:
        return (f"interrupted: {cfg.run_dir} has no checkpoint yet; `{command}` starts it again "
                "from step 0")
    step = int(ckpt.name.removeprefix("step_"))
    return f"interrupted: continue from the step-{step} checkpoint with `{command}`"


@record  # under torchrun: a failing rank's exception goes into torchrun's failure summary
def main(argv: list[str] | None = None, cfg: Config | None = None) -> int:
    cfg = cfg if cfg is not None else parse_config(argv)
    launch, cuda = dist.launched(), torch.cuda.is_available()
    if (problem := cfg.launch_problem(launch.size, launch.local_size, dist.under_torchrun(),
                                      cuda)) is not None:
        fail(problem)
    dist.init("cuda" if cuda else "cpu")  # a torchrun job's process group (nothing alone)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print(interrupted_message(cfg), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0
