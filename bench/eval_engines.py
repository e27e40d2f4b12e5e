#!/usr/bin/env python
"""Is the full in-loop eval bound by one engine's CPU? The same eval (1,250 MATH-subset problems x
4 samples x 512 tokens, per-problem seeds, graded) split over E eval-engine processes at once.

    python bench/eval_engines.py --shape 0.5B --configs 1:1024 2:512 4:256 --out engines.json

Each config "E:S" starts E engine processes as the concurrent eval engine is started
(rlvr.engine_process.EngineProcess with a grader; S sequences at once each, the KV cache the
memory plan gives an engine of S sequences), warms each up on a few problems, then sends every
engine its share of the problems (interleaved) at the same moment and times until the last answer.
Prints, per config: engine start-up, the eval's wall time, tokens/s, and the mean GPU utilization
nvidia-smi reported during the eval. If one engine's per-step CPU work sets the pace, E engines
finish in about 1/E of the time while the GPU is not yet busy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

from bench.models import build_random_qwen, math_texts  # noqa: E402


def parse_config(text: str) -> tuple[int, int]:
    try:
        engines, seqs = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ENGINES:SEQS, e.g. 2:512") from None
    if engines < 1 or seqs < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both numbers must be >= 1")
    return engines, seqs


class UtilSampler:
    """nvidia-smi's GPU utilization every 200 ms, into a file, between start() and stop()."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkstemp(suffix=".util")[1])
        self.proc = None

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=self.path.open("w"), stderr=subprocess.DEVNULL)
        except FileNotFoundError:  # no GPU here: no figure
            self.proc = None

    def stop(self) -> float:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
        vals = [float(v) for v in self.path.read_text().split() if v.strip().isdigit()]
        return sum(vals) / len(vals) if vals else float("nan")


def gpu_processes() -> list[tuple[int, int]]:
    """Which processes hold GPU memory, and how much (nvidia-smi); none without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    return [tuple(int(x) for x in line.split(",")) for line in out.stdout.splitlines()
            if line.strip()]


def run_config(engines: int, seqs: int, model_dir: str, problems, shape, args) -> dict:
    from rlvr.engine_process import EngineProcess, EngineSpec
    from rlvr.memory import Workload, eval_engine_kv_tokens

    share = -(-len(problems) // engines)
    wl = Workload(eval_seqs=share * args.n, eval_max_tokens=args.max_tokens,
                  eval_engine_seqs=seqs)
    kv = eval_engine_kv_tokens(wl) * shape.kv_bytes_per_token
    t0 = time.perf_counter()
    procs = [EngineProcess(EngineSpec(backend=args.backend, model_dir=model_dir,
                                      max_model_len=1024 + args.max_tokens, seed=0,
                                      max_num_seqs=seqs, kv_cache_bytes=kv, grader=True,
                                      grader_workers=args.grader_workers))
             for _ in range(engines)]
    try:
        for p in procs:
            p.wait_ready()
        start_s = time.perf_counter() - t0
        apps = gpu_processes()
        print(f"[bench] GPU processes (pid, MiB): {apps}", flush=True)
        params = dict(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=0)
        warm = [p.submit("eval", problems=problems[:16], **params) for p in procs]
        for p, t in zip(procs, warm):
            p.result(t)
        util = UtilSampler()
        util.start()
        t0 = time.perf_counter()
        tickets = [p.submit("eval", problems=problems[i::engines], **params)
                   for i, p in enumerate(procs)]
        results = [p.result(t) for p, t in zip(procs, tickets)]
        wall = time.perf_counter() - t0
        mean_util = util.stop()
    finally:
        for p in procs:
            p.close()
    tokens = sum(r.n_tokens for r in results)
    row = {"engines": engines, "seqs": seqs, "gpu_processes_mib": apps, "kv_gib_each": kv / 2**30,
           "start_s": start_s, "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
           "gpu_util": mean_util,
           "engine_wall_s": [r.wall_s for r in results]}
    print(f"[bench] {engines} x {seqs}: start {start_s:.1f} s, eval {wall:.1f} s, "
          f"{row['tok_s']:.0f} tok/s, GPU util {mean_util:.0f}%", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--configs", nargs="+", type=parse_config, default=[(1, 1024), (2, 512)],
                    help="ENGINES:SEQS each, run in this order")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=512)
    ap.add_argument("--grader_workers", type=int, default=2)
    ap.add_argument("--backend", default="vllm", choices=("vllm", "hf"), help="hf: a CPU smoke run")
    ap.add_argument("--limit", type=int, default=None, help="the first N problems only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rlvr.data import load_subset
    from rlvr.eval_run import problems_from_rows
    from rlvr.memory import model_shape_from_config
    from rlvr.modeling import load_tokenizer
    from rlvr.prompts import encode_problems

    model_dir = str(build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                      math_texts(args.data_dir)))
    tok = load_tokenizer(model_dir)
    enc = encode_problems(load_subset(args.data_dir, "test"), tok, "paper", 1024)
    problems = problems_from_rows(enc.rows, enc.prompt_ids, "math_subset")[:args.limit]
    shape = model_shape_from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    rows = [run_config(e, s, model_dir, problems, shape, args) for e, s in args.configs]
    print(f"\n{len(problems)} problems x {args.n} x {args.max_tokens} tokens, {args.shape}")
    print(f"{'engines x seqs':>15} {'start s':>8} {'eval s':>7} {'tok/s':>8} {'GPU %':>6}")
    for r in rows:
        print(f"{r['engines']:>6} x {r['seqs']:<6} {r['start_s']:>8.1f} {r['wall_s']:>7.1f} "
              f"{r['tok_s']:>8.0f} {r['gpu_util']:>6.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
