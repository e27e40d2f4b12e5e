#!/usr/bin/env python
"""Does --compile pay over a published run once its compile cache is warm? Three short real runs.

    python bench/compile_cache.py --shape 0.5B --steps 6 --cache_dir /tmp/rlvr_compile_cache \
        [-- more MATH_experiment.py flags, e.g. --gpu_memory_gb 79]

Runs bench/whole_run.py three times, each in its own process, all sharing one fresh cache
directory (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR under --cache_dir):
  eager  -- no --compile (it also fills vLLM's own compile cache, so the next two find it warm),
  cold   -- --compile with nothing of the policy's cached: the first run of a shape on a machine,
  warm   -- --compile again: every later run of that shape (a study's second run onwards).
The in-process vLLM engine points TORCHINDUCTOR_CACHE_DIR at its own directory under
VLLM_CACHE_ROOT when it compiles, so the policy's graphs land there; the sizes of the three
directories after each run show where. Evals are cut to --eval_limit 8 and run blocking: this
measures the update, not the eval. Per run it prints the first step's train phase (which
compiles), the median of the later ones, and the update's cost over an 80-step run (the first
two steps as measured, 78 at the median), what that gains over eager, and each run's hits,
misses and bypasses of inductor's FX-graph and AOTAutograd caches (a warm run that misses says
why its compile was not served).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"eager": [], "cold": ["--compile"], "warm": ["--compile"]}


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cache_dir", default="/tmp/rlvr_compile_cache")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="which of the three runs, in this order (each takes ~2-3 min)")
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more MATH_experiment.py flags (after --)")
    a = ap.parse_args()
    extra = a.extra
    if a.steps < 3:
        ap.error("--steps must be >= 3 (the later steps' median is the compiled speed)")
    if "warm" in a.modes and "cold" not in a.modes:
        ap.error("--modes warm needs cold before it: the cache starts empty")
    cache = Path(a.cache_dir)
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TRITON_CACHE_DIR": str(cache / "triton")}
    rows = {}
    for mode, flags in MODES.items():
        if mode not in a.modes:
            continue
        out = cache.parent / f"compile_cache_{mode}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "whole_run.py"), "--shape", a.shape,
               "--steps", str(a.steps), "--out", str(out), "--", "--concurrent_eval", "false",
               "--eval_limit", "8", *flags, *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        r = json.loads(out.read_text())
        train = r["train_s_series"]
        steady = statistics.median(train[2:])
        rows[mode] = {"wall_s": r["wall_s"], "startup_s": r["startup_s"], "first_s": train[0],
                      "second_s": train[1], "steady_s": steady,
                      "update_80_s": train[0] + train[1] + 78 * steady, "series": train,
                      "caches": r.get("compile_caches", {}),
                      **{f"{d}_mib": round(dir_mib(cache / d), 1) if (cache / d).exists()
                         else 0.0 for d in ("vllm", "inductor", "triton")}}
    print(f"\n--compile over 80 steps, {a.shape}, flags {extra}")
    print("| run | wall s | start-up s | step 1 train s | step 2 | later (median) | update over "
          "80 steps s | vs eager s | cache MiB vllm/inductor/triton |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, v in rows.items():
        gain = (f"{v['update_80_s'] - rows['eager']['update_80_s']:+.1f}" if "eager" in rows
                else "-")
        print(f"| {mode} | {v['wall_s']:.1f} | {v['startup_s']:.1f} | {v['first_s']:.2f} | "
              f"{v['second_s']:.2f} | {v['steady_s']:.3f} | {v['update_80_s']:.1f} | "
              f"{gain} | {v['vllm_mib']}/{v['inductor_mib']}/{v['triton_mib']} |")
    for mode, v in rows.items():
        print(f"  {mode} train_s per step: {v['series']}; caches: {v['caches']}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
