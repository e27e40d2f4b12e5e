"""run_study.py's two actions on top of the study modules: a dry run, and a run (then the report).

Order, so that bad input costs nothing: the grid against the study directory's study.json
(read only), then MATH_experiment.py's own answer for every distinct run, and only then the
study directory, its runner lock and study.json; the launcher last.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rlvr.cli import EXIT_INTERRUPTED
from rlvr.run_logs import plural
from rlvr.study import (
    MANIFEST,
    RunnerLock,
    StudyError,
    StudySpec,
    claim_manifest,
    job_state,
    manifest_differences,
    read_attempts,
    short_name,
    write_json,
)
from rlvr.study_schedule import Card, StudyPlan, plan_study, projected_seconds, visible_cards


def _check_dir(study_dir: Path, spec: StudySpec, extend: bool) -> None:
    path = study_dir / MANIFEST
    if path.is_file():
        if diffs := manifest_differences(json.loads(path.read_text()), spec, extend):
            raise StudyError(f"{study_dir} holds another study: " + "; ".join(diffs)
                             + " (re-run its own command, or choose another --study_dir)")
    elif study_dir.exists() and any(study_dir.iterdir()):
        raise StudyError(f"--study_dir {study_dir} exists and is not a study directory (no "
                         f"{MANIFEST}); choose another")


def _plan(a: argparse.Namespace, spec: StudySpec, study_dir: Path) -> StudyPlan:
    cards: list[Card] | None = None
    if a.launcher == "local" and a.gpus != "none" and a.dry_run and a.gpus and a.card_gb:
        # planning a study for cards as given, whether this machine has them or not
        cards = [Card(i.strip(), a.card_gb, "planned") for i in a.gpus.split(",") if i.strip()]
    elif a.launcher == "local" and a.gpus != "none":
        cards = visible_cards(a.gpus)
    gpus = a.slurm_gpus_per_run if a.launcher == "slurm" else a.gpus_per_run
    plan = plan_study(spec, study_dir, cards, a.card_gb, a.runs_per_gpu, max(1, gpus),
                      ask_workers=min(8, os.cpu_count() or 1))
    if a.launcher == "slurm" and a.card_gb:  # plans printed for the cluster's cards
        plan.card_gib = a.card_gb
    return plan


def _model_errors(plan: StudyPlan) -> list[str]:
    seen = {}
    for r in plan.runs:
        if (err := plan.plans[r.name].model_error) is not None:
            seen.setdefault(r.model, err)
    return [f"--models {m}: {e}" for m, e in seen.items()]


def _fmt(seconds: float) -> str:
    h, m = divmod(int(seconds // 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def describe(plan: StudyPlan, study_dir: Path) -> str:
    """The dry run's text: grid, memory plans, schedule, projected wall time."""
    spec = plan.spec
    attempts = read_attempts(study_dir)
    lam = f" x λ {' '.join(f'{x:g}' for x in spec.lambdas)}" if "W_REINFORCE" in \
        spec.objectives else ""
    out = [f"study {spec.name}: {plural(len(plan.runs), 'run')} ("
           f"{plural(len(spec.models), 'model')} x {plural(len(spec.objectives), 'objective')}"
           f"{lam} x {plural(len(spec.seeds), 'seed')}) in {study_dir}",
           f"flags for every run: {' '.join(spec.flags) or '(none)'}", ""]
    width = max(len(r.name) for r in plan.runs)
    for j in plan.jobs:
        state = job_state(j.run_dir, attempts.get(j.name, [])) if j.kind == "train" else (
            "done" if (j.run_dir / "DONE").is_file() else "new")
        peak = f"  planned peak {j.peak_gib:.1f} GiB" if j.peak_gib else ""
        out.append(f"  {j.name:<{width}}  {state:<8}{peak}")
    shown = set()
    for r in plan.runs:
        p = plan.plans[r.name].plan
        if p and p.get("table") and (r.model, p["table"]) not in shown:
            shown.add((r.model, p["table"]))
            out += ["", f"memory plan of {short_name(r.model)} ({r.objective} and alike; "
                    "MATH_experiment.py --dry_run):", p["table"]]
    out += [""] + schedule_lines(plan)
    seconds, why = projected_seconds(plan)
    out.append(f"projected wall time: {_fmt(seconds)}{why}" if seconds is not None
               else f"projected wall time: unknown: {why}")
    return "\n".join(out)


