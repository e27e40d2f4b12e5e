"""evaluate.py's models: what --model_id names, the directory both engines load, the engine, and
the worker that evaluates one model (in this process, or in a spawned one on vLLM).

The evaluation itself is the one generate -> grade path, rlvr/eval_run.py's `run_eval`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from rlvr.cli import EXIT_INTERRUPTED, EXIT_REFUSED
from rlvr.eval_run import DEFAULT_CHUNK_SAMPLES, HF_CHUNK_SAMPLES, problems_from_rows, run_eval
from rlvr.prompts import encode_problems
from rlvr.reward import BatchGrader


class EvalError(Exception):
    """A problem with the inputs or the model, reported as one `error:` line."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fingerprint(path: Path) -> str:
    """Names, sizes and mtimes of a model's files: a re-trained model is a different model."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def _checkpoints(run: Path) -> str:
    found = sorted(p.name for p in (run / "checkpoints").glob("step_*") if p.is_dir())
    return ", ".join(found) or "none"


def _run_spec(model_id: str, run: Path, checkpoint: str | None) -> dict:
    if checkpoint is None:
        final = run / "final_model"
        if not (final / "config.json").is_file():
            raise EvalError(f"run {model_id} has no final_model/ (still training?); pass "
                            f"--checkpoint (available: {_checkpoints(run)})")
        return {"kind": "hf_dir", "path": str(final.resolve()), "label": f"{run.name}/final"}
    ckpt = run / "checkpoints" / checkpoint
    if not ckpt.is_dir():
        raise EvalError(f"run {model_id} has no checkpoints/{checkpoint} "
                        f"(available: {_checkpoints(run)}); pass --checkpoint one of those")
    return {"kind": "checkpoint", "path": str(ckpt.resolve()), "run_dir": str(run.resolve()),
            "label": f"{run.name}/{checkpoint}"}


def resolve_model(model_id: str, checkpoint: str | None) -> dict:
    """What --model_id names, checked on disk without loading anything: a spec with kind
    (hub, hf_dir, gguf, checkpoint), path, label (the model's name in every output)."""
    p = Path(model_id).expanduser()
    spec: dict
    if p.is_file() and p.suffix == ".gguf":
        spec = {"kind": "gguf", "path": str(p.resolve()), "label": p.stem}
    elif p.is_dir() and p.parent.name == "checkpoints" and (p.parents[1] / "config.json").is_file():
        if checkpoint is not None:
            raise EvalError(f"--checkpoint applies to run directories, not to {model_id}; leave "
                            "--checkpoint out")
        spec = _run_spec(model_id, p.parent.parent, p.name)
    elif p.is_dir() and (p / "config.json").is_file() and (
            (p / "final_model").is_dir() or (p / "checkpoints").is_dir()):
        spec = _run_spec(model_id, p, checkpoint)
    elif p.is_dir() and (p / "config.json").is_file():
        run = p.resolve().parent  # <run>/final_model is named after its run
        label = f"{run.name}/final" if p.resolve().name == "final_model" else p.resolve().name
        spec = {"kind": "hf_dir", "path": str(p.resolve()), "label": label}
    elif p.exists():
        raise EvalError(f"--model_id {model_id} is neither a model directory (config.json), a "
                        ".gguf file, nor a training run directory; pass one of those")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) and not model_id.startswith(".") \
            and not Path(p.parts[0]).is_dir():  # runs/typo is a missing path, not a hub id
        spec = {"kind": "hub", "path": None, "label": model_id}
    else:
        raise EvalError(f"--model_id {model_id} not found (not a local path, and a hub id is "
                        "owner/name); check the path or the id")
    if checkpoint is not None and spec["kind"] != "checkpoint":
        raise EvalError(f"--checkpoint applies to run directories, not to {model_id}; leave "
                        "--checkpoint out, or pass --model_id the run directory")
    spec["model_id"] = model_id
    spec["fingerprint"] = _fingerprint(Path(spec["path"])) if spec["path"] else ""
    return spec


def check_model_loads(spec: dict) -> None:
    """Load the tokenizer of a hub id or HF directory now, so that a typo fails before any
    output is written (checkpoints and .gguf files are checked on disk above)."""
    if spec["kind"] not in ("hub", "hf_dir"):
        return
    from rlvr.modeling import load_tokenizer

    try:
        load_tokenizer(spec["path"] or spec["model_id"])
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"cannot load --model_id {spec['model_id']}: {msg}; check the id or the "
                        "path") from None


def _cache_root() -> Path:
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr"))


