#!/usr/bin/env python
"""How many runs should share one card: k = 1, 2, 3, 4 concurrent runs of one shape, measured.

    python bench/packing.py --shape 0.5B --counts 1 2 3 4 --card_gb 79 --steps 20 \
        [--eval_every N] [--eval_limit N] [--write] [-- more MATH_experiment.py flags]

For each k, run_study.py itself runs k seeds of W_REINFORCE on a random-weight Qwen2.5-shaped
model (bench/models.py; named Qwen2.5-<shape>-Instruct so the table matches the real models)
with --runs_per_gpu k on card 0, each run with its 1/k share of --card_gb as --gpu_memory_gb, the
starts staggered as in a study. Per k it reports the median s/step of every run's steps after
its first two, the median eval time (evals after step 0), the trainer's median wait for an eval
but the last (concurrent evals overlap the steps) and for the last, each run's fixed cost (its
wall time less its steps and eval waits: start-up and final save), the wall time from the first
start to the last run's DONE, and the aggregate throughput: steps per second of all k runs
together over one run's alone, from the wall times (start-up and staggering included, as a study
pays them). run_study.py's projection is built from these figures.
Prints a table and the JSON entry `auto` reads (rlvr/packing.json); --write merges it there.
One count per call keeps a call short: each k runs k full runs at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build_random_qwen, math_texts  # noqa: E402
from rlvr.study import PACKING_TABLE, write_json  # noqa: E402


def measure(model_dir: Path, k: int, a: argparse.Namespace, extra: list[str]) -> dict:
    study = Path(a.studies) / f"{model_dir.name}_k{k}_{int(time.time())}"
    cmd = [sys.executable, str(ROOT / "run_study.py"), "--models", str(model_dir),
           "--objectives", "W_REINFORCE", "--seeds", *map(str, range(1, k + 1)),
           "--runs_per_gpu", str(k), "--gpus", a.gpu, "--card_gb", str(a.card_gb),
           "--study_dir", str(study), "--no_report", "--status_every", "60", "--",
           "--n_train_steps", str(a.steps), "--eval_every", str(a.eval_every or a.steps),
           "--save_every", "0",
           "--data_dir", a.data_dir, *(["--eval_limit", str(a.eval_limit)] if a.eval_limit
                                       else []), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {**summarize(study), "runner_s": round(time.time() - t0, 1)}


def summarize(study: Path) -> dict:
    """The figures of one finished study directory (see the module's docstring)."""
    attempts = [json.loads(x) for x in (study / "attempts.jsonl").read_text().splitlines()]
    first = min(x["time"] for x in attempts if x["event"] == "start")
    last = max(x["time"] for x in attempts if x["event"] == "end")
    started = {x["job"]: x["time"] for x in attempts if x["event"] == "start"}
    ended = {x["job"]: x["time"] for x in attempts if x["event"] == "end"}
    steps, evals, waits, finals, fixed, problems = [], [], [], [], [], set()
    for run in (study / "runs").iterdir():
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        step_s = [x["time/step_s"] for x in lines if "time/step_s" in x]
        # what the trainer spent on each eval: its wait for a concurrent one, all of a blocking one
        run_waits = [x.get("time/eval_wait_s", x["time/eval_s"]) for x in lines
                     if "time/eval_s" in x]
        steps += step_s[2:]
        evals += [x["time/eval_s"] for x in lines if "time/eval_s" in x and x["step"] > 0]
        waits += run_waits[:-1]
        finals += run_waits[-1:]
        # start-up and the final save: the run's wall time less its steps and eval waits
        fixed.append(ended[run.name] - started[run.name] - sum(step_s) - sum(run_waits))
        problems |= {int(x["eval/n_problems"]) for x in lines if "eval/n_problems" in x}
    return {"s_per_step": round(statistics.median(steps), 3),
            "eval_s": round(statistics.median(evals), 1) if evals else None,
            "eval_wait_s": round(statistics.median(waits), 1) if waits else 0.0,
            "final_eval_s": round(statistics.median(finals), 1),
            "fixed_s": round(statistics.median(fixed), 1),
            "wall_s": round(last - first, 1),
            "eval_problems": max(problems) if problems else None}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--card_gb", type=float, required=True, help="the card to plan for, GiB")
    ap.add_argument("--gpu", default="0")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval_every", type=int, default=None, help="default: --steps (evals at 0 "
                                                                  "and at the end)")
    ap.add_argument("--eval_limit", type=int, default=None, help="default: the full eval set")
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--studies", default="/tmp/rlvr_packing")
    ap.add_argument("--write", action="store_true", help="merge the entry into "
                                                          "rlvr/packing.json")
    a = ap.parse_args(argv)
    name = f"Qwen2.5-{a.shape}-Instruct"
    model_dir = build_random_qwen(a.shape, Path(a.model_root) / name, math_texts(a.data_dir))
    card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i",
                           a.gpu], capture_output=True, text=True).stdout.strip()
    per = {k: measure(model_dir, k, a, extra) for k in a.counts}
    data = json.loads(PACKING_TABLE.read_text()) if PACKING_TABLE.is_file() else {}
    old = next((m for m in data.get("measurements", []) if m["model"] == name), {})
    merged = {**{int(k): v for k, v in old.get("per_card", {}).items()}, **per}
    one = merged.get(1)
    every = a.eval_every or a.steps
    print(f"\n{name} on {card}, planned as {a.card_gb:g} GiB, {a.steps} steps, evals every "
          f"{every} (and at 0){f' on {a.eval_limit} problems' if a.eval_limit else ''}")
    print("| runs/card | s/step (each) | eval s (each) | eval wait s | start-up+save s | wall s "
          "| aggregate vs 1 |")
    print("|---|---|---|---|---|---|---|")
    for k, v in sorted(merged.items()):
        v["aggregate"] = round(k * one["wall_s"] / v["wall_s"], 2) if one else None
        print(f"| {k} | {v['s_per_step']} | {v['eval_s']} | {v.get('eval_wait_s')} | "
              f"{v.get('fixed_s')} | {v['wall_s']} | {v['aggregate']} |")
    eval_problems = next((v["eval_problems"] for v in merged.values()
                          if v.get("eval_problems")), None)
    entry = {"model": name, "card": card, "card_gib": a.card_gb, "steps": a.steps,
             "eval_every": every,
             "eval_problems": eval_problems, "extra_flags": extra,
             "measured": time.strftime("%Y-%m-%d"),
             "per_card": {str(k): v for k, v in sorted(merged.items())}}
    print(json.dumps(entry))
    if a.write and one is not None:
        rest = [m for m in data.get("measurements", []) if m["model"] != name]
        write_json(PACKING_TABLE, {**data, "measurements": [*rest, entry]})
        print(f"written to {PACKING_TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
