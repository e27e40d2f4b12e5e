#!/usr/bin/env python
"""Where vLLM's start-up goes: one `VLLMEngine` of a model shape, with timers around vLLM's
warm-up functions. Run it several times in a row (one process each) to see what its on-disk
caches save:

    for i in 1 2 3; do python bench/startup_probe.py --shape 0.5B; done
    python bench/startup_probe.py --shape 0.5B --profile     # cProfile of warmup_kernels

`warmup_kernels` (vLLM's V2 runner) JIT-compiles the Triton sampling kernels: 15-19 s on an H100
when they are not in Triton's cache, ~0.3 s when they are (docs/PERFORMANCE.md, fourth round).
Random weights with Qwen2.5 shapes (bench/models.py).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rlvr.vllm_engine as engine_mod  # noqa: E402  (sets the environment vLLM must see first)
from bench.models import build_random_qwen, math_texts  # noqa: E402
from rlvr.modeling import load_tokenizer  # noqa: E402


def timed(totals: dict[str, float], name: str, fn, profile: bool = False):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prof = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if prof:
            prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B", "7B"))
    ap.add_argument("--model_root", default="/tmp/rlvr_models", help="random models are kept here")
    ap.add_argument("--kv_cache_gib", type=float, default=3.0)
    ap.add_argument("--profile", action="store_true", help="cProfile of warmup_kernels")
    args = ap.parse_args()

    repo = Path(__file__).resolve().parents[1]
    texts = math_texts(repo / "data/math_subset") or ["What is 1 + 1? The answer is 2."] * 200
    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape, texts)
    import vllm.compilation.compiler_interface as compiler_interface
    import vllm.v1.worker.gpu_worker as gpu_worker

    totals: dict[str, float] = {}
    gpu_worker.warmup_kernels = timed(totals, "warmup_kernels (after graph capture)",
                                      gpu_worker.warmup_kernels, args.profile)
    gpu_worker.kernel_warmup = timed(totals, "kernel_warmup (before graph capture)",
                                     gpu_worker.kernel_warmup)
    gpu_worker.freeze_gc_heap = timed(totals, "freeze_gc_heap", gpu_worker.freeze_gc_heap)
    # looked up at call time, so patching the module attribute is enough
    compiler_interface.trigger_inductor_lazy_init = timed(
        totals, "trigger_inductor_lazy_init", compiler_interface.trigger_inductor_lazy_init)

    tok = load_tokenizer(str(model_dir))
    start = time.perf_counter()
    engine_mod.VLLMEngine(str(model_dir), tok, [tok.eos_token_id], max_model_len=1536, seed=0,
                          kv_cache_bytes=int(args.kv_cache_gib * 2**30))
    print(f"\n{args.shape}: engine start-up {time.perf_counter() - start:.1f} s")
    for name, seconds in totals.items():
        print(f"  {name:40s} {seconds:6.1f} s")


if __name__ == "__main__":
    main()
