"""The study loop: generate -> score -> advantages -> update -> sync weights, with periodic eval."""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from rlvr.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final_policy
from rlvr.config import RESUMABLE_FIELDS, Config, load_config, parse_config
from rlvr.data import DataError, load_subset, stratified_subset
from rlvr.engines import make_engine
from rlvr.evaluation import format_eval_table, summarize_eval
from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer, resolve_model_dir
from rlvr.objectives import compute_advantages
from rlvr.prompts import encode_prompt
from rlvr.reward import BatchGrader
from rlvr.tracking import RunLogger, provenance
from rlvr.training import UpdateBatch, compute_old_logprobs, make_optimizer, policy_update


class PromptSampler:
    """Training prompts without replacement, reshuffled every epoch; resumable from (epoch, pos)."""

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
class Problems:
    rows: list[dict]
    prompt_ids: list[list[int]]
    n_skipped: int  # prompts over --max_prompt_tokens


def encode_problems(rows: list[dict], tokenizer, cfg: Config) -> Problems:
    kept_rows, ids, skipped = [], [], 0
    for row in rows:
        p = encode_prompt(tokenizer, row["problem"], cfg.prompt_style)
        if len(p) > cfg.max_prompt_tokens:
            skipped += 1
            continue
        kept_rows.append(row)
        ids.append(p)
    return Problems(kept_rows, ids, skipped)


# The eval sample must not depend on --seed: runs of several seeds are compared on one problem set.
EVAL_SAMPLE_SEED = 0


def select_eval_rows(rows: list[dict], limit: int | None,
                     seed: int = EVAL_SAMPLE_SEED) -> list[dict]:
    """The whole test subset, or a seeded sample of `limit` problems stratified like it."""
    if limit is None or limit >= len(rows):
        return rows
    return stratified_subset(rows, limit / len(rows), seed)


def evaluate(engine, grader: BatchGrader, probs: Problems, cfg: Config) -> tuple[dict, list[str]]:
    greedy = cfg.eval_temperature == 0
    n = 1 if greedy else cfg.eval_n
    outs = engine.generate(probs.prompt_ids, n=n, temperature=cfg.eval_temperature,
                           max_tokens=cfg.eval_max_tokens or cfg.max_tokens)
    texts = [c.text for group in outs for c in group]
    golds = [row["answer"] for row in probs.rows for _ in range(n)]
    graded = grader.grade_batch(texts, golds)
    correct = [graded.scores[i * n:(i + 1) * n] for i in range(len(probs.rows))]
    metrics = summarize_eval(correct, [r["subject"] for r in probs.rows],
                             [r["level"] for r in probs.rows])
    metrics["grade_timeouts"] = graded.n_timeouts
    metrics["no_box_frac"] = graded.n_no_box / max(len(texts), 1)
    metrics["response_len"] = float(np.mean([len(c.token_ids) for g in outs for c in g]))
    examples = [
        f"**{r.get('unique_id', i)}** (gold `{r['answer']}`, score {correct[i][0]:.0f})\n\n"
        f"{outs[i][0].text}" for i, r in enumerate(probs.rows[:cfg.n_eval_examples_logged])
    ]
    return metrics, examples


def sampler_logprob_gap(comps, old_logp: list[torch.Tensor]) -> dict[str, float]:
    """|log pi_old - log pi_sampler| per token: how far the trainer's numerics (HF, fp32 masters
    with bf16 autocast) are from the engine's that actually drew the samples (vLLM, bf16)."""
    diffs = [(old - torch.tensor(c.logprobs)).abs() for c, old in zip(comps, old_logp)
             if c.logprobs is not None and len(c.logprobs) == len(old) and len(old)]
    if not diffs:
        return {}
    d = torch.cat(diffs)
    return {"train/logp_gap_mean": d.mean().item(), "train/logp_gap_max": d.max().item()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: Config) -> Config:
    """Refuse to clobber an existing run; on --resume, check the saved config is compatible."""
    run_dir = cfg.run_dir
    if not cfg.resume:
        if run_dir.exists():
            raise SystemExit(f"error: run directory {run_dir} already exists; pass --resume to "
                             "continue it, or choose another --exp_name / --output_dir")
        return cfg
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        raise SystemExit(f"error: nothing to resume: {saved_path} not found")
    saved = load_config(saved_path)
    diffs = [f"--{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
             for k in cfg.to_json() if k not in RESUMABLE_FIELDS
             and getattr(saved, k) != getattr(cfg, k)]
    if diffs:
        raise SystemExit("error: --resume may change only the step, eval and save settings; "
                         "changed: " + ", ".join(diffs))
    return cfg


