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
One count per call keeps a call short: each k runs k full runs at once. A measurement cut short
(a time limit's SIGINT) is still summarized, its unfinished runs projected to their end at the
measured rates and the entry marked "estimated"; --from_dirs K=DIR summarizes study directories
already measured (copied back from the GPU) without running anything.
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


def measure(model_dir: Path, k: int, a: argparse.Namespace, extra: list[str]) -> Path:
    """Run the k-per-card study; its directory, also when the run was cut short (a time limit's
    SIGINT reaches the runner too, which stops its runs: what they logged is summarized)."""
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
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        proc.wait()
    except KeyboardInterrupt:
        print(f"interrupted: summarizing what {study} has", flush=True)
        try:
            proc.wait(timeout=4)
        except subprocess.TimeoutExpired:
            pass
    return study


def run_records(study: Path) -> list[dict]:
    """Per run of a study directory: its start, READY and end times (None: not reached), its
    planned steps and evals, and what it logged (step times, eval times and the trainer's waits:
    all of a blocking eval, the hand-over and wait of a concurrent one)."""
    if not (study / "attempts.jsonl").is_file():
        return []
    attempts = [json.loads(x) for x in (study / "attempts.jsonl").read_text().splitlines()]
    started = {x["job"]: x["time"] for x in attempts if x["event"] == "start"}
    ended = {x["job"]: x["time"] for x in attempts if x["event"] == "end" and x.get("rc") == 0}
    out = []
    for run in sorted((study / "runs").iterdir()):
        if not (run / "metrics.jsonl").is_file():
            continue
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((run / "config.json").read_text())
        ready = run / "READY"
        ready_t = json.loads(ready.read_text())["time"] if ready.is_file() else None
        n, every = int(cfg["n_train_steps"]), int(cfg["eval_every"])
        out.append({
            "start": started[run.name], "end": ended.get(run.name) if (run / "DONE").is_file()
            else None, "ready": ready_t, "step_spans": step_spans(lines, ready_t),
            "n_steps": n, "n_evals": len({0, n, *range(every, n + 1, every)} if every else {0, n}),
            "step_s": [x["time/step_s"] for x in lines if "time/step_s" in x],
            "eval_s": [(x["step"], x["time/eval_s"]) for x in lines if "time/eval_s" in x],
            "waits": [x.get("time/eval_wait_s", x["time/eval_s"]) for x in lines
                      if "time/eval_s" in x],
            "eval_problems": max((int(x["eval/n_problems"]) for x in lines
                                  if "eval/n_problems" in x), default=None)})
    return out


def step_spans(lines: list[dict], ready: float | None) -> list[tuple[float, float]]:
    """When each step ran: from READY on, the logged steps and eval waits laid end to end
    (the few seconds between records are not logged; the spans are that close)."""
    t, spans = ready or 0.0, []
    for x in lines:
        if "time/eval_s" in x:
            t += x.get("time/eval_wait_s", x["time/eval_s"])
        if "time/step_s" in x:
            spans.append((t, t + x["time/step_s"]))
            t += x["time/step_s"]
    return spans


def packed_steps(runs: list[dict]) -> list[float]:
    """The step times of steps that ran while every other run of the card was in its steps too
    (between its first step and its last): the steps a long study's packed runs take. A short
    measurement's runs overlap only in part (staggered starts, the last one alone at its end)."""
    if len(runs) < 2 or any(not r["step_spans"] for r in runs):
        return []
    out = []
    for r in runs:
        others = [o for o in runs if o is not r]
        for a, b in r["step_spans"][2:]:
            if all(o["step_spans"][0][0] <= a and b <= o["step_spans"][-1][1] for o in others):
                out.append(b - a)
    return out


def summarize(runs: list[dict], end_cost_s: float | None) -> dict:
    """The figures of one k (see the module's docstring). A run cut short is projected to its
    end at the measured rates: its missing steps at the median s/step, its missing evals at the
    median wait, its last eval as long as a finished run's (else as an in-loop eval), and its
    end (final save, exit) costing `end_cost_s`; the entry then says `"estimated": true`."""
    runs = [r for r in runs if r["end"] is not None or r["ready"] is not None]
    done = [r for r in runs if r["end"] is not None]
    steps = [s for r in runs for s in r["step_s"][2:]]
    evals = [t for r in runs for step, t in r["eval_s"] if step > 0]
    waits = [w for r in runs for w in (r["waits"][:-1] if r["end"] else r["waits"])]
    finals = [r["waits"][-1] for r in done]
    packed = packed_steps(runs)
    # k > 1: the steps run side by side, when enough of them were (else every step counted)
    s_per_step = statistics.median(packed if len(packed) >= 5 else steps)
    eval_s = statistics.median(evals) if evals else None
    wait_s = statistics.median(waits) if waits else 0.0
    all_evals = [t for r in runs for _, t in r["eval_s"]]
    final_s = (statistics.median(finals) if finals else eval_s
               or (statistics.median(all_evals) if all_evals else 0.0))
    # start-up and final save: a run's wall time less its steps and eval waits
    fixed = [r["end"] - r["start"] - sum(r["step_s"]) - sum(r["waits"]) for r in done]
    ends = []
    for r in runs:
        if r["end"] is not None:
            ends.append(r["end"])
            continue
        missing_evals = r["n_evals"] - len(r["waits"])
        ends.append(r["ready"] + sum(r["step_s"]) + (r["n_steps"] - len(r["step_s"])) * s_per_step
                    + sum(r["waits"]) + max(0, missing_evals - 1) * wait_s
                    + (final_s if missing_evals > 0 else 0.0) + (end_cost_s or 0.0))
        fixed.append(r["ready"] - r["start"] + (end_cost_s or 0.0))
    return {"s_per_step": round(s_per_step, 3), "packed_steps": len(packed),
            "eval_s": round(eval_s, 1) if eval_s else None,
            "eval_wait_s": round(wait_s, 1), "final_eval_s": round(final_s, 1),
            "fixed_s": round(statistics.median(fixed), 1),
            "wall_s": round(max(ends) - min(r["start"] for r in runs), 1),
            "eval_problems": max((r["eval_problems"] or 0) for r in runs) or None,
            **({"estimated": True} if len(done) < len(runs) else {})}


def end_cost(runs: list[dict]) -> float | None:
    """What a finished run spent after its last eval and before READY (save, exit; start-up
    is READY - start): the median over finished runs, for projecting cut ones."""
    costs = [r["end"] - r["ready"] - sum(r["step_s"]) - sum(r["waits"]) for r in runs
             if r["end"] is not None and r["ready"] is not None]
    return statistics.median(costs) if costs else None


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
    ap.add_argument("--from_dirs", nargs="+", metavar="K=DIR", default=None,
                    help="summarize these finished (or cut) study directories of k runs per card "
                         "instead of running (e.g. copied back from the GPU)")
    ap.add_argument("--card", default=None, help="the card's name (default: nvidia-smi's)")
    a = ap.parse_args(argv)
    name = f"Qwen2.5-{a.shape}-Instruct"
    card = a.card or subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", a.gpu],
        capture_output=True, text=True).stdout.strip()
    if a.from_dirs:
        studies = {int(k): Path(d) for k, d in (x.split("=", 1) for x in a.from_dirs)}
    else:
        model_dir = build_random_qwen(a.shape, Path(a.model_root) / name,
                                      math_texts(a.data_dir))
        studies = {}
        for k in a.counts:  # a cut k still counts (estimated); the next ones are not started
            studies[k] = measure(model_dir, k, a, extra)
            if not all((r / "DONE").is_file() for r in (studies[k] / "runs").iterdir()):
                break
    records = {k: run_records(d) for k, d in studies.items()}
    cost = end_cost([r for runs in records.values() for r in runs])
    per = {k: summarize(runs, cost) for k, runs in records.items()
           if any(r["ready"] is not None for r in runs)}
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
