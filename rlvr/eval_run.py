"""The one evaluation path: generate -> grade -> per-sample records, for evaluate.py and training.

`run_eval` generates a chunk of problems while the previous chunk is graded in a background
thread (math-verify runs in BatchGrader's worker processes; this thread only feeds them), so the
GPU never waits on grading unless grading is the slower of the two, which `grade_wait_s`
measures. Each finished chunk is handed to `on_chunk` (evaluate.py appends it to samples.jsonl
there), which is what makes an interrupted evaluation resumable problem by problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rlvr.evaluation import summarize_samples
from rlvr.prompts import encode_prompt
from rlvr.reward import BatchGrader, extract_boxed
from rlvr.sampling import sampling_seed

# Samples per chunk on vLLM: 32 full batches of its 512 sequences. Every chunk ends with a drain
# in which fewer and fewer sequences are left decoding (the longest samples of the chunk), so a
# bigger chunk wastes a smaller share of the GPU; a smaller one loses less work to a kill and
# overlaps more grading with generation. 32 batches keep the drain (at most ~one max-length
# sample's worth of steps at low occupancy) to a few percent of a chunk by our estimate, not a
# measurement; MATH-500 x 256 samples is then 8 chunks of 64 problems (minutes each).
DEFAULT_CHUNK_SAMPLES = 16_384
# The HF engine has no continuous batching to keep full: small chunks, fine-grained resumption.
HF_CHUNK_SAMPLES = 256
PROGRESS_EVERY_S = 10.0
HEARTBEAT_S = 60.0


@dataclass
class EvalProblem:
    id: str
    dataset: str
    problem: str
    answer: str  # gold final answer (box content)
    prompt_ids: list[int]
    subject: str | None = None
    level: int | None = None


@dataclass
class EvalResult:
    records: list[dict]  # one per sample, rlvr.evaluation.RECORD_KEYS, problem-major
    scores: list[list[float]]  # [problem][sample], 0/1
    n_timeouts: int = 0  # samples whose grading hit the time limit (scored 0)
    n_tokens: int = 0  # generated tokens
    gen_s: float = 0.0  # inside engine.generate
    grade_wait_s: float = 0.0  # generation held back waiting for the grader
    grade_s: float = 0.0  # inside grader.grade_batch (in the grading thread)
    wall_s: float = 0.0
    timing: dict = field(default_factory=dict)


def encode_problems(rows: list[dict], tokenizer, prompt_style: str) -> list[EvalProblem]:
    """Rows of rlvr.eval_sets (id, dataset, problem, answer, subject, level) -> EvalProblems."""
    return [EvalProblem(r["id"], r["dataset"], r["problem"], r["answer"],
                        encode_prompt(tokenizer, r["problem"], prompt_style), r.get("subject"),
                        r.get("level")) for r in rows]


def problems_from_rows(rows: list[dict], prompt_ids: list[list[int]],
                       dataset: str) -> list[EvalProblem]:
    """Training-data rows (rlvr.data: unique_id, answer, subject, level) already encoded."""
    return [EvalProblem(str(r.get("unique_id", i)), dataset, r["problem"], r["answer"], ids,
                        r.get("subject"), r.get("level"))
            for i, (r, ids) in enumerate(zip(rows, prompt_ids, strict=True))]


def chunk_size(n: int, chunk_samples: int = DEFAULT_CHUNK_SAMPLES) -> int:
    """Problems per chunk: as many as fit in `chunk_samples` samples, at least one."""
    return max(1, chunk_samples // max(n, 1))


class _Progress:
    """One line per finished chunk, at most every PROGRESS_EVERY_S seconds, and one at the end;
    while a long chunk generates (minutes at 256 samples x 4,096 tokens), a heartbeat line every
    HEARTBEAT_S seconds says the run is alive and which chunk it is on."""

    def __init__(self, label: str, total: int, n_chunks: int, stream) -> None:
        self.label, self.total, self.n_chunks, self.stream = label, total, n_chunks, stream
        self.t0 = time.perf_counter()
        self.last = self.last_update = -math.inf  # any line; a chunk's line
        self.done, self.chunk = 0, 0
        self._stop = threading.Event()
        if stream is not None:
            threading.Thread(target=self._beat, daemon=True, name="rlvr-progress").start()

    def _print(self, text: str) -> None:
        self.last = time.perf_counter()
        print(f"[eval] {self.label}: {text}", file=self.stream, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if time.perf_counter() - self.last >= HEARTBEAT_S:
                self._print(f"{self.done}/{self.total} problems, generating chunk "
                            f"{self.chunk}/{self.n_chunks} | "
                            f"{(time.perf_counter() - self.t0) / 60:.1f} min")

    def update(self, done: int, samples: int, tokens: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.stream is None or (done < self.total
                                   and now - self.last_update < PROGRESS_EVERY_S):
            return
        self.last_update = now
        el = max(now - self.t0, 1e-9)
        eta = el / done * (self.total - done) if done else math.nan
        self._print(f"{done}/{self.total} problems | {samples / el:.1f} samples/s | "
                    f"{tokens / el:.0f} tok/s | {el / 60:.1f} min | ETA {eta / 60:.1f} min")

    def close(self) -> None:
        self._stop.set()


def _records(model: str, chunk: list[EvalProblem], outs, scores: list[float]) -> list[dict]:
    recs, i = [], 0
    for p, group in zip(chunk, outs, strict=True):
        for j, c in enumerate(group):
            recs.append({"model": model, "dataset": p.dataset, "problem_id": p.id, "sample": j,
                         "subject": p.subject, "level": p.level, "gold": p.answer,
                         "score": scores[i], "extracted": extract_boxed(c.text),
                         "response_tokens": len(c.token_ids),
                         "finish_reason": "length" if c.truncated else "stop",
                         "response": c.text})
            i += 1
    return recs


def run_eval(engine, grader: BatchGrader, problems: list[EvalProblem], *, n: int,
             temperature: float, top_p: float, max_tokens: int, seed: int, model: str = "",
             chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
             on_chunk: Callable[[list[dict]], None] | None = None,
             keep_records: bool = True, progress=None, label: str = "") -> EvalResult:
    """n samples of every problem, graded; records and the [problem][sample] score matrix.

    A problem's samples depend only on (seed, dataset, problem id) and the model: the same
    whether it is evaluated alone, in another chunk, after a resume or on another rank.

    Chunk k+1 is generated while chunk k is graded (and handed to `on_chunk`) in one background
    thread: BatchGrader is called from that thread only. `progress` is a stream for the progress
    line (evaluate.py: sys.stdout), or None for silence. `keep_records=False` keeps only the
    scores in memory (evaluate.py
    has every record on disk; 256 samples of 5,000 problems would be gigabytes of text).
    """
    res = EvalResult(records=[], scores=[])
    if not problems:
        return res
    t_start = time.perf_counter()
    per = chunk_size(n, chunk_samples)
    chunks = [problems[i:i + per] for i in range(0, len(problems), per)]
    prog = _Progress(label or model, len(problems), len(chunks), progress)
    state = {"done": 0, "samples": 0}

    def grade(chunk: list[EvalProblem], outs) -> None:  # runs in the grading thread
        texts = [c.text for group in outs for c in group]
        golds = [p.answer for p, group in zip(chunk, outs, strict=True) for _ in group]
        t0 = time.perf_counter()
        graded = grader.grade_batch(texts, golds)
        res.grade_s += time.perf_counter() - t0
        recs = _records(model, chunk, outs, graded.scores)
        if on_chunk is not None:
            on_chunk(recs)
        if keep_records:
            res.records.extend(recs)
        i = 0
        for group in outs:
            res.scores.append(graded.scores[i:i + len(group)])
            i += len(group)
        res.n_timeouts += graded.n_timeouts
        state["done"] += len(chunk)
        state["samples"] += len(texts)
        prog.update(state["done"], state["samples"], res.n_tokens)

    pending: Future | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvr-grade") as pool:
            for k, chunk in enumerate(chunks, 1):
                prog.chunk = k
                t0 = time.perf_counter()
                outs = engine.generate([p.prompt_ids for p in chunk], n=n,
                                       temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                                       seeds=[sampling_seed(seed, p.dataset, p.id) for p in chunk])
                res.gen_s += time.perf_counter() - t0
                res.n_tokens += sum(len(c.token_ids) for group in outs for c in group)
                if pending is not None:  # at most one chunk waits for grading
                    t0 = time.perf_counter()
                    pending.result()
                    res.grade_wait_s += time.perf_counter() - t0
                pending = pool.submit(grade, chunk, outs)
            t0 = time.perf_counter()
            pending.result()  # the last chunk's grading overlaps nothing
            res.timing["last_grade_s"] = time.perf_counter() - t0
    finally:
        prog.close()
    res.wall_s = time.perf_counter() - t_start
    res.timing.update(gen_s=res.gen_s, grade_s=res.grade_s, grade_wait_s=res.grade_wait_s,
                      wall_s=res.wall_s, n_chunks=len(chunks), problems_per_chunk=per)
    return res


def training_eval_metrics(result: EvalResult) -> dict[str, float]:
    """The in-loop eval's metrics: summarize_eval's keys (pass@1, pass@1_se, pass@k, pass@k_se,
    pass@1/<subject>, pass@1/level_<n>, n_problems, n_samples_per_problem) plus n_samples,
    no_box_frac, truncated_frac, response_len and grade_timeouts."""
    out = summarize_samples(result.records)
    out["grade_timeouts"] = result.n_timeouts
    return out


def eval_examples(result: EvalResult, k: int) -> list[str]:
    """The first sample of the first k problems as Markdown, for TensorBoard text."""
    first = [r for r in result.records if r["sample"] == 0][:k]
    return [f"**{r['problem_id']}** (gold `{r['gold']}`, score {r['score']:.0f})\n\n"
            f"{r['response']}" for r in first]


# ----------------------------------------------------------------------------- models


class EvalError(Exception):
    """A problem with the inputs or the model, reported as one `error:` line."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cache_root() -> Path:
    return Path(os.environ.get("RLVR_CACHE", Path.home() / ".cache" / "rlvr"))


