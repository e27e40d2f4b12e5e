#!/usr/bin/env python
"""GPU benchmark of one model shape: rollout, train step, weight sync and eval, in one process.

    python bench/bench_gpu.py --shape 0.5B --out bench_0.5B.json

1. Rollout: the project's VLLMEngine vs a raw `vllm.LLM.generate` of the same batch
   (32 prompts x 2 samples x 512 tokens), tokens/s and the ratio.
2. Train step: old log-probs + clipped loss + backward + AdamW on that batch (fp32 masters, bf16
   autocast): tokens/s, MFU = 6 * params * forward tokens / time / peak, the peak being measured
   here with an 8192^3 bf16 matmul; peak GPU memory of the HF side.
3. Sync: push all weights into vLLM and reset the prefix cache (awake, and from level-2 sleep).
4. Eval: the test subset (1,250 problems) with eval_n = 1 and eval_n = 4, generation + grading.
The whole-run figure (s/step over real steps of MATH_experiment.py) is bench/whole_run.py.
Random weights with Qwen2.5 shapes (bench/models.py): valid for speed and memory, not accuracy.
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
from rlvr.config import Config  # noqa: E402
from rlvr.data import load_subset  # noqa: E402
from rlvr.engines import make_engine  # noqa: E402
from rlvr.experiment import encode_problems, evaluate  # noqa: E402
from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer  # noqa: E402
from rlvr.objectives import compute_advantages  # noqa: E402
from rlvr.reward import BatchGrader  # noqa: E402
from rlvr.training import (  # noqa: E402
    UpdateBatch,
    compute_old_logprobs,
    make_optimizer,
    policy_update,
)
from rlvr.vllm_engine import VLLMEngine  # noqa: E402

N_PROMPTS, N_SAMPLES, GEN_LEN = 32, 2, 512


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def gpu_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def measured_bf16_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t0 = now()
    for _ in range(10):
        a @ b
    dt = (now() - t0) / 10
    del a, b
    return 2 * 8192**3 / dt / 1e12


def bench_rollout(engine: VLLMEngine, prompts: list[list[int]], reps: int) -> dict:
    from vllm import SamplingParams

    # ignore_eos on both sides so each timed run generates exactly 64 x 512 tokens
    raw_sp = SamplingParams(n=N_SAMPLES, temperature=1.0, max_tokens=GEN_LEN, min_tokens=GEN_LEN,
                            ignore_eos=True)

    def ours():
        outs = engine.generate(prompts, N_SAMPLES, 1.0, GEN_LEN)
        return sum(len(c.token_ids) for g in outs for c in g)

    def raw():
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], raw_sp,
                                   use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    res = {}
    rates: dict[str, list[float]] = {"raw": [], "ours": []}
    raw(), ours()  # warm-up
    for _ in range(reps):  # interleaved, so drift in clocks or memory hits both alike
        for name, fn in (("raw", raw), ("ours", ours)):
            t0 = now()
            n = fn()
            rates[name].append(n / (now() - t0))
    for name, r in rates.items():
        res[f"rollout_{name}_tok_s"] = statistics.median(r)
        res[f"rollout_{name}_tok_s_all"] = r
    res["rollout_ratio"] = res["rollout_ours_tok_s"] / res["rollout_raw_tok_s"]
    return res


def bench_train(policy, engine, tok, prompts, cfg: Config, peak_tflops: float) -> dict:
    outs = engine.generate(prompts, N_SAMPLES, 1.0, GEN_LEN)
    comps = [c for g in outs for c in g]
    flat = [p for p in prompts for _ in range(N_SAMPLES)]
    correct = torch.tensor([float(i % 3 == 0) for i in range(len(comps))])
    adv, keep = compute_advantages(correct, "W_REINFORCE", 0.1, N_SAMPLES)
    batch = UpdateBatch(flat, [c.token_ids for c in comps], adv, keep)
    opt = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    engine.sleep()
    n_params = sum(p.numel() for p in policy.parameters())
    fwd_tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
    times_old, times_upd = [], []
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        t0 = now()
        old, _ = compute_old_logprobs(policy, batch, 1.0, cfg.micro_batch_size, tok.pad_token_id,
                                      torch.device("cuda"))
        t1 = now()
        policy_update(policy, opt, batch, old, temperature=1.0, clip_range=0.2,
                      mini_batch_size=len(comps), micro_batch_size=cfg.micro_batch_size,
                      max_grad_norm=1.0, pad_id=tok.pad_token_id, device=torch.device("cuda"),
                      generator=gen)
        t2 = now()
        times_old.append(t1 - t0)
        times_upd.append(t2 - t1)
    t_old, t_upd = statistics.median(times_old[1:]), statistics.median(times_upd[1:])
    flops = 6 * n_params * fwd_tokens
    res = {
        "params": n_params, "train_fwd_tokens": fwd_tokens,
        "old_logprob_s": t_old, "update_s": t_upd, "train_s": t_old + t_upd,
        "train_tok_s": fwd_tokens / (t_old + t_upd),
        "mfu_update": flops / t_upd / (peak_tflops * 1e12),
        "mfu_step_incl_old_logprob": flops / (t_old + t_upd) / (peak_tflops * 1e12),
        # torch's counter includes vLLM's sleep-mode (cumem) pool when sleep mode is on
        "train_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "train_alloc_before_gib": base / 2**30,
        "gpu_used_after_train_gib": gpu_used_gib(),
    }
    del opt
    return res


def bench_sync(policy, engine: VLLMEngine, reps: int = 5) -> dict:
    awake, asleep = [], []
    for _ in range(reps):
        engine.sync_weights(policy)
        awake.append(engine.last_sync_s)
    if engine.sleep_mode:
        for _ in range(reps):
            engine.sleep()
            engine.sync_weights(policy)
            asleep.append(engine.last_sync_s)
    res = {"sync_s": statistics.median(awake[1:])}
    if asleep:
        res["sync_from_sleep_s"] = statistics.median(asleep[1:])
    return res


def bench_eval(engine, tok, cfg: Config, data_dir: str) -> dict:
    test = encode_problems(load_subset(data_dir, "test"), tok, cfg)
    res = {"eval_problems": len(test.rows)}
    with BatchGrader(timeout_s=cfg.grade_timeout_s) as grader:
        for n in (1, 4):
            cfg.eval_n = n
            t0 = now()
            m, _ = evaluate(engine, grader, test, cfg)
            res[f"eval_n{n}_s"] = now() - t0
            res[f"eval_n{n}_response_len"] = m["response_len"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--gpu_mem_util", type=float, default=0.35)
    ap.add_argument("--micro_batch_size", type=int, default=Config.micro_batch_size)
    ap.add_argument("--sleep", action="store_true", help="vLLM sleep mode during updates")
    ap.add_argument("--skip_eval", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()

    r: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d"), "sleep": args.sleep,
               "gpu_mem_util": args.gpu_mem_util, "micro_batch_size": args.micro_batch_size}
    t0 = time.perf_counter()
    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                  math_texts(args.data_dir))
    r["build_s"] = time.perf_counter() - t0
    cfg = Config(model_id=str(model_dir), gpu_mem_util=args.gpu_mem_util, vllm_sleep=args.sleep,
                 micro_batch_size=args.micro_batch_size, eval_temperature=1.0)
    tok = load_tokenizer(str(model_dir))
    t0 = time.perf_counter()
    policy = load_policy(str(model_dir), torch.device("cuda"), "auto")
    engine = make_engine("vllm", policy, tok, str(model_dir), eos_token_ids(policy, tok), cfg)
    r["init_s"] = time.perf_counter() - t0
    r["peak_bf16_tflops"] = measured_bf16_peak_tflops()
    train = encode_problems(load_subset(args.data_dir, "train"), tok, cfg)
    prompts = train.prompt_ids[:N_PROMPTS]
    r["prompt_len_mean"] = sum(map(len, prompts)) / len(prompts)
    r.update(bench_rollout(engine, prompts, args.reps))
    r.update(bench_train(policy, engine, tok, prompts, cfg, r["peak_bf16_tflops"]))
    r.update(bench_sync(policy, engine))
    if not args.skip_eval:
        r.update(bench_eval(engine, tok, cfg, args.data_dir))

    rows = [
        ("rollout raw vLLM (tok/s)", f"{r['rollout_raw_tok_s']:.0f}"),
        ("rollout VLLMEngine (tok/s)", f"{r['rollout_ours_tok_s']:.0f}"),
        ("rollout ratio ours/raw", f"{r['rollout_ratio']:.3f}"),
        ("train: old log-probs (s)", f"{r['old_logprob_s']:.3f}"),
        ("train: update fwd+bwd+AdamW (s)", f"{r['update_s']:.3f}"),
        ("train tokens/s (both)", f"{r['train_tok_s']:.0f}"),
        ("MFU of the update", f"{r['mfu_update']:.1%}"),
        ("MFU incl. old log-probs", f"{r['mfu_step_incl_old_logprob']:.1%}"),
        ("measured bf16 peak (TFLOP/s)", f"{r['peak_bf16_tflops']:.0f}"),
        ("peak torch alloc, train (GiB)", f"{r['train_peak_alloc_gib']:.1f}"),
        ("GPU memory used after train (GiB)", f"{r['gpu_used_after_train_gib']:.1f}"),
        ("weight sync + prefix reset (s)", f"{r['sync_s']:.3f}"),
    ]
    if "sync_from_sleep_s" in r:
        rows.append(("sync from level-2 sleep (s)", f"{r['sync_from_sleep_s']:.3f}"))
    if "eval_n1_s" in r:
        rows += [(f"eval {r['eval_problems']} problems, n=1 (s)", f"{r['eval_n1_s']:.1f}"),
                 (f"eval {r['eval_problems']} problems, n=4 (s)", f"{r['eval_n4_s']:.1f}")]
    print(f"\n{args.shape} on {r['device']} ({r['date']})")
    for k, v in rows:
        print(f"  {k:<34} {v:>10}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
