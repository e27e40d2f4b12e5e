#!/usr/bin/env python
"""Run a whole study: models x objectives x seeds on the GPUs at hand, or on Slurm, and its report.

    python run_study.py --study seed                   # the published study, studies/seed/
    python run_study.py --study seed --dry_run         # grid, memory plans, schedule, wall time
    python run_study.py --status studies/seed          # progress, from the files alone
    python run_study.py --models Qwen/Qwen2.5-0.5B-Instruct --objectives NSR PSR --seeds 1 2 \\
        -- --n_train_steps 40                          # flags after -- go to every run

Re-running the same command continues the study: finished runs are skipped, interrupted ones
resume from their checkpoint. The report is DIR/results.md (python plot_results.py --study DIR).
Exit status: 0 all done, 1 some run failed, 2 bad input (one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from rlvr.cli import EXIT_REFUSED
from rlvr.study import PUBLISHED, StudyError, StudySpec, check_spec

DEFAULTS = {"objectives": ["NSR", "PSR", "W_REINFORCE"], "seeds": [1, 2, 3], "lambdas": [0.1]}


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="run_study.py", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the grid")
    g.add_argument("--study", choices=sorted(PUBLISHED), help="a published study's axes and flags "
                   "(seed: Qwen2.5-0.5B/1.5B/3B-Instruct x NSR, PSR, W_REINFORCE (λ 0.1) x seeds "
                   "1 2 3, --preset seed); axes given as well replace its own")
    g.add_argument("--models", nargs="*", help="model ids or paths (MATH_experiment.py "
                   "--model_id); required without --study")
    g.add_argument("--objectives", nargs="*", help="default: NSR PSR W_REINFORCE")
    g.add_argument("--seeds", nargs="*", type=int, help="default: 1 2 3")
    g.add_argument("--lambdas", nargs="*", type=float, help="W_REINFORCE's λ (default: 0.1)")
    g.add_argument("--name", help="the study's name (default: --study, else 'study')")
    g.add_argument("--study_dir", type=Path, help="default: studies/<name>")
    g.add_argument("--extend", action="store_true", help="let a study directory's grid grow by "
                   "the new cells of this command (nothing else may change)")
    g.add_argument("--final_eval", metavar="DATASETS[:N]", help="evaluate.py on every final "
                   "model and each base model, e.g. math500:16 (the report compares them)")
    g.add_argument("--final_eval_flags", default="", help="more evaluate.py flags for "
                   "--final_eval, one string, e.g. '--max_tokens 4096 --limit 100'")
    m = p.add_argument_group("what to do")
    m.add_argument("--dry_run", action="store_true", help="print the grid, each distinct run's "
                   "memory plan, the schedule and the projected wall time; start nothing")
    m.add_argument("--status", type=Path, metavar="DIR", help="print a study's progress and exit")
    m.add_argument("--no_report", action="store_true", help="do not write DIR/results.md at "
                   "the end")
    m.add_argument("--max_retries", type=int, default=1, help="retries of a failed run before "
                   "it is reported as failed (default: 1)")
    m.add_argument("--status_every", type=float, default=None, help="seconds between progress "
                   "tables (default: 2 on a terminal, redrawn in place; 60 otherwise)")
    loc = p.add_argument_group("local GPUs (--launcher local, the default)")
    loc.add_argument("--launcher", choices=("local", "slurm"), default="local",
                     help="local (default): this machine's cards; slurm: a job array")
    loc.add_argument("--gpus", help="cards to use, as CUDA_VISIBLE_DEVICES takes them (0,1); "
                     "'none' for CPU with the HF engine (default: CUDA_VISIBLE_DEVICES, else all)")
    loc.add_argument("--parallel", type=int, default=1,
                     help="with --gpus none: runs at once (default: 1)")
    loc.add_argument("--runs_per_gpu", default="auto", help="runs sharing one card, each with "
                     "its share of the memory; auto: from the measured packing table "
                     "(rlvr/packing.json, bench/packing.py), 1 per card until measured")
    loc.add_argument("--card_gb", type=float, help="memory of each card to plan for, GiB "
                     "(default: nvidia-smi's); e.g. 79 to run an 80 GB card's study elsewhere")
    loc.add_argument("--gpus_per_run", type=int, default=1, help="cards per run (torchrun "
                     "--nproc_per_node N, whole cards; default: 1)")
    s = p.add_argument_group("Slurm (--launcher slurm, through submitit)")
    s.add_argument("--slurm_partition", help="sbatch --partition (default: the cluster's)")
    s.add_argument("--slurm_time", default="24:00:00", help="per run, HH:MM:SS or minutes "
                   "(default: 24:00:00); a run stopped by it (or preempted) is requeued and "
                   "resumes from its checkpoint")
    s.add_argument("--slurm_gpus_per_run", type=int, default=1, help="GPUs per task (default: "
                   "1; more: torchrun across them; 0: none)")
    s.add_argument("--slurm_cpus_per_run", type=int, default=8, help="default: 8")
    s.add_argument("--slurm_mem_gb", type=float, default=None, help="host memory per run")
    for key in ("account", "qos", "constraint"):
        s.add_argument(f"--slurm_{key}", help=f"sbatch --{key}")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def make_spec(a: argparse.Namespace, flags: list[str]) -> StudySpec:
    base = PUBLISHED.get(a.study, {})
    axes = {k: getattr(a, k) if getattr(a, k) is not None else base.get(k, DEFAULTS.get(k))
            for k in ("models", "objectives", "seeds", "lambdas")}
    if axes["models"] is None:
        raise StudyError("--models is required without --study (e.g. --models "
                         "Qwen/Qwen2.5-0.5B-Instruct)")
    try:
        eval_flags = tuple(shlex.split(a.final_eval_flags))
    except ValueError as e:
        raise StudyError(f"--final_eval_flags: {e}") from None
    return StudySpec(a.name or a.study or "study", tuple(axes["models"]),
                     tuple(axes["objectives"]), tuple(axes["seeds"]), tuple(axes["lambdas"]),
                     tuple(base.get("flags", [])) + tuple(flags), a.final_eval, eval_flags)


def check_args(a: argparse.Namespace) -> None:
    from rlvr.study_schedule import check_final_eval

    if a.max_retries < 0:
        raise StudyError("--max_retries must be >= 0")
    if a.parallel < 1:
        raise StudyError("--parallel must be >= 1")
    if a.gpus_per_run < 1:
        raise StudyError("--gpus_per_run must be >= 1")
    if a.runs_per_gpu != "auto" and not (a.runs_per_gpu.isdigit() and int(a.runs_per_gpu) >= 1):
        raise StudyError(f"--runs_per_gpu must be auto or >= 1, got {a.runs_per_gpu!r}")
    if a.gpus_per_run > 1 and a.runs_per_gpu not in ("auto", "1"):
        raise StudyError("--gpus_per_run > 1 takes whole cards: --runs_per_gpu must be 1")
    if a.parallel > 1 and a.gpus != "none":
        raise StudyError("--parallel is for --gpus none (CPU); on GPUs see --runs_per_gpu")
    if a.launcher == "slurm" and shutil.which("sbatch") is None:
        raise StudyError("--launcher slurm needs Slurm's sbatch on PATH (this machine has none)")
    if a.card_gb is not None and a.card_gb <= 0:
        raise StudyError("--card_gb must be > 0")
    check_final_eval(a.final_eval)


def main(argv: list[str] | None = None) -> int:
    own, flags = split_argv(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(own)
    try:
        if a.status is not None:
            from rlvr.study_progress import status_text

            print(status_text(a.status))
            return 0
        check_args(a)
        spec = make_spec(a, flags)
        check_spec(spec)
        study_dir = a.study_dir or Path("studies") / spec.name
        from rlvr.study_main import dry_run, run

        return dry_run(a, spec, study_dir) if a.dry_run else run(a, spec, study_dir)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
