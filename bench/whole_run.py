#!/usr/bin/env python
"""Whole-run speed: real steps of MATH_experiment.py on a random Qwen2.5-shaped model.

    python bench/whole_run.py --shape 0.5B --steps 12 --out whole_0.5B.json [-- extra flags]

Runs the published settings (64 x 512-token rollouts, W_REINFORCE so every sample trains, one
update per step, eval every 10 steps on the 1,250-problem test subset with eval_n = 1) for
`--steps` steps, then reads metrics.jsonl: median s/step over the steps after the first two, eval
time, start-up time, and the projected wall time of 80 steps with 9 evals. With random weights
every response runs the full 512 tokens: a worst case for a real model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build_random_qwen, math_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--runs_dir", default="/tmp/rlvr_bench_runs")
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more MATH_experiment.py flags (after --)")
    args = ap.parse_args()

    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                  math_texts(args.data_dir))
    name = f"whole_{args.shape}_{int(time.time())}"
    cmd = [sys.executable, str(ROOT / "MATH_experiment.py"), "--model_id", str(model_dir),
           "--objective", "W_REINFORCE", "--n_train_steps", str(args.steps),
           "--eval_every", "10", "--eval_n", "1", "--save_every", "0",
           "--data_dir", args.data_dir, "--output_dir", args.runs_dir, "--exp_name", name,
           *args.extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0

    run_dir = Path(args.runs_dir) / name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    # a 3B checkpoint with its optimizer is ~40 GB: keep the device's disk for the next run
    for big in ("checkpoints", "final_model"):
        shutil.rmtree(run_dir / big, ignore_errors=True)
    steps = [ln for ln in lines if "time/step_s" in ln]
    evals = [ln for ln in lines if "time/eval_s" in ln]
    timed = steps[2:] or steps
    med = {k: statistics.median(ln[k] for ln in timed)
           for k in ("time/step_s", "time/rollout_s", "time/reward_s", "time/train_s",
                     "time/sync_s", "mem/peak_gb", "train/response_len")}
    eval_s = statistics.median(ln["time/eval_s"] for ln in evals)
    loop_s = sum(ln["time/step_s"] for ln in steps) + sum(ln["time/eval_s"] for ln in evals)
    startup_s = wall - loop_s  # model load, engine init, compile, data, final save
    projected = 80 * med["time/step_s"] + 9 * eval_s + startup_s
    gaps = [ln["train/logp_gap_mean"] for ln in steps if "train/logp_gap_mean" in ln]
    r = {"shape": args.shape, "steps": len(steps), "wall_s": wall, "startup_s": startup_s,
         "eval_s": eval_s, "n_evals": len(evals), "projected_80_steps_s": projected,
         "logp_gap_mean": gaps, "extra_flags": args.extra,
         **{k.replace("/", "_"): v for k, v in med.items()}}
    print(f"\nwhole run, {args.shape}: {len(steps)} steps, {len(evals)} evals, {wall:.0f} s")
    for k in ("time_step_s", "time_rollout_s", "time_reward_s", "time_train_s", "time_sync_s",
              "eval_s", "startup_s", "mem_peak_gb", "train_response_len",
              "projected_80_steps_s"):
        print(f"  {k:<26} {r[k]:>10.2f}")
    print(f"  {'logp gap vLLM vs HF (mean)':<26} {gaps}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