def write_config(cfg: Config, device: torch.device) -> None:
    """config.json; a resume keeps the original provenance and appends its own under "resumes"."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.json"
    data = {**cfg.to_json(), "provenance": provenance(device)}
    if cfg.resume and path.exists():
        old = json.loads(path.read_text())
        data["provenance"] = old.get("provenance", data["provenance"])
        data["resumes"] = old.get("resumes", []) + [provenance(device)]
    tmp = cfg.run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, cfg.run_dir / "config.json")


def run(cfg: Config) -> dict:
    cfg = prepare_run_dir(cfg)
    try:  # all input checks happen before anything is written
        train_rows = load_subset(cfg.data_dir, "train")
        test_rows = load_subset(cfg.data_dir, "test")
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gc = {"true": True, "false": False}.get(cfg.gradient_checkpointing, "auto")
    try:
        model_dir = resolve_model_dir(cfg.model_id)
        tokenizer = load_tokenizer(model_dir)
        policy = load_policy(model_dir, device, gc)
    except (OSError, ValueError) as e:  # a bad path or hub id, an unsupported model
        raise SystemExit(f"error: cannot load --model_id {cfg.model_id}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    eos_ids = eos_token_ids(policy, tokenizer)
    engine = make_engine(cfg.backend, policy, tokenizer, model_dir, eos_ids, cfg)
    seed_everything(cfg.seed)  # after the engine: vLLM's in-process engine reseeds global RNGs
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    train = encode_problems(train_rows, tokenizer, cfg)
    evalset = encode_problems(select_eval_rows(test_rows, cfg.eval_limit), tokenizer, cfg)
    mini = cfg.mini_batch_size or cfg.rollout_batch_size
    gen = torch.Generator().manual_seed(cfg.seed)

    step, sampler, history = 0, PromptSampler(len(train.rows), cfg.seed), []
    ckpt = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        # crashed before its first checkpoint: nothing to continue, so start it again from step 0
        print(f"[resume] no checkpoint under {cfg.run_dir}: restarting the run from step 0",
              flush=True)
        for old in [*cfg.run_dir.glob("events.out.tfevents.*"), cfg.run_dir / "metrics.jsonl"]:
            old.unlink(missing_ok=True)
    if ckpt is not None:
        state = load_checkpoint(ckpt, policy, optimizer)
        step, history = state["step"], state["eval_history"]
        sampler = PromptSampler(len(train.rows), cfg.seed, **state["sampler"])
        gen.set_state(state["generator"])
        engine.sync_weights(policy)
        print(f"[resume] continuing {cfg.run_name} from step {step} ({ckpt})", flush=True)
    write_config(cfg, device)
    logger = RunLogger(cfg.run_dir, resume_step=step if ckpt is not None else None)
    print(f"[run] {cfg.run_name}: {cfg.objective} on {cfg.model_id}, engine {engine.name}, "
          f"device {device}, {len(train.rows)} train prompts ({train.n_skipped} skipped), "
          f"{len(evalset.rows)} eval problems", flush=True)

    grader = BatchGrader(num_workers=cfg.grader_workers, timeout_s=cfg.grade_timeout_s)

    def do_eval(at_step: int) -> None:
        t0 = time.perf_counter()
        metrics, examples = evaluate(engine, grader, evalset, cfg)
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        metrics["time/eval_s"] = time.perf_counter() - t0
        logger.log(at_step, metrics)
        for i, ex in enumerate(examples):
            logger.text(f"eval_samples/{i}", ex, at_step)
        history.append((at_step, {k.removeprefix("eval/"): v for k, v in metrics.items()}))
        print(f"[eval] step {at_step}: pass@1 {metrics['eval/pass@1']:.4f} "
              f"± {metrics['eval/pass@1_se']:.4f} on {int(metrics['eval/n_problems'])} problems "
              f"({metrics['time/eval_s']:.1f} s)", flush=True)

    def checkpoint(at_step: int) -> None:
        try:
            save_checkpoint(cfg.run_dir, at_step, policy, optimizer,
                            {"sampler": sampler.state(), "generator": gen.get_state(),
                             "eval_history": history})
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
            raise SystemExit(f"error: could not write the step-{at_step} checkpoint under "
                             f"{cfg.run_dir}: {str(e).splitlines()[0]}") from None

    try:
        if step == 0 and not history:
            do_eval(0)
        run_start, first_step, nonfinite_streak = time.perf_counter(), step, 0
        while step < cfg.n_train_steps:
            step += 1
            t_step = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # 1. generate
            idx = sampler.next(cfg.prompts_per_step)
            k = cfg.rollouts_per_prompt
            every = cfg.logprob_gap_every
            # Not on the HF engine: it samples with the policy itself (gap 0 by construction) and
            # its per-step scores would hold [64, 151,936] fp32 per token for Qwen (~20 GB).
            gap_step = engine.name != "hf" and every > 0 and (step == 1 or step % every == 0)
            t0 = time.perf_counter()
            outs = engine.generate([train.prompt_ids[i] for i in idx], n=k,
                                   temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                   return_logprobs=gap_step)
            t_rollout = time.perf_counter() - t0
            comps = [c for group in outs for c in group]
            prompts = [train.prompt_ids[i] for i in idx for _ in range(k)]
            # 2. score
            t0 = time.perf_counter()
            graded = grader.grade_batch([c.text for c in comps],
                                        [train.rows[i]["answer"] for i in idx for _ in range(k)])
            t_reward = time.perf_counter() - t0
            correct = torch.tensor(graded.scores)
            # 3. advantages
            adv, keep = compute_advantages(correct, cfg.objective, cfg.lambda_psr, k)
            batch = UpdateBatch(prompts, [c.token_ids for c in comps], adv, keep)
            # 4. update
            t0 = time.perf_counter()
            engine.sleep()
            old_logp, entropy = compute_old_logprobs(policy, batch, cfg.temperature,
                                                     cfg.micro_batch_size,
                                                     tokenizer.pad_token_id, device)
            gap = sampler_logprob_gap(comps, old_logp) if gap_step else {}
            upd = policy_update(policy, optimizer, batch, old_logp, temperature=cfg.temperature,
                                clip_range=cfg.clip_range, mini_batch_size=mini,
                                micro_batch_size=cfg.micro_batch_size,
                                max_grad_norm=cfg.max_grad_norm, pad_id=tokenizer.pad_token_id,
                                device=device, generator=gen)
            t_train = time.perf_counter() - t0
            # 5. sync weights into the rollout engine (after the step's last optimizer update)
            t0 = time.perf_counter()
            engine.sync_weights(policy)
            t_sync = time.perf_counter() - t0

            step_s = time.perf_counter() - t_step
            groups = correct.view(-1, k)
            n_gen = sum(len(c.token_ids) for c in comps)
            metrics = {
                "train/reward_mean": correct.mean().item(),
                "train/samples_kept": int(keep.sum()),
                "train/loss": upd["loss"],
                "train/grad_norm": upd["grad_norm"],
                "train/entropy": entropy,
                "train/clip_frac": upd["clip_frac"],
                "train/ratio_max": upd["ratio_max"],
                "train/ratio_min": upd["ratio_min"],
                "train/ratio_mean": upd["ratio_mean"],
                "train/n_updates": upd["n_updates"],
                "train/skipped_empty_minibatches": upd["skipped_empty_minibatches"],
                "train/nonfinite_minibatches": upd["nonfinite_minibatches"],
                "train/response_len": n_gen / len(comps),
                "train/truncated_frac": float(np.mean([c.truncated for c in comps])),
                "train/no_signal_frac": (groups.min(1).values == groups.max(1).values)
                .float().mean().item(),
                "train/skipped_prompts": train.n_skipped,
                "train/grade_timeouts": graded.n_timeouts,
                "train/no_box_frac": graded.n_no_box / len(comps),
                "train/epoch": sampler.epoch,
                "time/rollout_s": t_rollout, "time/reward_s": t_reward,
                "time/train_s": t_train, "time/sync_s": t_sync, "time/step_s": step_s,
                "perf/tokens_per_s": n_gen / step_s,
                "perf/rollout_tokens_per_s": n_gen / max(t_rollout, 1e-9),
                "mem/peak_gb": peak_memory_gb(device),
                **gap,
            }
            logger.log(step, metrics)
            done = step - first_step
            eta = (time.perf_counter() - run_start) / done * (cfg.n_train_steps - step)
            print(f"step {step}/{cfg.n_train_steps} | reward {metrics['train/reward_mean']:.3f} "
                  f"| kept {int(keep.sum())}/{len(comps)} | loss {upd['loss']:.4g} "
                  f"| clip {upd['clip_frac']:.3f} | {step_s:.1f} s/step | ETA {eta / 60:.1f} min",
                  flush=True)

            nonfinite_streak = nonfinite_streak + 1 if upd["nonfinite_minibatches"] else 0
            if nonfinite_streak >= 3:
                checkpoint(step)
                raise SystemExit(f"error: non-finite loss or gradient in {nonfinite_streak} steps "
                                 f"in a row (last at step {step}); checkpoint saved, run stopped")
            if step % cfg.eval_every == 0 or step == cfg.n_train_steps:
                do_eval(step)
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.n_train_steps:
                checkpoint(step)
        checkpoint(step)
        save_final_policy(cfg.run_dir, policy, tokenizer)
    finally:
        grader.close()
        logger.close()
    print(f"\n{cfg.run_name}: eval summary\n{format_eval_table(history)}", flush=True)
    return {"history": history, "run_dir": str(cfg.run_dir)}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
