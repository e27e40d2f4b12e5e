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
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import build_random_qwen, math_texts  # noqa: E402
from rlvr.study import PACKING_TABLE, write_json  # noqa: E402


def measure(model_dir: Path, k: int, a: argparse.Namespace, extra: list[str]
            ) -> tuple[Path, bool]:
    """Run the k-per-card study: its directory, and whether the measurements stop here: it was
    interrupted (a time limit's SIGINT: the runner is asked to stop its runs too, and what they
    logged is summarized) or the runner failed (a run that failed makes no measurement; the
    counts measured before it are kept)."""
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
        rc = proc.wait()
    except KeyboardInterrupt:
        print(f"interrupted: stopping the runner, then summarizing what {study} has", flush=True)
        proc.send_signal(signal.SIGINT)  # the runner stops its runs on its first SIGINT only
        try:
            proc.wait(timeout=4)
        except subprocess.TimeoutExpired:
            pass
        return study, True
    if rc != 0:
        print(f"k={k}: run_study.py exited with status {rc}; see {study}/logs", flush=True)
    return study, rc != 0


def run_records(study: Path) -> list[dict]:
    """Per run of a study directory: its start, READY and end times (None: not reached), its
    planned steps and evals, and what it logged (step times, eval times and the trainer's waits:
    all of a blocking eval, the hand-over and wait of a concurrent one)."""
    if not (study / "attempts.jsonl").is_file() or not (study / "runs").is_dir():
        return []
    attempts = [json.loads(x) for x in (study / "attempts.jsonl").read_text().splitlines()]
    started = {x["job"]: x["time"] for x in attempts if x["event"] == "start"}
    ended = {x["job"]: x for x in attempts if x["event"] == "end"}
    out = []
    for run in sorted((study / "runs").iterdir()):
        if not (run / "metrics.jsonl").is_file() or not (run / "config.json").is_file():
            continue  # never came up
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((run / "config.json").read_text())
        ready = run / "READY"
        ready_t = json.loads(ready.read_text())["time"] if ready.is_file() else None
        n, every = int(cfg["n_train_steps"]), int(cfg["eval_every"])
        end = ended.get(run.name, {})
        out.append({
            "name": run.name, "start": started[run.name],
            "end": end["time"] if end.get("rc") == 0 and (run / "DONE").is_file() else None,
            # ended on its own with an error (a stopped run's status is the signal's)
            "failed": end.get("rc") not in (None, 0) and not end.get("stopped"),
            "ready": ready_t, "step_spans": step_spans(lines, ready_t),
            "n_steps": n, "eval_every": every,
            "eval_engines": (cfg.get("memory_plan") or {}).get("eval_engines", 1),
            "n_evals": len({0, n, *range(every, n + 1, every)} if every else {0, n}),
            "step_s": [x["time/step_s"] for x in lines if "time/step_s" in x],
            "eval_s": [(x["step"], x["time/eval_s"]) for x in lines if "time/eval_s" in x],
            "waits": [x.get("time/eval_wait_s", x["time/eval_s"]) for x in lines
                      if "time/eval_s" in x],
            "concurrent": any("time/eval_wait_s" in x for x in lines),
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
    steps = ([s for r in runs for s in r["step_s"][2:]]
             or [s for r in runs for s in r["step_s"]])  # runs of 1-2 steps: all of them
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
            "concurrent_evals": any(r["concurrent"] for r in runs),
            **({"estimated": True} if len(done) < len(runs) else {}),
            **({"end_cost_unknown": True} if len(done) < len(runs) and end_cost_s is None
               else {})}


def end_cost(runs: list[dict]) -> float | None:
    """What a finished run spent after its last eval and before READY (save, exit; start-up
    is READY - start): the median over finished runs, for projecting cut ones."""
    costs = [r["end"] - r["ready"] - sum(r["step_s"]) - sum(r["waits"]) for r in runs
             if r["end"] is not None and r["ready"] is not None]
    return statistics.median(costs) if costs else None


def usable(k: int, runs: list[dict]) -> str | None:
    """Why a k's runs make no measurement (None: they do): one failed, or fewer than k started."""
    if failed := [r["name"] for r in runs if r["failed"]]:
        return f"run {failed[0]} failed (its log says why)"
    if (started := sum(r["ready"] is not None for r in runs)) < k:
        return f"only {started} of its {k} runs came up (READY)"
    if not any(r["step_s"] for r in runs):
        return "no step was logged"
    return None


def settings(runs: list[dict], card_gib: float, extra: list[str]) -> dict:
    """What a measurement was made with: its runs' steps, eval interval, eval problems and
    concurrent eval engines (as their config.json and metrics say), the card it was planned for
    and the flags passed (as given here); entries that differ in any of these are not merged."""
    first = min(runs, key=lambda r: r["start"])
    return {"card_gib": card_gib, "steps": first["n_steps"], "eval_every": first["eval_every"],
            "eval_problems": max((r["eval_problems"] or 0) for r in runs) or None,
            "eval_engines": max(r.get("eval_engines", 1) for r in runs),
            "extra_flags": extra}


def print_table(name: str, card: str, entry: dict) -> None:
    print(f"\n{name} on {card}, planned as {entry['card_gib']:g} GiB, {entry['steps']} steps, "
          f"evals every {entry['eval_every']} (and at 0) on {entry['eval_problems']} problems")
    print("| runs/card | s/step (each) | eval s (each) | eval wait s | start-up+save s | wall s "
          "| aggregate vs 1 | |")
    print("|---|---|---|---|---|---|---|---|")
    for k, v in entry["per_card"].items():
        note = "projected: runs cut short" if v.get("estimated") else "measured"
        if v.get("end_cost_unknown"):
            note += "; no run finished, so the final save is left out"
        print(f"| {k} | {v['s_per_step']} | {v['eval_s']} | {v.get('eval_wait_s')} | "
              f"{v.get('fixed_s')} | {v['wall_s']} | {v['aggregate']} | {note} |")


def count_dir(text: str) -> tuple[int, Path]:
    """--from_dirs' K=DIR: runs per card, and an existing study directory."""
    k, _, d = text.partition("=")
    if not k.isdigit() or int(k) < 1 or not (Path(d) / "attempts.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected K=DIR, K >= 1 and DIR a study "
                                         "directory (with attempts.jsonl)")
    return int(k), Path(d)


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
    ap.add_argument("--from_dirs", nargs="+", metavar="K=DIR", default=None, type=count_dir,
                    help="summarize these finished (or cut) study directories of k runs per card "
                         "instead of running (e.g. copied back from the GPU)")
    ap.add_argument("--card", default=None, help="the card's name (default: nvidia-smi's)")
    a = ap.parse_args(argv)
    name = f"Qwen2.5-{a.shape}-Instruct"
    try:
        card = a.card or subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", a.gpu],
            capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        card = "unknown (no nvidia-smi; pass --card)"
    if a.from_dirs:
        studies = dict(a.from_dirs)
    else:
        model_dir = build_random_qwen(a.shape, Path(a.model_root) / name,
                                      math_texts(a.data_dir))
        studies = {}
        for k in a.counts:  # a cut k still counts (projected); the next ones are not started
            studies[k], stop = measure(model_dir, k, a, extra)
            if stop:
                break
    records = {}
    for k, d in studies.items():
        if why := usable(k, runs := run_records(d)):
            print(f"k={k} ({d}): no figures: {why}")
        else:
            records[k] = runs
    if not records:
        return 1
    cost = end_cost([r for runs in records.values() for r in runs])
    per = {k: summarize(runs, cost) for k, runs in records.items()}
    made = settings([r for runs in records.values() for r in runs], a.card_gb, extra)
    data = json.loads(PACKING_TABLE.read_text()) if PACKING_TABLE.is_file() else {}
    old = next((m for m in data.get("measurements", []) if m["model"] == name), {})
    if old and {x: old.get(x) for x in made} != made:
        print(f"the table's {name} entry was made with other settings; it is replaced, not merged")
        old = {}
    merged = {**{int(k): v for k, v in old.get("per_card", {}).items()}, **per}
    one = merged.get(1)
    for k, v in merged.items():
        v["aggregate"] = round(k * one["wall_s"] / v["wall_s"], 2) if one else None
    entry = {"model": name, "card": card, **made, "measured": time.strftime("%Y-%m-%d"),
             "per_card": {str(k): v for k, v in sorted(merged.items())}}
    print_table(name, card, entry)
    print(json.dumps(entry))
    if a.write and one is not None:
        rest = [m for m in data.get("measurements", []) if m["model"] != name]
        write_json(PACKING_TABLE, {**data, "measurements": [*rest, entry]})
        print(f"written to {PACKING_TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
