#!/usr/bin/env python
"""Whole-run speed and memory: real steps of MATH_experiment.py on a random Qwen2.5-shaped model.

    python bench/whole_run.py --shape 0.5B --steps 30 --out whole.json [--length_mix] \
        [-- more MATH_experiment.py flags, e.g. --gpu_memory_gb 24]

Runs the product's loop in this process (the memory plan decides everything it decides for a
user) with the published settings unless flags say otherwise: W_REINFORCE (every sample trains),
64 x 512-token rollouts, eval every 10 steps on the whole eval set. Reads metrics.jsonl back and
prints one table: median s/step and phases after the first two steps, eval time (and, for
concurrent evals, the trainer's wait for them), start-up, the end-of-run save, this process's GPU
memory peak per step as the driver counts it (nvidia-smi's per-process figure) and whether it
stays flat after the first eval, and the projected wall time of the published 80-step run with 9
evals, from this run's own evals (the line says so when they were limited by --eval_limit).
Random weights run every response to the limit (the worst case); --length_mix draws real-looking
lengths instead (bench/length_mix.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build_random_qwen, math_texts  # noqa: E402


def timed(module, name: str, sink: dict) -> None:
    """Wrap module.name so its total wall time lands in sink[name]."""
    fn = getattr(module, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sink[name] = sink.get(name, 0.0) + time.perf_counter() - t0

    setattr(module, name, wrapper)


def summarize(lines: list[dict], wall: float, saves: dict) -> dict:
    steps = [ln for ln in lines if "time/step_s" in ln]
    evals = [ln for ln in lines if "time/eval_s" in ln]
    timed_steps = steps[2:] or steps
    keys = ("time/step_s", "time/rollout_s", "time/reward_s", "time/train_s", "time/update_s",
            "time/sync_s", "train/response_len", "mem/peak_gb")
    med = {k.replace("/", "_"): statistics.median(ln[k] for ln in timed_steps) for k in keys}
    # the in-loop evals (the first runs beside the start of training, the others beside its
    # steps) apart from the last, which ends the run and runs alone
    eval_s = statistics.median(ln["time/eval_s"] for ln in evals[:-1] or evals)
    # what the trainer spent on each eval: all of it when it waited, the hand-over and any
    # wait for a concurrent one (the last eval, which ends the run, it waits for in full)
    waits = [ln.get("time/eval_wait_s", ln["time/eval_s"]) for ln in evals]
    wait_s = statistics.median(waits[:-1] or waits)
    loop_s = sum(ln["time/step_s"] for ln in steps) + sum(waits)
    save_s = sum(saves.values())
    startup_s = wall - loop_s - save_s
    proc = [ln.get("mem/process_peak_gb") or ln.get("mem/eval_process_peak_gb") for ln in lines]
    proc = [p for p in proc if p is not None]
    first_eval_after = next((i for i, ln in enumerate(lines) if "time/eval_s" in ln
                             and ln["step"] > 0), len(lines))
    after = [p for ln, p in zip(lines[first_eval_after:], proc[first_eval_after:]) if p]
    return {
        "steps": len(steps), "evals": len(evals), "wall_s": wall, "startup_s": startup_s,
        "final_save_s": save_s, "eval_s": eval_s, "last_eval_s": evals[-1]["time/eval_s"],
        "eval_wait_s": wait_s,
        "last_eval_wait_s": waits[-1], **med,
        "process_peak_gib": max(proc) if proc else None,
        "process_peak_series_gib": [round(p, 2) for p in proc],
        "train_s_series": [round(ln["time/train_s"], 3) for ln in steps],
        # flat: the peak after the first eval is not above the peak up to it (+3%: the rollout's
        # and update's allocations vary a little with the batch)
        "flat_after_first_eval": (max(after) <= 1.03 * max(proc[:first_eval_after + 1])
                                  if after and proc else None),
        "projected_80_steps_9_evals_s": (80 * med["time_step_s"] + 8 * wait_s + waits[-1]
                                         + startup_s + save_s),
    }


def compile_cache_counters() -> dict:
    """This process's hits, misses and bypasses of inductor's FX-graph cache and AOTAutograd's
    (with --compile: whether a warm cache served the policy's graphs, and if not, why)."""
    from torch._dynamo.utils import counters

    return {f"{group}/{name}": n for group in ("inductor", "aot_autograd")
            for name, n in counters[group].items() if "cache" in name or "bypass" in name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B", "7B"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--length_mix", action="store_true")
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--runs_dir", default="/tmp/rlvr_bench_runs")
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more MATH_experiment.py flags (after --)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                  math_texts(args.data_dir))
    build_s = time.perf_counter() - t0
    name = f"whole_{args.shape}_{int(time.time())}"
    flags = ["--model_id", str(model_dir), "--objective", "W_REINFORCE", "--n_train_steps",
             str(args.steps), "--eval_every", "10", "--save_every", "0", "--data_dir",
             args.data_dir, "--output_dir", args.runs_dir, "--exp_name", name, *args.extra]
    print("$ MATH_experiment.py", " ".join(flags), flush=True)

    import rlvr.experiment as experiment
    import rlvr.run_setup as run_setup
    from rlvr.config import parse_config

    saves: dict = {}
    timed(experiment, "save_final_policy", saves)
    timed(experiment, "checkpoint", saves)
    if args.length_mix:
        from bench import length_mix

        build_engine = run_setup.build_engine

        def with_mix(*a, **kw):
            engine = build_engine(*a, **kw)
            length_mix.install(engine)
            return engine

        run_setup.build_engine = with_mix
    t0 = time.perf_counter()
    experiment.main(cfg=parse_config(flags))
    wall = time.perf_counter() - t0

    run_dir = Path(args.runs_dir) / name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    cfg = json.loads((run_dir / "config.json").read_text())
    ckpt_bytes = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    final_bytes = sum(f.stat().st_size for f in (run_dir / "final_model").rglob("*")
                      if f.is_file())
    for big in ("checkpoints", "final_model"):  # 7B: tens of GB; keep the disk for the next run
        shutil.rmtree(run_dir / big, ignore_errors=True)
    r = {"shape": args.shape, "length_mix": args.length_mix, "extra_flags": args.extra,
         "model_build_s": build_s, "memory_plan": cfg.get("memory_plan"),
         "checkpoint_gb": ckpt_bytes / 1e9, "final_model_gb": final_bytes / 1e9,
         **summarize(lines, wall, saves), "compile_caches": compile_cache_counters()}
    plan = r["memory_plan"] or {}
    print(f"\nwhole run {args.shape}{' (length mix)' if args.length_mix else ''}: "
          f"{r['steps']} steps, {r['evals']} evals, {wall:.0f} s; plan: optim "
          f"{plan.get('optim')}, ckpt {plan.get('gradient_checkpointing')}, sleep "
          f"{plan.get('sleep')}, micro-batch {plan.get('micro_batch_tokens')} tokens, planned "
          f"peak {plan.get('planned_peak_gib')} GiB")
    for k in ("time_step_s", "time_rollout_s", "time_reward_s", "time_train_s", "time_update_s",
              "time_sync_s", "eval_s", "last_eval_s", "eval_wait_s", "last_eval_wait_s",
              "startup_s",
              "final_save_s", "train_response_len",
              "mem_peak_gb", "process_peak_gib", "checkpoint_gb", "final_model_gb",
              "projected_80_steps_9_evals_s"):
        v = r[k]
        print(f"  {k:<30} {v:>10.2f}" if isinstance(v, float) else f"  {k:<30} {v!s:>10}")
    print(f"  {'flat after first eval':<30} {r['flat_after_first_eval']!s:>10}")
    limited = cfg.get("eval_limit")
    which = f"LIMITED evals (--eval_limit {limited})" if limited else "full evals"
    problems = max(ln.get("eval/n_problems", 0) for ln in lines)
    print(f"  projection from {which} of {problems:.0f} problems x {cfg.get('eval_n')} samples; "
          f"the run itself: {wall:.0f} s for {r['steps']} steps and {r['evals']} evals")
    print(f"  per-record process peak (GiB): {r['process_peak_series_gib']}")
    for key in ("time/rollout_s", "time/train_s", "time/step_s"):
        print(f"  {key} per step: {[round(ln[key], 2) for ln in lines if key in ln]}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
