"""Offline evaluation with the paper's protocol: pass@1 ... pass@n on MATH, AIME and AMC.

  python evaluate.py --model_id Qwen/Qwen2.5-0.5B-Instruct runs/<run> --datasets math500 amc23

Protocol (Zhu et al., 2025, their eval.sh and eval.py): the test sets of MATH (all 5,000
problems), AIME 2025 and AMC 2023; vLLM in bf16, n = 256 samples per problem at
temperature 0.6, top-p 0.95, top-k off, up to 4,096 new tokens, the prompt "{problem}\\nPlease
reason step by step, and put your final answer within \\boxed{}." under the chat template with the
system message "You are a helpful assistant."; pass@k for k = 1, 2, 4, ..., n with the unbiased
estimator, ± 1 standard error over problems. Answers are graded by the last \\boxed{} with
math-verify (the project's grader, not the paper's math_equal). Outputs under --out:
samples.jsonl (one line per sample), summary.json, results.md, pass_at_k_curves.png,
eval_config.json, timing.jsonl. An interrupted evaluation resumes where it stopped when re-run
with the same flags; a finished one re-run only prints its summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rlvr.cli import EXIT_INTERRUPTED, EXIT_REFUSED, ArgumentParser, unwritable_reason
from rlvr.data import DataError
from rlvr.eval_report import (
    FIGURE,
    RESULTS,
    SAMPLES,
    SUMMARY,
    ReportError,
    build_summary,
    done_problems,
    format_summary_table,
    merge_config,
    plot_pass_at_k_curves,
    repair_samples,
    results_markdown,
    write_config,
    write_summary,
)
from rlvr.eval_sets import EVAL_SETS, load_eval_set, select_subset
from rlvr.eval_worker import (
    EvalError,
    check_model_loads,
    evaluate_model,
    evaluate_model_in_child,
    resolve_model,
)
from rlvr.prompts import PROMPT_STYLES

# The paper's evaluation sets (its eval.sh: TianHongZXY/MATH, AIME2025 and amc23, [test] each).
PAPER_DATASETS = ("math", "aime2025", "amc23")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # no "(default: None)" after flags whose help already says what None means
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    head, example, protocol = __doc__.split("\n\n", 2)
    p = ArgumentParser(prog="evaluate.py", description=f"{head}\n\n{protocol}",
                       epilog=f"example:\n{example}", formatter_class=_Formatter)
    p.add_argument("--model_id", nargs="+", required=True, metavar="MODEL",
                   help="hub id, local HF directory, .gguf file, a MATH_experiment.py run "
                        "directory (its final_model/, or --checkpoint) or <run>/checkpoints/step_N")
    p.add_argument("--checkpoint", default=None,
                   help="for run directories: evaluate checkpoints/<this> (e.g. step_40)")
    p.add_argument("--datasets", nargs="+", default=list(PAPER_DATASETS), metavar="NAME",
                   help=f"any of {', '.join(EVAL_SETS)}; the default is the paper's three sets "
                        "(math = the full 5,000-problem MATH test split); math500 is the "
                        "500-problem subset most small-model papers report, 10x cheaper")
    p.add_argument("--n", type=int, default=256, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (needs --n 1)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling (top-k is off)")
    p.add_argument("--max_tokens", type=int, default=4096, help="max new tokens per sample")
    p.add_argument("--prompt_style", default="paper", choices=tuple(PROMPT_STYLES),
                   help="'paper' is the paper's exact instruction")
    p.add_argument("--limit", type=int, default=None,
                   help="a seeded subset of N problems per dataset, stratified by subject x "
                        "level for the MATH sets (default: all)")
    p.add_argument("--data_root", default=None,
                   help="local data, DIR/{MATH,MATH500,AIME2024,AIME2025,AMC23}/test.jsonl "
                        "(default: the hub, see README)")
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf"),
                   help="auto = vllm when CUDA and vllm are importable, else hf")
    p.add_argument("--out", default=None, help="output directory (default: evals/<model name>)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and --limit subset seed")
    p.add_argument("--gpu_mem_util", type=float, default=0.9, help="vLLM's share of the GPU")
    p.add_argument("--max_num_seqs", type=int, default=512,
                   help="vLLM's decode batch (512 = its largest CUDA-graph batch)")
    p.add_argument("--grader_workers", type=int, default=None,
                   help="math-verify processes (default: CPUs - 2, at least 1, at most 32)")
    p.add_argument("--grade_timeout_s", type=float, default=5.0,
                   help="per-sample grading limit; a timeout scores 0 and is counted")
    p.add_argument("--chunk_samples", type=int, default=None,
                   help="samples generated per chunk, the unit of resumption (default: 16384)")
    return p


def check_flags(a: argparse.Namespace) -> None:
    checks = [
        (a.n >= 1, f"--n must be >= 1, got {a.n}"),
        (a.temperature >= 0, f"--temperature must be >= 0, got {a.temperature}"),
        (0 < a.top_p <= 1, f"--top_p must be in (0, 1], got {a.top_p}"),
        (a.max_tokens >= 1, f"--max_tokens must be >= 1, got {a.max_tokens}"),
        (a.limit is None or a.limit >= 1, f"--limit must be >= 1, got {a.limit}"),
        (0 < a.gpu_mem_util < 1, f"--gpu_mem_util must be in (0, 1), got {a.gpu_mem_util}"),
        (a.grader_workers is None or a.grader_workers >= 1, "--grader_workers must be >= 1"),
        (a.grade_timeout_s > 0, "--grade_timeout_s must be > 0"),
        (a.chunk_samples is None or a.chunk_samples >= 1, "--chunk_samples must be >= 1"),
        (a.max_num_seqs >= 1, "--max_num_seqs must be >= 1"),
        (a.temperature > 0 or a.n == 1,
         f"--temperature 0 is greedy, one sample per problem, but --n is {a.n}; pass --n 1, or "
         "a --temperature > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise EvalError(msg)
    unknown = [d for d in a.datasets if d not in EVAL_SETS]
    if unknown:
        raise EvalError(f"unknown dataset {unknown[0]!r}; pass --datasets from "
                        f"{', '.join(EVAL_SETS)}")
    if a.data_root is not None and not Path(a.data_root).is_dir():
        raise EvalError(f"--data_root {a.data_root} is not a directory; pass the directory "
                        "that holds MATH500/, AIME2025/ ... (or leave it out to read the hub)")


# ----------------------------------------------------------------------------- output dir


def default_out(specs: list[dict]) -> Path:
    name = re.sub(r"[^\w.-]+", "_", specs[0]["label"]).strip("_")
    return Path("evals") / (name + (f"_and_{len(specs) - 1}_more" if len(specs) > 1 else ""))


def _sha(rows: list[dict]) -> str:
    import hashlib

    text = json.dumps([(r["id"], r["problem"], r["answer"]) for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def new_config(a: argparse.Namespace, specs: list[dict], sets: dict[str, list[dict]]) -> dict:
    from rlvr.prompts import SYSTEM_MESSAGE

    protocol = {"n": a.n, "temperature": a.temperature, "top_p": a.top_p,
                "max_tokens": a.max_tokens, "prompt_style": a.prompt_style,
                "prompt": PROMPT_STYLES[a.prompt_style], "system": SYSTEM_MESSAGE,
                "limit": a.limit, "seed": a.seed}
    datasets = {}
    for d, rows in sets.items():
        spec = EVAL_SETS[d]
        source = (f"{Path(a.data_root).resolve() / spec.folder / 'test.jsonl'}" if a.data_root
                  else f"hub:{spec.hub_id}[{spec.hub_split}]")
        datasets[d] = {"source": source, "n_problems": len(rows), "problems_sha256": _sha(rows)}
    return {"protocol": protocol, "datasets": datasets, "models": {s["label"]: s for s in specs}}


def finish(out: Path, config: dict, quiet_if_unchanged: bool = False) -> None:
    """summary.json, the figure and results.md from samples.jsonl; then print the tables."""
    summary = build_summary(out, config)
    old = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).is_file() else None
    if not (quiet_if_unchanged and old == json.loads(json.dumps(summary))):
        write_summary(out, config)
        try:
            fig = FIGURE if plot_pass_at_k_curves([(out.name, summary)], out / FIGURE) else None
        except ImportError:  # matplotlib: in requirements.txt, but the numbers do not need it
            print("note: matplotlib is not installed: no pass@k figure", file=sys.stderr)
            fig = None
        (out / RESULTS).write_text(results_markdown(summary, fig))
    print(f"\n{format_summary_table(summary)}\n\n[eval] outputs in {out}/", flush=True)


def run(a: argparse.Namespace) -> int:
    check_flags(a)
    specs = [resolve_model(m, a.checkpoint) for m in dict.fromkeys(a.model_id)]
    labels = [s["label"] for s in specs]
    if len(set(labels)) != len(labels):
        raise EvalError(f"two --model_id share the name {max(labels, key=labels.count)!r}; "
                        "evaluate them into separate --out directories")
    out = Path(a.out) if a.out else default_out(specs)
    if (why := unwritable_reason(out)) is not None:
        raise EvalError(f"cannot write the output directory {out}: {why}; pass another --out")
    sets = {d: select_subset(load_eval_set(d, a.data_root), a.limit, a.seed)
            for d in dict.fromkeys(a.datasets)}
    config = merge_config(out, new_config(a, specs, sets))
    records, dropped = repair_samples(out / SAMPLES, a.n, dry_run=True)  # nothing written yet
    done = done_problems(records)
    del records
    jobs = []
    for s in specs:
        todo = {d: [r for r in rows if (s["label"], d, r["id"]) not in done]
                for d, rows in sets.items()}
        if todo := {d: rows for d, rows in todo.items() if rows}:
            jobs.append({"spec": s, "todo": todo, "protocol": config["protocol"],
                         "backend": a.backend, "gpu_mem_util": a.gpu_mem_util,
                         "max_num_seqs": a.max_num_seqs, "grader_workers": a.grader_workers,
                         "grade_timeout_s": a.grade_timeout_s, "chunk_samples": a.chunk_samples,
                         "out": str(out)})
    for job in jobs:  # the last input check (a hub id with a typo) before anything is written
        check_model_loads(job["spec"])
    if dropped:
        repair_samples(out / SAMPLES, a.n)
        print(f"[resume] dropped {dropped} lines of problems cut short: they are redone",
              flush=True)
    if not jobs:
        print(f"[eval] {out}: every requested problem is done; summary:", flush=True)
        finish(out, config, quiet_if_unchanged=True)
        return 0
    write_config(out, config)
    for job in jobs:
        n_left = sum(map(len, job["todo"].values()))
        print(f"[eval] {job['spec']['label']}: {n_left} problems to do", flush=True)
    # One vLLM engine per process: several models on vLLM each get a spawned process.
    from rlvr.engines import vllm_available

    backend = a.backend if a.backend != "auto" else ("vllm" if vllm_available() else "hf")
    for job in jobs:
        if backend == "vllm" and len(jobs) > 1:
            if (code := evaluate_model_in_child(job)) != 0:
                return code
        else:
            evaluate_model(job)
    finish(out, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (EvalError, DataError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue; finished problems are kept",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    from rlvr.console import quiet_third_party

    quiet_third_party()  # before transformers and vLLM read their settings (child processes too)
    sys.exit(main())
