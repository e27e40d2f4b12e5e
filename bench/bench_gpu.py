#!/usr/bin/env python
"""GPU phase benchmark of one model shape, through the product's own set-up (memory plan included).

    python bench/bench_gpu.py --shape 0.5B --out phases.json [--length_mix]

1. Rollout, 32 prompts x 2 samples x 512 tokens: the project's VLLMEngine against a raw
   `vllm.LLM.generate` of the same prompts and sampling (interleaved, median of reps); ms per decode
   step; the cost of per-step sampling log-probs (what --rollout_is and the gap metric need).
2. Where a generate's time goes: a torch-profiler trace of one rollout, GPU-busy share of the
   wall time and the top kernels (the rest is the engine's CPU work per step).
3. Samples/s at 64, 256 and 1,024 rollouts per step (decode is latency-bound at 64).
4. Train phase on the rollout batch: the loop's own update (pi_old from the update's forward,
   micro-batches of the plan's token budget): s, tokens/s, MFU = 6 * params * forward tokens /
   time / the bf16 peak measured here.
5. Weight sync into vLLM (awake; from sleep when the plan sleeps).
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
from bench.timing import measured_bf16_peak_tflops, now  # noqa: E402
from rlvr.config import parse_config  # noqa: E402
from rlvr.data import load_subset  # noqa: E402
from rlvr.fsdp import full_tensors  # noqa: E402
from rlvr.objectives import compute_advantages  # noqa: E402
from rlvr.prompts import encode_problems  # noqa: E402
from rlvr.run_plan import resolve_memory  # noqa: E402
from rlvr.run_setup import load_models  # noqa: E402
from rlvr.training import UpdateBatch, UpdateSettings, policy_update  # noqa: E402

N_PROMPTS, N_SAMPLES, GEN_LEN = 32, 2, 512


def bench_rollout(engine, prompts: list[list[int]], reps: int) -> dict:
    from vllm import SamplingParams

    def raw(**kw):
        sp = SamplingParams(n=N_SAMPLES, temperature=1.0, max_tokens=GEN_LEN, top_p=1.0, **kw)
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    variants = {
        "raw": raw,  # vLLM's defaults: text detokenised at every decode step
        "raw_no_detok": lambda: raw(detokenize=False),
        "ours": lambda: sum(len(c.token_ids) for g in engine.generate(prompts, N_SAMPLES, 1.0,
                                                                      GEN_LEN) for c in g),
        "ours_logprobs": lambda: sum(len(c.token_ids) for g in engine.generate(
            prompts, N_SAMPLES, 1.0, GEN_LEN, return_logprobs=True) for c in g),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, int] = {}
    for fn in variants.values():  # warm-up (the log-prob path JIT-compiles a kernel)
        fn()
    for _ in range(reps):  # interleaved, so drift in clocks or memory hits all alike
        for name, fn in variants.items():
            t0 = now()
            tokens[name] = fn()
            times[name].append(now() - t0)
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[f"rollout_{name}_s"] = med
        res[f"rollout_{name}_tok_s"] = tokens[name] / med
        res[f"rollout_{name}_ms_per_decode_step"] = 1000 * med / GEN_LEN
    res["rollout_ratio_to_raw"] = res["rollout_raw_s"] / res["rollout_ours_s"]
    res["logprobs_cost_s"] = res["rollout_ours_logprobs_s"] - res["rollout_ours_s"]
    return res


def profile_generate(engine, prompts) -> dict:
    """GPU-busy share of one rollout's wall time and the kernels that take it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = now()
        engine.generate(prompts, N_SAMPLES, 1.0, GEN_LEN)
        wall = now() - t0
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    busy_us = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:6]
    return {"profile_wall_s": wall, "profile_gpu_busy_share": busy_us / 1e6 / wall,
            "profile_top_kernels": [(e.key[:60], round(e.self_device_time_total / 1e3, 1))
                                    for e in top]}


