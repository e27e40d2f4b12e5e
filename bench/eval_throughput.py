#!/usr/bin/env python
"""The in-loop eval's speed: 1,250 MATH-subset problems x 4 samples x 512 tokens (temperature 1,
top-p 1) on a random-weight Qwen2.5-shaped model, through our eval path against raw vLLM.

    python bench/eval_throughput.py --shape 0.5B --max_num_seqs 1024 --out eval_tp.json

One engine built as the concurrent eval engine is (rlvr.vllm_engine.VLLMEngine: CUDA graphs up to
--max_num_seqs, the KV cache the memory plan gives it), then interleaved: raw `LLM.generate` of
the same prompt ids with the same SamplingParams (one request per problem, n = 4, no seeds, no
detokenising), and `rlvr.eval_run.run_eval` (per-problem seeds, grading overlapped, records).
Prints tokens/s of each, their ratio, the eval's wall time, and the decode floor: the bytes a
decode step must read (bf16 weights, plus the KV cache of the sequences decoding) over the HBM
bandwidth measured here, summed over the steps the eval's sequences need at that concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

import torch  # noqa: E402

from bench.models import build_random_qwen, math_texts  # noqa: E402


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def hbm_bytes_per_s() -> float:
    """A device-to-device copy of 4 GiB: bytes read + written per second."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = now()
    for _ in range(5):
        y.copy_(x)
    return 5 * 2 * x.numel() / (now() - t0)


def decode_floor_s(n_params: int, kv_per_token: int, prompt_lens: list[int], n: int,
                   new: int, concurrency: int, bandwidth: float) -> float:
    """Seconds the eval's decode steps need at least: waves of `concurrency` sequences, each step
    reading the weights once and every decoding sequence's KV cache."""
    seqs = sorted((p for p in prompt_lens for _ in range(n)), reverse=True)
    total = 0.0
    for w in range(0, len(seqs), concurrency):
        wave = seqs[w:w + concurrency]
        for t in range(new):
            total += 2 * n_params + kv_per_token * (sum(wave) + t * len(wave))
    return total / bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--max_num_seqs", type=int, default=1024)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=1, help="raw/ours pairs (ABBA order)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rlvr.data import load_subset
    from rlvr.eval_run import problems_from_rows, run_eval
    from rlvr.eval_worker import engine_eos_ids
    from rlvr.memory import Workload, eval_engine_kv_tokens, model_shape_from_config
    from rlvr.modeling import load_tokenizer
    from rlvr.prompts import encode_problems
    from rlvr.reward import BatchGrader
    from rlvr.vllm_engine import VLLMEngine

    model_dir = str(build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                      math_texts(args.data_dir)))
    tok = load_tokenizer(model_dir)
    rows = load_subset(args.data_dir, "test")
    enc = encode_problems(rows, tok, "paper", 1024)
    problems = problems_from_rows(enc.rows, enc.prompt_ids, "math_subset")
    shape = model_shape_from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    wl = Workload(eval_seqs=len(problems) * args.n, eval_max_tokens=args.max_tokens,
                  eval_engine_seqs=args.max_num_seqs)
    kv_bytes = eval_engine_kv_tokens(wl) * shape.kv_bytes_per_token
    t0 = time.perf_counter()
    engine = VLLMEngine(model_dir, tok, engine_eos_ids(model_dir, tok),
                        max_model_len=1024 + args.max_tokens, seed=0,
                        max_num_seqs=args.max_num_seqs, kv_cache_bytes=kv_bytes)
    start_s = time.perf_counter() - t0
    from vllm import SamplingParams

    sp = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=args.max_tokens,
                        detokenize=False, stop_token_ids=engine.eos_ids)
    prompts = [{"prompt_token_ids": p.prompt_ids} for p in problems]
    engine.llm.generate(prompts[:64], sp, use_tqdm=False)  # warm-up: sampler kernels, graphs
    grader = BatchGrader(num_workers=max(1, min(8, (os.cpu_count() or 2) - 2)))
    rates, walls = {"raw": [], "ours": []}, {"raw": [], "ours": []}

    def raw() -> int:
        outs = engine.llm.generate(prompts, sp, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    def ours() -> int:
        return run_eval(engine, grader, problems, n=args.n, temperature=1.0, top_p=1.0,
                        max_tokens=args.max_tokens, seed=0, model="bench").n_tokens

    order = [x for i in range(args.reps) for x in (("raw", "ours"), ("ours", "raw"))[i % 2]]
    for name in order:
        t0 = now()
        tokens = (raw if name == "raw" else ours)()
        wall = now() - t0
        rates[name].append(tokens / wall)
        walls[name].append(wall)
        print(f"[bench] {name}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.0f} tok/s",
              flush=True)
    grader.close()
    bw = hbm_bytes_per_s()
    floor = decode_floor_s(shape.n_params, shape.kv_bytes_per_token,
                           [len(p.prompt_ids) for p in problems], args.n, args.max_tokens,
                           args.max_num_seqs, bw)
    r = {"shape": args.shape, "max_num_seqs": args.max_num_seqs, "problems": len(problems),
         "samples": len(problems) * args.n, "kv_cache_gib": kv_bytes / 2**30,
         "engine_start_s": start_s, "raw_tok_s": statistics.median(rates["raw"]),
         "ours_tok_s": statistics.median(rates["ours"]),
         "ours_wall_s": statistics.median(walls["ours"]),
         "raw_wall_s": statistics.median(walls["raw"]), "hbm_gb_s": bw / 1e9,
         "decode_floor_s": floor}
    r["ratio"] = r["ours_tok_s"] / r["raw_tok_s"]
    print(f"\neval {r['problems']} x {args.n} x {args.max_tokens} tok, {args.shape}, "
          f"max_num_seqs {args.max_num_seqs} (KV {r['kv_cache_gib']:.1f} GiB):\n"
          f"  raw vLLM        {r['raw_tok_s']:>9.0f} tok/s  {r['raw_wall_s']:6.1f} s\n"
          f"  ours (run_eval) {r['ours_tok_s']:>9.0f} tok/s  {r['ours_wall_s']:6.1f} s  "
          f"ratio {r['ratio']:.3f}\n"
          f"  decode floor    {r['decode_floor_s']:6.1f} s at {r['hbm_gb_s']:.0f} GB/s "
          f"(copy, read + write)")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