def schedule_lines(plan: StudyPlan) -> list[str]:
    if plan.cards is None:
        return ["schedule: on CPU (HF engine)" if plan.counts is None else "schedule:"]
    names = ", ".join(f"{c.id} ({c.name}, {c.gib:.1f} GiB)" for c in plan.cards)
    lines = [f"schedule: {len(plan.cards)} card(s): {names}; planned as {plan.card_gib:.1f} GiB"]
    for model, k in (plan.counts or {}).items():
        lines.append(f"  {short_name(model)}: {k} run(s) per card, --gpu_memory_gb "
                     f"{plan.card_gib / k:.1f} each")
    lines += [f"  {n}" for n in plan.notes]
    lines.append("  order: largest planned peak first; a card starts its next run once the "
                 "last one started there is READY")
    return lines


def dry_run(a: argparse.Namespace, spec: StudySpec, study_dir: Path) -> int:
    _check_dir(study_dir, spec, a.extend)
    plan = _plan(a, spec, study_dir)
    print(describe(plan, study_dir))
    for line in _model_errors(plan):
        print(f"warning: {line}")
    if a.launcher == "slurm":
        print(f"launcher: Slurm job array, {a.slurm_gpus_per_run} GPU(s) and "
              f"{a.slurm_cpus_per_run} CPUs per run, --time {a.slurm_time}")
    return 0


def run(a: argparse.Namespace, spec: StudySpec, study_dir: Path) -> int:
    # an existing study is locked at once; a new one gets its directory only once it is planned
    lock = RunnerLock(study_dir) if (study_dir / MANIFEST).is_file() else None
    try:
        _check_dir(study_dir, spec, a.extend)
        plan = _plan(a, spec, study_dir)
        if errors := _model_errors(plan):
            raise StudyError(errors[0])
        study_dir.mkdir(parents=True, exist_ok=True)
        lock = lock or RunnerLock(study_dir)
        _write_manifest(a, spec, study_dir, plan)
        rc = launch(a, study_dir, plan)
        if rc != EXIT_INTERRUPTED and not a.no_report:
            write_report(study_dir)
        return rc
    finally:
        if lock is not None:
            lock.release()


def _write_manifest(a: argparse.Namespace, spec: StudySpec, study_dir: Path,
                    plan: StudyPlan) -> None:
    claim_manifest(study_dir, spec, a.extend)
    manifest = json.loads((study_dir / MANIFEST).read_text())
    manifest["jobs"] = {**manifest.get("jobs", {}), **plan.manifest_jobs(study_dir)}
    manifest["schedule"] = {"cards": len(plan.cards) if plan.cards else 1,
                            "max_per_card": plan.max_per_card if plan.cards else a.parallel,
                            "launcher": a.launcher}
    write_json(study_dir / MANIFEST, manifest)


def launch(a: argparse.Namespace, study_dir: Path, plan: StudyPlan) -> int:
    if a.launcher == "slurm":
        from rlvr.slurm_launcher import SlurmLauncher

        return SlurmLauncher(study_dir, plan.jobs, a).run()
    from rlvr.launchers import Display, LocalPool

    for note in plan.notes:
        print(f"note: {note}", flush=True)
    return LocalPool(study_dir, plan.jobs, plan.cards, a.parallel, plan.max_per_card,
                     a.max_retries, Display(every_s=a.status_every)).run()


def write_report(study_dir: Path) -> None:
    from rlvr.plotting import PlotError, make_study_report

    try:
        written = make_study_report(study_dir)
        print(f"report: {next(p for p in written if p.name == 'results.md')}", flush=True)
    except PlotError as e:
        print(f"note: no report yet: {e}", flush=True)
