#!/usr/bin/env python
"""GPU benchmark of evaluate.py's path on MATH-500 with a random Qwen2.5-shaped model.

    python bench/bench_eval.py --shape 0.5B --data_root ../shared/data --out bench_eval.json

1. Generation: `rlvr.eval_run.run_eval` (chunks, the grading thread, samples.jsonl appends, as
   evaluate.py runs it) vs a raw `vllm.LLM.generate` of the same prompt token ids with the paper's
   SamplingParams (n 8, temperature 0.6, top-p 0.95, top-k off, 1,024 tokens), on one engine,
   interleaved raw, ours[, ours, raw, ...]: tokens/s, the median of the reps, and the ratio.
2. Grading: BatchGrader samples/s on this machine's cores on realistic responses: MATH-500
   reference solutions (each ends in a \\boxed answer) graded against golds, 8 distinct (answer,
   gold) pairs per problem so that deduplication cannot help (random weights never write a box).
3. Long-context probe: 512 distinct ~2,048-token prompts decoding 512 tokens each (contexts of
   2,048-2,560 tokens, about the mean context of a 4,096-token sample), tokens/s.
4. The projected wall time of the full protocol on MATH-500 (256 samples, 4,096 tokens): every
   sample to the limit (worst case), and an assumed length mix (--mix_mean, --mix_long_frac).
Random weights: valid for speed and memory, not accuracy; every sample runs to the token limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

import torch  # noqa: E402

from bench.models import build_random_qwen, math_texts  # noqa: E402
from rlvr.eval_report import append_jsonl  # noqa: E402
from rlvr.eval_run import DEFAULT_CHUNK_SAMPLES, problems_from_rows, run_eval  # noqa: E402
from rlvr.eval_sets import load_eval_set  # noqa: E402
from rlvr.eval_worker import default_grader_workers, engine_eos_ids  # noqa: E402
from rlvr.modeling import load_tokenizer  # noqa: E402
from rlvr.prompts import encode_problems  # noqa: E402
from rlvr.reward import BatchGrader  # noqa: E402

FULL_N, FULL_TOKENS, MATH500_PROBLEMS = 256, 4096, 500  # the paper's protocol on MATH-500


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def raw_params(n: int, temperature: float, top_p: float, max_tokens: int, **kw):
    from vllm import SamplingParams

    try:  # the paper's eval.py: top_k=-1
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1,
                              max_tokens=max_tokens, **kw)
    except ValueError:  # a vLLM that only takes 0 for "off"
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=0,
                              max_tokens=max_tokens, **kw)


def bench_generation(engine, grader, problems, args) -> dict:
    prompts = [{"prompt_token_ids": p.prompt_ids} for p in problems]
    sp = raw_params(args.n, args.temperature, args.top_p, args.max_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))

    def raw() -> tuple[int, float]:
        t0 = now()
        outs = engine.llm.generate(prompts, sp, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs), now() - t0

    last: dict = {}

    def ours() -> tuple[int, float]:
        path = tmp / "samples.jsonl"
        path.unlink(missing_ok=True)
        t0 = now()
        res = run_eval(engine, grader, problems, n=args.n, temperature=args.temperature,
                       top_p=args.top_p, max_tokens=args.max_tokens, seed=0, model="bench",
                       chunk_samples=args.chunk_samples or DEFAULT_CHUNK_SAMPLES,
                       on_chunk=lambda recs: append_jsonl(path, recs), keep_records=False,
                       progress=sys.stdout, label="ours")
        wall = now() - t0  # all of it: generation, grading tail, samples.jsonl writes
        last["res"] = res
        return res.n_tokens, wall

    # raw, ours | ours, raw | raw, ours ...: a drift in clocks or memory hits both alike
    order = [x for i in range(args.reps) for x in (("raw", "ours"), ("ours", "raw"))[i % 2]]
    rates: dict[str, list[float]] = {"raw": [], "ours": []}
    walls: dict[str, list[float]] = {"raw": [], "ours": []}
    for name in order:
        tokens, wall = (raw if name == "raw" else ours)()
        rates[name].append(tokens / wall)
        walls[name].append(wall)
        print(f"[bench] {name}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.0f} tok/s",
              flush=True)
    res = last["res"]
    return {
        "gen_raw_tok_s": statistics.median(rates["raw"]),
        "gen_ours_tok_s": statistics.median(rates["ours"]),
        "gen_ratio": statistics.median(rates["ours"]) / statistics.median(rates["raw"]),
        "gen_raw_tok_s_all": rates["raw"], "gen_ours_tok_s_all": rates["ours"],
        "run_wall_s": statistics.median(walls["ours"]), "run_tokens": res.n_tokens,
        "run_samples": len(problems) * args.n, "run_grade_wait_s": res.grade_wait_s,
        "run_last_grade_s": res.timing["last_grade_s"], "run_chunks": res.timing["n_chunks"],
    }


def bench_grading(grader, rows: list[dict], n: int) -> dict:
    """Sample j of problem i answers with the reference solution of problem (i + 7j) mod N: j = 0
    is right, the rest mostly wrong, and every (answer, gold) pair is distinct."""
    texts, golds = [], []
    for i, r in enumerate(rows):
        for j in range(n):
            texts.append(rows[(i + 7 * j) % len(rows)]["solution"])
            golds.append(r["answer"])
    grader.grade_batch(["\\boxed{1}"], ["1"])  # wait until every worker is up
    t0 = time.perf_counter()
    res = grader.grade_batch(texts, golds)
    dt = time.perf_counter() - t0
    return {"grade_samples": len(texts), "grade_s": dt, "grade_samples_per_s": len(texts) / dt,
            "grade_correct_frac": sum(res.scores) / len(texts), "grade_timeouts": res.n_timeouts,
            "grade_workers": grader.num_workers, "cpu_count": os.cpu_count()}


def bench_long(engine, problems, ctx: int, new: int, seqs: int) -> dict:
    """Decode rate at long contexts: distinct prompts cut from the concatenated problem prompts.

    Timed as the difference of two passes (new and new/4 tokens) after a pass that fills the
    prefix cache, so that request set-up and prefill cancel out and only decoding is left."""
    stream = [t for p in problems for t in p.prompt_ids]
    while len(stream) < ctx + seqs * 97:
        stream += stream
    prompts = [{"prompt_token_ids": stream[i * 97: i * 97 + ctx]} for i in range(seqs)]
    engine.llm.generate(prompts, raw_params(1, 0.6, 0.95, 1), use_tqdm=False)
    times = {}
    for m in (new // 4, new):
        sp = raw_params(1, 0.6, 0.95, m, min_tokens=m, ignore_eos=True)
        t0 = now()
        engine.llm.generate(prompts, sp, use_tqdm=False)
        times[m] = now() - t0
    engine.llm.reset_prefix_cache()
    rate = seqs * (new - new // 4) / (times[new] - times[new // 4])
    return {"long_ctx": ctx, "long_new": new, "long_seqs": seqs, "long_tok_s": rate,
            "long_pass_s": times}


def projections(r: dict, n_problems: int, args) -> dict:
    samples = n_problems * FULL_N
    out = {"full_samples": samples}
    rate_long = r.get("long_tok_s")
    if rate_long:  # every sample decodes all 4,096 tokens, at the long-context rate
        out["full_worst_s"] = samples * FULL_TOKENS / rate_long
    # The mix: a share at the limit (long-context rate), the rest short (the n = 8 run's rate,
    # measured at contexts up to ~1,100 tokens).
    long_tokens = samples * args.mix_long_frac * FULL_TOKENS
    short_tokens = samples * args.mix_mean - long_tokens
    out["mix_short_mean_tokens"] = short_tokens / (samples * (1 - args.mix_long_frac))
    out["full_mix_s"] = (short_tokens / r["gen_ours_tok_s"]
                         + long_tokens / (rate_long or r["gen_ours_tok_s"]))
    out["gen_samples_per_s_at_mix"] = samples / out["full_mix_s"]
    out["grading_headroom_at_mix"] = r["grade_samples_per_s"] / out["gen_samples_per_s_at_mix"]
    return out


def table(r: dict, args) -> list[tuple[str, str]]:
    rows = [
        (f"MATH-500 x {args.n} x {args.max_tokens} tok: raw vLLM (tok/s)",
         f"{r['gen_raw_tok_s']:.0f}"),
        ("  evaluate.py path, run_eval (tok/s)", f"{r['gen_ours_tok_s']:.0f}"),
        ("  ratio ours/raw (target >= 0.9)", f"{r['gen_ratio']:.3f}"),
        ("  wall time of the run (s)", f"{r['run_wall_s']:.1f}"),
        ("  generation held back by grading (s)", f"{r['run_grade_wait_s']:.2f}"),
        (f"grading, {r['grade_workers']} workers on {r['cpu_count']} CPUs (samples/s)",
         f"{r['grade_samples_per_s']:.0f}"),
    ]
    if "long_tok_s" in r:
        rows.append((f"decode at {r['long_ctx']}-{r['long_ctx'] + r['long_new']} ctx (tok/s)",
                     f"{r['long_tok_s']:.0f}"))
        rows.append((f"full protocol, all {FULL_TOKENS} tok (worst, h)",
                     f"{r['full_worst_s'] / 3600:.2f}"))
    rows += [
        (f"full protocol, mean {args.mix_mean} tok, {args.mix_long_frac:.0%} at limit (h)",
         f"{r['full_mix_s'] / 3600:.2f}"),
        ("  grading headroom at that mix (x)", f"{r['grading_headroom_at_mix']:.1f}"),
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--data_root", default=str(Path(__file__).resolve().parents[2] /
                                               "shared/data"), help="evaluate.py's --data_root")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max_tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--limit", type=int, default=None, help="fewer MATH-500 problems")
    ap.add_argument("--reps", type=int, default=1, help="raw/ours pairs (ABBA order)")
    ap.add_argument("--chunk_samples", type=int, default=None,
                    help="run_eval's chunk (default: evaluate.py's, 16384 samples)")
    ap.add_argument("--gpu_mem_util", type=float, default=0.9)
    ap.add_argument("--long_ctx", type=int, default=2048, help="0 skips the long probe")
    ap.add_argument("--long_new", type=int, default=512)
    ap.add_argument("--mix_mean", type=float, default=600.0,
                    help="assumed mean response tokens (0.5B instruct, T 0.6)")
    ap.add_argument("--mix_long_frac", type=float, default=0.05,
                    help="assumed share of responses that hit the 4,096-token limit")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    data_root = args.data_root if Path(args.data_root).is_dir() else None

    from rlvr.vllm_engine import VLLMEngine

    r: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d"), **vars(args)}
    rows = load_eval_set("math500", data_root)
    texts = (math_texts(Path(data_root) / "MATH") if data_root else []) or \
        [x["problem"] + "\n" + x.get("solution", "") for x in rows]
    t0 = time.perf_counter()
    model_dir = str(build_random_qwen(args.shape, Path(args.model_root) / args.shape, texts))
    r["build_s"] = time.perf_counter() - t0
    tok = load_tokenizer(model_dir)
    enc = encode_problems(rows[:args.limit] if args.limit else rows, tok, "paper")
    problems = problems_from_rows(enc.rows, enc.prompt_ids)
    longest = max(len(p.prompt_ids) for p in problems)
    t0 = time.perf_counter()
    engine = VLLMEngine(model_dir, tok, engine_eos_ids(model_dir, tok), seed=0, max_num_seqs=512,
                        max_model_len=max(longest + args.max_tokens, args.long_ctx +
                                          args.long_new + 8), gpu_mem_util=args.gpu_mem_util)
    r["init_s"] = time.perf_counter() - t0
    # Warm-up with the timed sampling settings: the first top-p batch JIT-compiles vLLM's
    # top-k/top-p Triton kernel (seconds), which must not land in either timed run.
    warm = [p.prompt_ids for p in problems[:max(1, 512 // args.n)]]
    engine.generate(warm, args.n, args.temperature, 16, top_p=args.top_p)
    raw_rows = _solutions(rows, data_root)
    with BatchGrader(num_workers=default_grader_workers(), timeout_s=5.0) as grader:
        r.update(bench_grading(grader, raw_rows[:len(problems)], args.n))
        r.update(bench_generation(engine, grader, problems, args))
    if args.long_ctx:
        r.update(bench_long(engine, problems, args.long_ctx, args.long_new, 512))
    r.update(projections(r, MATH500_PROBLEMS, args))
    print(f"\nbench_eval {args.shape} on {r['device']} ({r['date']}); assumed mix: mean "
          f"{args.mix_mean:.0f} tokens, {args.mix_long_frac:.0%} of samples at {FULL_TOKENS}")
    for k, v in table(r, args):
        print(f"  {k:<58} {v:>10}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


def _solutions(rows: list[dict], data_root: str | None) -> list[dict]:
    """MATH-500 rows with their reference solutions (the eval rows keep only the gold answer)."""
    from rlvr.data import load_math

    if data_root:
        raw = load_math(str(Path(data_root) / "MATH500"), "test")
    else:
        import datasets

        raw = list(datasets.load_dataset("HuggingFaceH4/MATH-500", split="test"))
    by_problem = {x["problem"]: x["solution"] for x in raw}
    return [{**r, "solution": by_problem[r["problem"]]} for r in rows]


if __name__ == "__main__":
    main()
