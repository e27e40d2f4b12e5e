#!/usr/bin/env python
"""Train-phase sweep without vLLM: micro-batch size x gradient checkpointing, per model shape.

    python bench/bench_train.py --shape 3B --configs 8:1 16:1 16:0 --out train_3B.json

For each config: the step's old log-probs (no grad) and one clipped-loss update (forward,
backward, AdamW on fp32 master weights with bf16 autocast) on 64 samples = 32 MATH prompts x 2
responses of 512 tokens. Prints time, tokens/s, MFU (6 * params * forward tokens / update time /
measured bf16 peak) and the peak memory of the training side alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_gpu import measured_bf16_peak_tflops, now  # noqa: E402
from bench.models import build_random_qwen, math_texts  # noqa: E402
from rlvr.config import Config  # noqa: E402
from rlvr.data import load_subset  # noqa: E402
from rlvr.experiment import encode_problems  # noqa: E402
from rlvr.modeling import load_policy, load_tokenizer  # noqa: E402
from rlvr.objectives import compute_advantages  # noqa: E402
from rlvr.training import (  # noqa: E402
    UpdateBatch,
    compute_old_logprobs,
    make_optimizer,
    policy_update,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=("0.5B", "1.5B", "3B"))
    ap.add_argument("--configs", nargs="+", default=["8:1", "16:0", "32:0"],
                    help="micro_batch_size:gradient_checkpointing(0/1)")
    ap.add_argument("--data_dir", default="data/math_subset")
    ap.add_argument("--model_root", default="/tmp/rlvr_models")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = torch.device("cuda")
    model_dir = build_random_qwen(args.shape, Path(args.model_root) / args.shape,
                                  math_texts(args.data_dir))
    tok = load_tokenizer(str(model_dir))
    train = encode_problems(load_subset(args.data_dir, "train"), tok, Config())
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in train.prompt_ids[:32] for _ in range(2)]
    responses = [torch.randint(0, 30000, (512,), generator=g).tolist() for _ in prompts]
    correct = torch.tensor([float(i % 3 == 0) for i in range(64)])
    adv, keep = compute_advantages(correct, "W_REINFORCE", 0.1, 2)
    batch = UpdateBatch(prompts, responses, adv, keep)
    fwd_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    peak = measured_bf16_peak_tflops()
    results = {"shape": args.shape, "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d"), "peak_bf16_tflops": peak,
               "fwd_tokens": fwd_tokens, "configs": []}
    policy = None
    for spec in args.configs:
        mb, gc = (int(x) for x in spec.split(":"))
        del policy
        torch.cuda.empty_cache()
        policy = load_policy(str(model_dir), cuda, gradient_checkpointing=bool(gc))
        n_params = sum(p.numel() for p in policy.parameters())
        opt = make_optimizer(policy, 1e-6, 0.01)
        torch.cuda.reset_peak_memory_stats()
        t_old, t_upd = [], []
        try:
            for _ in range(args.reps + 1):
                t0 = now()
                old, _ = compute_old_logprobs(policy, batch, 1.0, mb, tok.pad_token_id, cuda)
                t1 = now()
                policy_update(policy, opt, batch, old, temperature=1.0, clip_range=0.2,
                              mini_batch_size=64, micro_batch_size=mb, max_grad_norm=1.0,
                              pad_id=tok.pad_token_id, device=cuda, generator=g)
                t_old.append(t1 - t0)
                t_upd.append(now() - t1)
        except torch.OutOfMemoryError:
            results["configs"].append({"micro_batch_size": mb, "grad_ckpt": gc, "oom": True})
            print(f"{args.shape} mb={mb} gc={gc}: out of memory", flush=True)
            del opt
            continue
        old_s, upd_s = statistics.median(t_old[1:]), statistics.median(t_upd[1:])
        r = {"micro_batch_size": mb, "grad_ckpt": gc, "params": n_params, "old_logprob_s": old_s,
             "update_s": upd_s, "tok_s": fwd_tokens / (old_s + upd_s),
             "mfu_update": 6 * n_params * fwd_tokens / upd_s / (peak * 1e12),
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        results["configs"].append(r)
        print(f"{args.shape} mb={mb:<3} gc={gc}: old {old_s:.3f} s, update {upd_s:.3f} s, "
              f"MFU {r['mfu_update']:.1%}, peak {r['peak_gib']:.1f} GiB", flush=True)
        del opt
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