def export_checkpoint(ckpt_dir: Path, run_dir: Path) -> str:
    """A bf16 HF directory of a training checkpoint's policy, cached by path and mtime.

    The architecture and tokenizer come from the run's final_model/ when it exists, else from the
    run's config.json `model_id` (the model training started from).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rlvr.checkpoint import load_policy_state
    from rlvr.modeling import load_tokenizer, resolve_model_dir

    key = hashlib.sha256(f"{ckpt_dir.resolve()}|{_fingerprint(ckpt_dir)}".encode()).hexdigest()[:16]
    out = _cache_root() / "checkpoints" / f"{run_dir.name}-{ckpt_dir.name}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    base = run_dir / "final_model"
    if not (base / "config.json").is_file():
        base = resolve_model_dir(json.loads((run_dir / "config.json").read_text())["model_id"])
    print(f"[model] exporting {ckpt_dir} to a bf16 HF directory at {out} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.load_state_dict(load_policy_state(ckpt_dir))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict={k: v.to(torch.bfloat16)
                                           for k, v in model.state_dict().items()})
    load_tokenizer(str(base)).save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def prepare_model_dir(spec: dict) -> str:
    """What both engines load for a model spec of evaluate.py (kind, model_id, path, run_dir)."""
    from rlvr.modeling import resolve_model_dir

    kind = spec["kind"]
    if kind == "hub":
        return spec["model_id"]
    if kind == "gguf":
        return resolve_model_dir(spec["path"])
    if kind == "checkpoint":
        return export_checkpoint(Path(spec["path"]), Path(spec["run_dir"]))
    return spec["path"]  # an HF directory, or a run's final_model/


def engine_eos_ids(model_dir: str, tokenizer) -> list[int]:
    """The ids that end a response, without loading the model (vLLM needs no HF policy)."""
    from transformers import GenerationConfig

    from rlvr.modeling import eos_token_ids

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = None
    return eos_token_ids(SimpleNamespace(generation_config=gen), tokenizer)


def open_engine(backend: str, model_dir: str, tokenizer, *, max_model_len: int, seed: int,
                gpu_mem_util: float, max_num_seqs: int):
    """vLLM (bf16, as the paper) or the HF engine (fp32 on CPU, bf16 autocast on GPU)."""
    from rlvr.engines import make_engine, vllm_available

    if backend == "vllm" and not vllm_available():
        raise EvalError("--backend vllm needs a CUDA GPU and the vllm package; use --backend "
                        "hf (or auto) on this machine")
    return make_engine(backend, model_dir, tokenizer, engine_eos_ids(model_dir, tokenizer),
                       max_model_len=max_model_len, seed=seed, max_num_seqs=max_num_seqs,
                       gpu_mem_util=gpu_mem_util)


# ----------------------------------------------------------------------------- the worker


def default_grader_workers() -> int:
    # vLLM's in-process engine and this process's threads need two cores; the rest grade
    return max(1, min(32, (os.cpu_count() or 2) - 2))


def evaluate_model(job: dict) -> None:
    """Evaluate one model of evaluate.py on the problems it still lacks, appending each chunk to
    samples.jsonl and one timing line per dataset to timing.jsonl (EvalError on a load failure).

    `job`: spec (`resolve_model`), todo {dataset: rows}, protocol (n, temperature, top_p,
    max_tokens, prompt_style, seed), backend, gpu_mem_util, max_num_seqs, grader_workers,
    grade_timeout_s, chunk_samples, out."""
    from rlvr.eval_report import SAMPLES, TIMING, append_jsonl
    from rlvr.modeling import load_tokenizer

    spec, proto, out = job["spec"], job["protocol"], Path(job["out"])
    label = spec["label"]
    try:
        model_dir = prepare_model_dir(spec)
        tokenizer = load_tokenizer(model_dir)
        todo = {}
        for d, rows in job["todo"].items():
            enc = encode_problems(rows, tokenizer, proto["prompt_style"])
            todo[d] = problems_from_rows(enc.rows, enc.prompt_ids)
        longest = max(len(p.prompt_ids) for probs in todo.values() for p in probs)
        engine = open_engine(job["backend"], model_dir, tokenizer,
                             max_model_len=longest + proto["max_tokens"], seed=proto["seed"],
                             gpu_mem_util=job["gpu_mem_util"], max_num_seqs=job["max_num_seqs"])
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # bad id, unsupported model, OOM
        raise EvalError(f"cannot load --model_id {spec['model_id']}: {_first_line(e)}") from None
    print(f"[eval] {label}: engine {engine.name}, "
          + ", ".join(f"{d} {len(p)} problems" for d, p in todo.items()), flush=True)
    workers = job.get("grader_workers") or default_grader_workers()
    with BatchGrader(num_workers=workers, timeout_s=job["grade_timeout_s"]) as grader:
        for dataset, problems in todo.items():
            res = run_eval(engine, grader, problems, n=proto["n"],
                           temperature=proto["temperature"], top_p=proto["top_p"],
                           max_tokens=proto["max_tokens"], seed=proto["seed"], model=label,
                           chunk_samples=job.get("chunk_samples") or (
                               HF_CHUNK_SAMPLES if engine.name == "hf" else DEFAULT_CHUNK_SAMPLES),
                           on_chunk=lambda recs: append_jsonl(out / SAMPLES, recs),
                           keep_records=False, progress=sys.stdout,
                           label=f"{label} / {dataset}")
            append_jsonl(out / TIMING, [{
                "model": label, "dataset": dataset, "engine": engine.name,
                "problems": len(problems), "samples": len(problems) * proto["n"],
                "tokens": res.n_tokens, "graded": res.n_graded, "gen_s": res.gen_s,
                "grade_s": res.grade_s, "grade_wait_s": res.grade_wait_s,
                "last_grade_s": res.timing["last_grade_s"], "wall_s": res.wall_s,
                "grade_timeouts": res.n_timeouts, "grader_workers": workers,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}])


def _child_main(job: dict) -> None:
    try:
        evaluate_model(job)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def evaluate_model_in_child(job: dict) -> int:
    """evaluate_model in a spawned process: one vLLM engine per process, freed with it (a second
    LLM in one process is fragile, and only one may use sleep mode). Returns the exit code."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_child_main, args=(job,), name="rlvr-eval")
    proc.start()
    proc.join()
    return proc.exitcode if proc.exitcode is not None else 1