def bench_scaling(engine, train_prompts) -> dict:
    res = {}
    for n_seq in (64, 256, 1024):
        prompts = train_prompts[:n_seq // N_SAMPLES]
        t0 = now()
        n_tok = sum(len(c.token_ids) for g in engine.generate(prompts, N_SAMPLES, 1.0, GEN_LEN)
                    for c in g)
        dt = now() - t0
        res[f"scaling_{n_seq}_samples_per_s"] = n_seq / dt
        res[f"scaling_{n_seq}_tok_s"] = n_tok / dt
    return res


def bench_train(run_cfg, mem, models, prompts, peak: float) -> dict:
    policy, optimizer, engine = models.policy, models.optimizer, models.engine
    tok = models.tokenizer
    outs = engine.generate(prompts, N_SAMPLES, 1.0, GEN_LEN)
    comps = [c for g in outs for c in g]
    flat = [p for p in prompts for _ in range(N_SAMPLES)]
    correct = torch.tensor([float(i % 3 == 0) for i in range(len(comps))])
    adv, keep = compute_advantages(correct, "W_REINFORCE", 0.1, N_SAMPLES)
    batch = UpdateBatch(flat, [c.token_ids for c in comps], adv, keep)
    gen = torch.Generator().manual_seed(0)
    settings = UpdateSettings(temperature=1.0, clip_range=0.2, mini_batch_size=len(comps),
                              max_grad_norm=1.0, pad_id=tok.pad_token_id,
                              device=torch.device("cuda"),
                              micro_batch_tokens=mem.micro_batch_tokens, packed=mem.packed)
    engine.sleep()
    n_params = sum(p.numel() for p in policy.parameters())
    fwd_tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        t0 = now()
        policy_update(models.trainer, optimizer, batch, settings, gen)
        times.append(now() - t0)
    t = statistics.median(times[1:])
    free, total = torch.cuda.mem_get_info()
    return {"params": n_params, "train_fwd_tokens": fwd_tokens, "train_s": t,
            "train_tok_s": fwd_tokens / t, "train_mfu": 6 * n_params * fwd_tokens / t / peak / 1e12,
            "train_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gpu_used_after_train_gib": (total - free) / 2**30}


def bench_sync(policy, engine, reps: int = 5) -> dict:
    awake, asleep = [], []
    for _ in range(reps):
        engine.load_weights(full_tensors(policy))
        awake.append(engine.last_sync_s)
    if engine.sleep_mode:
        for _ in range(reps):
            engine.sleep()
            engine.load_weights(full_tensors(policy))
            asleep.append(engine.last_sync_s)
    return {"sync_s": statistics.median(awake[1:]),
            "sync_from_sleep_s": statistics.median(asleep[1:]) if asleep else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B", "7B"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="MATH_experiment.py flags for the set-up (after --)")
    args = ap.parse_args()

    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                  math_texts(args.data_dir))
    cfg = parse_config(["--model_id", str(model_dir), "--data_dir", args.data_dir,
                        "--output_dir", "/tmp/rlvr_bench_phases", *args.extra])
    device = torch.device("cuda")
    t0 = time.perf_counter()
    mem = resolve_memory(cfg, device, 1250)
    models = load_models(cfg, device, mem)
    tok, policy, engine = models.tokenizer, models.policy, models.engine
    r: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d"), "init_s": time.perf_counter() - t0,
               "plan": mem.plan, "peak_bf16_tflops": measured_bf16_peak_tflops()}
    train = encode_problems(load_subset(args.data_dir, "train"), tok, cfg.prompt_style,
                            cfg.max_prompt_tokens)
    prompts = train.prompt_ids[:N_PROMPTS]
    r["prompt_len_mean"] = sum(map(len, prompts)) / len(prompts)
    r.update(bench_rollout(engine, prompts, args.reps))
    r.update(profile_generate(engine, prompts))
    r.update(bench_scaling(engine, train.prompt_ids))
    r.update(bench_train(cfg, mem, models, prompts, r["peak_bf16_tflops"]))
    r.update(bench_sync(policy, engine))

    rows = [("rollout raw vLLM (s, tok/s)", f"{r['rollout_raw_s']:.3f}",
             f"{r['rollout_raw_tok_s']:.0f}"),
            ("rollout ours (s, tok/s)", f"{r['rollout_ours_s']:.3f}",
             f"{r['rollout_ours_tok_s']:.0f}"),
            ("raw without detokenising (s, tok/s)", f"{r['rollout_raw_no_detok_s']:.3f}",
             f"{r['rollout_raw_no_detok_tok_s']:.0f}"),
            ("ratio raw/ours time, ms/decode step", f"{r['rollout_ratio_to_raw']:.3f}",
             f"{r['rollout_ours_ms_per_decode_step']:.2f}"),
            ("rollout with log-probs (s), cost", f"{r['rollout_ours_logprobs_s']:.3f}",
             f"{r['logprobs_cost_s']:+.3f}"),
            ("GPU busy share of a generate", f"{r['profile_gpu_busy_share']:.2f}", ""),
            ("samples/s at 64 / 256", f"{r['scaling_64_samples_per_s']:.1f}",
             f"{r['scaling_256_samples_per_s']:.1f}"),
            ("samples/s at 1024", f"{r['scaling_1024_samples_per_s']:.1f}", ""),
            ("train phase (s), MFU", f"{r['train_s']:.3f}", f"{r['train_mfu']:.1%}"),
            ("sync awake / from sleep (s)", f"{r['sync_s']:.3f}",
             f"{r['sync_from_sleep_s'] or 0:.3f}")]
    print(f"\n{args.shape} on {r['device']} (bf16 peak {r['peak_bf16_tflops']:.0f} TFLOP/s), "
          f"plan: {json.dumps({k: (r['plan'] or {}).get(k) for k in ('optim', 'sleep', 'gradient_checkpointing', 'micro_batch_tokens')})}")  # noqa: E501
    for name, a, b in rows:
        print(f"  {name:<40} {a:>10} {b:>10}")
    print("  top kernels (ms):", r["profile_top_kernels"])
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
