#!/usr/bin/env python
"""One GPU, three launches of the same run, vLLM in each: plain `python`, `torchrun
--nproc_per_node 1` (DDP) and the same with --fsdp (FSDP2). They must agree; prints each one's
s/step and its overhead on the plain run's.

    python bench/dist_check.py --steps 5 --out dist_check.json [-- more MATH_experiment flags]

Each launch runs this file as a worker: MATH_experiment's loop on a random-weight model of the
Qwen2.5-0.5B shape, with the verifier replaced by a hash of the response text
(bench/hash_grader.py: random weights never answer right, so real rewards would all be 0 and
prove nothing) and every training sample's score recorded. Checked against the plain run, at
step 1 (the same weights and per-request seeds, so the same rollouts): every sample's reward
identical; the loss equal (one update at ratio 1: the token mean of -A); the gradient norm and
entropy within bf16 noise (FSDP2 computes with bf16 weights, the others with fp32 masters under
bf16 autocast). s/step is the median of steps 2..N (step 1 compiles and warms up). Exit status 1
if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {  # launcher, extra flags
    "plain": ([sys.executable], []),
    "ddp": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "1"], []),
    "fsdp": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node", "1"], ["--fsdp"]),
}
BF16_REL = 0.05  # gradient norm / entropy: bf16 weights against fp32 masters


def worker(out: Path, mode: str, flags: list[str]) -> int:
    from rlvr.console import quiet_third_party

    quiet_third_party(debug=False)
    from bench.hash_grader import HashGrader
    from rlvr import experiment

    HashGrader.log, HashGrader.case = out / f"scores_{mode}.jsonl", mode
    experiment.BatchGrader = HashGrader
    return experiment.main(flags)


def launch(mode: str, out: Path, flags: list[str]) -> dict:
    runner, extra = MODES[mode]
    cmd = [*runner, str(Path(__file__).resolve()), "--worker", mode, "--out_dir", str(out),
           "--", *flags, *extra, "--exp_name", mode]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    (out / f"{mode}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "Error"))]
        return {"mode": mode, "ok": False, "wall_s": wall,
                "error": errors[0] if errors else proc.stderr[-300:]}
    lines = [json.loads(x) for x in (out / mode / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "train/loss" in ln]
    cfg = json.loads((out / mode / "config.json").read_text())
    from bench.hash_grader import step_scores

    return {"mode": mode, "ok": True, "wall_s": wall, "world_size": cfg.get("world_size"),
            "layout": cfg.get("mode"), "step1": steps[0],
            "s_per_step": statistics.median(ln["time/step_s"] for ln in steps[1:] or steps),
            "sync_s": statistics.median(ln["time/sync_s"] for ln in steps[1:] or steps),
            "scores_step1": step_scores(out / f"scores_{mode}.jsonl", mode)[0]}


def compare(ref: dict, r: dict) -> list[str]:
    """What differs from the plain run at step 1 beyond what the layout explains."""
    bad = []
    if r["scores_step1"] != ref["scores_step1"]:
        n = sum(a != b for a, b in zip(r["scores_step1"], ref["scores_step1"]))
        bad.append(f"{n}/{len(ref['scores_step1'])} step-1 rewards differ")
    a, b = ref["step1"], r["step1"]
    for key in ("train/samples_kept", "train/response_len"):
        if a[key] != b[key]:
            bad.append(f"{key} {b[key]} != {a[key]}")
    if abs(b["train/loss"] - a["train/loss"]) > 1e-4 * max(abs(a["train/loss"]), 1e-6):
        bad.append(f"loss {b['train/loss']} != {a['train/loss']}")
    for key in ("train/grad_norm", "train/entropy"):
        if abs(b[key] - a[key]) > BF16_REL * abs(a[key]):
            bad.append(f"{key} {b[key]:.5g} vs {a[key]:.5g} (more than {BF16_REL:.0%} apart)")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--model_dir", default=None, help="a model to use instead of the random 0.5B")
    ap.add_argument("--runs_dir", default="/tmp/rlvr_dist_check")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out_dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="more MATH_experiment.py flags (after --)")
    args = ap.parse_args()
    if args.worker:
        sys.exit(worker(Path(args.out_dir), args.worker, args.extra))

    from bench.models import build_random_qwen, math_texts

    model_dir = args.model_dir or build_random_qwen("0.5B", Path(args.model_root) / "0.5B",
                                                    math_texts(args.data_dir))
    out = Path(args.runs_dir) / str(int(time.time()))
    out.mkdir(parents=True)
    flags = ["--model_id", str(model_dir), "--objective", "W_REINFORCE", "--n_train_steps",
             str(args.steps), "--eval_every", "1000", "--eval_limit", "16", "--eval_n", "1",
             "--save_every", "0", "--gpu_memory_gb", "79", "--data_dir", args.data_dir,
             "--output_dir", str(out), *args.extra]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = [launch(mode, out, flags) for mode in MODES]
    ref, failed = results[0], []
    print(f"\n{'mode':<6} {'ranks':>5} {'layout':>6} {'s/step':>8} {'overhead':>9} {'sync_s':>7} "
          f"{'wall_s':>7}  step 1 against plain")
    for r in results:
        if not r["ok"]:
            failed.append(f"{r['mode']}: launch failed")
            print(f"{r['mode']:<6} FAILED: {r['error']}")
            continue
        bad = compare(ref, r) if r is not ref and ref["ok"] else []
        failed += [f"{r['mode']}: {b}" for b in bad]
        over = r["s_per_step"] / ref["s_per_step"] - 1 if ref["ok"] else float("nan")
        s1 = r["step1"]
        print(f"{r['mode']:<6} {r['world_size']!s:>5} {r['layout']!s:>6} {r['s_per_step']:8.3f} "
              f"{over:+9.1%} {r['sync_s']:7.3f} {r['wall_s']:7.0f}  "
              + ("reference" if r is ref else "; ".join(bad) or "identical rewards")
              + f" | loss {s1['train/loss']:.6g} grad_norm {s1['train/grad_norm']:.5g} "
              f"entropy {s1['train/entropy']:.5g} gap {s1.get('train/logp_gap_mean', 0):.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "failed": failed}, indent=2))
    print("\nerrors: " + ("; ".join(failed) if failed else "none"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
