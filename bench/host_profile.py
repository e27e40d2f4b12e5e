#!/usr/bin/env python
"""Where a vLLM decode step's time goes on the host: the rollout's and the eval's batches through
raw `LLM.generate`, with vLLM's engine core in this process (as the run's engines are) or in a
process of its own (`--mp`).

    python bench/host_profile.py --shape 0.5B --cases rollout rollout_lp eval --out hp.json
    python bench/host_profile.py --shape 0.5B --mp --profile_dir prof_mp --out hp_mp.json
    python bench/host_profile.py --summarize prof_mp/eval.txt   # top frames, on any machine

`--profile_dir` runs each case again with py-spy (on PATH) attached to this process (and, with
--mp, to the engine core's) for --seconds, and writes DIR/<case>.txt (py-spy's raw stacks) and
DIR/summary.txt. py-spy is attached only then: sampling from the process's start slows vLLM's
compile several-fold.

Cases (every response exactly --max_tokens long, per-request seeds as the run's are):
  rollout     32 prompts x 2 samples (the default step's 64 sequences), no log-probs
  rollout_lp  the same with the sampled tokens' log-probs (--rollout_is, the logged gap)
  rollout_flat  the same with vLLM's flat log-probs container
  eval        128 problems x 4 samples: one eval engine's 512 sequences
Each case runs in a function of its own name, so a profile's stacks say which case they belong to
(`--summarize`). Prints ms per decode step of each and writes them to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {"rollout": (32, 2, False, False), "rollout_lp": (32, 2, True, False),
         "rollout_flat": (32, 2, True, True), "eval": (128, 4, False, False)}


def summarize(path: str, top: int = 25) -> None:
    """Self and inclusive sample shares of the hottest frames in a py-spy raw profile, per case."""
    per_case: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        case = next((f.split(" ")[0][5:] for f in frames if f.startswith("case_")), None)
        if case is None and frames[0].startswith("process "):  # py-spy --subprocesses
            case = "other process " + frames[0].split(":")[0][8:]
        if case is None or any(f.startswith("_wait_for_profiler ") for f in frames):
            continue
        n = int(count)
        totals[case] += n
        per_case[case][frames[-1]] += n
        for f in set(frames):
            incl[case][f] += n
    for case, total in totals.items():
        print(f"\n== {case}: {total} samples\n-- self")
        for f, n in per_case[case].most_common(top):
            print(f"{100 * n / total:5.1f}%  {f}")
        print("-- inclusive")
        for f, n in incl[case].most_common(top + 15):
            print(f"{100 * n / total:5.1f}%  {f}")


def _wait_for_profiler() -> None:
    """py-spy's start-up; its samples here are left out of the summary (by this name)."""
    time.sleep(1.0)


def build_llm(model_dir: str, max_num_seqs: int, max_model_len: int, kv_bytes: int):
    """The engine as rlvr.vllm_engine.VLLMEngine builds it (same arguments)."""
    from vllm import LLM

    return LLM(model=model_dir, dtype="bfloat16", enable_prefix_caching=True,
               max_model_len=max_model_len, seed=0, max_num_seqs=max_num_seqs,
               kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=0.01,
               generation_config="vllm", logprobs_mode="processed_logprobs")


def run_case(llm, prompts: list[list[int]], name: str, max_tokens: int, seconds: float,
             profile_dir: str | None = None, mp: bool = False) -> dict:
    from vllm import SamplingParams

    n_prompts, n, logprobs, flat = CASES[name]
    reqs = [{"prompt_token_ids": p} for p in prompts[:n_prompts]]
    sp = [SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens,
                         min_tokens=max_tokens, ignore_eos=True, detokenize=False,
                         logprobs=0 if logprobs else None, flat_logprobs=flat, seed=1000 + i)
          for i in range(len(reqs))]

    def reps(seconds: float) -> list[float]:
        walls = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(walls) < 2:
            t0 = time.perf_counter()
            outs = llm.generate(reqs, sp, use_tqdm=False)
            walls.append(time.perf_counter() - t0)
            if logprobs:  # what the engine wrapper reads back
                for r in outs:
                    for o in r.outputs:
                        lp = (list(o.logprobs.logprobs) if flat
                              else [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)])
                        assert len(lp) == max_tokens
        return walls

    walls = reps(seconds)
    wall = statistics.median(walls[1:])
    if profile_dir:  # more reps with py-spy attached to this process (and its children)
        out = Path(profile_dir) / f"{name}.txt"
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(os.getpid()), "--rate", "100", "--idle",
             "--nonblocking", "--format", "raw", "--output", str(out),
             "--duration", str(int(seconds))] + (["--subprocesses"] if mp else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_for_profiler()
        reps(seconds)
        spy.wait()
    return {"case": name, "seqs": n_prompts * n, "reps": len(walls), "wall_s": wall,
            "ms_per_step": 1000 * wall / max_tokens, "walls": walls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--mp", action="store_true",
                    help="vLLM's engine core in a process of its own "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=1)")
    ap.add_argument("--seconds", type=float, default=15.0, help="time per case (at least 2 reps)")
    ap.add_argument("--max_tokens", type=int, default=512)
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile_dir", default=None,
                    help="also profile each case with py-spy attached (needs py-spy on PATH); "
                         "writes DIR/<case>.txt and DIR/summary.txt")
    ap.add_argument("--summarize", metavar="PROFILE", help="summarize a py-spy raw profile; no GPU")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if args.profile_dir:
        import ctypes

        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        # PR_SET_PTRACER_ANY: py-spy, a child of this process, may read this process's memory
        ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from bench.models import build_random_qwen, math_texts
    from rlvr.data import load_subset
    from rlvr.modeling import load_tokenizer
    from rlvr.prompts import encode_problems
    from rlvr.vllm_engine import pin_triton_cache_dir

    # after that import, which sets 0 (and before vLLM's, which reads it)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.mp else "0"
    pin_triton_cache_dir()
    model_dir = str(build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                      math_texts(args.data_dir)))
    tok = load_tokenizer(model_dir)
    prompts = encode_problems(load_subset(args.data_dir, "test")[:128], tok, "paper",
                              1024).prompt_ids
    t0 = time.perf_counter()
    llm = build_llm(model_dir, 512, 1024 + args.max_tokens, 8 << 30)
    start_s = time.perf_counter() - t0
    results = []
    for name in args.cases:
        fn = globals().get(f"case_{name}")
        r = fn(llm, prompts, name, args.max_tokens, args.seconds, args.profile_dir, args.mp)
        results.append(r)
        print(f"[host_profile] mp={int(args.mp)} {name:12s} {r['seqs']:4d} seqs: "
              f"{r['wall_s']:.3f} s, {r['ms_per_step']:.2f} ms/step ({r['reps']} reps)", flush=True)
    if args.profile_dir:
        import contextlib
        import io

        for name in args.cases:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                summarize(str(Path(args.profile_dir) / f"{name}.txt"))
            with open(Path(args.profile_dir) / "summary.txt", "a") as f:
                f.write(f"##### mp={int(args.mp)} {name}\n{buf.getvalue()}\n")
    out = {"shape": args.shape, "mp": args.mp, "engine_start_s": start_s, "cases": results}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


# one function per case, so that a sampling profile's stacks name the case they belong to
def case_rollout(*a):
    return run_case(*a)


def case_rollout_lp(*a):
    return run_case(*a)


def case_rollout_flat(*a):
    return run_case(*a)


def case_eval(*a):
    return run_case(*a)


if __name__ == "__main__":
    main()