def _policy_state(ckpt_dir: Path) -> dict:
    from rlvr import checkpoint

    loader = getattr(checkpoint, "load_policy_state", None)  # the checkpoint format's owner
    if loader is not None:
        return loader(ckpt_dir)
    import torch

    return torch.load(ckpt_dir / "policy.pt", map_location="cpu", weights_only=True)


def export_checkpoint(ckpt_dir: Path, run_dir: Path) -> str:
    """A bf16 HF directory of a training checkpoint's policy, cached by path and mtime.

    The architecture and tokenizer come from the run's final_model/ when it exists, else from the
    run's config.json `model_id` (the model training started from).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rlvr.modeling import load_tokenizer, resolve_model_dir

    files = sorted(p for p in ckpt_dir.iterdir() if p.is_file())
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{ckpt_dir.resolve()}|{stamp}".encode()).hexdigest()[:16]
    out = _cache_root() / "checkpoints" / f"{run_dir.name}-{ckpt_dir.name}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    base = run_dir / "final_model"
    if not (base / "config.json").is_file():
        base = resolve_model_dir(json.loads((run_dir / "config.json").read_text())["model_id"])
    print(f"[model] exporting {ckpt_dir} to a bf16 HF directory at {out} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.load_state_dict(_policy_state(ckpt_dir))
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
    import torch

    from rlvr.engines import HFEngine, vllm_available

    eos = engine_eos_ids(model_dir, tokenizer)
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        if not vllm_available():
            raise EvalError("--backend vllm needs a CUDA GPU and the vllm package")
        from rlvr.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, tokenizer, eos, max_model_len=max_model_len, seed=seed,
                          max_num_seqs=max_num_seqs, gpu_mem_util=gpu_mem_util)
    from rlvr.modeling import load_policy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(model_dir, device, False)
    return HFEngine(policy, tokenizer, eos)


# ----------------------------------------------------------------------------- evaluate.py's worker


def default_grader_workers() -> int:
    # vLLM's in-process engine and this process's threads need two cores; the rest grade
    return max(1, min(32, (os.cpu_count() or 2) - 2))


def evaluate_model(job: dict) -> None:
    """Evaluate one model of evaluate.py on the problems it still lacks, appending each chunk to
    samples.jsonl and one timing line per dataset to timing.jsonl (EvalError on a load failure).

    `job`: spec (evaluate.resolve_model), todo {dataset: rows}, protocol (n, temperature, top_p,
    max_tokens, prompt_style, seed), backend, gpu_mem_util, max_num_seqs, grader_workers,
    grade_timeout_s, chunk_samples, out."""
    from rlvr.eval_report import SAMPLES, TIMING, append_jsonl
    from rlvr.modeling import load_tokenizer

    spec, proto, out = job["spec"], job["protocol"], Path(job["out"])
    label = spec["label"]
    try:
        model_dir = prepare_model_dir(spec)
        tokenizer = load_tokenizer(model_dir)
        todo = {d: encode_problems(rows, tokenizer, proto["prompt_style"])
                for d, rows in job["todo"].items()}
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
                "tokens": res.n_tokens, "gen_s": res.gen_s, "grade_s": res.grade_s,
                "grade_wait_s": res.grade_wait_s,
                "last_grade_s": res.timing["last_grade_s"], "wall_s": res.wall_s,
                "grade_timeouts": res.n_timeouts, "grader_workers": workers,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}])


def _child_main(job: dict) -> None:
    try:
        evaluate_model(job)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def evaluate_model_in_child(job: dict) -> int:
    """evaluate_model in a spawned process: one vLLM engine per process, freed with it (a second
    LLM in one process is fragile, and only one may use sleep mode). Returns the exit code."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=_child_main, args=(job,), name="rlvr-eval")
    proc.start()
    proc.join()
    return proc.exitcode if proc.exitcode is not None else 1
