"""Which runs share a card, with what memory each, in what order; and the projected wall time.

A card holds runs whose shares add up to at most 1, and at most --runs_per_gpu of them. Every
run of a model gets 1/k of the card as its --gpu_memory_gb, k its model's runs per card: the
--runs_per_gpu given, or `auto` (rlvr.study.auto_per_card, capped by memory). A k at whose share
MATH_experiment.py's own memory plan finds no way to fit is refused before anything starts (a
smaller share may well fit with a leaner plan: the plan is asked at the share). Runs start
largest planned peak first. Torch-free, and nothing here touches a GPU: cards are read
from nvidia-smi.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlvr.study import (
    EVALUATE,
    EXPERIMENT,
    RunPlan,
    RunSpec,
    StudyError,
    StudySpec,
    ask_all,
    auto_per_card,
    check_flags,
    expand,
    plan_key,
    read_packing_table,
    short_name,
)
from rlvr.study_report import base_eval_name

# vLLM's share of the budget that --final_eval gives evaluate.py (its own default is 0.9 of a
# whole card)
EVAL_MEM_SHARE = 0.9


@dataclass
class Card:
    id: str  # what CUDA_VISIBLE_DEVICES takes: an index or a UUID
    gib: float
    name: str = ""


def visible_cards(gpus: str | None, env: dict | None = None) -> list[Card]:
    """The cards a study may use: --gpus (ids as CUDA_VISIBLE_DEVICES takes them), else those
    CUDA_VISIBLE_DEVICES lists, else every card nvidia-smi shows."""
    env = os.environ if env is None else env
    if shutil.which("nvidia-smi") is None:
        raise StudyError("no GPU found (nvidia-smi is not on PATH): run on CPU with --gpus none "
                         "--parallel N")
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total,name",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise StudyError(f"nvidia-smi failed: {out.stderr.strip() or out.stdout.strip()}")
    cards = {}
    for line in out.stdout.strip().splitlines():
        index, uuid, mib, name = [x.strip() for x in line.split(",", 3)]
        card = Card(index, float(mib) / 1024, name)
        cards[index] = cards[uuid] = card
    wanted = gpus or env.get("CUDA_VISIBLE_DEVICES")
    if wanted is None:
        return list({id(c): c for c in cards.values()}.values())
    ids = [x.strip() for x in wanted.split(",") if x.strip()]
    if missing := [i for i in ids if i not in cards]:
        raise StudyError(f"GPU {missing[0]} not found (nvidia-smi lists "
                         f"{', '.join(sorted({c.id for c in cards.values()}))})")
    if not ids:
        raise StudyError("no GPUs selected (CUDA_VISIBLE_DEVICES is empty): pass --gpus or "
                         "--gpus none --parallel N")
    return [Card(i, cards[i].gib, cards[i].name) for i in ids]


@dataclass
class Job:
    """One process the launcher runs: a training run, or an evaluate.py of a final model."""
    name: str
    kind: str  # "train" or "eval"
    script: Path
    args: list[str]
    run_dir: Path  # where its state is (a run directory, or evaluate.py's --out)
    model: str
    share: float = 1.0  # of a card
    budget_gib: float | None = None
    peak_gib: float = 0.0
    gpus: int = 1  # cards per run; > 1: torchrun, whole cards
    after: str | None = None  # a job that must be done first
    n_steps: int = 0
    eval_every: int = 0
    eval_problems: int | None = None

    def command(self, resume: bool) -> list[str]:
        if self.gpus > 1:
            head = ["torchrun", "--standalone", "--nproc_per_node", str(self.gpus)]
        else:
            head = [sys.executable]
        tail = ["--resume"] if resume and self.kind == "train" else []
        budget = [] if self.budget_gib is None or self.kind != "train" else [
            "--gpu_memory_gb", f"{self.budget_gib:.2f}"]
        return [*head, str(self.script), *self.args, *budget, *tail]


def share_candidates(model: str, runs_per_gpu: str, table: dict) -> list[int]:
    """The runs-per-card counts above 1 worth asking the memory plan about: the one given, or
    for auto those the packing table has measured for the model."""
    if runs_per_gpu != "auto":
        return [int(runs_per_gpu)] if int(runs_per_gpu) > 1 else []
    measured = table.get(short_name(model), {}).get("per_card", {})
    return sorted(int(k) for k in measured if int(k) > 1)


def per_card_counts(fits: dict[str, int], refusals: dict[str, tuple[int, str]],
                    card_gib: float, runs_per_gpu: str, table: dict,
                    probes: dict[str, Job] | None = None) -> tuple[dict[str, int], list[str]]:
    """{model: runs per card} and notes, from how many of each model's runs fit on a card
    (`fits`: each with its 1/k share, by MATH_experiment.py's own memory plan at that budget)
    and why the next count did not (`refusals`: k, the plan's error); StudyError when the
    count given cannot fit. `auto` judges the counts by the throughput projected for a run
    like `probes[model]` where the table allows, else by the measurement's own."""
    counts, notes = {}, []
    for model, fit in fits.items():
        if runs_per_gpu == "auto":
            projected = (projected_aggregates(probes[model], table,
                                              share_candidates(model, "auto", table))
                         if probes and model in probes else {})
            counts[model], note = auto_per_card(model, fit, table, projected)
            notes.append(f"--runs_per_gpu auto: {note}")
            continue
        k = int(runs_per_gpu)
        if k > fit:
            _, why = refusals[model]
            raise StudyError(f"--runs_per_gpu {k}: {short_name(model)} does not fit {k} runs "
                             f"on a {card_gib:.1f} GiB card: at {card_gib / k:.1f} GiB a run, "
                             f"{why}")
        counts[model] = k
    return counts, notes


def share_fits(runs: list[RunSpec], args: dict[str, list[str]], card_gib: float,
               runs_per_gpu: str, table: dict, ask_workers: int
               ) -> tuple[dict[str, int], dict[str, tuple[int, str]], dict]:
    """How many runs of each model fit on a card, asking MATH_experiment.py's memory plan at
    each candidate share (a run at 1/k of the card may choose a leaner plan than at the whole
    card); the refusal of the first count that does not fit; and the answers, by (plan key, k)."""
    candidates = {r.model: share_candidates(r.model, runs_per_gpu, table) for r in runs}
    asks = {}
    for r in runs:
        for k in candidates[r.model]:
            asks.setdefault((plan_key(args[r.name]), k),
                            (args[r.name], card_gib / k, f"run {r.name} at 1/{k} of the card"))
    answers = ask_all(asks, ask_workers)
    keys = {}
    for r in runs:
        keys.setdefault(r.model, set()).add(plan_key(args[r.name]))
    fits, refusals = {}, {}
    for model, ks in candidates.items():
        fits[model] = 1
        for k in ks:
            errors = [plan["error"] for key in keys[model]
                      if (plan := answers[(key, k)].plan) and "error" in plan]
            if errors:
                refusals[model] = (k, errors[0])
                break
            fits[model] = k
    return fits, refusals, answers


def projected_aggregates(job: Job, table: dict, counts: list[int]) -> dict[int, float]:
    """Throughput of k runs on a card against one, for runs of this job's length and evals,
    projected from the table (job_seconds) for each measured k; {} when one alone or a count is
    not measured. A short measurement's own aggregate overstates packing for a longer run:
    the fixed start-up, overlapped when packed, weighs less there."""
    measured = table.get(short_name(job.model), {}).get("per_card", {})
    if not all("s_per_step" in measured.get(str(k), {}) for k in (1, *counts)):
        return {}  # an entry without step times (a hand-written table) keeps its aggregates
    one = job_seconds(job, table, 1)
    if not one:
        return {}
    out = {1: 1.0}
    for k in counts:
        if (seconds := job_seconds(job, table, k)) is None:
            return {}
        out[k] = round(k * one / seconds, 2)
    return out


def train_jobs(spec: StudySpec, runs: list[RunSpec], study_dir: Path,
               plans: dict[str, RunPlan], counts: dict[str, int] | None,
               card_gib: float | None, gpus_per_run: int) -> list[Job]:
    """The training jobs, largest planned peak first; `counts` None on CPU."""
    jobs = []
    for r in runs:
        plan = plans[r.name]
        k = counts[r.model] if counts else 1
        budget = card_gib / k if counts and card_gib else None
        cfg = plan.config
        jobs.append(Job(r.name, "train", EXPERIMENT, r.args(spec, study_dir),
                        study_dir / "runs" / r.name, r.model, 1.0 / k, budget,
                        plan.planned_peak_gib, gpus_per_run,
                        n_steps=int(cfg.get("n_train_steps", 0)),
                        eval_every=int(cfg.get("eval_every", 0)),
                        eval_problems=plan.eval_problems))
    return sorted(jobs, key=lambda j: (-j.peak_gib, j.name))


def eval_jobs(spec: StudySpec, study_dir: Path, trains: list[Job]) -> list[Job]:
    """--final_eval "DATASETS:N": evaluate.py on every final model, and on each base model."""
    if not spec.final_eval:
        return []
    datasets, _, n = spec.final_eval.partition(":")
    common = ["--datasets", *datasets.split(","), *(["--n", n] if n else []),
              *spec.final_eval_flags]
    jobs, bases = [], {}
    for t in trains:
        out = study_dir / "evals" / t.name
        util = ["--gpu_mem_util", f"{EVAL_MEM_SHARE * t.share:.3f}"]
        jobs.append(Job(f"eval:{t.name}", "eval", EVALUATE,
                        ["--model_id", str(t.run_dir), "--out", str(out), *util, *common],
                        out, t.model, t.share, after=t.name))
        name = base_eval_name(short_name(t.model))
        bases.setdefault(name, Job(f"eval:{name}", "eval", EVALUATE,
                                   ["--model_id", t.model, "--out", str(study_dir / "evals" / name),
                                    *util, *common], study_dir / "evals" / name, t.model, t.share))
    return list(bases.values()) + jobs


def check_final_eval(value: str | None) -> None:
    if value is None:
        return
    datasets, sep, n = value.partition(":")
    if not datasets or (sep and not n.isdigit()):
        raise StudyError(f"--final_eval {value!r}: expected DATASETS[:N], e.g. math500:16 or "
                         "math500,amc23:16")


# ----------------------------------------------------------------------------- projection


def job_seconds(job: Job, table: dict, k: int) -> float | None:
    """A job's projected duration from the measured packing table (None: not measured).

    With the run's fixed cost measured (start-up, final save: `fixed_s`) it is fixed + steps x
    s/step + the trainer's wait for each eval but the last + the last eval in full. An eval's
    time grows with its problems (same samples and tokens each). A blocking eval's wait is all
    of it. A concurrent one overlaps the steps until the next eval is due, so its wait is what
    it takes beyond `eval_every` steps plus the rest of the wait the measurement shows (its
    wait less that excess: the hand-over). An entry without these figures counts every eval in
    full and no start-up."""
    measured = table.get(short_name(job.model), {})
    entry = measured.get("per_card", {}).get(str(k))
    if not entry or job.kind != "train":
        return None
    n_evals = len({s for s in range(0, job.n_steps + 1)
                   if s == 0 or s == job.n_steps or (job.eval_every and s % job.eval_every == 0)})
    scale = (job.eval_problems / measured["eval_problems"]
             if job.eval_problems and measured.get("eval_problems") else 1.0)
    step_s, eval_m = entry["s_per_step"], entry["eval_s"] or 0.0
    if entry.get("fixed_s") is None:
        return job.n_steps * step_s + n_evals * eval_m * scale
    if entry.get("concurrent_evals", True):
        every_m = measured.get("eval_every") or job.eval_every
        handover = max(0.0, entry["eval_wait_s"] - max(0.0, eval_m - every_m * step_s))
        wait = max(0.0, eval_m * scale - (job.eval_every or job.n_steps) * step_s) + handover
    else:
        wait = entry["eval_wait_s"] * scale
    return (entry["fixed_s"] + job.n_steps * step_s + (n_evals - 1) * wait
            + entry["final_eval_s"] * scale)


def simulate(jobs: list[tuple[float, float]], cards: int, max_per_card: int) -> float:
    """Wall time of placing (share, seconds) jobs in order, as the local launcher does: a job
    starts on the first card with room for its share (shares <= 1, at most max_per_card runs),
    the first pending job that fits whenever a job ends."""
    t, running, pending = 0.0, [], list(jobs)
    load, count = [0.0] * cards, [0] * cards
    while pending or running:
        for share, seconds in list(pending):
            card = next((c for c in range(cards) if load[c] + share <= 1 + 1e-9
                         and count[c] < max_per_card), None)
            if card is not None:
                pending.remove((share, seconds))
                load[card] += share
                count[card] += 1
                running.append((t + seconds, card, share))
        if not running:
            raise ValueError("a job's share does not fit on any card")
        running.sort()
        t, card, share = running.pop(0)
        load[card] -= share
        count[card] -= 1
    return t


# ----------------------------------------------------------------------------- the whole plan


@dataclass
class StudyPlan:
    spec: StudySpec
    runs: list[RunSpec]
    jobs: list[Job]  # training runs (largest planned peak first), then final evaluations
    plans: dict[str, RunPlan]  # per run name
    cards: list[Card] | None  # None: CPU
    card_gib: float | None
    counts: dict[str, int] | None  # runs per card, per model
    notes: list[str]

    def manifest_jobs(self, study_dir: Path) -> dict:
        return {j.name: {"dir": str(j.run_dir.relative_to(study_dir)), "kind": j.kind,
                         "model": j.model, "share": j.share, "n_steps": j.n_steps,
                         "eval_every": j.eval_every} for j in self.jobs}

    @property
    def max_per_card(self) -> int:
        return max(self.counts.values()) if self.counts else 1


def plan_study(spec: StudySpec, study_dir: Path, cards: list[Card] | None,
               card_gb: float | None, runs_per_gpu: str, gpus_per_run: int,
               ask_workers: int) -> StudyPlan:
    """Ask MATH_experiment.py about each distinct run (its flags, model and memory plan for the
    card), decide the runs per card, and lay out the jobs; StudyError on anything it refuses."""
    runs = expand(spec)
    args = {r.name: r.args(spec, study_dir) for r in runs}
    labels = {r.name: f"run {r.name} ({r.objective} on {r.model})" for r in runs}
    configs = {name: check_flags(a, labels[name]) for name, a in args.items()}  # instant
    card_gib = card_gb or (min(c.gib for c in cards) if cards else None)
    asks = {}
    for name, a in args.items():
        asks.setdefault(plan_key(a), (a, card_gib, labels[name]))
    answers = ask_all(asks, ask_workers)
    plans = {name: dataclasses.replace(answers[plan_key(a)], config=configs[name])
             for name, a in args.items()}
    for r in runs:
        if (plan := plans[r.name].plan) and "error" in plan:
            raise StudyError(f"{short_name(r.model)} cannot run on a {card_gib:.1f} GiB card: "
                             f"{plan['error']}")
    counts, notes = None, []
    if cards is not None:
        table = read_packing_table()
        if gpus_per_run > 1:  # whole cards per run (run_study.py refuses a count above 1)
            runs_per_gpu = "1"
        fits, refusals, shared = share_fits(runs, args, card_gib, runs_per_gpu, table,
                                            ask_workers)
        # each model's run as one alone on a card would be: its length and evals
        probes = {j.model: j for j in train_jobs(spec, runs, study_dir, plans, None, card_gib,
                                                 gpus_per_run)}
        counts, notes = per_card_counts(fits, refusals, card_gib, runs_per_gpu, table, probes)
        for r in runs:  # a run sharing its card is planned, and ordered, at its share
            if (k := counts[r.model]) > 1:
                plans[r.name] = dataclasses.replace(shared[(plan_key(args[r.name]), k)],
                                                    config=configs[r.name])
    trains = train_jobs(spec, runs, study_dir, plans, counts, card_gib, gpus_per_run)
    return StudyPlan(spec, runs, trains + eval_jobs(spec, study_dir, trains), plans, cards,
                     card_gib, counts, notes)


def projected_seconds(plan: StudyPlan) -> tuple[float | None, str]:
    """The study's projected wall time from the measured packing table, and what it leaves
    out; None when some model's step times were never measured."""
    table = read_packing_table()
    trains = [j for j in plan.jobs if j.kind == "train"]
    work = []
    for j in trains:
        seconds = job_seconds(j, table, (plan.counts or {}).get(j.model, 1))
        if seconds is None:
            return None, (f"no measured step and eval times for {short_name(j.model)} at "
                          f"{(plan.counts or {}).get(j.model, 1)} per card (bench/packing.py "
                          "measures them)")
        work.append((j.share, seconds))
    cards = len(plan.cards) // max(1, trains[0].gpus) if plan.cards else 1
    extra = " (final evaluations not included)" if len(trains) < len(plan.jobs) else ""
    return simulate(work, cards, plan.max_per_card), extra
