"""The one evaluation path: generate -> grade -> per-sample records, for evaluate.py and training.

`run_eval` generates a chunk of problems while the previous chunk is graded in a background
thread (math-verify runs in BatchGrader's worker processes; this thread only feeds them), so the
GPU never waits on grading unless grading is the slower of the two, which `grade_wait_s`
measures. Each finished chunk is handed to `on_chunk` (evaluate.py appends it to samples.jsonl
there), which is what makes an interrupted evaluation resumable problem by problem.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from rlvr.evaluation import summarize_samples
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
    n_graded: int = 0  # samples with a \boxed{} answer, the only ones math-verify sees
    n_tokens: int = 0  # generated tokens
    gen_s: float = 0.0  # inside engine.generate
    grade_wait_s: float = 0.0  # generation held back waiting for the grader
    grade_s: float = 0.0  # inside grader.grade_batch (in the grading thread)
    wall_s: float = 0.0
    timing: dict = field(default_factory=dict)


def problems_from_rows(rows: list[dict], prompt_ids: list[list[int]],
                       dataset: str | None = None) -> list[EvalProblem]:
    """EvalProblems of rows already encoded (rlvr.prompts.encode_problems): evaluation-set rows
    (rlvr.eval_sets: id, dataset) or training-data rows (rlvr.data: unique_id, else the row's
    position; `dataset` names their set)."""
    return [EvalProblem(str(r.get("id") or r.get("unique_id", i)), r.get("dataset") or dataset,
                        r["problem"], r["answer"], ids, r.get("subject"), r.get("level"))
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
        res.n_graded += len(texts) - graded.n_no_box
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


def merge_eval_results(parts: list[EvalResult]) -> EvalResult:
    """One eval's result from those of its contiguous shards, in shard order: the records and
    scores of the whole set in its own order, as one engine would have given them. The shards
    ran at the same time, so their times are the slowest shard's."""
    out = EvalResult(records=[r for p in parts for r in p.records],
                     scores=[s for p in parts for s in p.scores])
    for key in ("n_timeouts", "n_graded", "n_tokens"):
        setattr(out, key, sum(getattr(p, key) for p in parts))
    for key in ("gen_s", "grade_wait_s", "grade_s", "wall_s"):
        setattr(out, key, max((getattr(p, key) for p in parts), default=0.0))
    out.timing = {"shards": [p.timing for p in parts]}
    return out


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
