#!/usr/bin/env python
"""Launches of the same run, vLLM in each: plain `python` on one GPU, `torchrun --nproc_per_node N`
(DDP) and the same with --fsdp (FSDP2), N = --nproc (1: every launch on one GPU; 2 or more: the
same global batch spread over N GPUs). They must agree; prints each one's s/step, samples/s and its
overhead on the plain run's.

    python bench/dist_check.py --steps 5 --out dist_check.json [-- more MATH_experiment flags]
    python bench/dist_check.py --nproc 2 --steps 5 -- --objective NSR     # 1 vs 2 GPUs
    python bench/dist_check.py --nproc 2 --modes plain ddp --per_gpu_batch 64        # scaling
    python bench/dist_check.py --shape 7B --nproc 2 --modes fsdp --steps 3 -- --preset paper \
        --rollout_batch_size 16                                  # the paper's shape, FSDP2

Each launch runs this file as a worker: MATH_experiment's loop on a random-weight model of the
Qwen2.5-0.5B shape, with the verifier replaced by a hash of the response text
(bench/hash_grader.py: random weights never answer right, so real rewards would all be 0 and
prove nothing) and every training sample's score recorded. Checked against the plain run, at
step 1 (the same weights and per-request seeds, so the same rollouts): every sample's reward
identical; the loss equal (one update at ratio 1: the token mean of -A); the gradient norm and
entropy within bf16 noise (FSDP2 computes with bf16 weights, the others with fp32 masters under
bf16 autocast). s/step is the median of steps 2..N (step 1 compiles and warms up). Exit status 1
if a check fails. Steps after the first are compared too (the same prompts; the weights differ by
rounding only, so a few samples may too): loss and gradient norm within 10%.
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

MODES = ("plain", "ddp", "fsdp")
BF16_REL = 0.05  # gradient norm / entropy: bf16 weights against fp32 masters
# after step 1 the weights differ by rounding, so a sample may too (one sample moves W_REINFORCE's
# loss by a few per cent under the hash grader)
DRIFT_REL = 0.10


def worker(out: Path, mode: str, flags: list[str]) -> int:
    from rlvr.console import quiet_third_party

    quiet_third_party(debug=False)
    from bench.hash_grader import HashGrader
    from rlvr import experiment

    HashGrader.log, HashGrader.case = out / f"scores_{mode}.jsonl", mode
    experiment.BatchGrader = HashGrader
    return experiment.main(flags)


def launcher(mode: str, nproc: int) -> tuple[list[str], list[str]]:
    """The command that starts `mode`, and the flags it adds."""
    if mode == "plain":
        return [sys.executable], []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(nproc)]
    return torchrun, ["--fsdp"] if mode == "fsdp" else []


def launch(mode: str, nproc: int, out: Path, flags: list[str],
           per_gpu_batch: int | None = None) -> dict:
    runner, extra = launcher(mode, nproc)
    if per_gpu_batch:  # scaling: each GPU the same share
        extra = [*extra, "--rollout_batch_size", str(per_gpu_batch * (1 if mode == "plain"
                                                                      else nproc))]
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
            "layout": cfg.get("mode"), "step1": steps[0], "steps": steps,
            "samples_per_s": statistics.median(
                cfg["rollout_batch_size"] / ln["time/step_s"] for ln in steps[1:] or steps),
            "s_per_step": statistics.median(ln["time/step_s"] for ln in steps[1:] or steps),
            "sync_s": statistics.median(ln["time/sync_s"] for ln in steps[1:] or steps),
            "scores_step1": step_scores(out / f"scores_{mode}.jsonl", mode)[0]}


def compare(ref: dict, r: dict) -> list[str]:
    """What differs from the reference run beyond what the layout explains: at step 1 (the same
    weights) exactly, after it within bf16 noise."""
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
    if len(r["steps"]) != len(ref["steps"]):
        bad.append(f"{len(r['steps'])} steps logged, the reference {len(ref['steps'])}")
    for i, (x, y) in enumerate(zip(ref["steps"][1:], r["steps"][1:]), start=2):
        for key in ("train/loss", "train/grad_norm"):
            if abs(y[key] - x[key]) > DRIFT_REL * max(abs(x[key]), 1e-3):
                bad.append(f"step {i}: {key} {y[key]:.5g} vs {x[key]:.5g}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=1, help="GPUs of the torchrun launches")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="launches, the first the reference")
    ap.add_argument("--per_gpu_batch", type=int, default=None,
                    help="scaling: plain gets this --rollout_batch_size, torchrun launches nproc "
                         "times it (their runs then differ: nothing is compared)")
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B", "7B"))
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

    model_dir = args.model_dir or build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                                    math_texts(args.data_dir))
    out = Path(args.runs_dir) / str(int(time.time()))
    out.mkdir(parents=True)
    flags = ["--model_id", str(model_dir), "--objective", "W_REINFORCE", "--n_train_steps",
             str(args.steps), "--eval_every", "1000", "--eval_limit", "16", "--eval_n", "1",
             "--save_every", "0", "--gpu_memory_gb", "79", "--data_dir", args.data_dir,
             "--output_dir", str(out), *args.extra]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    modes = list(dict.fromkeys(args.modes))  # each once: a mode's run directory is its name
    results = [launch(mode, args.nproc, out, flags, args.per_gpu_batch) for mode in modes]
    ref, failed = results[0], []
    print(f"\n{'mode':<6} {'ranks':>5} {'layout':>6} {'s/step':>8} {'samples/s':>9} "
          f"{'overhead':>9} {'sync_s':>7} {'wall_s':>7}  against {ref['mode']}")
    for r in results:
        if not r["ok"]:
            failed.append(f"{r['mode']}: launch failed")
            print(f"{r['mode']:<6} FAILED: {r['error']}")
            continue
        bad = compare(ref, r) if r is not ref and ref["ok"] and not args.per_gpu_batch else []
        failed += [f"{r['mode']}: {b}" for b in bad]
        over = r["s_per_step"] / ref["s_per_step"] - 1 if ref["ok"] else float("nan")
        s1 = r["step1"]
        print(f"{r['mode']:<6} {r['world_size']!s:>5} {r['layout']!s:>6} {r['s_per_step']:8.3f} "
              f"{r['samples_per_s']:9.1f} {over:+9.1%} {r['sync_s']:7.3f} {r['wall_s']:7.0f}  "
              + ("reference" if r is ref else
                 f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x its samples/s (scaling)"
                 if args.per_gpu_batch else "; ".join(bad) or "identical rewards")
              + f" | loss {s1['train/loss']:.6g} grad_norm {s1['train/grad_norm']:.5g} "
              f"entropy {s1['train/entropy']:.5g} gap {s1.get('train/logp_gap_mean', 0):.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "failed": failed}, indent=2))
    print("\nerrors: " + ("; ".join(failed) if failed else "none"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
